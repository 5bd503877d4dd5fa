"""The store of finished suite invocations: what its key covers, and that an identical rerun is
read back without torch or MLflow while a changed input or a lost MLflow store runs again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evalkit.suites import suite_data
from evalkit.suites.store import BUILTIN_METHODS, BUILTIN_METRICS, invocation_key, mlflow_up_to_date

SUITE = """
name: tiny-store
model: tiny-sd
sampler: {steps: 2, guidance: 7.5, height: 64, width: 64}
data: {source: shapesworld, n: 2, seed: 0, size: 64}
options: {masks: reference}
methods:
  - name: daam
  - name: raw-attn
metrics:
  - {name: miou-inf, params: {tau: 0.4}}
expect:
  - daam.miou-inf_tau0.4 >= 0.0
min_n: 2
"""


def _suite(tmp_path: Path, text: str = SUITE) -> Path:
    p = tmp_path / "tiny-store.yaml"
    p.write_text(text)
    return p


def test_builtin_name_lists_match_the_registries():
    from evalkit.methods.registry import _REGISTRY as methods
    from evalkit.metrics.registry import _REGISTRY as metrics

    assert {n for n, c in methods.items() if c.__module__.startswith("evalkit.")} == BUILTIN_METHODS
    assert {n for n, c in metrics.items() if c.__module__.startswith("evalkit.")} == BUILTIN_METRICS


def test_invocation_key_covers_what_shapes_the_results(tmp_path):
    path = _suite(tmp_path)
    data = suite_data(str(path))
    key = invocation_key(data, limit=None, methods=None)
    assert key == invocation_key(suite_data(str(path)), limit=None, methods=None)  # stable
    assert key != invocation_key(data, limit=1, methods=None)
    assert key != invocation_key(data, limit=None, methods=["daam"])
    assert key != invocation_key(suite_data(str(path), {"sampler": {"steps": 3}}), limit=None, methods=None)
    # a data file is fingerprinted by content
    coco = tmp_path / "gt.json"
    coco.write_text("{}")
    with_file = {**data, "data": {"source": "coco", "path": str(coco)}}
    k1 = invocation_key(with_file, limit=None, methods=None)
    coco.write_text('{"images": []}')
    assert k1 != invocation_key(with_file, limit=None, methods=None)
    # so is any other file the suite names, e.g. an HRV file in a method's parameters
    hrv = tmp_path / "my-hrv.json"
    hrv.write_text("{}")
    with_hrv = {**data, "methods": [{"name": "hrv-selective", "params": {"hrv": str(hrv)}}]}
    k3 = invocation_key(with_hrv, limit=None, methods=None)
    hrv.write_text('{"heads": []}')
    assert k3 != invocation_key(with_hrv, limit=None, methods=None)
    # a plugin's source file is part of the key; an unknown plugin or method disables storing
    plugin = tmp_path / "my_plugin_mod.py"
    plugin.write_text("X = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        k2 = invocation_key(data, limit=None, methods=None, plugins=["my_plugin_mod"])
        plugin.write_text("X = 2\n")
        assert k2 != invocation_key(data, limit=None, methods=None, plugins=["my_plugin_mod"])
    finally:
        sys.path.remove(str(tmp_path))
    assert invocation_key(data, limit=None, methods=None, plugins=["no_such_module_xyz"]) is None
    unknown = {**data, "methods": [{"name": "not-a-registered-method"}]}
    assert invocation_key(unknown, limit=None, methods=None) is None


def test_a_method_registered_in_process_is_keyed_by_its_source(tmp_path):
    mod = tmp_path / "store_plugin_method.py"
    mod.write_text("from evalkit.methods import RawAttn, register_method\n\n"
                   "@register_method('store-test-raw')\nclass StoreTestRaw(RawAttn):\n    '''raw, renamed'''\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import store_plugin_method  # noqa: F401

        data = {**suite_data(str(_suite(tmp_path))), "methods": [{"name": "store-test-raw"}]}
        key = invocation_key(data, limit=None, methods=None)
        assert key is not None
        mod.write_text(mod.read_text() + "# changed\n")
        assert invocation_key(data, limit=None, methods=None) != key
    finally:
        sys.path.remove(str(tmp_path))


CHECK = ("import sys; from evalkit.cli import main; rc = main(sys.argv[1:]); "
         "print('IMPORTED', 'torch' in sys.modules, 'mlflow' in sys.modules); sys.exit(rc)")


def _cli(tmp_path: Path, suite: Path, *extra: str, check: bool = False) -> subprocess.CompletedProcess:
    args = ["run", str(suite), "--cache-dir", str(tmp_path / "cache"), "--reports-dir", str(tmp_path / "reports"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet", *extra]
    cmd = [sys.executable, "-c", CHECK, *args] if check else [sys.executable, "-m", "evalkit.cli", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _rows(tmp_path: Path) -> list[list[str]]:
    latest = sorted((tmp_path / "reports" / "tiny-store").glob("*/results.json"))[-1]
    return json.loads(latest.read_text())["rows"]


def test_identical_rerun_reads_the_store_without_torch_or_mlflow(tmp_path):
    suite = _suite(tmp_path)
    first = _cli(tmp_path, suite)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 cases (2 computed)" in first.stdout and "nothing recomputed" not in first.stdout
    rows = _rows(tmp_path)

    again = _cli(tmp_path, suite, check=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing recomputed" in again.stdout and "2 cases (0 computed)" in again.stdout
    assert "IMPORTED False False" in again.stdout  # neither torch nor mlflow was imported
    assert "PASSED daam.miou-inf_tau0.4 >= 0.0" in again.stdout
    verdicts = [ln for ln in first.stdout.splitlines() if ln.startswith(("PASSED", "FAILED", "INCONCLUSIVE"))]
    assert verdicts and verdicts == [ln for ln in again.stdout.splitlines()
                                     if ln.startswith(("PASSED", "FAILED", "INCONCLUSIVE"))]
    assert _rows(tmp_path) == rows  # a fresh report with the same table
    assert len(list((tmp_path / "reports" / "tiny-store").glob("*/report.md"))) >= 1

    state = tmp_path / "cache" / "mlflow-runs.json"
    mlflow_key = next(k for k in json.loads(state.read_text())["_complete"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow_up_to_date(uri, state, mlflow_key)
    # the MLflow store is lost: the next invocation logs again (cases come from the case cache)
    (tmp_path / "mlflow.db").unlink()
    assert not mlflow_up_to_date(uri, state, mlflow_key)
    relog = _cli(tmp_path, suite)
    assert relog.returncode == 0, relog.stdout + relog.stderr
    assert "nothing recomputed" not in relog.stdout and "2 cases (0 computed)" in relog.stdout
    assert mlflow_up_to_date(uri, state, mlflow_key)
    # a changed input is not served from the store
    changed = _cli(tmp_path, suite, "--methods", "daam", "--no-mlflow")
    assert changed.returncode == 0 and "nothing recomputed" not in changed.stdout
    assert [r for r in _rows(tmp_path) if r["method"] == "daam"] == [r for r in rows if r["method"] == "daam"]


def test_a_plugin_method_runs_in_a_suite_next_to_the_builtins_in_mlflow(tmp_path):
    """The README's flow: `evalkit --plugins up_attn run SUITE` with `- name: up-attn` in the suite."""
    suite = _suite(tmp_path, SUITE.replace("  - name: raw-attn", "  - name: up-attn"))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root / "examples")}
    cmd = [sys.executable, "-m", "evalkit.cli", "--plugins", "up_attn", "run", str(suite), "--cache-dir",
           str(tmp_path / "cache"), "--reports-dir", str(tmp_path / "reports"), "--tracking-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"]
    runs = [subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env) for _ in "ab"]
    for r in runs:
        assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing recomputed" not in runs[0].stdout and "nothing recomputed" in runs[1].stdout
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evalkit/tiny-store")
    found = {("tiny-store" if r.data.tags["evalkit.role"] == "suite" else r.info.run_name): r
             for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {"tiny-store", "daam", "up-attn"}
    parent = found["tiny-store"].info.run_id
    assert found["up-attn"].data.tags["mlflow.parentRunId"] == parent == found["daam"].data.tags["mlflow.parentRunId"]
    row = next(r for r in _rows(tmp_path) if r["method"] == "up-attn" and r["metric"] == "miou-inf_tau0.4")
    assert found["up-attn"].data.metrics["miou-inf_tau0.4"] == pytest.approx(row["value"])


def test_model_fingerprint_sees_retrained_weights_of_the_same_size(tmp_path):
    from evalkit.suites.store import model_fingerprint

    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    before = model_fingerprint(str(tmp_path))
    weights.write_bytes(b"\x01" * 64)  # same size, other values: a retrained model
    retrained = model_fingerprint(str(tmp_path))
    assert retrained != before
    (tmp_path / "MODEL_CARD.md").write_text("notes")  # documentation does not change the model
    assert model_fingerprint(str(tmp_path)) == retrained
