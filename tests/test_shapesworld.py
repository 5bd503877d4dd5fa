"""ShapesWorld: deterministic generator, exact masks, COCO export, analytic checker, the committed model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evalkit.shapesworld import (
    COLORS,
    SHAPES,
    ObjectSpec,
    check,
    dataset,
    describe,
    parse_prompt,
    sample_scene,
    to_coco,
    vocabulary,
)
from evalkit.shapesworld.scene import BACKGROUND

# Fixed prompts and seeds whose samples the committed model renders correctly (see MODEL_CARD.md).
MODEL_CASES = [
    ("a large red circle", 1),
    ("a large blue square", 1),
    ("a large yellow triangle", 2),
    ("a large purple heart", 1),
]


def test_generator_is_deterministic():
    a, b = dataset(12, seed=3), dataset(12, seed=3)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert [x.seed for x in a] == [x.seed for x in b]
    for x, y in zip(a, b):
        assert x.scene == y.scene
        assert np.array_equal(x.image, y.image)
        assert all(np.array_equal(m, n) for m, n in zip(x.object_masks, y.object_masks))
    # item i does not depend on how many items are drawn, and another seed gives other scenes
    assert dataset(5, seed=3)[4].prompt == a[4].prompt
    assert [x.prompt for x in dataset(12, seed=4)] != [x.prompt for x in a]
    assert sample_scene(7) == sample_scene(7)


def test_masks_match_rendered_pixels_exactly():
    for item in dataset(40, seed=1):
        image = item.image
        masks = item.object_masks
        assert len(masks) == len(item.scene.objects)
        covered = np.zeros(image.shape[:2], dtype=bool)
        for obj, mask in zip(item.scene.objects, masks):
            assert mask.dtype == bool and mask.any()
            painted = np.all(image == np.array(COLORS[obj.color], dtype=np.uint8), axis=-1)
            assert np.array_equal(painted, mask)  # distinct colours: the colour's pixels are the mask
            assert not (covered & mask).any()
            covered |= mask
        assert np.all(image[~covered] == np.array(BACKGROUND, dtype=np.uint8))


def test_grounded_words_point_at_their_object():
    for item in dataset(30, seed=2):
        assert item.image_size == (64, 64)
        for a in item.annotations:
            assert item.prompt[a.start : a.start + len(a.word)] == a.word
            obj = item.scene.objects[a.object_index]
            assert a.word == {"noun": obj.shape, "color": obj.color, "size": obj.size}[a.role]
            assert a.mask is item.object_masks[a.object_index]
        assert sorted(item.masks("noun")) == sorted(set(item.nouns))
        assert len(parse_prompt(item.prompt)) == len(item.scene.objects)


def test_prompt_grammar_has_function_words_and_fillers():
    texts = [describe(sample_scene(i), i).text for i in range(300)]
    joined = " ".join(texts)
    for word in ("and", "above", "left of", "next to", "the", "quietly"):
        assert f" {word} " in f" {joined} ", word
    assert describe(sample_scene(0)).text == describe(sample_scene(0)).text  # plain phrasing is fixed


def test_every_word_is_one_clip_token():
    from evalkit.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    for word in vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_coco_export_round_trips():
    from pycocotools import mask as mask_utils

    items = dataset(6, seed=5)
    coco = json.loads(json.dumps(to_coco(items)))  # JSON-serializable
    assert [im["prompt"] for im in coco["images"]] == [it.prompt for it in items]
    assert [im["seed"] for im in coco["images"]] == [it.seed for it in items]
    anns = coco["annotations"]
    assert len(anns) == sum(len(it.annotations) for it in items)
    by_image = {it.index + 1: it for it in items}
    for ann in anns:
        item = by_image[ann["image_id"]]
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        assert np.array_equal(mask, item.object_masks[ann["object_index"]])
        assert ann["area"] == mask.sum()
        assert coco["categories"][ann["category_id"] - 1]["name"] == item.scene.objects[ann["object_index"]].shape


def test_checker_agrees_with_ground_truth():
    hits = total = rejects = negatives = 0
    for item in dataset(80, seed=11):
        result = check(item.image, item.prompt)
        hits += sum(result.presence)
        total += len(result.presence)
        present = {(o.color, o.shape) for o in item.scene.objects}
        for obj in item.scene.objects:
            wrong_shape = SHAPES[(SHAPES.index(obj.shape) + 1) % len(SHAPES)]
            absent_color = next(c for c in COLORS if all(c != o.color for o in item.scene.objects))
            for spec in (ObjectSpec(wrong_shape, obj.color), ObjectSpec(obj.shape, absent_color)):
                if (spec.color, spec.shape) in present:
                    continue
                negatives += 1
                rejects += not check(item.image, [spec]).objects[0].present
    assert hits / total >= 0.98
    assert rejects / negatives >= 0.98
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert not check(blank, "a red circle").all_present


@pytest.fixture(scope="module")
def shapesworld_pipe():
    import torch

    from evalkit.models import load

    torch.manual_seed(0)
    return load("shapesworld", scheduler="ddim")


def test_committed_model_is_a_small_sd_pipeline(shapesworld_pipe):
    from evalkit.models import BUILTIN_MODELS, list_builtin_models
    from evalkit.trace import find_cross_attention_layers

    assert "shapesworld" in list_builtin_models()
    folder = BUILTIN_MODELS["shapesworld"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix != ".png")
    assert size <= 30 * 2**20
    assert (folder / "MODEL_CARD.md").is_file()
    layers = [info for info, _ in find_cross_attention_layers(shapesworld_pipe.unet)]
    assert {info.place for info in layers} == {"down", "mid", "up"}
    assert len({info.downsample for info in layers if info.place != "mid"}) >= 2


def test_committed_model_samples_pass_the_checker(shapesworld_pipe):
    from evalkit.analysis.shapesworld_card import sample

    prompts, seeds = zip(*MODEL_CASES)
    images = sample(shapesworld_pipe, prompts, seeds)
    passed = [check(img, p).all_present for img, p in zip(images, prompts)]
    assert all(img.shape == (64, 64, 3) for img in images)
    assert sum(passed) >= len(passed) - 1, passed


def test_model_card_reports_the_measured_numbers_and_verdicts():
    """The card's target table is rendered from metrics.json (with Wilson intervals of the rates), and
    each verdict follows from the number next to it."""
    import json

    from evalkit.builtin_models import BUILTIN_MODELS
    from evalkit.metrics import wilson_ci95

    folder = BUILTIN_MODELS["shapesworld"]
    m = json.loads((folder / "metrics.json").read_text())
    card = (folder / "MODEL_CARD.md").read_text()
    for key, field, goal in (("single_object", "object_accuracy", 0.9), ("two_objects", "all_present", 0.6)):
        value, n = m[key][field], m[key]["n_images"]
        lo, hi = wilson_ci95(round(value * n), n)
        row = next(line for line in card.splitlines() if f"(n={n}) | {value:.3f} [{lo:.2f}, {hi:.2f}]" in line)
        assert row.endswith("| met |") == (value >= goal)
    daam = m["daam"]
    row = next(line for line in card.splitlines() if line.startswith("| `daam` mIoU"))
    assert f"| {daam['miou']:.3f} |" in row and row.endswith("| met |") == (daam["miou"] >= 0.4)
    assert daam["miou"] > daam["baseline_miou"]
