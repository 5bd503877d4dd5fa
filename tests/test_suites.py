"""Suites: loading with include:, errors with file:line and suggestions, claims, the case cache,
and an end-to-end run that is interrupted with kill -9 and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evalkit.suites import CaseCache, SuiteError, load_suite, parse_claim

TINY = """
include: base.yaml
name: tiny
methods:
  - name: daam
  - name: norm
metrics:
  - {name: miou-inf, params: {tau: 0.4}}
  - {name: relevance-mass}
expect:
  - daam.miou-inf_tau0.4 >= 0.0
  - norm.relevance-mass > 2.0
"""
BASE = """
model: tiny-sd
sampler: {steps: 2, guidance: 7.5, height: 64, width: 64}
data: {source: shapesworld, n: 3, seed: 0, size: 64}
options: {masks: reference}  # tiny-sd draws noise: score against the reference scenes' exact masks
min_n: 2  # a handful of words: decide claims anyway (the default asks for 10 items)
"""


def _write(tmp_path: Path, text: str = TINY, base: str = BASE) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    p = tmp_path / "tiny.yaml"
    p.write_text(text)
    return p


def test_shipped_suites_validate():
    from evalkit.suites import list_suites

    names = list_suites()
    assert "task-a" in names
    for name in names:
        load_suite(name)


def test_include_merges_defaults(tmp_path):
    spec = load_suite(str(_write(tmp_path)))
    assert spec.model == "tiny-sd" and spec.sampler.steps == 2 and spec.data.n == 3
    assert [m.label for m in spec.methods] == ["daam", "norm"]
    assert [m.label for m in spec.metrics] == ["miou-inf_tau0.4", "relevance-mass"]


@pytest.mark.parametrize(
    "bad,message",
    [
        (TINY.replace("  - name: norm", "  - nmae: norm"),
         r"tiny.yaml:6: unknown key 'methods.1.nmae'; did you mean 'name'"),
        (TINY.replace("name: norm", "name: nrom"),
         r"tiny.yaml:6: unknown attribution method 'nrom'; did you mean 'norm'"),
        (TINY.replace("name: relevance-mass", "name: relevance-mas"), r"tiny.yaml:9: unknown metric"),
        (TINY + "smapler: {steps: 3}\n", r"tiny.yaml:13: unknown key 'smapler'; did you mean 'sampler'"),
        (TINY.replace("norm.relevance-mass > 2.0", "nrm.relevance-mass > 2.0"),
         r"tiny.yaml:12: claim .* unknown method 'nrm'; did you mean 'norm'"),
        (TINY.replace("include: base.yaml", "include: nothere.yaml"), "include 'nothere.yaml' not found"),
        ("name: [unclosed", "not valid YAML"),
    ],
)
def test_malformed_suites_name_file_line_and_fix(tmp_path, bad, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(str(_write(tmp_path, bad)))


def test_unknown_suite_suggests():
    with pytest.raises(SuiteError, match="did you mean 'task-a'"):
        load_suite("task-aa")


def test_claims_parse_with_margins_and_reject_what_an_interval_cannot_decide():
    labels = {"methods": ["daam", "norm"], "metrics": ["miou-inf_tau0.4"]}
    c = parse_claim("norm.miou-inf_tau0.4 >= daam.miou-inf_tau0.4", labels)
    assert c.left.method == "norm" and c.left.metric == "miou-inf_tau0.4" and c.op == ">="
    m = parse_claim("norm.miou-inf_tau0.4 >= daam.miou-inf_tau0.4 - 0.02", labels)
    assert (m.right.method, m.right.offset) == ("daam", -0.02) and str(m.right) == "daam.miou-inf_tau0.4 - 0.02"
    t = parse_claim("daam.miou-inf_tau0.4 > 0.45", labels)
    assert t.right.constant == 0.45
    with pytest.raises(ValueError, match="LEFT OP RIGHT"):
        parse_claim("norm.miou-inf_tau0.4", labels)
    with pytest.raises(ValueError, match="two claims with margins"):
        parse_claim("norm.miou-inf_tau0.4 == daam.miou-inf_tau0.4", labels)
    with pytest.raises(ValueError, match="did you mean 'daam'"):
        parse_claim("norm.miou-inf_tau0.4 >= dam.miou-inf_tau0.4 - 0.02", labels)
    with pytest.raises(ValueError, match="one side must be METHOD.METRIC"):
        parse_claim("0.3 > 0.2", labels)


def test_cache_is_atomic_checksummed_and_safe(tmp_path):
    cache = CaseCache(tmp_path)
    key = "ab" + "0" * 62
    d = cache.store(key, {"case.json": {"a": 1}, "maps.npz": {"x": np.ones(3, np.float32)},
                          "image.png": Image.new("RGB", (4, 4))})
    assert cache.load(key) == d
    (d / "maps.npz").write_bytes(b"garbage")
    assert cache.load(key) is None and not d.exists()  # corrupt entry detected and removed
    with pytest.raises(ValueError, match="only"):
        cache.store(key, {"state.pkl": b"x"})
    assert not list(tmp_path.glob("ab/.tmp-*"))  # no half-written folders left behind


def _run(tmp_path, suite, *extra, env=None):
    cmd = [sys.executable, "-m", "evalkit.cli", "run", str(suite), "--cache-dir", str(tmp_path / "cache"),
           "--reports-dir", str(tmp_path / "reports"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--quiet", *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def test_run_kill9_resume_same_numbers_no_duplicate_runs(tmp_path, tiny_pipe):
    suite = _write(tmp_path, base=BASE.replace("steps: 2", "steps: 12"))  # slow enough cases to kill mid-run
    # interrupted run: kill -9 as soon as the first case is in the cache
    proc = _run(tmp_path, suite)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "cache").glob("??/*/entry.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "cache").glob("??/*/entry.json")))
    assert 1 <= done_before < 3
    # resume: completes, exit 1 because one claim is written to fail
    proc = _run(tmp_path, suite)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, out
    assert f"3 cases ({3 - done_before} computed)" in out
    assert "PASSED daam.miou-inf_tau0.4 >= 0.0" in out and "FAILED norm.relevance-mass > 2.0" in out
    # a rerun recomputes nothing and logs into the same MLflow runs
    proc = _run(tmp_path, suite)
    out2, _ = proc.communicate(timeout=400)
    assert "3 cases (0 computed)" in out2
    # same numbers as an uninterrupted run in a fresh cache (in-process, same pipeline weights)
    from evalkit.suites import result_rows, run_suite

    fresh = run_suite(load_suite(str(suite)), cache_dir=tmp_path / "fresh", progress=False, pipe=tiny_pipe)
    reports = sorted((tmp_path / "reports" / "tiny").glob("*/results.json"))
    a = json.loads(reports[-1].read_text())["rows"]
    b = result_rows(fresh)
    assert [(r["method"], r["metric"], round(r["value"], 6)) for r in a] == \
        [(r["method"], r["metric"], round(r["value"], 6)) for r in b]
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("evalkit/tiny")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("evalkit.role") == "suite")  # one parent, one per method
    assert sorted(r.info.run_name for r in runs if r is not parent) == ["daam", "norm"] and len(runs) == 3
    assert parent.info.run_name.startswith("tiny | tiny-sd | n=3 | ")  # what tells suite runs apart
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.metrics["norm/miou-inf_tau0.4"] == pytest.approx(next(
        r["value"] for r in a if r["method"] == "norm" and r["metric"] == "miou-inf_tau0.4"))
    assert "FAILED norm.relevance-mass > 2.0" in parent.data.tags["mlflow.note.content"]
    child = next(r for r in runs if r.info.run_name == "norm")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.metrics["miou-inf_tau0.4"] == pytest.approx(next(
        r["value"] for r in a if r["method"] == "norm" and r["metric"] == "miou-inf_tau0.4"))
    history = client.get_metric_history(child.info.run_id, "miou-inf_tau0.4")
    assert len(history) == 1  # resumed and repeated invocations did not log duplicate points
    assert {"suite", "model", "git_commit", "evalkit_version"} <= set(parent.data.tags)
    arts = [f.path for f in client.list_artifacts(parent.info.run_id)]
    assert "report.md" in arts and any(a.startswith("overlays") and a.endswith(".png") for a in arts)
    report = reports[-1].parent
    assert (report / "report.html").is_file() and "## Claims" in (report / "report.md").read_text()


def test_cli_run_input_errors_exit_2(tmp_path):
    suite = _write(tmp_path)
    proc = _run(tmp_path, suite, "--methods", "daaam")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "did you mean 'daam'" in out
    proc = _run(tmp_path, tmp_path / "missing.yaml")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no suite" in out


def test_shapesworld_ground_truth_comes_from_the_generated_image():
    """On a rendered reference scene the segmentation-based masks reproduce the exact masks."""
    from evalkit.items import load_items
    from evalkit.shapesworld import dataset
    from evalkit.suites.schema import DataSpec

    items = load_items(DataSpec(n=8, seed=3))
    scenes = dataset(8, 3, size=64)
    ious = []
    for item, scene in zip(items, scenes):
        got = item.ground(scene.image)
        assert set(got) == set(item.masks)
        for w, ref in item.masks.items():
            ious.append((got[w] & ref).sum() / max((got[w] | ref).sum(), 1))
    assert np.mean(ious) > 0.95 and min(ious) > 0.8
    blank = items[0].ground(np.full((64, 64, 3), 240, np.uint8))
    assert all(not m.any() for m in blank.values())  # nothing drawn: empty masks (excluded when scored)


def test_changing_the_mask_source_invalidates_cached_cases(tmp_path, tiny_pipe):
    from evalkit.suites import run_suite

    spec = load_suite(str(_write(tmp_path)))
    first = run_suite(spec, cache_dir=tmp_path / "c", progress=False, pipe=tiny_pipe)
    again = run_suite(spec, cache_dir=tmp_path / "c", progress=False, pipe=tiny_pipe)
    other = run_suite(spec.model_copy(update={"options": {"masks": "generated"}}), cache_dir=tmp_path / "c",
                      progress=False, pipe=tiny_pipe)
    assert (first.n_computed, again.n_computed, other.n_computed) == (3, 0, 3)


def test_methods_filter_selects_variants_of_protocol_suites_and_their_claims():
    from evalkit.suites import select_methods

    spec = select_methods(load_suite("head-removal"), ["none", "top-5"])
    assert [v.id for v in spec.variants] == ["none", "top-5"]
    assert spec.expect == ["none.specificity > top-5.specificity"]  # claims about random-5 are dropped
    with pytest.raises(SuiteError, match="no variant 'top5'; did you mean 'top-5'"):
        select_methods(load_suite("head-removal"), ["top5"])
    task = select_methods(load_suite("task-a"), ["daam", "hrv-30"])
    assert [m.label for m in task.methods] == ["daam", "hrv-30"]
    assert task.expect == ["daam.miou-inf_tau0.4 > 0.2", "hrv-30.miou-inf_tau0.4 >= daam.miou-inf_tau0.4"]


def test_method_subsets_and_added_methods_rescore_from_the_cache(tmp_path, tiny_pipe, capsys):
    """Each method's maps are a cache entry of their own: a subset of methods after a full run computes
    nothing; an added method generates only for itself and leaves the cached methods' numbers alone; a
    flipped byte in an entry is noticed, counted and recomputed to the same result."""
    from evalkit.suites import run_suite, select_methods

    spec = load_suite(str(_write(tmp_path)))
    full = run_suite(spec, cache_dir=tmp_path / "c", progress=False, pipe=tiny_pipe)
    subset = run_suite(select_methods(spec, ["daam"]), cache_dir=tmp_path / "c", progress=False, pipe=None)
    assert (full.n_computed, subset.n_computed) == (3, 0)  # pipe=None: nothing was even loaded
    key = ("daam", "miou-inf_tau0.4")
    assert subset.results[key].per_sample == full.results[key].per_sample
    # a new method reading statistics the stored traces hold: re-scored from them, nothing generated
    grown = spec.model_copy(update={"methods": [*spec.methods, spec.methods[0].model_copy(
        update={"name": "raw-attn"})]})
    more = run_suite(grown, cache_dir=tmp_path / "c", progress=False, pipe=None)
    assert (more.n_computed, more.n_rescored) == (0, 3)
    assert more.results[("norm", "relevance-mass")].per_sample == full.results[("norm", "relevance-mass")].per_sample
    # ... and its maps are the ones a fresh generation gives (same bytes)
    fresh = run_suite(grown.model_copy(update={"store_traces": False}), cache_dir=tmp_path / "fresh",
                      progress=False, pipe=tiny_pipe)
    for a, b in zip(more.map_dirs, fresh.map_dirs):
        with np.load(a["raw-attn"] / "maps.npz") as za, np.load(b["raw-attn"] / "maps.npz") as zb:
            assert za.files == zb.files and all(np.array_equal(za[w], zb[w]) for w in za.files)
    assert not (tmp_path / "fresh" / "traces").exists()  # store_traces: false keeps no traces
    # a method reading a statistic no stored trace holds: generated, and the trace now holds both
    needs_more = spec.model_copy(update={"methods": [*spec.methods, spec.methods[0].model_copy(
        update={"name": "norm-sq"})]})
    sq = run_suite(needs_more, cache_dir=tmp_path / "c", progress=False, pipe=tiny_pipe)
    assert (sq.n_computed, sq.n_rescored) == (3, 0)
    from evalkit.trace import Trace

    stored = CaseCache(tmp_path / "c" / "traces").load(sq.cases[0].key)
    assert Trace.stored_stats(stored) == {"attn", "norm", "norm_sq"}
    # corrupt one maps entry: a one-line notice, counted, recomputed, same numbers
    target = full.map_dirs[1]["norm"] / "maps.npz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    capsys.readouterr()
    again = run_suite(spec, cache_dir=tmp_path / "c", progress=False, pipe=tiny_pipe)
    notice = capsys.readouterr().err
    assert "is corrupt (checksum mismatch); recomputing it" in notice and again.n_corrupt == 1
    assert (again.n_computed, again.n_rescored) == (0, 1)  # its case's stored trace serves it
    assert again.results[("norm", "relevance-mass")].per_sample == full.results[("norm", "relevance-mass")].per_sample


def test_store_traces_auto_skips_large_traces_and_says_so(tmp_path, tiny_pipe, capsys, monkeypatch):
    """``store_traces: auto`` keeps traces up to a size limit; above it, one notice names the setting."""
    from evalkit.suites import run_suite, runner

    spec = load_suite(str(_write(tmp_path)))
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"n": 1})})
    monkeypatch.setattr(runner, "TRACE_AUTO_LIMIT_MB", 0.0)
    capsys.readouterr()
    run_suite(spec, cache_dir=tmp_path / "c", progress=False, pipe=tiny_pipe)
    err = capsys.readouterr().err
    assert err.count("traces are not cached") == 1 and "store_traces: true" in err
    assert not (tmp_path / "c" / "traces").exists()
    kept = run_suite(spec.model_copy(update={"store_traces": True}), cache_dir=tmp_path / "k", progress=False,
                     pipe=tiny_pipe)
    assert CaseCache(tmp_path / "k" / "traces").load(kept.cases[0].key) is not None
