"""Method conformance kit: the invariants every attribution method must keep (one map per word on the
latent grid, finite float32, deterministic, independent of the other words, all occurrences and pieces
of a word used, only declared statistics read, maps that survive saving, every model family), checked on
the reference traces of evalkit's built-in models.

Run it with ``pytest --evalkit-method NAME`` (the pytest plugin :mod:`evalkit.conformance.plugin`) or
``evalkit check-method NAME``; see docs/conformance.md. The names below are imported on first use, so
that the pytest plugin, loaded in every pytest run, costs nothing until asked for."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckResult": "core",
    "Conformance": "runner",
    "INVARIANTS": "checks",
    "INVARIANT_NAMES": "checks",
    "check_method": "runner",
    "summarize": "runner",
    "FAMILIES": "families",
    "ModelFamily": "families",
    "all_models": "families",
    "import_plugins": "subject",
    "parse_params": "subject",
    "resolve_method": "subject",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
