"""MLflow as a user meets it: a tracking server on loopback, a suite logged to it, runs read back
through the REST API, and the UI opened in headless Chromium showing the runs and a metric value."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from evalkit.suites import load_suite, result_rows, run_suite
from evalkit.tracking import log_suite

SUITE = """
name: ui-check
model: tiny-sd
sampler: {steps: 1, guidance: 7.5, height: 64, width: 64}
data: {source: shapesworld, n: 2, seed: 0, size: 64}
options: {masks: reference}
methods: [{name: daam}, {name: raw-attn}]
metrics: [{name: miou-inf, params: {tau: 0.4}}]
expect: ["daam.miou-inf_tau0.4 >= 0.0"]
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite store; stopped with its whole process group."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def logged(server, tiny_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    (root / "ui-check.yaml").write_text(SUITE)
    spec = load_suite(str(root / "ui-check.yaml"))
    result = run_suite(spec, cache_dir=root / "cache", progress=False, pipe=tiny_pipe)
    report = root / "report.md"
    report.write_text("# ui-check\n")
    ids = log_suite(result, invocation_key="k", state_file=root / "runs.json", tracking_uri=server,
                    artifacts=[report], samples_table=result.samples)
    return result, ids


def _api(server: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_runs_read_back_through_rest(server, logged):
    result, ids = logged
    exp = _api(server, "experiments/get-by-name?experiment_name=evalkit/ui-check")["experiment"]
    runs = _api(server, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    by_name = {r["info"]["run_name"].split(" | ")[0]: r for r in runs}  # the suite run: "ui-check | model | ..."
    assert set(by_name) == {"ui-check", "daam", "raw-attn"}
    daam = by_name["daam"]
    tags = {t["key"]: t["value"] for t in daam["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == ids["parent"] and tags["suite"] == "ui-check"
    metrics = {m["key"]: m["value"] for m in daam["data"]["metrics"]}
    expected = next(r["value"] for r in result_rows(result) if r["method"] == "daam")
    assert metrics["miou-inf_tau0.4"] == pytest.approx(expected)
    params = {p["key"]: p["value"] for p in by_name["ui-check"]["data"]["params"]}
    assert params["sampler.steps"] == "1" and params["model"] == "tiny-sd"


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("EVALKIT_REQUIRE_BROWSER"),
                    reason="Debian's chromium is not installed (CI installs it and sets EVALKIT_REQUIRE_BROWSER)")
def test_ui_shows_runs_and_metric_in_headless_chromium(server, logged, tmp_path):
    assert CHROMIUM is not None, "EVALKIT_REQUIRE_BROWSER is set but chromium is missing: apt-get install chromium"
    result, ids = logged
    exp = _api(server, "experiments/get-by-name?experiment_name=evalkit/ui-check")["experiment"]
    value = next(r["value"] for r in result_rows(result) if r["method"] == "daam")

    def dom(url: str) -> str:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=False)
        return out.stdout

    listing = dom(f"{server}/#/experiments/{exp['experiment_id']}/runs")
    assert "ui-check" in listing  # the suite's parent run (method runs are nested under it)
    run_page = dom(f"{server}/#/experiments/{exp['experiment_id']}/runs/{ids['daam']}")
    assert "daam" in run_page and "ui-check" in run_page and "miou-inf_tau0.4" in run_page
    shown = [f"{value:.4f}", f"{value:.3f}", f"{value:.2f}", str(round(value, 4))]
    assert any(s in run_page for s in shown), f"none of {shown} on the run page"
