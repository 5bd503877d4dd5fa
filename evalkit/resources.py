"""Where evalkit's built-in data lives, so that a source checkout and an installed wheel find the same things.

The repo keeps the built-in models in ``fixtures/`` and the shipped suites in ``suites/`` (top level, beside the
package). A wheel carries them as package data: ``setup.py`` maps ``fixtures/`` onto ``evalkit/_fixtures`` and
``suites/`` onto ``evalkit/_suites``. :func:`builtin_dir` answers with the packaged folder when it exists (an
installed wheel, found through :mod:`importlib.resources`) and with the checkout's folder otherwise (an editable
install or ``PYTHONPATH``), so edits to ``fixtures/`` and ``suites/`` take effect at once in development.

Kept free of heavy imports: model listings and cache keys use it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

Kind = Literal["fixtures", "suites"]

#: Repo folder -> the folder inside the installed package that a wheel carries it as (setup.py maps them).
PACKAGED_NAMES: dict[str, str] = {"fixtures": "_fixtures", "suites": "_suites"}


def package_root() -> Path:
    """The installed ``evalkit`` package folder (a real folder: diffusers loads models from paths, not streams)."""
    root = resources.files(__package__)
    if not isinstance(root, Path):  # a zipped install (zipimport): pip never installs wheels that way
        raise RuntimeError(f"evalkit must be installed as files on disk, not imported from an archive ({root})")
    return root


def source_checkout() -> Path | None:
    """The repo root when evalkit runs from a source checkout (editable install, ``PYTHONPATH``), else None."""
    root = package_root().parent
    if (root / "pyproject.toml").is_file() and (root / "fixtures").is_dir() and (root / "suites").is_dir():
        return root
    return None


def builtin_dir(kind: Kind) -> Path:
    """The folder of the built-in ``kind`` ("fixtures" or "suites"): the wheel's package data, else the checkout's
    top-level folder; the packaged path (absent) when neither exists, so that errors name where it belongs."""
    packaged = package_root() / PACKAGED_NAMES[kind]
    if packaged.is_dir():
        return packaged
    checkout = source_checkout()
    return checkout / kind if checkout is not None else packaged
