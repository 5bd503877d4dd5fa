"""Packaging: the built-in models, suites and HRVs resolve in a checkout and in an installed wheel (through
importlib.resources), ``./suites`` of the working directory comes before the built-in suites, and a wheel built
from this tree carries fixtures, suites, HRVs and license files. The full install (fresh virtualenv, CLI from an
empty folder) is .ci/wheel_smoke.sh (`nox -s wheel`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from evalkit import resources
from evalkit.builtin_models import BUILTIN_MODELS
from evalkit.suites import SuiteError, find_suite, list_suites, suite_data
from evalkit.suites.loader import SUITES_DIR

ROOT = Path(__file__).resolve().parents[1]
#: What a wheel is built from (setup.py maps fixtures/ and suites/ into the package).
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "evalkit", "fixtures", "suites"]


def test_checkout_resolves_to_repo_folders() -> None:
    """In a source checkout (editable install) the built-ins are the repo's top-level folders, not copies."""
    assert resources.source_checkout() == ROOT
    assert resources.builtin_dir("fixtures") == ROOT / "fixtures"
    assert SUITES_DIR == ROOT / "suites"
    for name, path in BUILTIN_MODELS.items():
        assert path == ROOT / "fixtures" / name and (path / "model_index.json").is_file()


def _fake_install(root: Path) -> Path:
    """A site-packages-like folder with an ``evalkit`` package carrying packaged built-ins (no checkout around)."""
    pkg = root / "site-packages" / "evalkit"
    (pkg / "_fixtures" / "shapesworld").mkdir(parents=True)
    (pkg / "_fixtures" / "shapesworld" / "model_index.json").write_text("{}")
    (pkg / "_suites").mkdir()
    (pkg / "_suites" / "task-a.yaml").write_text("name: task-a\n")
    return pkg


def test_installed_layout_uses_package_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed: the package's ``_fixtures``/``_suites``; they win even over a checkout-looking parent folder."""
    pkg = _fake_install(tmp_path)
    monkeypatch.setattr(resources, "package_root", lambda: pkg)
    assert resources.source_checkout() is None
    assert resources.builtin_dir("fixtures") == pkg / "_fixtures"
    assert resources.builtin_dir("suites") == pkg / "_suites"
    for kind in ("fixtures", "suites"):  # a stray pyproject.toml, fixtures/, suites/ in site-packages change nothing
        (pkg.parent / kind).mkdir()
    (pkg.parent / "pyproject.toml").write_text("")
    assert resources.builtin_dir("fixtures") == pkg / "_fixtures"


def test_missing_builtins_name_the_packaged_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither packaged nor in a checkout: the path where they belong, for the error that follows."""
    pkg = tmp_path / "evalkit"
    pkg.mkdir()
    monkeypatch.setattr(resources, "package_root", lambda: pkg)
    assert resources.builtin_dir("suites") == pkg / "_suites"


def test_user_suites_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``./suites/NAME.yaml`` of the working directory shadows a built-in suite; its ``include: _defaults.yaml``
    falls back to the built-in one; both are listed; a path still works; an unknown name lists both folders."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "task-a.yaml").write_text("include: _defaults.yaml\nname: task-a\nmethods: [{name: norm}]\n")
    (tmp_path / "suites" / "mine.yaml").write_text("name: mine\n")
    assert find_suite("task-a") == Path("suites/task-a.yaml").resolve()
    assert find_suite("seed-control") == SUITES_DIR / "seed-control.yaml"
    data = suite_data("task-a")
    assert data["methods"] == [{"name": "norm"}] and data["model"] == "shapesworld"  # the built-in defaults
    assert {"mine", "task-a", "seed-control"} <= set(list_suites())
    assert find_suite(str(SUITES_DIR / "task-a.yaml")) == SUITES_DIR / "task-a.yaml"
    with pytest.raises(SuiteError, match="suites in .*suites and .*suites"):
        find_suite("no-such-suite")


def test_checkout_root_lists_each_suite_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the repo root ``./suites`` is the built-in folder: looked at once."""
    monkeypatch.chdir(ROOT)
    from evalkit.suites.loader import suite_dirs

    assert suite_dirs() == [SUITES_DIR]


def test_git_commit_outside_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed evalkit reports "unknown", not the commit of whatever repository holds its folder."""
    from evalkit.tracking import git_commit

    monkeypatch.setattr(resources, "package_root", lambda: _fake_install(tmp_path))
    assert git_commit() == "unknown"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(copy of this tree, wheel built from it): with the dev virtualenv's setuptools (~3 s) when it is new enough
    for pyproject.toml (>= 77, as torch requires), else in pip's isolated build environment."""
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    isolation = ["--no-build-isolation"] if int(version("setuptools").split(".")[0]) >= 77 else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                           "--disable-pip-version-check", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("evalkit-*.whl")
    return src, whl


def test_wheel_contents(built: tuple[Path, Path]) -> None:
    """Built-in models (without their build scripts), suites and their data, HRVs, LICENSE and the HRV NOTICE."""
    wheel = built[1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ["evalkit/_fixtures/shapesworld/model_index.json", "evalkit/_fixtures/shapesworld/hrv.json",
              "evalkit/_fixtures/shapesworld/unet/diffusion_pytorch_model.safetensors",
              "evalkit/_fixtures/tiny-sd/text_encoder/model.safetensors", "evalkit/_suites/_defaults.yaml",
              "evalkit/_suites/task-a.yaml", "evalkit/_suites/data/ae_animal_animal.txt", "evalkit/data/hrv_sd14.json",
              "evalkit/data/NOTICE-hrv_sd14.md", "evalkit/data/LICENSE-Apache-2.0.txt", "evalkit/resources.py"]:
        assert f in names, f
    tracked = {p.relative_to(ROOT / "fixtures").as_posix() for p in (ROOT / "fixtures").rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert {n.removeprefix("evalkit/_fixtures/") for n in names if n.startswith("evalkit/_fixtures/")} == tracked
    assert not [n for n in names if n.startswith(("evalkit/_fixtures/", "evalkit/_suites/")) and n.endswith(".py")]
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    for lic in ("LICENSE", "evalkit/data/NOTICE-hrv_sd14.md", "evalkit/data/LICENSE-Apache-2.0.txt"):
        assert f"{dist_info}/licenses/{lic}" in names, lic
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT AND Apache-2.0" in meta


PROBE = """
import json, evalkit
from evalkit.builtin_models import BUILTIN_MODELS
from evalkit.methods.hrv import HeadRelevance
from evalkit.resources import source_checkout
from evalkit.suites import find_suite, load_suite
from evalkit.suites.runner import code_version
from evalkit.suites.store import package_digest
from evalkit.tracking import git_commit
print(json.dumps({
    "evalkit": evalkit.__file__, "checkout": str(source_checkout()), "git": git_commit(),
    "models": {k: str(v) for k, v in BUILTIN_MODELS.items()},
    "has_index": all((v / "model_index.json").is_file() for v in BUILTIN_MODELS.values()),
    "task_a": str(find_suite("task-a")), "mine": str(find_suite("mine")), "mine_model": load_suite("mine").model,
    "hrv_sd14": len(HeadRelevance.load("sd14").heads), "hrv_shapes": len(HeadRelevance.load("shapesworld").heads),
    "code": code_version(), "digest": package_digest(),
}))
"""


def test_wheel_resolves_from_any_folder(built: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The unpacked wheel, imported from an empty folder (no checkout on the path): built-ins from the package,
    a user suite from ./suites that includes the built-in defaults, both HRVs, the code hashes, no git commit."""
    src, wheel = built
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    (work / "suites").mkdir(parents=True)
    (work / "suites" / "mine.yaml").write_text("include: _defaults.yaml\nname: mine\nmethods: [{name: daam}]\n"
                                               "metrics: [{name: iou}]\n")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    pkg = site / "evalkit"
    assert got["evalkit"] == str(pkg / "__init__.py") and got["checkout"] == "None" and got["git"] == "unknown"
    assert got["models"] == {k: str(pkg / "_fixtures" / k) for k in BUILTIN_MODELS} and got["has_index"]
    assert got["task_a"] == str(pkg / "_suites" / "task-a.yaml")
    assert got["mine"] == str(work / "suites" / "mine.yaml") and got["mine_model"] == "shapesworld"
    assert got["hrv_sd14"] == 128 and got["hrv_shapes"] > 0
    from evalkit.suites import runner, store

    for module in (runner, store):  # hash the sources the wheel was built from, as a checkout of them would
        monkeypatch.setattr(module, "PACKAGE", src / "evalkit")
    assert got["code"] == runner.code_version()  # the same sources hash the same installed or not: caches carry over
    assert got["digest"] == store.package_digest()
