"""Grounded-SAM ground truth: Grounding DINO boxes for a word -> SAM masks -> COCO RLE, cached per image.

For generated images without human masks, the usual automatic ground truth is Grounded-SAM: an open-vocabulary
detector (Grounding DINO) finds boxes for the word, and SAM turns each box into a mask. This module runs that chain
with transformers' ``GroundingDinoForObjectDetection`` (the ``groundingdino-py`` package does not run on
transformers 5, see ``docs/groundtruth.md``) and ``segment_anything``'s ``SamPredictor``, and caches every result as
COCO RLE in a JSON file per image, so a suite never pays for the two models twice.

Per word ``w`` and image ``I`` (H x W):

1. Grounding DINO runs on ``I`` with the text ``w.lower() + "."`` (its training convention: lower case, phrases
   ending in a period). A query's box score is the maximum sigmoid logit over all text tokens, exactly as
   ``GroundingDinoProcessor.post_process_grounded_object_detection`` computes it. A query is kept when its box
   score is ``> box_threshold`` and the best logit over the word's own tokens (not ``[CLS]``/``[SEP]``/``.``) is
   ``> text_threshold``. Boxes are converted to absolute ``xyxy`` pixels and clipped to the image.
2. ``keep="all"`` (default) prompts SAM with every kept box and unites the masks, so plural words ("dogs") and
   repeated objects are covered; ``keep="best"`` uses only the highest-scoring box.
3. SAM predicts one mask per box (``multimask_output=False``); the union is the word's mask.
4. No kept box -> an all-False mask, recorded in the cache with ``no_box: true`` and logged as a warning, never an
   exception: "the detector found nothing" is a result, and recomputing it on every run would be waste.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .coco import GroundTruth, atomic_write_json, decode_rle, encode_rle
from .sam_models import (
    TransformersSamPredictor,
    check_checkpoint_path,
    check_detector,
    check_segmenter,
    is_sam_checkpoint,
    load_pretrained,
    load_sam_checkpoint,
    load_transformers_sam,
    sam_type_for,
    source_name,
)

__all__ = ["CACHE_VERSION", "GroundedSam", "Grounding", "TransformersSamPredictor", "check_detector", "check_segmenter",
           "image_sha256", "is_sam_checkpoint", "module_fingerprint", "sam_type_for"]

logger = logging.getLogger(__name__)

#: Bumped whenever the pipeline's output for the same inputs would change, so stale cache entries are not reused.
CACHE_VERSION = 1
CACHE_FORMAT = "evalkit.grounded_sam/1"
DEFAULT_DINO = "IDEA-Research/grounding-dino-tiny"
_SAM_BATCH = 64  # boxes per SAM decoder call


@dataclass(frozen=True, eq=False)
class Grounding:
    """The Grounded-SAM result for one word in one image.

    ``boxes`` are the kept Grounding DINO boxes (``xyxy`` pixels, best first) that prompted SAM, ``scores`` their box
    scores, ``mask`` the union of SAM's masks (bool, image ``(H, W)``); ``cached`` says it came from the cache.
    """

    word: str
    mask: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    cached: bool

    @property
    def no_box(self) -> bool:
        """True when Grounding DINO kept no box for the word (the mask is then empty)."""
        return len(self.boxes) == 0


def image_sha256(image: Image.Image) -> str:
    """sha256 of the image's decoded RGB pixel bytes and size.

    Hashing pixels rather than the file means the same picture re-encoded (other PNG compression, metadata) still
    hits the cache, while any pixel change misses it.
    """
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"RGB:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): identifies the weights, not the file path."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class GroundedSam:
    """Grounding DINO + SAM masks for prompt words, cached as COCO RLE keyed by image hash, models and thresholds.

    Args:
        detector: a ``transformers.GroundingDinoForObjectDetection`` (any module with its forward/outputs works).
        processor: the matching ``transformers.GroundingDinoProcessor`` (image preprocessing and tokenizer).
        sam_predictor: a ``segment_anything.SamPredictor`` wrapping the SAM model.
        box_threshold: keep a detector query whose box score (max sigmoid over text tokens) is above this.
        text_threshold: ... and whose best score over the word's own tokens is above this.
        cache_dir: folder for the per-image cache files ``<image sha256>.json``. ``None``: a ``gsam_cache`` folder
            next to the image file when the image was opened from a file, else no caching.
        keep: ``"all"`` unites the SAM masks of all kept boxes, ``"best"`` uses the top-scoring box only.
        detector_id, sam_id: model identities for the cache key. ``None``: a name plus a fingerprint of the weights
            (:func:`module_fingerprint`, computed once, on first cache use; a few seconds for SAM ViT-H).
    """

    def __init__(
        self,
        detector: torch.nn.Module,
        processor: Any,
        sam_predictor: Any,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        keep: Literal["all", "best"] = "all",
        detector_id: str | None = None,
        sam_id: str | None = None,
    ) -> None:
        for name, value in (("box_threshold", box_threshold), ("text_threshold", text_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if keep not in ("all", "best"):
            raise ValueError(f"keep must be 'all' or 'best', got {keep!r}")
        self.detector = detector.eval()
        self.processor = processor
        self.sam_predictor = sam_predictor
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.keep = keep
        self._detector_id = detector_id
        self._sam_id = sam_id
        self._detector_name: str | None = None  # set by from_pretrained: hub id / folder name
        self._sam_name: str | None = None  # from_pretrained: sam-<type>:<checkpoint name> / sam-hf:<id or folder>
        #: running counts: ``cache_hits``, ``computed`` words, ``no_box`` words (a summary for suite reports).
        self.stats: dict[str, int] = {"cache_hits": 0, "computed": 0, "no_box": 0}

    # ------------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        dino: str | os.PathLike[str] = DEFAULT_DINO,
        sam_checkpoint: str | os.PathLike[str] | None = None,
        sam_type: str = "vit_h",
        device: str | torch.device = "cpu",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        keep: Literal["all", "best"] = "all",
        local_files_only: bool = False,
    ) -> GroundedSam:
        """Load Grounding DINO from a hub id or local folder, and SAM from a checkpoint file, folder or hub id.

        ``dino``: a Hugging Face id (needs the network or the HF cache) or a folder written by ``save_pretrained`` /
        ``hf download <id> --local-dir <folder>``. ``sam_checkpoint``: a ``.pth``/``.pt`` file of
        ``segment_anything.sam_model_registry[sam_type]`` (e.g. ``sam_vit_h_4b8939.pth`` for ``vit_h``), loaded with
        ``map_location="cpu"`` and ``weights_only=True``, then moved to ``device``; or a folder / hub id of
        transformers' ``SamModel`` (e.g. ``facebook/sam-vit-huge``; ``sam_type`` is then not used).
        ``local_files_only``: never download (local folders and the Hugging Face cache only).
        """
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        if sam_checkpoint is None:
            raise ValueError("sam_checkpoint is required: a segment-anything .pth checkpoint, or a folder / hub id of "
                             "transformers' SamModel")
        checkpoint = is_sam_checkpoint(sam_checkpoint)
        if checkpoint:  # argument errors before any model is read
            check_checkpoint_path(Path(sam_checkpoint), sam_type)
        processor, detector = load_pretrained(
            "Grounding DINO", str(dino), local_files_only,
            lambda src, **kw: (GroundingDinoProcessor.from_pretrained(src, **kw),
                               GroundingDinoForObjectDetection.from_pretrained(src, **kw)))
        detector.to(device)
        if checkpoint:
            predictor, sam_name = load_sam_checkpoint(Path(sam_checkpoint), sam_type, device)
        else:
            predictor, sam_name = load_transformers_sam(str(sam_checkpoint), device, local_files_only)
        gsam = cls(detector, processor, predictor, box_threshold, text_threshold, cache_dir, keep=keep)
        gsam._detector_name = source_name(dino)
        gsam._sam_name = sam_name
        return gsam

    @cached_property
    def detector_id(self) -> str:
        """The detector's identity in cache keys (explicit, or name + weight fingerprint)."""
        if self._detector_id is not None:
            return self._detector_id
        name = self._detector_name or getattr(getattr(self.detector, "config", None), "_name_or_path", "")
        name = name or type(self.detector).__name__
        return f"{name}@{module_fingerprint(self.detector)[:16]}"

    @cached_property
    def sam_id(self) -> str:
        """SAM's identity in cache keys (explicit, or name + weight fingerprint)."""
        if self._sam_id is not None:
            return self._sam_id
        return f"{self._sam_name or 'sam'}@{module_fingerprint(self.sam_predictor.model)[:16]}"

    # ----------------------------------------------------------------------------------------------------- caching

    def cache_key(self, image_hash: str, word: str) -> str:
        """sha256 of everything the mask depends on: image, both models, thresholds, box policy, word, version."""
        payload = {
            "version": CACHE_VERSION, "image": image_hash, "detector": self.detector_id, "sam": self.sam_id,
            "box_threshold": self.box_threshold, "text_threshold": self.text_threshold, "keep": self.keep,
            "word": word,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def cache_path(self, image: Image.Image, image_hash: str | None = None) -> Path | None:
        """The cache file for ``image``: ``<cache_dir>/<sha256>.json`` (see ``cache_dir``); ``None`` = no cache."""
        folder = self.cache_dir
        if folder is None:
            filename = getattr(image, "filename", "")
            if not filename:
                return None
            folder = Path(filename).parent / "gsam_cache"
        return folder / f"{image_hash or image_sha256(image)}.json"

    @staticmethod
    def _read_cache(path: Path | None) -> dict[str, Any]:
        if path is None or not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return dict(data["entries"])
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            logger.warning("ignoring unreadable Grounded-SAM cache %s (%s); it will be rewritten", path, err)
            return {}

    # ------------------------------------------------------------------------------------------------------ models

    def _raw_detections(self, image: Image.Image, word: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All detector queries for ``word``: clipped ``xyxy`` pixel boxes, box scores, scores on the word's tokens."""
        query = word.strip().lower()
        query = query if query.endswith(".") else query + "."
        device = next(self.detector.parameters()).device
        inputs = self.processor(images=image, text=query, return_tensors="pt").to(device)
        with torch.inference_mode():
            outputs = self.detector(**inputs)
        probs = outputs.logits[0].float().sigmoid()  # (queries, max_text_len); positions past the text are 0
        tokens = self.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
        special = set(self.processor.tokenizer.all_special_tokens) | {"."}
        word_pos = [i for i, tok in enumerate(tokens) if tok not in special]
        if not word_pos:
            raise ValueError(f"word {word!r} has no tokens for Grounding DINO besides special tokens/periods")
        box_scores = probs.max(dim=-1).values
        word_scores = probs[:, word_pos].max(dim=-1).values
        cx, cy, w, h = outputs.pred_boxes[0].float().unbind(-1)
        width, height = image.size
        boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height],
                            dim=-1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return boxes.cpu().numpy(), box_scores.cpu().numpy(), word_scores.cpu().numpy()

    def detect(self, image: Image.Image, word: str) -> tuple[np.ndarray, np.ndarray]:
        """Kept boxes (``(n, 4)`` ``xyxy`` pixels inside the image, best first) and their box scores for ``word``."""
        boxes, box_scores, word_scores = self._raw_detections(image.convert("RGB"), word)
        kept = np.flatnonzero((box_scores > self.box_threshold) & (word_scores > self.text_threshold))
        kept = kept[np.argsort(-box_scores[kept], kind="stable")]
        if self.keep == "best":
            kept = kept[:1]
        return boxes[kept].astype(np.float32), box_scores[kept].astype(np.float32)

    def segment(self, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Union of SAM's single-mask predictions for ``boxes`` on the image last given to ``set_image``.

        ``size`` is the image ``(H, W)``; the result is a bool ``(H, W)`` mask.
        """
        predictor = self.sam_predictor
        union = torch.zeros(size, dtype=torch.bool, device=predictor.device)
        for start in range(0, len(boxes), _SAM_BATCH):
            chunk = torch.as_tensor(boxes[start:start + _SAM_BATCH], dtype=torch.float32, device=predictor.device)
            chunk = predictor.transform.apply_boxes_torch(chunk, size)
            masks, _, _ = predictor.predict_torch(point_coords=None, point_labels=None, boxes=chunk,
                                                  multimask_output=False)
            union |= masks[:, 0].any(dim=0)
        return union.cpu().numpy()

    # ------------------------------------------------------------------------------------------------------ public

    def ground(self, image: Image.Image, words: Sequence[str]) -> dict[str, Grounding]:
        """:class:`Grounding` per word, from the cache when present, else computed and then cached (atomically)."""
        words = list(dict.fromkeys(words))
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"words must be non-empty strings, got {word!r}")
        rgb = image.convert("RGB")
        size = (rgb.height, rgb.width)
        image_hash = image_sha256(rgb)
        path = self.cache_path(image, image_hash)
        entries = self._read_cache(path)

        results: dict[str, Grounding] = {}
        new_entries: dict[str, dict[str, Any]] = {}
        sam_ready = False
        for word in words:
            key = self.cache_key(image_hash, word)
            entry = entries.get(key)
            if entry is not None and list(entry.get("segmentation", {}).get("size", [])) == list(size):
                results[word] = _grounding_from_entry(word, entry)
                self.stats["cache_hits"] += 1
                continue
            boxes, scores = self.detect(rgb, word)
            if len(boxes) == 0:
                mask = np.zeros(size, dtype=bool)
                self.stats["no_box"] += 1
                logger.warning("Grounded-SAM: no box above box_threshold=%s/text_threshold=%s for %r in image %s; "
                               "recording an empty mask", self.box_threshold, self.text_threshold, word,
                               getattr(image, "filename", "") or image_hash[:12])
            else:
                if not sam_ready:
                    self.sam_predictor.set_image(np.asarray(rgb), image_format="RGB")
                    sam_ready = True
                mask = self.segment(boxes, size)
            self.stats["computed"] += 1
            results[word] = Grounding(word, mask, boxes, scores, cached=False)
            new_entries[key] = {
                "word": word, "detector": self.detector_id, "sam": self.sam_id,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold, "keep": self.keep,
                "boxes": boxes.tolist(), "scores": scores.tolist(), "no_box": bool(len(boxes) == 0),
                "segmentation": encode_rle(mask), "area": int(mask.sum()),
            }

        if path is not None and new_entries:
            merged = {**self._read_cache(path), **new_entries}  # re-read: keep entries another process added meanwhile
            atomic_write_json(path, {"format": CACHE_FORMAT, "image_sha256": image_hash, "height": size[0],
                                     "width": size[1], "entries": merged})
        return results

    def masks(self, image: Image.Image, words: Sequence[str]) -> dict[str, np.ndarray]:
        """Bool ``(H, W)`` mask per word (all-False where no box passed the thresholds; see :meth:`ground`)."""
        return {word: g.mask for word, g in self.ground(image, words).items()}

    def annotate(self, gt: GroundTruth, image_id: int, words: Iterable[str]) -> dict[str, Grounding]:
        """Ground ``words`` in image ``image_id`` of ``gt`` and add the non-empty masks to ``gt`` as annotations.

        Words whose mask is empty are not added (a later ``gt.masks_for`` names them as missing) but are in the
        returned dict, so the caller can report them. The cache defaults to ``gsam_cache/`` next to the image.
        """
        record = gt.image(image_id)
        path = gt.image_path(image_id)
        with Image.open(path) as image:
            image.load()
            if (image.height, image.width) != (record.height, record.width):
                raise ValueError(f"{path}: image is {image.width}x{image.height}, the ground truth says "
                                 f"{record.width}x{record.height}")
            groundings = self.ground(image, list(words))
        for word, g in groundings.items():
            if g.mask.any():
                gt.add_mask(image_id, word, g.mask)
        return groundings


def _grounding_from_entry(word: str, entry: dict[str, Any]) -> Grounding:
    boxes = np.asarray(entry.get("boxes", []), dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(entry.get("scores", []), dtype=np.float32).reshape(-1)
    return Grounding(word, decode_rle(entry["segmentation"]), boxes, scores, cached=True)
