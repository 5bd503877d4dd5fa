"""The metric API: MetricResult, 95% CIs, reductions (per-sample vs pooled), NaN exclusion, the registry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evalkit.metrics import (
    Metric,
    MetricResult,
    UnknownMetricError,
    available_metrics,
    create_metric,
    get_metric_class,
    mean_ci95,
    pooled_ci95,
    register_metric,
)


def _pair(inter: int, union: int, gt: int) -> tuple[np.ndarray, np.ndarray]:
    """A 1 x union (pred, gt) pair with the given intersection and gt area (pred covers the rest)."""
    pred = np.zeros((1, union), bool)
    g = np.zeros((1, union), bool)
    g[0, :gt] = True
    pred[0, gt - inter : union] = True
    return pred, g


def test_mean_ci95_is_the_student_t_interval():
    from scipy import stats

    x = [0.2, 0.5, 0.9, 0.4, 0.7]
    mean, (lo, hi) = mean_ci95(x)
    ref_lo, ref_hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert mean == pytest.approx(np.mean(x))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))
    assert mean_ci95([0.3]) == (0.3, None)
    assert math.isnan(mean_ci95([])[0])
    assert mean_ci95([1.0, math.nan, 3.0])[0] == 2.0  # NaNs ignored


@pytest.mark.parametrize("hits", [0, 1, 2, 5])
def test_mean_ci95_of_hit_rates_is_the_wilson_interval(hits):
    from scipy import stats

    x = [1.0] * hits + [0.0] * (5 - hits)
    mean, (lo, hi) = mean_ci95(x)
    ref = stats.binomtest(hits, 5).proportion_ci(0.95, method="wilson")
    assert mean == hits / 5
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert 0.0 <= lo <= mean <= hi <= 1.0


def test_pooled_ci95_is_seeded_and_brackets_the_value():
    num, den = [1, 90, 5, 30], [2, 100, 20, 31]
    value, ci = pooled_ci95(num, den)
    assert value == pytest.approx(sum(num) / sum(den))
    assert ci is not None and ci[0] <= value <= ci[1]
    assert pooled_ci95(num, den) == (value, ci)  # fixed seed: reproducible
    assert pooled_ci95([1], [2]) == (0.5, None)


def test_reduction_per_sample_vs_pooled_iou_known_values():
    """Pairs with IoU 1/2 and 90/100: per-sample mean 0.7, pooled (1 + 90) / (2 + 100)."""
    samples = [_pair(1, 2, 2), _pair(90, 100, 95)]
    per = create_metric("iou")
    pooled = create_metric("iou", reduction="pooled")
    for pred, gt in samples:
        assert per.update(pred, gt) == pooled.update(pred, gt)
    r_per, r_pooled = per.compute(), pooled.compute()
    assert r_per.value == pytest.approx(0.7)
    assert r_pooled.value == pytest.approx(91 / 102)
    assert r_per.reduction == "per-sample" and r_pooled.reduction == "pooled"
    assert r_per.label == "iou_tau0.4" and r_pooled.label == "iou_reductionpooled_tau0.4"
    assert r_per.per_sample == r_pooled.per_sample == pytest.approx([0.5, 0.9])


def test_reduction_grounding_loss_mean_of_ratios_vs_ratio_of_means():
    per = create_metric("grounding-loss")
    pooled = create_metric("grounding-loss", reduction="pooled")
    for value, baseline in [(0.9, 1.0), (0.0, 0.2)]:
        per.update(value, baseline)
        pooled.update(value, baseline)
    assert per.compute().value == pytest.approx((0.1 + 1.0) / 2)
    assert pooled.compute().value == pytest.approx(1 - 0.9 / 1.2)


def test_nan_samples_are_excluded_and_counted():
    m = create_metric("iou", tau=0.5)
    heat = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert m.update(heat, np.array([[0, 1], [0, 0]])) == 1.0
    assert math.isnan(m.update(heat, np.zeros((2, 2), bool)))  # empty ground truth
    assert m.update(heat, np.array([[1, 1], [0, 0]])) == 0.5
    r = m.compute()
    assert (r.value, r.n, r.n_excluded) == (0.75, 2, 1)
    assert math.isnan(r.per_sample[1]) and len(r.per_sample) == 3
    pooled = create_metric("iou", tau=0.5, reduction="pooled")
    pooled.update(heat, np.array([[0, 1], [0, 0]]))
    pooled.update(heat, np.zeros((2, 2), bool))  # not pooled into the unions either
    assert pooled.compute().value == 1.0 and pooled.compute().n_excluded == 1


def test_result_is_json_ready_and_reset_forgets():
    m = create_metric("miou80", tau=0.3)
    m.update(np.eye(3), np.eye(3, dtype=bool), word="dog")
    r = m.compute()
    assert isinstance(r, MetricResult)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["label"] == "miou80_matchexact_tau0.3" and d["direction"] == "higher" and d["category"] == "grounding"
    assert d["ci95"] is None and d["n"] == 1
    m.reset()
    assert len(m) == 0 and m.compute().n == 0 and math.isnan(m.compute().value)
    assert "miou80" in str(r) and "n=1" in str(r)


def test_registry_lookup_metadata_and_errors():
    meta = available_metrics()
    expected = {
        "iou", "miou80", "miou-inf", "miou-best-tau", "pointing-game", "relevance-mass", "relevance-rank",
        "top-k-intersection", "specificity", "shift", "stability", "variance", "noise", "grounding-loss",
        "clip-full-prompt", "clip-min-object", "clip-score", "aesthetic",
    }  # fmt: skip
    assert expected <= set(meta)
    for name, info in meta.items():
        assert info["direction"] in ("higher", "lower"), name
        assert info["reduction"] in info["reductions"], name
        assert info["summary"] and info["source"], name
    assert meta["noise"]["direction"] == "lower" and meta["iou"]["reductions"] == ["per-sample", "pooled"]
    assert get_metric_class("miou80").name == "miou80"
    with pytest.raises(UnknownMetricError, match="did you mean 'miou80'"):
        create_metric("miou8")
    with pytest.raises(ValueError, match="has no parameter"):
        create_metric("iou", threshold=0.4)
    with pytest.raises(ValueError, match="supports reduction"):
        create_metric("iou", reduction="sum")
    with pytest.raises(ValueError, match=r"has no parameter\(s\) \['reduction'\]"):
        create_metric("miou80", reduction="pooled")  # DAAM's mIoU is per-pair by definition


def test_register_metric_validates_declarations():
    with pytest.raises(ValueError, match="direction"):

        @register_metric("bad-direction")
        class Bad(Metric):  # noqa: F841
            direction = "up"
            category = "grounding"

    with pytest.raises(TypeError):
        register_metric("not-a-metric")(object)
    assert "bad-direction" not in available_metrics()
