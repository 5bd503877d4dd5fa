"""Verdicts: the bootstrap intervals against scipy, the power figure and Holm's procedure against
statsmodels, the verdict rules on data whose truth is known, a suite whose truth is known by
construction (a method = DAAM + seeded noise), exit codes, per-item tables, ``evalkit compare``,
and the steering protocol's exclusions (no claim passes on unsteered images)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from evalkit import stats
from evalkit.methods import register_method
from evalkit.methods.daam import DAAM
from evalkit.suites import load_suite, run_suite
from evalkit.suites.claims import FAILED, INCONCLUSIVE, PASSED, Settings, judge, parse_claim

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# interval, power and correction against independent implementations
# ----------------------------------------------------------------------------------------------
def _row(values, keys=None, num=None, den=None):
    keys = keys or [f"i{k}" for k in range(len(values))]
    return stats.RowSample.build(keys, values, "pooled" if num is not None else "per-sample", num, den)


def test_paired_interval_matches_scipy_bootstrap():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.2, 40)
    b = a - 0.05 + rng.normal(0, 0.1, 40)
    comp = stats.compare_rows(_row(a), _row(b), n_resamples=50_000, seed=3)
    assert comp.diff == pytest.approx(a.mean() - b.mean(), abs=1e-12) and comp.paired and comp.n == 40
    ref = bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True, vectorized=True,
                    n_resamples=50_000, method="percentile", confidence_level=0.95, rng=np.random.default_rng(7))
    low, high = comp.interval(0.95)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert abs(low - ref.confidence_interval.low) < 0.03 * width
    assert abs(high - ref.confidence_interval.high) < 0.03 * width

    # pooled rows (ratio of sums), paired: scipy resamples the four columns together
    num_a, den_a = rng.integers(0, 50, 30).astype(float), rng.integers(50, 100, 30).astype(float)
    num_b, den_b = num_a * 0.8 + rng.integers(0, 5, 30), den_a
    comp = stats.compare_rows(_row(num_a / den_a, num=num_a, den=den_a), _row(num_b / den_b, num=num_b, den=den_b),
                              n_resamples=50_000, seed=3)
    assert comp.diff == pytest.approx(num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum())
    ref = bootstrap((num_a, den_a, num_b, den_b),
                    lambda w, x, y, z, axis: w.sum(axis) / x.sum(axis) - y.sum(axis) / z.sum(axis), paired=True,
                    vectorized=True, n_resamples=50_000, method="percentile", rng=np.random.default_rng(7))
    low, high = comp.interval(0.95)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert abs(low - ref.confidence_interval.low) < 0.03 * width
    assert abs(high - ref.confidence_interval.high) < 0.03 * width

    # one row against a number (threshold claims): the row's own percentile interval
    comp = stats.compare_rows(_row(a), None, 0.4, n_resamples=50_000, seed=3)
    ref = bootstrap((a,), np.mean, n_resamples=50_000, method="percentile", rng=np.random.default_rng(7))
    assert comp.interval(0.95)[0] + 0.4 == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)


def test_pairing_uses_shared_valid_items_only():
    a = _row([0.5, 0.6, math.nan, 0.9], keys=["x", "y", "z", "w"])
    b = _row([0.4, 0.1, 0.3], keys=["y", "x", "z"])
    comp = stats.compare_rows(a, b, n_resamples=1000)
    assert comp.n == 2 and comp.left == pytest.approx(0.55) and comp.right == pytest.approx(0.25)
    disjoint = stats.compare_rows(_row([0.2, 0.3], ["p", "q"]), _row([0.1, 0.2, 0.4], ["r", "s", "t"]),
                                  n_resamples=1000)
    assert not disjoint.paired and (disjoint.n_left, disjoint.n_right) == (2, 3)
    with pytest.raises(ValueError, match="unique"):
        _row([1, 2], keys=["a", "a"])


def test_power_figure_matches_statsmodels():
    from statsmodels.stats.power import TTestPower

    for es in (0.15, 0.3, 0.5, 0.8, 1.2):
        for alpha in (0.05, 0.0125):
            ref = TTestPower().solve_power(effect_size=es, alpha=alpha, power=0.8, alternative="two-sided")
            assert stats.n_for_power(es, alpha) == math.ceil(ref - 1e-9)
            assert stats.t_test_power(es, 25, alpha) == pytest.approx(
                TTestPower().power(effect_size=es, nobs=25, alpha=alpha, alternative="two-sided"), abs=1e-9)
    assert stats.n_for_power(0.0) is None


def test_holm_levels_decide_as_statsmodels_multipletests():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.06, rng.integers(1, 8)).tolist()
        levels = stats.holm_levels(p, 0.05, lambda i, level, p=p: p[i] <= level)
        ours = [p[i] <= levels[i] for i in range(len(p))]
        assert ours == list(multipletests(p, alpha=0.05, method="holm")[0])


# ----------------------------------------------------------------------------------------------
# verdict rules on data whose truth is known
# ----------------------------------------------------------------------------------------------
LABELS = {"methods": ["good", "bad", "same", "few", "gone"], "metrics": ["m"]}


def _rows_known():
    rng = np.random.default_rng(5)
    base = rng.uniform(0.3, 0.7, 200)
    keys = [f"k{i}" for i in range(200)]
    return {("good", "m"): _row(base + 0.1 + rng.normal(0, 0.02, 200), keys),
            ("bad", "m"): _row(base, keys),
            ("same", "m"): _row(base + rng.normal(0, 0.05, 200), keys),
            ("few", "m"): _row(base[:5] + 0.3, keys[:5])}


def _judge(texts, rows=None, **settings):
    rows = rows or _rows_known()
    return judge([parse_claim(t, LABELS) for t in texts], rows, Settings(**settings))


def test_verdicts_intervals_margins_and_reasons():
    out = _judge(["good.m > bad.m", "bad.m > good.m", "same.m >= bad.m", "few.m > bad.m", "gone.m > bad.m",
                  "good.m > 0.5", "0.9 > good.m", "bad.m >= good.m - 0.15", "bad.m >= good.m - 0.05"])
    v = [o.verdict for o in out]
    assert v == [PASSED, FAILED, INCONCLUSIVE, INCONCLUSIVE, INCONCLUSIVE, PASSED, PASSED, PASSED, FAILED]
    good = out[0]
    assert good.n == 200 and good.paired and good.ci[0] > 0.09 and good.ci[1] < 0.11
    assert good.confidence > 0.95  # Holm: 9 claims, the first judged at 1 - 0.05 / 7 (7 testable)
    assert out[2].n_needed is not None and out[2].n_needed > 200 and "items for 80% power" in out[2].line()
    assert out[3].reason == "n=5 valid items < min_n=10" and out[3].n_needed is None
    assert "no values for gone.m" in out[4].reason
    assert out[6].left == 0.9 and out[6].diff > 0.25 and out[6].ci[0] > 0  # mirrored: 0.9 - good.m
    assert out[7].extra["margin"] == pytest.approx(-0.15) and "margin -0.1500" in out[7].line()
    line = out[0].line()
    assert line.startswith("PASSED good.m > bad.m") and "n=200" in line and "% CI" in line
    # the same claims decided again give identical outcomes (seeded resampling)
    again = _judge(["good.m > bad.m", "bad.m > good.m", "same.m >= bad.m", "few.m > bad.m", "gone.m > bad.m",
                    "good.m > 0.5", "0.9 > good.m", "bad.m >= good.m - 0.15", "bad.m >= good.m - 0.05"])
    assert [o.to_dict() for o in again] == [o.to_dict() for o in out]


def test_holm_correction_and_confidence_settings():
    texts = ["good.m > bad.m", "same.m >= bad.m"]
    none = _judge(texts, correction="none", confidence=0.9)
    holm = _judge(texts, confidence=0.9)
    assert [o.confidence for o in none] == pytest.approx([0.9, 0.9])
    # Holm, 2 claims: the smaller p is judged at alpha / 2, the next at alpha / 1
    assert holm[0].confidence == pytest.approx(0.95) and holm[1].confidence == pytest.approx(0.9)
    assert holm[0].ci[0] <= none[0].ci[0] and holm[0].ci[1] >= none[0].ci[1]  # wider at the first step
    # once a step is not decided, every later claim keeps that step's level
    three = _judge(["same.m >= bad.m", "good.m > bad.m", "bad.m >= same.m - 0.2"], confidence=0.9)
    assert [o.verdict for o in three] == [INCONCLUSIVE, PASSED, PASSED]
    assert three[1].confidence == pytest.approx(1 - 0.1 / 3)
    few = _judge(["few.m > bad.m"], min_n=5)
    assert few[0].verdict == PASSED


# ----------------------------------------------------------------------------------------------
# a suite whose truth is known by construction
# ----------------------------------------------------------------------------------------------
@register_method("noisy-daam")
class NoisyDAAM(DAAM):
    """Test method: DAAM's maps plus seeded uniform noise of ``scale`` times the map's maximum, so its
    maps localize worse than DAAM's by construction."""

    summary = "DAAM plus seeded noise (test method)"

    def __init__(self, scale: float = 0.03) -> None:
        self.scale = float(scale)

    def params(self) -> dict:
        return {"scale": self.scale}

    def token_maps(self, trace, positions):
        maps = super().token_maps(trace, positions)
        g = torch.Generator().manual_seed(zlib.crc32(f"{trace.prompt}|{list(positions)}".encode()))
        return maps + torch.rand(maps.shape, generator=g, dtype=maps.dtype) * self.scale * maps.amax()


TRUTH = """
name: truth
model: shapesworld
sampler: {scheduler: ddim, steps: 25, guidance: 4.0}
data: {source: shapesworld, n: 60, seed: 0, size: 64}
methods:
  - name: daam
  - {name: noisy-daam, id: noisy}
metrics:
  - {name: miou-inf, params: {tau: 0.4}}
expect:
  - daam.miou-inf_tau0.4 > noisy.miou-inf_tau0.4
  - noisy.miou-inf_tau0.4 > daam.miou-inf_tau0.4
min_n: 2
"""


def test_known_truth_passes_at_large_n_and_is_inconclusive_at_small_n(tmp_path):
    (tmp_path / "truth.yaml").write_text(TRUTH)
    spec = load_suite(str(tmp_path / "truth.yaml"))
    big = run_suite(spec, cache_dir=tmp_path / "cache", progress=False)
    small = run_suite(spec, cache_dir=tmp_path / "cache", progress=False, limit=3)
    assert small.n_computed == 0  # the first items are cached by the large run
    assert [c.verdict for c in big.claims] == [PASSED, FAILED]
    assert big.claims[0].n >= 100 and big.claims[0].ci[0] > 0
    assert small.claims[0].verdict == INCONCLUSIVE and 2 <= small.claims[0].n < 10
    assert small.claims[0].ci[0] < 0 < small.claims[0].ci[1] and small.claims[0].n_needed > small.claims[0].n
    # verdicts are reproduced exactly by a rerun (seeded resampling)
    again = run_suite(spec, cache_dir=tmp_path / "cache", progress=False)
    assert [c.to_dict() for c in again.claims] == [c.to_dict() for c in big.claims]


# ----------------------------------------------------------------------------------------------
# CLI: exit codes, summary, per-item tables, MLflow, compare
# ----------------------------------------------------------------------------------------------
CLI_SUITE = """
name: tiny-verdicts
model: tiny-sd
sampler: {steps: STEPS, guidance: 1.0, height: 64, width: 64}
data: {source: shapesworld, n: 3, seed: SEED, size: 64}
options: {masks: reference}
methods:
  - name: daam
  - name: raw-attn
metrics:
  - {name: miou-inf, params: {tau: 0.4}}
  - {name: miou80, params: {tau: 0.4}}
  - {name: relevance-mass}
expect:
  - daam.relevance-mass >= raw-attn.relevance-mass
"""


def _cli(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evalkit.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)


def _suite_file(tmp_path, name, steps=1, seed=0):
    p = tmp_path / f"{name}.yaml"
    p.write_text(CLI_SUITE.replace("STEPS", str(steps)).replace("SEED", str(seed)))
    return p


def test_cli_exit_codes_items_mlflow_and_compare(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--cache-dir", str(tmp_path / "cache"), "--reports-dir", str(tmp_path / "reports"),
              "--tracking-uri", uri, "--quiet"]
    a = _cli(tmp_path, "run", str(_suite_file(tmp_path, "a")), *common)
    # few items: the claim is INCONCLUSIVE (n < min_n), which does not fail a run unless --strict
    assert a.returncode == 0, a.stdout + a.stderr
    assert "0 passed, 1 inconclusive, 0 failed" in a.stdout
    assert "INCONCLUSIVE daam.relevance-mass >= raw-attn.relevance-mass" in a.stdout and "min_n=10" in a.stdout
    assert "word is not a COCO-80 class" in a.stdout  # miou80's exclusions are shown with their reason
    strict = _cli(tmp_path, "run", str(_suite_file(tmp_path, "a")), *common, "--strict")
    assert strict.returncode == 1 and "nothing recomputed" in strict.stdout

    report_a = sorted((tmp_path / "reports" / "tiny-verdicts").glob("*/items.csv"))[0].parent
    with (report_a / "items.csv").open() as f:
        items = list(csv.DictReader(f))
    n_words = len({r["item"] for r in items})
    assert len(items) == 2 * 3 * n_words  # every method x metric x item, excluded ones included
    not_coco = [r for r in items if r["metric"] == "miou80_tau0.4"]
    assert all(r["value"] == "" and r["excluded"] == "word is not a COCO-80 class" for r in not_coco)
    md = (report_a / "report.md").read_text()
    assert "## Excluded items" in md and "| INCONCLUSIVE |" in md and "items.csv" in md

    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("evalkit/tiny-verdicts")
    runs = {r.info.run_name.split(" | ")[0]: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["tiny-verdicts"]
    assert parent.data.metrics["claims_inconclusive"] == 1 and parent.data.metrics["claim0.verdict"] == 0
    assert "INCONCLUSIVE" in parent.data.tags["claim0"]
    assert "items.csv" in [f.path for f in client.list_artifacts(parent.info.run_id)]
    daam = runs["daam"].data.metrics
    assert math.isnan(daam["miou80_tau0.4"]) and daam["miou80_tau0.4.n_excluded"] == n_words  # NaN logged as NaN
    # re-logging into the same runs (stored result gone, cases cached) keeps their durations
    import shutil

    shutil.rmtree(tmp_path / "cache" / "suites")
    relog = _cli(tmp_path, "run", str(_suite_file(tmp_path, "a")), *common)
    assert relog.returncode == 0 and "3 cases (0 computed)" in relog.stdout
    again = client.get_run(parent.info.run_id)
    assert again.info.end_time == parent.info.end_time and len(client.search_runs([exp.experiment_id])) == 3

    # a second run of the same items (more steps) compares item by item
    b = _cli(tmp_path, "run", str(_suite_file(tmp_path, "b", steps=2)), *common)
    assert b.returncode == 0, b.stdout + b.stderr
    report_b = max((tmp_path / "reports" / "tiny-verdicts").glob("*/items.csv"), key=lambda p: p.stat().st_mtime)
    cmp = _cli(tmp_path, "compare", str(report_a), str(report_b.parent))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "relevance-mass" in cmp.stdout and "miou-inf_tau0.4" in cmp.stdout and f"│ {n_words} " in cmp.stdout
    by_id = _cli(tmp_path, "compare", parent.info.run_id, str(report_b.parent), "--tracking-uri", uri)
    assert by_id.returncode == 0 and by_id.stdout.count("relevance-mass") == cmp.stdout.count("relevance-mass")
    # runs over other items: refused in one line
    c = _cli(tmp_path, "run", str(_suite_file(tmp_path, "c", seed=99)), *common, "--no-mlflow")
    report_c = max((tmp_path / "reports" / "tiny-verdicts").glob("*/items.csv"), key=lambda p: p.stat().st_mtime)
    assert c.returncode == 0
    refused = _cli(tmp_path, "compare", str(report_a), str(report_c.parent))
    assert refused.returncode == 2 and "share no items" in refused.stderr and "Traceback" not in refused.stderr


def test_compare_pairs_items_and_values_against_a_direct_computation():
    from evalkit.reports.compare import compare_items

    a = [{"method": "daam", "metric": "m", "item": f"x{i}", "value": v, "numerator": None, "denominator": None,
          "reduction": "per-sample"} for i, v in enumerate([0.2, 0.4, 0.6, None])]
    b = [{**r, "value": (None if r["value"] is None else r["value"] - 0.1)} for r in a[::-1]]
    (d,) = compare_items(a, b, resamples=10_000)
    assert d.n == 3 and d.diff == pytest.approx(0.1) and d.ci == pytest.approx((0.1, 0.1))
    with pytest.raises(ValueError, match="no method.metric row in common"):
        compare_items(a, [{**r, "metric": "other"} for r in b])


# ----------------------------------------------------------------------------------------------
# steering: items that cannot be steered are excluded and counted, never scored as steered
# ----------------------------------------------------------------------------------------------
STEER_TINY = {"model": "tiny-sd", "sampler": {"steps": 1, "guidance": 1.0, "height": 64, "width": 64},
              "data": {"n": 3, "n_objects": 1, "phrasing": "plain"}, "min_n": 2}


def _foreign_hrv(pipe, path):
    """An HRV file with tiny-sd's heads whose concepts list none of ShapesWorld's words."""
    from evalkit.methods import HeadRelevance
    from evalkit.trace import find_cross_attention_layers

    heads = tuple(n for info, _ in find_cross_attention_layers(pipe.unet) for n in info.head_names())
    HeadRelevance(model="tiny-sd", heads=heads, vectors={"Animals": tuple([1.0] * len(heads))},
                  words={"Animals": ("cat", "dog")}).save(path)
    return path


def test_steering_excludes_unsteerable_items_and_no_claim_passes_on_unsteered_images(tiny_pipe, tmp_path):
    hrv = _foreign_hrv(tiny_pipe, tmp_path / "hrv.json")
    spec = load_suite("steering-adherence", {
        **STEER_TINY, "variants": [{"id": "none", "params": {"steering": "none"}},
                                   {"id": "hrv", "params": {"steering": "hrv", "hrv": str(hrv)}}],
        "metrics": [{"name": "checker-full-prompt", "id": "full-prompt"}, {"name": "checker-mos", "id": "mos"}],
        "expect": ["hrv.full-prompt >= none.full-prompt", "hrv.mos >= none.mos"]})
    result = run_suite(spec, cache_dir=tmp_path / "cache", progress=False, pipe=tiny_pipe)
    row = result.results[("hrv", "full-prompt")]
    assert (row.n, row.n_excluded) == (0, 3)
    assert all("not steerable: no concept of the HRV file" in why for why in row.reasons.values())
    assert result.results[("none", "full-prompt")].n == 3
    assert all(c.verdict == INCONCLUSIVE and "n=0" in c.reason for c in result.claims)
    assert not any((d / "hrv.png").exists() for d in result.case_dirs)  # nothing scored as steered

    # value steering: removing "dog" from "a cat,dog." merges ",." into one token, so S(h, i) is undefined
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat,dog.\na red circle\n")
    spec = load_suite("steering-adherence", {
        **STEER_TINY, "options": {"prompts": str(prompts)},
        "variants": [{"id": "none", "params": {"steering": "none"}},
                     {"id": "value", "params": {"steering": "value", "k": 2}}],
        "metrics": [{"name": "checker-full-prompt", "id": "full-prompt"}],
        "expect": ["value.full-prompt >= none.full-prompt"]})
    result = run_suite(spec, cache_dir=tmp_path / "cache", progress=False, pipe=tiny_pipe)
    reasons = result.results[("value", "full-prompt")].reasons
    assert "word 'dog' not steerable: cannot align tokens" in reasons["prompts-0/s0"]
    assert not (result.case_dirs[0] / "value.png").exists() and (result.case_dirs[1] / "value.png").exists()
    assert result.claims[0].verdict == INCONCLUSIVE


def test_untaggable_words_are_reported_not_tagged_x():
    from evalkit.analysis import try_pos_tags

    tags, missing = try_pos_tags("a cat!?dog!", ["cat", "dog", "a"])
    assert tags == {"a": "DET"} and set(missing) == {"cat", "dog"} and "spaCy did not find" in missing["dog"]
