"""First contact: bad inputs fail before anything is generated or written, with one line and the
right exit code (2 bad input, 3 environment or internal error); `evalkit attribute` with its default
methods works on every built-in model."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalkit.cli import main
from evalkit.methods import AttributionMethod, register_method

BASE = """
name: pv
model: tiny-sd
sampler: {steps: 1, guidance: 1.0, height: 64, width: 64}
data: {source: shapesworld, n: 1, seed: 0, size: 64}
options: {masks: reference}
methods: [{name: daam}]
metrics: [{name: miou-inf, params: {tau: 0.4}}]
"""


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _nothing_written(root: Path) -> bool:
    return sorted(p.name for p in root.iterdir()) == sorted(["suite.yaml"])


ATTRIBUTE_BAD = [
    (["--steps", "0"], 2, "--steps must be >= 1"),
    (["--steps", "-3"], 2, "--steps must be >= 1"),
    (["--guidance", "-3"], 2, "--guidance must be >= 0"),
    (["--prompt", ""], 2, "--prompt is empty"),
    (["--height", "60"], 2, "--height must be a positive multiple of 8"),
    (["--words", "bird,dragon"], 2, "word 'dragon' is not in the prompt"),
    (["--prompt", " ".join(["a red bird"] * 40)], 2, "CLI: --truncate"),
    (["--methods", "hrv-selective"], 2, "no head relevance vectors are known for model 'tiny-sd'"),
    (["--methods", "daam", "--param", "daam.k=3"], 2, "--param daam.k=3: method 'daam'"),
    (["--methods", "dam"], 2, "did you mean 'daam'"),
    (["--model", "shapesworld", "--methods", "hrv-selective", "--param", "hrv-selective.k=abc"], 2,
     "--param hrv-selective.k=abc: method 'hrv-selective' with"),
    (["--scheduler", "ddimm"], 2, "unknown scheduler 'ddimm'"),
]


@pytest.mark.parametrize("extra,code,message", ATTRIBUTE_BAD, ids=[" ".join(a)[:40] for a, _, _ in ATTRIBUTE_BAD])
def test_attribute_bad_inputs_fail_before_generating(tmp_path, capsys, extra, code, message):
    out = tmp_path / "out"
    args = ["attribute", "--model", "tiny-sd", "--prompt", "a red bird", "--out", str(out), "--steps", "1",
            "--height", "64", "--width", "64"]
    got, err = _run(capsys, *args, *extra)
    assert got == code and message in err and "\n" not in err, err
    assert not out.exists()


def test_attribute_without_cuda_is_an_environment_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    got, err = _run(capsys, "attribute", "--prompt", "a red bird", "--out", str(tmp_path / "o"), "--device", "cuda")
    assert got == 3 and "CUDA is not available" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("model,expected", [("tiny-sd", {"daam", "raw-attn", "norm"}),
                                            ("tiny-sd2", {"daam", "raw-attn", "norm", "hrv-selective"}),
                                            ("tiny-sdxl", {"daam", "raw-attn", "norm", "hrv-selective"}),
                                            ("shapesworld", {"daam", "raw-attn", "norm", "hrv-selective"})])
def test_attribute_default_methods_work_on_every_builtin_model(tmp_path, capsys, model, expected):
    out = tmp_path / "out"
    code = main(["attribute", "--model", model, "--prompt", "a red circle", "--words", "circle", "--out", str(out),
                 "--steps", "1", "--height", "64", "--width", "64"])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.stem for p in out.glob("*.npz")} == expected
    if "hrv-selective" not in expected:
        assert "hrv-selective skipped: no head relevance vectors are known for 'tiny-sd'" in printed


SUITE_BAD = [
    ("tau: 0.4}", "tua: 0.4}", "metric 'miou-inf' has no parameter 'tua'; did you mean 'tau'?"),
    ("tau: 0.4}", "tau: 7}", "tau=7 must lie in [0, 1]"),
    ("methods: [{name: daam}]", "methods: [{name: hrv-selective, params: {hrv: sd14}}]",
     "does not match model 'tiny-sd' (62 attn2 heads)"),
    ("sampler: {steps: 1", "sampler: {scheduler: ddimm, steps: 1", "did you mean 'ddim'?"),
    ("guidance: 1.0", "guidance: -3", "greater than or equal to 0"),
    ("data: {source: shapesworld,", "data: {source: coco, path: nothere.json,", "data.path 'nothere.json' does not"),
    ("methods: [{name: daam}]", "methods: [{name: daam, params: {layers: up}}]", "has no parameter(s) ['layers']"),
]


@pytest.mark.parametrize("old,new,message", SUITE_BAD, ids=[n[:30] for _, n, _ in SUITE_BAD])
def test_validate_and_run_reject_what_would_fail_after_generating(tmp_path, capsys, monkeypatch, old, new, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite.yaml").write_text(BASE.replace(old, new))
    for argv in (["validate", "suite.yaml"], ["run", "suite.yaml", "--quiet"]):
        got, err = _run(capsys, *argv)
        assert got == 2 and message in err and "\n" not in err, err
    assert _nothing_written(tmp_path)


RUN_BAD = [
    (["--limit", "0"], {}, 2, "--limit must be >= 1"),
    (["--limit", "-1"], {}, 2, "--limit must be >= 1"),
    ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, 3, "MLflow tracking server http://127.0.0.1:9 does not answer"),
    (["--reports-dir", "suite.yaml/reports"], {}, 3, "reports folder 'suite.yaml/reports' is not writable"),
    (["--cache-dir", "suite.yaml/cache"], {}, 3, "cache folder 'suite.yaml/cache' is not writable"),
    (["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""}, 3, "CUDA is not available"),
]


@pytest.mark.parametrize("extra,env,code,message", RUN_BAD, ids=[m[:30] for _, _, _, m in RUN_BAD])
def test_run_bad_inputs_and_environment(tmp_path, capsys, monkeypatch, extra, env, code, message):
    import torch

    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "suite.yaml").write_text(BASE)
    got, err = _run(capsys, "run", "suite.yaml", "--quiet", *extra)
    assert got == code and message in err and "\n" not in err, err
    assert _nothing_written(tmp_path)


@register_method("broken-for-test")
class Broken(AttributionMethod):
    """Test method whose maps raise an unforeseen error (an internal error, exit code 3)."""

    needs = frozenset({"attn"})

    def token_maps(self, trace, positions):
        raise ZeroDivisionError("a bug inside a method")


def test_internal_error_is_one_line_exit_3_with_the_traceback_in_a_log(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite.yaml").write_text(BASE.replace("{name: daam}", "{name: broken-for-test}"))
    got, err = _run(capsys, "run", "suite.yaml", "--quiet", "--no-mlflow")
    assert got == 3 and err.startswith("evalkit: internal error: ZeroDivisionError: a bug inside a method")
    log = Path(err.rsplit("traceback in ", 1)[1].rstrip(")")).resolve()
    assert log.is_file() and log.parent == tmp_path / "reports" / "suite" / "errors"
    assert "Traceback" in log.read_text() and "token_maps" in log.read_text()


def test_every_shipped_suite_passes_the_preflight(tmp_path):
    from test_groundtruth_grounded_sam import save_tiny_grounded_sam

    from evalkit.preflight import check_suite
    from evalkit.suites import list_suites, load_suite

    names = list_suites()
    assert "task-a" in names
    dino, sam = save_tiny_grounded_sam(tmp_path)
    for name in names:
        spec = load_suite(name)
        if spec.ground_truth.grounded_sam:  # its hub models are not cached here: tiny local folders in their place
            spec = load_suite(name, {"ground_truth": {"detector": str(dino), "segmenter": str(sam)}})
        check_suite(spec)
