"""MLflow as a user meets it: a tracking server on loopback, one small suite logged for two models (tiny-sd and
shapesworld), runs read back through the REST API, and the UI opened in headless Chromium: the runs table with
both suite runs and their method-prefixed headline metrics, the compare view lining the two models up, and a
method run's page. Server, suite and URLs come from docs/make_mlflow_screenshots.py, which makes the docs'
screenshots from the same setup."""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "make_mlflow_screenshots.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("EVALKIT_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (CI installs it and sets EVALKIT_REQUIRE_BROWSER)")


@pytest.fixture(scope="module")
def shots() -> Iterator[ModuleType]:
    """docs/make_mlflow_screenshots.py as a module (its server, suite, shared view and URL helpers)."""
    spec = importlib.util.spec_from_file_location("make_mlflow_screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def server(shots, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite store; stopped with its whole process group."""
    try:
        proc, url = shots.start_server(tmp_path_factory.mktemp("mlflow"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield url
    shots.stop_server(proc)


@pytest.fixture(scope="module")
def logged(shots, server, tiny_pipe, tmp_path_factory) -> dict[str, tuple]:
    """The suite run on each model and logged to the server: ``{model: (SuiteResult, run ids)}``; shapesworld is
    loaded by name (offline, a few seconds)."""
    root = tmp_path_factory.mktemp("suite")
    return {"tiny-sd": shots.log_model(server, root, "tiny-sd", pipe=tiny_pipe),
            "shapesworld": shots.log_model(server, root, "shapesworld")}


@pytest.fixture(scope="module")
def experiment(server, logged) -> dict:
    """The suite's experiment as the REST API returns it."""
    return _api(server, "experiments/get-by-name?experiment_name=evalkit/ui-check")["experiment"]


def _api(server: str, path: str, body: dict | None = None) -> dict:
    """One MLflow REST call (GET, or POST with a JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server}/api/2.0/mlflow/{path}", data=data,
                                 headers={"Content-Type": "application/json"}, method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _headline(result) -> dict[str, float]:
    """Each ``<method>/<metric>`` key of a suite run with its value."""
    from evalkit.tracking import metric_key

    return {f"{method}/{metric_key(metric)}": r.value for (method, metric), r in result.results.items()}


def _run_names(server: str, logged: dict) -> dict[str, str]:
    """The suite (parent) run's name per model."""
    return {model: _api(server, f"runs/get?run_id={ids['parent']}")["run"]["info"]["run_name"]
            for model, (_, ids) in logged.items()}


def _js_number(v: float) -> str:
    """A float as JavaScript's ``String(v)`` writes it (what the runs table shows): shortest round trip."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _ui_number(v: float) -> str:
    """A metric value as MLflow's compare view writes it (its ``Utils.formatMetric``): 3 decimals below 10,
    2 below 100, 1 above, 4 significant digits in exponent form below 0.001."""
    if v == 0:
        return "0"
    if abs(v) < 1e-3:
        mantissa, exp = f"{v:.3e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    scale = 1000 if abs(v) < 10 else 100 if abs(v) < 100 else 10
    return _js_number(math.floor(v * scale + 0.5) / scale)  # Math.round: halves go up


def _metric_rows(page: str) -> dict[str, list[str]]:
    """The compare view's metrics table as ``{key: [value per run, left to right]}``. MLflow draws it as two
    virtualized grids (keys, values) of absolutely placed cells, so one row is the cells sharing one ``top``."""
    start = page.index('aria-label="Metrics - Show diff only"')
    end = page.index(">Artifacts<", start)
    rows: dict[str, list[str]] = {}
    for top, cell in re.findall(r'<div[^>]*style="[^"]*\btop: ([\d.]+)px[^"]*"[^>]*>(.*?)</div>', page[start:end]):
        rows.setdefault(top, []).append(html.unescape(re.sub(r"<[^>]+>", "", cell)).strip())
    return {cells[0]: cells[1:] for cells in rows.values()}


@pytest.fixture
def dom(tmp_path):
    """Headless Chromium's DOM of a URL once the page has settled (20 s of virtual time), wide enough that the
    runs table's grid draws every column."""
    assert CHROMIUM is not None, "EVALKIT_REQUIRE_BROWSER is set but chromium is missing: apt-get install chromium"

    def load(url: str) -> str:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1000", "--virtual-time-budget=20000",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=False)
        return out.stdout

    return load


def test_runs_read_back_through_rest(server, logged, experiment):
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert len(runs) == 6  # per model: the suite run and one run per method
    for model, (result, ids) in logged.items():
        mine = [r for r in runs if {t["key"]: t["value"] for t in r["data"]["tags"]}["model"] == model]
        by_name = {r["info"]["run_name"].split(" | ")[0]: r for r in mine}  # the suite run: "ui-check | model | ..."
        assert set(by_name) == {"ui-check", "daam", "raw-attn"}
        parent = by_name["ui-check"]
        assert re.fullmatch(rf"ui-check \| {model} \| n=2 \| \d\d-\d\d \d\d:\d\d", parent["info"]["run_name"])
        daam = by_name["daam"]
        daam_tags = {t["key"]: t["value"] for t in daam["data"]["tags"]}
        assert daam_tags["mlflow.parentRunId"] == ids["parent"] == parent["info"]["run_id"]
        assert daam_tags["suite"] == "ui-check" and daam_tags["evalkit.role"] == "method"
        parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        assert parent_tags["evalkit.role"] == "suite" and model in parent_tags["mlflow.note.content"]
        expected = result.results[("daam", "miou-inf_tau0.4")].value
        assert {m["key"]: m["value"] for m in daam["data"]["metrics"]}["miou-inf_tau0.4"] == pytest.approx(expected)
        parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        for key, value in _headline(result).items():  # the suite run carries every method's headline number
            assert parent_metrics[key] == pytest.approx(value)
        params = {p["key"]: p["value"] for p in parent["data"]["params"]}
        assert params["sampler.steps"] == "1" and params["model"] == model


@needs_browser
def test_runs_table_shows_both_models_and_their_headline_metrics(shots, server, logged, experiment, dom):
    names = _run_names(server, logged)
    plain = dom(shots.runs_table_url(server, experiment["experiment_id"]))
    for name in names.values():  # with nothing set up: both suite runs (method runs are nested under them)
        assert html.escape(name) in plain, f"{name!r} not in the runs table"
    keys = list(_headline(logged["tiny-sd"][0]))
    share = shots.share_headline_view(server, experiment["experiment_id"], keys)
    shown = dom(shots.runs_table_url(server, experiment["experiment_id"], share))
    for name in names.values():
        assert html.escape(name) in shown, f"{name!r} not in the shared runs view"
    for key in keys:
        assert f">{key}<" in shown, f"no column {key!r} in the shared runs view"
    for model, (result, _) in logged.items():
        for key, value in _headline(result).items():
            assert f">{_js_number(value)}<" in shown, f"{model} {key} = {value!r} not in the shared runs view"


@needs_browser
def test_compare_view_lines_up_both_models(shots, server, logged, experiment, dom):
    names = _run_names(server, logged)
    order = list(logged)  # the runs in the URL's order: tiny-sd, shapesworld; the view's columns follow it
    page = dom(shots.compare_url(server, experiment["experiment_id"], [logged[m][1]["parent"] for m in order]))
    assert "Comparing 2 Runs from 1 Experiment" in page
    positions = [page.find(html.escape(names[m])) for m in order]
    assert -1 not in positions and positions == sorted(positions), f"run names missing or out of order: {names}"
    rows = _metric_rows(page)
    for key in _headline(logged["tiny-sd"][0]):
        expected = [_ui_number(_headline(logged[m][0])[key]) for m in order]
        assert rows.get(key) == expected, f"compare view row {key}: {rows.get(key)} != {expected} (rows: {rows})"


@needs_browser
def test_method_run_page_shows_its_metric(shots, server, logged, experiment, dom):
    result, ids = logged["tiny-sd"]
    value = result.results[("daam", "miou-inf_tau0.4")].value
    run_page = dom(f"{server}/#/experiments/{experiment['experiment_id']}/runs/{ids['daam']}")
    assert "daam" in run_page and "ui-check" in run_page and "miou-inf_tau0.4" in run_page
    shown = [f"{value:.4f}", f"{value:.3f}", f"{value:.2f}", str(round(value, 4))]
    assert any(s in run_page for s in shown), f"none of {shown} on the run page"


def test_ui_number_matches_mlflow_format_metric():
    """The compare view's number format, from MLflow's Utils.formatMetric."""
    values = (0.0, 0.0561434, 0.036635, 1.0, 12.346, 123.46, -0.5, -0.0625, 0.000123456)
    assert [_ui_number(v) for v in values] == ["0", "0.056", "0.037", "1", "12.35", "123.5", "-0.5", "-0.062",
                                               "1.235e-4"]
