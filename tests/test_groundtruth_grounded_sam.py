"""Grounded-SAM with tiny random-weight models built offline from configs: no stubs between box, mask, RLE and cache.

The models are real ``GroundingDinoForObjectDetection`` / ``segment_anything.Sam`` instances, just small and
untrained, so the whole chain (processor -> detector -> boxes -> SamPredictor -> masks -> RLE -> cache -> IoU) runs
in well under a second per image on a CPU.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamConfig,
    SamImageProcessor,
    SamModel,
    SamProcessor,
    SwinConfig,
)

from evalkit.groundtruth import GroundTruth, decode_rle
from evalkit.groundtruth.grounded_sam import (
    CACHE_FORMAT,
    GroundedSam,
    TransformersSamPredictor,
    check_detector,
    check_segmenter,
    image_sha256,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "car", "on", "the", "sofa"]
H, W = 96, 128


def tiny_processor(tmp: Path, vocab: list[str] = VOCAB) -> GroundingDinoProcessor:
    """Grounding DINO's processor with a BERT tokenizer over ``vocab`` and 112 px images."""
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(tmp / "vocab.txt"), do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 112, "longest_edge": 112})
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_dino(vocab_size: int = len(VOCAB)) -> GroundingDinoForObjectDetection:
    """Grounding DINO at toy size (Swin 32 wide, one-layer BERT, 64-d transformer), random weights."""
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
                                   out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=32,
    )
    return GroundingDinoForObjectDetection(config).eval()


def tiny_sam(checkpoint: str | None = None) -> Sam:
    """SAM's architecture at toy size (ViT embed 64, depth 2, 256 px); same signature as sam_model_registry entries."""
    torch.manual_seed(1)
    dim, img_size, patch = 32, 256, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=patch, embed_dim=64, depth=2, num_heads=2,
                                      mlp_ratio=2.0, out_chans=dim, qkv_bias=True, use_rel_pos=True, window_size=4,
                                      global_attn_indexes=(1,), norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img_size // patch, img_size // patch),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=1, iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2)),
    ).eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam


def tiny_hf_sam() -> tuple[SamModel, SamProcessor]:
    """transformers' ``SamModel`` at toy size (ViT 32 wide, depth 2, 256 px), random weights, with its processor."""
    torch.manual_seed(2)
    config = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=256, window_size=4, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=256, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=32, iou_head_depth=1),
    )
    image_processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256},
                                        mask_size={"longest_edge": 64}, mask_pad_size={"height": 64, "width": 64})
    return SamModel(config).eval(), SamProcessor(image_processor=image_processor)


def save_tiny_grounded_sam(root: Path) -> tuple[Path, Path]:
    """Folders ``root/tiny-dino`` and ``root/tiny-sam`` (transformers' SamModel) as ``save_pretrained`` writes them,
    with a word-piece vocabulary of single letters, so that the detector's tokenizer spells any lower-case word."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *letters, *(f"##{c}" for c in letters)]
    dino, sam = root / "tiny-dino", root / "tiny-sam"
    tiny_dino(len(vocab)).save_pretrained(dino)
    tiny_processor(root, vocab).save_pretrained(dino)
    model, processor = tiny_hf_sam()
    model.save_pretrained(sam)
    processor.save_pretrained(sam)
    return dino, sam


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models are dominated by thread synchronisation: on a shared 2-core box one thread is ~5x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor,
                                                               SamPredictor]:
    return tiny_dino(), tiny_processor(tmp_path_factory.mktemp("tok")), SamPredictor(tiny_sam())


@pytest.fixture(scope="module")
def image() -> Image.Image:
    arr = np.full((H, W, 3), 40, np.uint8)
    arr[20:70, 30:90] = (200, 120, 30)  # an "object"
    return Image.fromarray(arr)


class CallCounter:
    """Counts real forward calls of the detector and the SAM image encoder; can make them raise."""

    def __init__(self, gsam: GroundedSam) -> None:
        self.calls = {"detector": 0, "sam": 0}
        self.fail = False
        self.handles = [
            gsam.detector.register_forward_pre_hook(partial(self._hook, "detector")),
            gsam.sam_predictor.model.image_encoder.register_forward_pre_hook(partial(self._hook, "sam")),
        ]

    def _hook(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        if self.fail:
            raise AssertionError(f"{name} ran although the result was cached")
        self.calls[name] += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def make(models, cache_dir: Path | None, **kw) -> GroundedSam:
    detector, processor, predictor = models
    kw.setdefault("box_threshold", 0.0)  # random weights: keep every query that has any score
    kw.setdefault("text_threshold", 0.0)
    return GroundedSam(detector, processor, predictor, cache_dir=cache_dir, **kw)


def test_detect_boxes_in_bounds_and_equal_transformers_post_processing(models, image) -> None:
    gsam = make(models, None, box_threshold=0.5)
    boxes, scores = gsam.detect(image, "cat")
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(scores) > 0
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= W).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= H).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (np.diff(scores) <= 0).all() and (scores > 0.5).all()

    # Our box scores / boxes are transformers' own post-processing (then clipped to the image).
    detector, processor, _ = models
    inputs = processor(images=image, text="cat.", return_tensors="pt")
    with torch.no_grad():
        outputs = detector(**inputs)
    ref = processor.post_process_grounded_object_detection(outputs, inputs["input_ids"], threshold=0.5,
                                                           text_threshold=0.0, target_sizes=[(H, W)])[0]
    ref_boxes = ref["boxes"].numpy().copy()
    ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clip(0, W)
    ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clip(0, H)
    raw_boxes, raw_scores, _ = gsam._raw_detections(image, "cat")
    keep = raw_scores > 0.5
    np.testing.assert_allclose(raw_boxes[keep], ref_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(raw_scores[keep], ref["scores"].numpy(), rtol=1e-6)

    best = make(models, None, box_threshold=0.5, keep="best").detect(image, "cat")
    np.testing.assert_array_equal(best[0], boxes[:1])


def test_full_chain_box_mask_rle_cache_iou(models, image, tmp_path: Path) -> None:
    gsam = make(models, tmp_path / "cache")
    out = gsam.ground(image, ["cat", "dog"])
    assert list(out) == ["cat", "dog"]
    for g in out.values():
        assert not g.cached and not g.no_box
        assert g.mask.dtype == bool and g.mask.shape == (H, W)
        assert g.mask.any(), "random SAM should still mark some pixels for a box prompt"
        assert ((g.boxes >= 0) & (g.boxes <= [W, H, W, H])).all()

    cache_file = tmp_path / "cache" / f"{image_sha256(image)}.json"
    data = json.loads(cache_file.read_text())
    assert data["format"] == CACHE_FORMAT and (data["height"], data["width"]) == (H, W)
    assert len(data["entries"]) == 2
    for key, entry in data["entries"].items():
        assert key == gsam.cache_key(image_sha256(image), entry["word"])
        mask = out[entry["word"]].mask
        np.testing.assert_array_equal(decode_rle(entry["segmentation"]), mask)  # RLE decodes to the same mask
        rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode()}
        assert mask_utils.iou([rle], [rle], [0])[0, 0] == pytest.approx(1.0)  # IoU with itself, via pycocotools
        assert entry["area"] == int(mask.sum()) == int(mask_utils.area(rle))
        assert len(entry["boxes"]) == len(entry["scores"]) > 0
    assert not list(cache_file.parent.glob("*.tmp"))  # atomic write leaves no temp files

    again = make(models, tmp_path / "cache").masks(image, ["dog", "cat"])  # fresh instance, same cache
    for word in ("cat", "dog"):
        np.testing.assert_array_equal(again[word], out[word].mask)


def test_cache_hit_skips_both_models(models, image, tmp_path: Path) -> None:
    gsam = make(models, tmp_path)
    counter = CallCounter(gsam)
    try:
        first = gsam.masks(image, ["cat"])
        assert counter.calls == {"detector": 1, "sam": 1}
        counter.fail = True  # any model call from now on raises
        second = gsam.ground(image, ["cat"])
        assert second["cat"].cached and gsam.stats["cache_hits"] == 1
        np.testing.assert_array_equal(second["cat"].mask, first["cat"])
        # a re-encoded copy of the same pixels hits the same entry
        copy = Image.frombytes("RGB", image.size, image.tobytes())
        assert make(models, tmp_path).ground(copy, ["cat"])["cat"].cached
        # a new word is a miss and needs the models
        with pytest.raises(AssertionError, match="ran although the result was cached"):
            gsam.masks(image, ["cat", "sofa"])
        counter.fail = False
        gsam.masks(image, ["cat", "sofa"])
        assert counter.calls == {"detector": 2, "sam": 2}
    finally:
        counter.remove()


def test_cache_key_changes_with_thresholds_and_box_policy(models, image, tmp_path: Path) -> None:
    h = image_sha256(image)
    base = make(models, tmp_path)
    keys = {
        base.cache_key(h, "cat"),
        make(models, tmp_path, box_threshold=0.3).cache_key(h, "cat"),
        make(models, tmp_path, text_threshold=0.3).cache_key(h, "cat"),
        make(models, tmp_path, keep="best").cache_key(h, "cat"),
        make(models, tmp_path, sam_id="other-sam").cache_key(h, "cat"),
        base.cache_key(h, "dog"),
        base.cache_key("0" * 64, "cat"),
    }
    assert len(keys) == 7

    base.masks(image, ["cat"])
    other = make(models, tmp_path, text_threshold=0.3)
    counter = CallCounter(other)
    try:
        assert not other.ground(image, ["cat"])["cat"].cached  # changed threshold: recomputed
        assert counter.calls["detector"] == 1
    finally:
        counter.remove()
    entries = json.loads((tmp_path / f"{h}.json").read_text())["entries"]
    assert sorted(e["text_threshold"] for e in entries.values()) == [0.0, 0.3]  # both kept side by side


def test_word_without_box_gives_recorded_empty_mask(models, image, tmp_path: Path, caplog) -> None:
    gsam = make(models, tmp_path, box_threshold=1.0)  # no sigmoid score exceeds 1
    with caplog.at_level(logging.WARNING, logger="evalkit.groundtruth.grounded_sam"):
        out = gsam.ground(image, ["car"])
    assert out["car"].no_box and out["car"].mask.shape == (H, W) and not out["car"].mask.any()
    assert gsam.stats["no_box"] == 1 and "no box" in caplog.text and "'car'" in caplog.text
    entry = next(iter(json.loads((tmp_path / f"{image_sha256(image)}.json").read_text())["entries"].values()))
    assert entry["no_box"] is True and entry["area"] == 0 and entry["boxes"] == []
    counter = CallCounter(gsam)
    counter.fail = True
    try:
        assert gsam.ground(image, ["car"])["car"].cached  # the empty result is cached too
    finally:
        counter.remove()


def test_annotate_adds_masks_to_ground_truth_with_cache_next_to_images(models, image, tmp_path: Path) -> None:
    image.save(tmp_path / "img.png")
    gt = GroundTruth(root=tmp_path)
    rec = gt.add_image("img.png", H, W, "a cat on a sofa", seed=3)
    gsam = make(models, None)  # cache_dir=None: next to the image file
    out = gsam.annotate(gt, rec.id, ["cat", "sofa"])
    assert (tmp_path / "gsam_cache" / f"{image_sha256(image)}.json").is_file()
    masks = gt.masks_for(rec.id, ["cat", "sofa"])
    np.testing.assert_array_equal(masks["cat"], out["cat"].mask)
    gt.save(tmp_path / "gt.json")
    assert GroundTruth.load(tmp_path / "gt.json").words(rec.id) == ["cat", "sofa"]


def test_from_pretrained_local_folder_and_checkpoint(models, image, tmp_path: Path, monkeypatch) -> None:
    detector, processor, predictor = models
    detector.save_pretrained(tmp_path / "tiny-dino")
    processor.save_pretrained(tmp_path / "tiny-dino")
    torch.save(predictor.model.state_dict(), tmp_path / "tiny_sam.pth")
    monkeypatch.setitem(sam_model_registry, "tiny", tiny_sam)  # register a SAM type, as the registry allows

    gsam = GroundedSam.from_pretrained(dino=tmp_path / "tiny-dino", sam_checkpoint=tmp_path / "tiny_sam.pth",
                                       sam_type="tiny", box_threshold=0.0, text_threshold=0.0,
                                       cache_dir=tmp_path / "c")
    assert gsam.detector_id.startswith("tiny-dino@") and gsam.sam_id.startswith("sam-tiny:tiny_sam.pth@")
    reference = make(models, None).masks(image, ["dog"])["dog"]
    np.testing.assert_array_equal(gsam.masks(image, ["dog"])["dog"], reference)  # same weights, same mask


def test_from_pretrained_errors(tmp_path: Path) -> None:
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"")
    with pytest.raises(OSError) as info:  # conftest sets HF_HUB_OFFLINE=1
        GroundedSam.from_pretrained(dino="IDEA-Research/grounding-dino-tiny", sam_checkpoint=ckpt)
    msg = str(info.value)
    assert "\n" not in msg and "local folder" in msg and "IDEA-Research/grounding-dino-tiny" in msg
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        GroundedSam.from_pretrained(dino=tmp_path, sam_checkpoint=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown sam_type 'vit_x'"):
        GroundedSam.from_pretrained(dino=tmp_path, sam_checkpoint=ckpt, sam_type="vit_x")
    with pytest.raises(OSError, match="cannot load Grounding DINO from local folder"):
        GroundedSam.from_pretrained(dino=tmp_path, sam_checkpoint=ckpt)


def test_from_pretrained_bad_sam_checkpoints(models, tmp_path: Path, monkeypatch) -> None:
    detector, processor, predictor = models
    detector.save_pretrained(tmp_path / "dino")
    processor.save_pretrained(tmp_path / "dino")
    monkeypatch.setitem(sam_model_registry, "tiny", tiny_sam)
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(OSError, match="cannot read SAM checkpoint .*corrupt.pth"):
        GroundedSam.from_pretrained(dino=tmp_path / "dino", sam_checkpoint=tmp_path / "corrupt.pth", sam_type="tiny")
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit sam_type 'tiny'"):
        GroundedSam.from_pretrained(dino=tmp_path / "dino", sam_checkpoint=tmp_path / "other.pth", sam_type="tiny")


def test_argument_validation(models, image) -> None:
    with pytest.raises(ValueError, match="box_threshold"):
        make(models, None, box_threshold=1.5)
    with pytest.raises(ValueError, match="keep"):
        make(models, None, keep="some")
    with pytest.raises(ValueError, match="non-empty strings"):
        make(models, None).masks(image, [""])


def test_transformers_sam_folder_gives_box_masks_and_from_pretrained_loads_it(models, image, tmp_path: Path) -> None:
    """SAM as transformers' SamModel (hub id or folder): boxes mapped to its frame as segment-anything maps them,
    masks of image shape, cached and reloaded identically; the offline checks accept both folders."""
    detector, processor, _ = models
    sam, sam_processor = tiny_hf_sam()
    predictor = TransformersSamPredictor(sam, sam_processor)
    predictor.set_image(np.asarray(image), image_format="RGB")
    boxes = predictor.transform.apply_boxes_torch(torch.tensor([[30.0, 20.0, 90.0, 70.0]]), (H, W))
    np.testing.assert_allclose(boxes.numpy(), [[60.0, 40.0, 180.0, 140.0]])  # longest side 128 -> 256
    masks, iou, low = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    assert masks.shape == (1, 1, H, W) and masks.dtype == torch.bool and iou.shape == (1, 1)

    sam.save_pretrained(tmp_path / "tiny-sam")
    sam_processor.save_pretrained(tmp_path / "tiny-sam")
    detector.save_pretrained(tmp_path / "tiny-dino")
    processor.save_pretrained(tmp_path / "tiny-dino")
    check_detector(str(tmp_path / "tiny-dino"))
    check_segmenter(str(tmp_path / "tiny-sam"))
    gsam = GroundedSam.from_pretrained(tmp_path / "tiny-dino", tmp_path / "tiny-sam", box_threshold=0.0,
                                       text_threshold=0.0, cache_dir=tmp_path / "c", local_files_only=True)
    assert gsam.sam_id.startswith("sam-hf:tiny-sam@") and isinstance(gsam.sam_predictor, TransformersSamPredictor)
    first = gsam.masks(image, ["cat", "dog"])
    assert all(m.shape == (H, W) and m.dtype == bool for m in first.values())
    again = GroundedSam.from_pretrained(tmp_path / "tiny-dino", tmp_path / "tiny-sam", box_threshold=0.0,
                                        text_threshold=0.0, cache_dir=tmp_path / "c", local_files_only=True)
    out = again.ground(image, ["cat", "dog"])
    assert all(g.cached for g in out.values()) and again.stats["computed"] == 0
    for word in ("cat", "dog"):
        np.testing.assert_array_equal(out[word].mask, first[word])


def test_offline_checks_name_the_fix_in_one_line(models, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "bad-dino").mkdir()
    (tmp_path / "bad-dino" / "config.json").write_text("{not json")
    for source, match in ((tmp_path / "bad-dino", "cannot load Grounding DINO from local folder"),
                          ("IDEA-Research/grounding-dino-tiny", "hf download IDEA-Research/grounding-dino-tiny")):
        with pytest.raises(OSError, match=match) as info:
            check_detector(str(source))
        assert "\n" not in str(info.value)
    detector, processor, predictor = models
    detector.save_pretrained(tmp_path / "no-weights")
    processor.save_pretrained(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no weights"):
        check_detector(str(tmp_path / "no-weights"))
    with pytest.raises(ValueError, match="not 'sam'"):
        check_segmenter(str(tmp_path / "no-weights"))  # a Grounding DINO folder is no SAM
    with pytest.raises(ValueError, match="cannot tell the SAM type"):
        check_segmenter(str(tmp_path / "weights.pth"))
    monkeypatch.setitem(sam_model_registry, "tiny", tiny_sam)
    torch.save(predictor.model.state_dict(), tmp_path / "tiny_sam.pth")
    check_segmenter(str(tmp_path / "tiny_sam.pth"), "tiny")  # memory-mapped and compared on the meta device
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit sam_type 'tiny'"):
        check_segmenter(str(tmp_path / "other.pth"), "tiny")
