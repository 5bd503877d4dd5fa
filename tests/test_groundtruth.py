"""evalkit.groundtruth: COCO round trip (checked with pycocotools itself) and the DAAM folder importer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from evalkit.groundtruth import (
    GroundTruth,
    GroundTruthError,
    MissingMaskError,
    decode_rle,
    encode_rle,
    import_daam_folder,
)


def _rect(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------------------------------------------- RLE


@pytest.mark.parametrize("kind", ["random", "empty", "full", "rect"])
def test_rle_roundtrip_is_exact_and_json_ready(kind: str) -> None:
    h, w = 37, 53  # odd sizes: catches row/column-major mix-ups
    mask = {
        "random": np.random.default_rng(0).random((h, w)) > 0.5,
        "empty": np.zeros((h, w), bool),
        "full": np.ones((h, w), bool),
        "rect": _rect(h, w, 3, 20, 5, 40),
    }[kind]
    rle = encode_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    rle = json.loads(json.dumps(rle))
    back = decode_rle(rle)
    assert back.dtype == bool and back.shape == (h, w)
    np.testing.assert_array_equal(back, mask)
    assert int(mask_utils.area(rle)) == int(mask.sum())


def test_encode_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 3, 4), bool))


# ---------------------------------------------------------------------------------------------------------------- COCO


def _small_gt() -> tuple[GroundTruth, dict[tuple[int, str], np.ndarray]]:
    gt = GroundTruth(info={"description": "test"})
    a = gt.add_image("a.png", 40, 60, "a dog chasing a cat", seed=7)
    b = gt.add_image("sub/b.png", 30, 30, "a red car", seed=11)
    masks = {
        (a.id, "dog"): _rect(40, 60, 5, 25, 3, 30),
        (a.id, "cat"): _rect(40, 60, 10, 39, 35, 59),
        (b.id, "car"): _rect(30, 30, 2, 28, 1, 17),
    }
    for (image_id, word), m in masks.items():
        gt.add_mask(image_id, word, m, category="vehicle" if word == "car" else None)
    return gt, masks


def test_coco_json_roundtrip_and_pycocotools_loads_it(tmp_path: Path) -> None:
    gt, masks = _small_gt()
    path = gt.save(tmp_path / "gt.json")

    coco = COCO(str(path))  # pycocotools itself must accept the file
    assert sorted(coco.getImgIds()) == [1, 2]
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"dog", "cat", "vehicle"}
    for ann in coco.loadAnns(coco.getAnnIds()):
        expected = masks[(ann["image_id"], ann["word"])]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), expected)
        assert ann["area"] == int(expected.sum())
        ys, xs = np.nonzero(expected)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["iscrowd"] == 0
    assert coco.loadImgs(1)[0]["prompt"] == "a dog chasing a cat" and coco.loadImgs(1)[0]["seed"] == 7

    loaded = GroundTruth.load(path)
    assert loaded.root == tmp_path
    assert loaded.images == gt.images
    assert loaded.annotations == gt.annotations
    assert loaded.image_path(2) == tmp_path / "sub" / "b.png"
    for (image_id, word), m in masks.items():
        np.testing.assert_array_equal(loaded.masks_for(image_id)[word], m)
    assert loaded.annotations[2].category == "vehicle" and loaded.annotations[0].category == "dog"
    assert loaded.to_coco() == gt.to_coco()


def test_masks_for_unites_instances_of_a_word_and_keeps_word_order() -> None:
    gt = GroundTruth()
    im = gt.add_image("x.png", 10, 10, "two dogs", seed=0)
    gt.add_mask(im.id, "dogs", _rect(10, 10, 0, 3, 0, 3))
    gt.add_mask(im.id, "dogs", _rect(10, 10, 6, 9, 6, 9))
    gt.add_mask(im.id, "two", np.zeros((10, 10), bool))
    got = gt.masks_for(im.id)
    assert list(got) == ["dogs", "two"] and gt.words(im.id) == ["dogs", "two"]
    np.testing.assert_array_equal(got["dogs"], _rect(10, 10, 0, 3, 0, 3) | _rect(10, 10, 6, 9, 6, 9))
    assert list(gt.masks_for(im.id, ["two"])) == ["two"]


def test_missing_word_error_names_word_image_and_available_words() -> None:
    gt, _ = _small_gt()
    with pytest.raises(MissingMaskError) as info:
        gt.masks_for(1, ["dog", "frisbee"])
    msg = str(info.value)
    assert "'frisbee'" in msg and "image 1" in msg and "a.png" in msg and "['cat', 'dog']" in msg
    with pytest.raises(MissingMaskError, match="no image with id 99"):
        gt.masks_for(99)


def test_mask_size_must_match_image_and_ids_must_be_unique() -> None:
    gt, _ = _small_gt()
    with pytest.raises(GroundTruthError, match=r"mask size \[40, 60\] != size \[30, 30\] of image 2"):
        gt.add_mask(2, "car", np.zeros((40, 60), bool))
    with pytest.raises(GroundTruthError, match="duplicate image id 1"):
        gt.add_image("c.png", 5, 5, "p", image_id=1)


def test_plain_coco_polygons_load_with_category_as_word(tmp_path: Path) -> None:
    data = {
        "images": [{"id": 3, "file_name": "p.png", "height": 20, "width": 20}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 18, "iscrowd": 0,
                         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]}],
        "categories": [{"id": 18, "name": "dog"}],
    }
    (tmp_path / "plain.json").write_text(json.dumps(data))
    gt = GroundTruth.load(tmp_path / "plain.json")
    mask = gt.masks_for(3, ["dog"])["dog"]
    assert mask.shape == (20, 20) and 80 <= mask.sum() <= 130
    assert gt.images[0].prompt == "" and gt.images[0].seed is None


def test_malformed_coco_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": 1}]}')
    with pytest.raises(GroundTruthError, match="bad.json"):
        GroundTruth.load(bad)
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(GroundTruthError, match="junk.json"):
        GroundTruth.load(tmp_path / "junk.json")


# ---------------------------------------------------------------------------------------------------------------- DAAM


def _write_daam_mask(path: Path, alpha: np.ndarray) -> None:
    """As DAAM's GenerationExperiment.save writes masks: the value in all four RGBA channels."""
    Image.fromarray(np.repeat(alpha[..., None], 4, axis=-1).astype(np.uint8), mode="RGBA").save(path)


def _make_daam_folder(root: Path, size: tuple[int, int] = (48, 64)) -> dict[tuple[int, str], np.ndarray]:
    """Two prompt folders with two word masks each, plus files/folders the importer must ignore."""
    h, w = size
    rng = np.random.default_rng(0)
    expected: dict[tuple[int, str], np.ndarray] = {}
    prompts = {
        12: ("A dog and a cat on a sofa", 1234, ["dog", "cat"]),
        3: ("a car next to a tree", 99, ["car", "tree"]),
    }
    for pid, (prompt, seed, words) in prompts.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "prompt.txt").write_text(prompt + "\n")
        (d / "seed.txt").write_text(f"{seed}\n")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "output.png")
        (d / "dog.heat_map.png").write_bytes(b"ignored")  # other DAAM files are skipped
        for k, word in enumerate(words):
            alpha = np.zeros((h, w), np.uint8)
            alpha[4 + k * 10: 20 + k * 10, 5 + k * 20: 30 + k * 20] = 255
            alpha[2, 2] = 1  # an anti-aliased edge pixel: alpha > 0 counts (DAAM's load_mask rule)
            _write_daam_mask(d / f"{word}.gt.png", alpha)
            expected[(pid, word)] = alpha > 0
    (root / "gsam_cache").mkdir()  # a non-DAAM folder: ignored
    (root / "README.txt").write_text("not a folder")
    return expected


def test_import_daam_folder_converts_to_coco(tmp_path: Path) -> None:
    root = tmp_path / "coco-gen"
    expected = _make_daam_folder(root)
    gt = import_daam_folder(root, output=root / "groundtruth.json")

    assert [im.id for im in gt.images] == [3, 12]  # numeric folder names, numeric order
    im12 = gt.image(12)
    assert (im12.prompt, im12.seed, im12.height, im12.width) == ("A dog and a cat on a sofa", 1234, 48, 64)
    assert im12.file_name == "12/output.png" and gt.image_path(12).is_file()
    for (pid, word), m in expected.items():
        np.testing.assert_array_equal(gt.masks_for(pid, [word])[word], m)
    assert gt.words(3) == ["car", "tree"]

    coco = COCO(str(root / "groundtruth.json"))
    assert len(coco.getAnnIds()) == 4
    loaded = GroundTruth.load(root / "groundtruth.json")
    assert loaded.image_path(3) == root / "3" / "output.png"
    np.testing.assert_array_equal(loaded.masks_for(12)["cat"], expected[(12, "cat")])


def test_daam_words_are_lowercased_and_non_numeric_folders_get_sequential_ids(tmp_path: Path) -> None:
    d = tmp_path / "prompt-b"
    d.mkdir()
    (d / "prompt.txt").write_text("a Dog")
    (d / "seed.txt").write_text("5")
    Image.new("RGB", (8, 6)).save(d / "output.png")
    alpha = np.zeros((6, 8), np.uint8)
    alpha[1:3, 1:3] = 200
    _write_daam_mask(d / "Dog.gt.png", alpha)
    la = Image.fromarray(np.stack([alpha, alpha], -1), mode="LA")  # LA masks carry alpha too
    la.save(d / "sofa.gt.png")
    (tmp_path / "prompt-a").mkdir()
    for name, text in (("prompt.txt", "x"), ("seed.txt", "1")):
        (tmp_path / "prompt-a" / name).write_text(text)
    Image.new("RGB", (8, 6)).save(tmp_path / "prompt-a" / "output.png")
    gt = import_daam_folder(tmp_path)
    assert [(im.id, im.file_name) for im in gt.images] == [(1, "prompt-a/output.png"), (2, "prompt-b/output.png")]
    assert gt.words(2) == ["dog", "sofa"] and gt.words(1) == []
    assert gt.masks_for(2)["dog"].sum() == 4


def _break(root: Path, how: str) -> str:
    """Damage prompt folder 12 and return the file name the error must mention."""
    d = root / "12"
    if how == "no_prompt":
        (d / "prompt.txt").unlink()
        return "prompt.txt"
    if how == "bad_seed":
        (d / "seed.txt").write_text("forty-two")
        return "seed.txt"
    if how == "no_image":
        (d / "output.png").unlink()
        return "output.png"
    if how == "unreadable_mask":
        (d / "dog.gt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return "dog.gt.png"
    if how == "mask_size":
        _write_daam_mask(d / "cat.gt.png", np.full((10, 10), 255, np.uint8))
        return "cat.gt.png"
    if how == "no_alpha":
        Image.fromarray(np.full((48, 64), 255, np.uint8), mode="L").save(d / "cat.gt.png")
        return "cat.gt.png"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_prompt", "bad_seed", "no_image", "unreadable_mask", "mask_size", "no_alpha"])
def test_malformed_daam_folder_errors_name_the_file(tmp_path: Path, how: str) -> None:
    _make_daam_folder(tmp_path)
    culprit = _break(tmp_path, how)
    with pytest.raises(GroundTruthError) as info:
        import_daam_folder(tmp_path)
    assert str(tmp_path / "12" / culprit) in str(info.value)


def test_folder_without_prompt_folders_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GroundTruthError, match="no DAAM prompt folders"):
        import_daam_folder(tmp_path)
    with pytest.raises(GroundTruthError, match="not a folder"):
        import_daam_folder(tmp_path / "missing")
