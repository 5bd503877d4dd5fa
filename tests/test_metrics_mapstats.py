"""Map statistics on hand-made maps whose values are known, and against scipy/numpy where one exists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evalkit.metrics import (
    concentration,
    create_metric,
    grounding_loss,
    high_frequency_energy,
    js_divergence,
    kl_divergence,
    normalized_entropy,
    pearson,
    relevance_mass,
    run_variance,
    shift,
    specificity,
    stability,
    total_variation,
)


def _checkerboard(h: int, w: int) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(np.float64)


def test_specificity_with_and_without_ground_truth():
    one_hot = np.zeros((8, 8))
    one_hot[2, 3] = 5.0
    assert concentration(one_hot) == pytest.approx(1.0)
    assert concentration(np.ones((8, 8))) == pytest.approx(0.0)  # constant -> min-max zeros -> uniform
    assert concentration(np.ones((8, 8)), normalize="none") == pytest.approx(0.0)
    four = np.zeros((8, 8))
    four[:2, :2] = 1.0  # mass spread evenly over 4 of 64 pixels
    assert concentration(four) == pytest.approx(1 - math.log(4) / math.log(64))
    assert normalized_entropy(four) == pytest.approx(math.log(4) / math.log(64))
    mask = np.zeros((8, 8), bool)
    mask[:2, :4] = True
    assert specificity(four, mask) == pytest.approx(1.0, abs=1e-7)
    assert specificity(four) == pytest.approx(concentration(four))
    heat = np.random.default_rng(0).random((8, 8))
    assert specificity(heat, mask) == relevance_mass(heat, mask, normalize="minmax")
    m = create_metric("specificity")
    m.update(four, mask)
    with pytest.raises(ValueError, match="mix two quantities"):
        m.update(four)
    assert m.compute().extra["mode"] == "relevance-mass"


def test_js_and_kl_against_scipy_and_known_values():
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import entropy

    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.random(9), rng.random(9)
        assert js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)
        assert kl_divergence(p, q) == pytest.approx(entropy(p, q))
        assert shift(torch.from_numpy(p), torch.from_numpy(q), divergence="kl") == pytest.approx(entropy(p, q))
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: 1 bit
    assert js_divergence([0.2, 0.8], [2, 8]) == pytest.approx(0.0)  # normalized first
    assert kl_divergence([1, 0], [0, 1]) == math.inf
    assert math.isfinite(kl_divergence([1, 0], [0, 1], eps=1e-6))
    assert js_divergence(np.zeros(4), [1, 1, 1, 1]) == pytest.approx(0.0)  # all-zero = uniform
    with pytest.raises(ValueError, match="negative"):
        js_divergence([-1, 2], [1, 1])
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        shift([1, 1], [1, 1, 1])
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[0, 0], b[3, 3] = 1.0, 1.0  # maps: moved blob -> maximal shift
    m = create_metric("shift")
    m.update(a, b)
    m.update(a, a)
    assert m.compute().value == pytest.approx(0.5)


def test_stability_pairwise_iou_and_correlation():
    base = np.zeros((10, 10))
    base[2:6, 2:6] = 1.0  # 16 px
    moved = np.zeros((10, 10))
    moved[2:6, 4:8] = 1.0  # overlaps base on 8 px: IoU 8 / 24
    assert stability([base, base, base]) == pytest.approx(1.0)
    assert stability([base, moved]) == pytest.approx(1 / 3)
    assert stability([base, base, moved]) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    rng = np.random.default_rng(0)
    maps = [rng.random((6, 6)) for _ in range(3)]
    ref = np.corrcoef([m.ravel() for m in maps])
    assert stability(maps, measure="pearson") == pytest.approx((ref[0, 1] + ref[0, 2] + ref[1, 2]) / 3)
    assert pearson(maps[0], maps[1]) == pytest.approx(ref[0, 1])
    assert math.isnan(pearson(np.ones((3, 3)), maps[0][:3, :3]))
    with pytest.raises(ValueError, match="at least 2"):
        stability([base])
    m = create_metric("stability", tau=0.5)
    m.update([base, moved])
    assert m.compute().value == pytest.approx(1 / 3) and m.compute().params == {"measure": "iou", "tau": 0.5}


def test_variance_across_seeds():
    import statistics

    assert run_variance([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    vals = [0.82, 0.79, 0.85, 0.80, 0.84]
    assert run_variance(vals) == pytest.approx(statistics.variance(vals))
    assert run_variance(vals, ddof=0) == pytest.approx(statistics.pvariance(vals))
    assert math.isnan(run_variance([0.5]))
    m = create_metric("variance")
    m.update([1.0, 2.0, 3.0])
    m.update([0.5])  # one seed: undefined -> excluded and counted
    r = m.compute()
    assert (r.value, r.n, r.n_excluded, r.direction) == (1.0, 1, 1, "lower")


def test_noise_total_variation_and_high_frequency_energy():
    assert total_variation(np.full((8, 8), 3.0)) == 0.0
    assert total_variation(_checkerboard(8, 8) * 7 + 2) == pytest.approx(1.0, abs=1e-7)
    step = np.zeros((6, 10))
    step[:, 5:] = 1.0  # one vertical edge: 6 unit differences over 6*9 + 10*5 neighbour pairs
    assert total_variation(step) == pytest.approx(6 / (6 * 9 + 10 * 5), abs=1e-8)
    assert high_frequency_energy(_checkerboard(16, 16)) == pytest.approx(1.0)
    smooth = np.cos(2 * np.pi * np.arange(16) / 16)[None].repeat(16, 0)  # one cycle per 16 px
    assert high_frequency_energy(smooth) == pytest.approx(0.0, abs=1e-12)
    assert high_frequency_energy(np.zeros((8, 8))) == 0.0
    tv, hf = create_metric("noise"), create_metric("noise", measure="hf")
    for m in (tv, hf):
        m.update(_checkerboard(8, 8))
        m.update(np.zeros((8, 8)))
    assert tv.compute().value == pytest.approx(0.5, abs=1e-7) and hf.compute().value == pytest.approx(0.5)


def test_grounding_loss_relative_drop():
    assert grounding_loss(0.46, 0.82) == pytest.approx((0.82 - 0.46) / 0.82)
    assert grounding_loss(0.82, 0.82) == 0.0
    assert grounding_loss(0.9, 0.6) == pytest.approx(-0.5)  # improvement is negative loss
    assert math.isnan(grounding_loss(0.1, 0.0)) and math.isnan(grounding_loss(math.nan, 0.5))
