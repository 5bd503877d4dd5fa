"""Grounding metrics against pycocotools, torchmetrics, Attribution.binarize and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evalkit.metrics import (
    COCO80_CLASSES,
    binarize_daam,
    coco_class,
    create_metric,
    decode_rle,
    encode_rle,
    iou,
    iou_counts,
    pointing_game,
    polygons_to_mask,
    relevance_mass,
    relevance_rank,
    rle_iou,
    top_k_intersection,
)


def _random_masks(seed: int, shape=(37, 53)):
    rng = np.random.default_rng(seed)
    for density_a, density_b in [(0.5, 0.5), (0.05, 0.3), (0.9, 0.01), (0.0, 0.2), (0.3, 0.0)]:
        yield rng.random(shape) < density_a, rng.random(shape) < density_b


def _blob(shape, top, left, h, w) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top : top + h, left : left + w] = True
    return m


# --- IoU, masks, pycocotools ----------------------------------------------------------------
def test_iou_agrees_with_pycocotools_and_torchmetrics():
    from torchmetrics.functional.classification import binary_jaccard_index

    for seed in range(3):
        for pred, gt in _random_masks(seed):
            ours = iou(pred, gt)
            assert ours == pytest.approx(rle_iou(pred, gt), abs=1e-12)
            assert ours == pytest.approx(rle_iou(encode_rle(pred), encode_rle(gt)), abs=1e-12)
            tm = binary_jaccard_index(torch.from_numpy(pred).long(), torch.from_numpy(gt).long()).item()
            assert ours == pytest.approx(tm, abs=1e-6)
            assert iou(torch.from_numpy(pred), torch.from_numpy(gt)) == ours  # torch input, same value
    empty = np.zeros((4, 4), bool)
    assert math.isnan(iou(empty, empty)) and rle_iou(empty, empty) == 0.0  # the one documented difference


def test_iou_hand_values_and_counts():
    a = _blob((10, 10), 0, 0, 4, 5)  # 20 px
    b = _blob((10, 10), 2, 0, 4, 5)  # 20 px, 10 shared
    assert iou_counts(a, b) == (10, 30)
    assert iou(a, b) == pytest.approx(1 / 3)
    assert iou(np.zeros((10, 10), bool), b) == 0.0


def test_rle_round_trip_and_coco_formats():
    rng = np.random.default_rng(0)
    m = rng.random((23, 31)) < 0.4
    rle = encode_rle(m)
    assert np.array_equal(decode_rle(rle), m)
    assert isinstance(rle["counts"], str)  # JSON-ready, as COCO JSON stores it
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}  # as pycocotools returns it
    assert np.array_equal(decode_rle(as_bytes), m)
    col = m.astype(np.uint8).ravel(order="F")  # uncompressed RLE: run lengths, column-major, from 0
    runs, cur, n = [], 0, 0
    for v in col:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    assert np.array_equal(decode_rle({"size": [23, 31], "counts": runs}), m)
    square = polygons_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 10, 12)
    assert square.shape == (10, 12) and square[3:6, 3:8].all() and not square[0].any() and not square[:, 10:].any()
    ours = create_metric("iou", tau=0.5)
    assert ours.update(m.astype(np.float32), rle) == 1.0  # ground truth given as RLE


def test_size_mismatch_is_a_clear_error():
    heat, mask = np.random.default_rng(0).random((64, 64)), np.zeros((512, 512), bool)
    for fn in (
        lambda: create_metric("miou-inf").update(heat, mask),
        lambda: pointing_game(heat, mask),
        lambda: relevance_mass(heat, mask),
        lambda: iou(heat > 0.5, mask),
    ):
        with pytest.raises(ValueError, match=r"\(64, 64\).*\(512, 512\).*to_image"):
            fn()
    with pytest.raises(ValueError, match="2-D"):
        relevance_mass(np.zeros((1, 8, 8)), np.zeros((8, 8), bool))


# --- binarization -----------------------------------------------------------------------------
def test_binarize_daam_matches_attribution_binarize():
    from evalkit.methods.base import Attribution

    g = torch.Generator().manual_seed(0)
    raw = torch.rand(8, 8, generator=g) * 3 + 1
    att = Attribution(method="x", prompt="a dog", tokens=[], maps={"dog": raw}, image_hw=(32, 32))
    image = att.to_image()["dog"]
    for tau in (0.3, 0.4, 0.5):
        assert np.array_equal(binarize_daam(image, tau), att.binarize(tau)["dog"].numpy())
    assert not binarize_daam(np.zeros((4, 4)), 0.3).any()  # all-zero map -> empty mask


# --- mIoU80, mIoU-inf, best over thresholds ---------------------------------------------------
def _heat_and_gt():
    """A 1 x 10 map i / 9 (i = 0..9) against a mask of its top 5 pixels, and the IoU at each tau.

    The daam rule keeps i >= 3 at tau 0.3 (7 px), i >= 4 at 0.4 (6 px), i >= 5 at 0.5 (5 px).
    """
    heat = np.arange(10, dtype=np.float64)[None] / 9
    gt = np.zeros((1, 10), bool)
    gt[0, 5:] = True
    return heat, gt, {0.3: 5 / 7, 0.4: 5 / 6, 0.5: 1.0}


def test_miou80_restricts_to_coco_words_and_counts_the_rest():
    heat, gt, by_tau = _heat_and_gt()
    m80, minf = create_metric("miou80", tau=0.4), create_metric("miou-inf", tau=0.4)
    off = np.zeros((1, 10), bool)
    off[0, :2] = True  # IoU at 0.4: 0 / 8
    for word, mask in [("dog", gt), ("sky", off), ("Hair  Drier", gt), ("dogs", off)]:
        m80.update(heat, mask, word=word)
        minf.update(heat, mask, word=word)
    r80, rinf = m80.compute(), minf.compute()
    assert r80.value == pytest.approx(by_tau[0.4]) and r80.n == 2
    assert r80.extra == {"n_not_coco": 2, "not_coco_words": ["dogs", "sky"]}
    assert rinf.value == pytest.approx(by_tau[0.4] / 2) and rinf.n == 4
    plural = create_metric("miou80", match="plural")
    plural.update(heat, off, word="dogs")
    assert plural.compute().n == 1
    with pytest.raises(ValueError, match="word="):
        create_metric("miou80").update(heat, gt)


def test_miou_inf_matches_daam_mean_evaluator_formula():
    """DAAM's evaluator: IoU = I / (U + 1e-8) per pair (after > tau on the normalized map), np.mean over pairs."""
    rng = np.random.default_rng(1)
    m = create_metric("miou-inf", tau=0.4)
    ref = []
    for _ in range(6):
        heat = rng.random((16, 16)) ** 3
        gt = rng.random((16, 16)) < 0.3
        m.update(torch.from_numpy(heat), torch.from_numpy(gt))
        t = torch.from_numpy(heat)
        pred = ((t - t.min()) / (t.max() - t.min() + 1e-8) > 0.4).float()
        b = torch.from_numpy(gt).float()
        inter = (pred * b).sum()
        ref.append((inter / (pred.sum() + b.sum() - inter + 1e-8)).item())
    r = m.compute()
    assert r.value == pytest.approx(np.mean(ref), abs=1e-6)
    lo, hi = r.ci95
    assert lo < r.value < hi


def test_best_over_thresholds_per_sample_and_dataset():
    heat, gt, _ = _heat_and_gt()  # best tau 0.5 (IoU 1); 0.3: 5/7, 0.4: 5/6
    gt6 = np.zeros((1, 10), bool)
    gt6[0, 4:] = True  # best tau 0.4 (IoU 1); 0.3: 6/7, 0.5: 5/6
    per, ds = create_metric("miou-best-tau"), create_metric("miou-best-tau", select="dataset")
    for mask in (gt, gt6, gt6):
        per.update(heat, mask)
        ds.update(heat, mask)
    r_per, r_ds = per.compute(), ds.compute()
    assert r_per.value == pytest.approx(1.0)  # each pair at its own best tau
    means = {0.3: (5 / 7 + 2 * 6 / 7) / 3, 0.4: (5 / 6 + 2) / 3, 0.5: (1 + 2 * 5 / 6) / 3}
    assert r_ds.extra["best_tau"] == 0.4 and r_ds.value == pytest.approx(means[0.4])
    assert r_ds.extra["per_tau"] == pytest.approx(means)
    assert r_ds.per_sample == pytest.approx([5 / 6, 1.0, 1.0])
    coco = create_metric("miou-best-tau", vocabulary="coco80")
    coco.update(heat, gt, word="dog")
    coco.update(heat, gt, word="sky")
    assert coco.compute().n == 1 and coco.compute().extra["n_not_coco"] == 1


# --- continuous-map metrics -------------------------------------------------------------------
def test_pointing_game_hits_tolerance_and_ties():
    mask = _blob((40, 40), 10, 10, 5, 5)
    heat = np.zeros((40, 40))
    heat[12, 12] = 1.0
    assert pointing_game(heat, mask) == 1.0
    heat = np.zeros((40, 40))
    heat[12, 24] = 1.0  # 10 px right of the mask's last column (14)
    assert pointing_game(heat, mask, tolerance_px=15) == 1.0
    assert pointing_game(heat, mask, tolerance_px=10) == 1.0
    assert pointing_game(heat, mask, tolerance_px=9.9) == 0.0
    heat[30, 30] = 1.0  # a tie between a hit and a miss
    assert pointing_game(heat, mask, tolerance_px=0) == 0.0
    assert pointing_game(heat, mask, tolerance_px=10) == 0.5
    assert pointing_game(np.zeros((40, 40)), mask, tolerance_px=0) == pytest.approx(25 / 1600)  # chance
    assert math.isnan(pointing_game(heat, np.zeros((40, 40), bool)))
    pg = create_metric("pointing-game", tolerance_px=0)
    pg.update(heat, mask)
    pg.update(heat, np.zeros((40, 40), bool))
    assert (pg.compute().value, pg.compute().n_excluded) == (0.0, 1)


def test_relevance_mass_hand_values():
    heat = np.array([[1.0, 2.0], [0.0, 1.0]])
    mask = np.array([[1, 1], [0, 0]], bool)
    assert relevance_mass(heat, mask) == pytest.approx(3 / 4)
    # min-max: [[0.5, 1], [0, 0.5]] -> 1.5 / 2
    assert relevance_mass(heat, mask, normalize="minmax") == pytest.approx(0.75, abs=1e-7)
    assert relevance_mass(heat + 10, mask) == pytest.approx(23 / 44)  # the floor dilutes raw mass
    assert relevance_mass(heat + 10, mask, normalize="minmax") == pytest.approx(0.75, abs=1e-7)
    assert relevance_mass(np.array([[-1.0, 1.0], [1.0, 0.0]]), mask) == pytest.approx(0.5)  # negatives clipped
    assert relevance_mass(np.zeros((2, 2)), mask) == 0.5  # all-zero -> uniform -> |M| / N
    assert math.isnan(relevance_mass(heat, np.zeros((2, 2), bool)))
    m = create_metric("relevance-mass")
    m.update(heat + 10, mask)
    assert m.compute().value == pytest.approx(0.75, abs=1e-7) and m.compute().params == {"normalize": "minmax"}


def test_relevance_rank_and_top_k_against_sorting():
    rng = np.random.default_rng(3)
    for _ in range(5):
        heat = rng.random((12, 15))
        mask = rng.random((12, 15)) < 0.25
        k = int(mask.sum())
        order = np.argsort(-heat.ravel(), kind="stable")
        assert relevance_rank(heat, mask) == pytest.approx(mask.ravel()[order[:k]].mean())
        assert top_k_intersection(heat, mask, k=7) == pytest.approx(mask.ravel()[order[:7]].mean())
        n = round(0.1 * heat.size)
        assert top_k_intersection(heat, mask, k=0.1) == pytest.approx(mask.ravel()[order[:n]].mean())
    mask = _blob((4, 4), 0, 0, 2, 2)
    assert relevance_rank(np.zeros((4, 4)), mask) == pytest.approx(4 / 16)  # ties: chance
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 1.0, 1.0
    assert relevance_rank(heat, mask) == pytest.approx((1 + 2 * 3 / 14) / 4)  # 1 hit, 2 of 14 tied zeros
    with pytest.raises(ValueError, match="k"):
        top_k_intersection(heat, mask, k=0)
    assert math.isnan(relevance_rank(heat, np.zeros((4, 4), bool)))


def test_all_zero_heat_map_edge_cases():
    mask = _blob((8, 8), 0, 0, 4, 4)
    zero = np.zeros((8, 8))
    m = create_metric("iou", tau=0.3)
    assert m.update(zero, mask) == 0.0  # the daam rule gives an empty prediction: a miss, not NaN
    assert relevance_mass(zero, mask) == 0.25 and relevance_rank(zero, mask) == 0.25


# --- COCO vocabulary --------------------------------------------------------------------------
def test_coco_class_rules():
    assert len(COCO80_CLASSES) == 80 and len(set(COCO80_CLASSES)) == 80
    cases = {
        # word: (exact, plural, synonyms)
        "dog": ("dog", "dog", "dog"),
        " Teddy_Bear ": ("teddy bear", "teddy bear", "teddy bear"),
        "hair drier": ("hair drier", "hair drier", "hair drier"),
        "drier": (None, None, None),
        "dogs": (None, "dog", "dog"),
        "wine glasses": (None, "wine glass", "wine glass"),
        "knives": (None, "knife", "knife"),
        "people": (None, "person", "person"),
        "buses": (None, "bus", "bus"),
        "skis": ("skis", "skis", "skis"),
        "sheep": ("sheep", "sheep", "sheep"),
        "sofa": (None, None, "couch"),
        "tables": (None, None, "dining table"),
        "man": (None, None, "person"),
        "hair dryer": (None, None, "hair drier"),
        "sky": (None, None, None),
    }
    for word, expected in cases.items():
        got = tuple(coco_class(word, match) for match in ("exact", "plural", "synonyms"))
        assert got == expected, word
    with pytest.raises(ValueError, match="match"):
        coco_class("dog", "fuzzy")
