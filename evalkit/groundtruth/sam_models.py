"""Loading and offline checks of Grounded-SAM's two models: Grounding DINO (transformers) and SAM (a
segment-anything checkpoint, or transformers' ``SamModel`` behind a ``SamPredictor``-like adapter). Kept apart from
:mod:`evalkit.groundtruth.grounded_sam`, which runs the chain and caches its masks."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_SUFFIXES", "TransformersSamPredictor", "check_checkpoint_path", "check_detector",
           "check_segmenter", "is_sam_checkpoint", "load_pretrained", "load_sam_checkpoint", "load_transformers_sam",
           "sam_type_for", "source_name"]

#: A segmenter path with one of these suffixes is a segment-anything checkpoint; anything else names transformers'
#: ``SamModel`` (a ``save_pretrained`` folder or a hub id such as ``facebook/sam-vit-huge``).
CHECKPOINT_SUFFIXES = (".pth", ".pt")
#: Weight files of a transformers model folder / hub repository (one of them must be present).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def is_sam_checkpoint(source: str | os.PathLike[str]) -> bool:
    """Whether a segmenter source is a segment-anything checkpoint file (else transformers' ``SamModel``)."""
    return Path(source).suffix in CHECKPOINT_SUFFIXES or Path(source).is_file()


def source_name(source: str | os.PathLike[str]) -> str:
    """A model's name in cache ids: a local folder's name, else the hub id."""
    return Path(source).resolve().name if Path(source).is_dir() else str(source)


def load_pretrained(kind: str, source: str, local_files_only: bool, load: Any) -> Any:
    """``load(source, local_files_only=...)`` with its errors turned into one line naming the fix."""
    try:
        return load(source, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise OSError(_load_error(kind, source, err)) from err


def _load_error(kind: str, source: str, err: BaseException) -> str:
    """One line saying why ``kind`` could not be loaded from ``source`` and what to do."""
    if Path(source).exists():
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot load {kind} from local folder {source}: {first}"
    return (f"cannot load {kind} {source!r}: it is not a local folder and is not in the Hugging Face cache "
            f"(offline?); run `hf download {source}` once with network access, or pass a local folder made with "
            f"`hf download {source} --local-dir <folder>` ({type(err).__name__})")


def sam_type_for(checkpoint: str | os.PathLike[str], sam_type: str | None = None) -> str:
    """The ``segment_anything.sam_model_registry`` type of a checkpoint: ``sam_type`` when given, else read from the
    file name as the official checkpoints spell it (``sam_vit_b_01ec64.pth`` -> ``vit_b``)."""
    if sam_type:
        return sam_type
    found = re.search(r"vit_[hlb]", Path(checkpoint).name)
    if found is None:
        raise ValueError(f"cannot tell the SAM type of checkpoint {Path(checkpoint).name!r} from its name; set "
                         "sam_type (vit_h, vit_l or vit_b)")
    return found.group(0)


def check_checkpoint_path(path: Path, sam_type: str) -> None:
    """``sam_type`` is a segment-anything model type and the checkpoint file exists."""
    from segment_anything import sam_model_registry

    if sam_type not in sam_model_registry:
        raise ValueError(f"unknown sam_type {sam_type!r}; segment_anything knows {sorted(sam_model_registry)}")
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path} (download e.g. sam_vit_h_4b8939.pth from the segment-anything "
            "release and pass its path)"
        )


def load_sam_checkpoint(path: Path, sam_type: str, device: str | torch.device) -> tuple[Any, str]:
    """A ``SamPredictor`` over a segment-anything checkpoint, and SAM's name in cache ids."""
    from segment_anything import SamPredictor, sam_model_registry

    check_checkpoint_path(path, sam_type)
    sam = sam_model_registry[sam_type](checkpoint=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / non-checkpoint files
        raise OSError(f"cannot read SAM checkpoint {path}: {type(err).__name__}") from err
    try:
        sam.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"SAM checkpoint {path} does not fit sam_type {sam_type!r} (missing/unexpected/mis-shaped weights); pass "
            "the sam_type the checkpoint was trained as"
        ) from err
    sam.to(device).eval()
    return SamPredictor(sam), f"sam-{sam_type}:{path.name}"


def load_transformers_sam(source: str, device: str | torch.device, local_files_only: bool) -> tuple[Any, str]:
    """A :class:`TransformersSamPredictor` over transformers' ``SamModel`` from a folder or hub id, and its name."""
    from transformers import SamModel, SamProcessor

    processor, model = load_pretrained(
        "SAM", source, local_files_only,
        lambda src, **kw: (SamProcessor.from_pretrained(src, **kw), SamModel.from_pretrained(src, **kw)))
    model.to(device).eval()
    return TransformersSamPredictor(model, processor), f"sam-hf:{source_name(source)}"


def check_detector(detector: str) -> None:
    """Check, without downloading or reading the weights, that Grounding DINO loads from ``detector``: config and
    processor parse, weight files are present (local folder or Hugging Face cache). One-line ``OSError``/``ValueError``
    naming the fix otherwise."""
    from transformers import GroundingDinoProcessor

    _check_transformers("Grounding DINO", detector, "grounding-dino", GroundingDinoProcessor)


def check_segmenter(segmenter: str, sam_type: str | None = None) -> None:
    """Check, without downloading or copying weights, that SAM loads from ``segmenter``: a checkpoint's tensors fit
    its type (memory-mapped), or a ``SamModel``'s config, processor and weight files are present. One-line
    ``OSError``/``ValueError`` naming the fix otherwise."""
    from transformers import SamProcessor

    if is_sam_checkpoint(segmenter):
        _check_sam_checkpoint(Path(segmenter), sam_type_for(segmenter, sam_type))
    else:
        _check_transformers("SAM", segmenter, "sam", SamProcessor)


def _check_transformers(kind: str, source: str, model_type: str, processor_cls: Any) -> None:
    """A transformers model of ``model_type`` with its processor and weights is available offline at ``source``."""
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    path = Path(source)
    if path.exists() and not path.is_dir():
        raise OSError(f"cannot load {kind} from {source}: it is a file, not a model folder (save_pretrained / "
                      "hf download --local-dir writes one)")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        processor_cls.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise OSError(_load_error(kind, source, err)) from err
    if config.model_type != model_type:
        raise ValueError(f"{kind} {source}: its config is a {config.model_type!r} model, not {model_type!r}")
    if path.is_dir():
        present = any((path / name).is_file() for name in _WEIGHT_FILES)
    else:
        present = any(isinstance(try_to_load_from_cache(source, name), str) for name in _WEIGHT_FILES)
    if not present:
        raise OSError(_load_error(kind, source, FileNotFoundError(f"no weights ({', '.join(_WEIGHT_FILES)})")))


def _check_sam_checkpoint(path: Path, sam_type: str) -> None:
    """A segment-anything checkpoint exists, reads, and holds exactly the tensors of ``sam_type`` (memory-mapped, and
    compared with the model built on the meta device: no weights are copied)."""
    from segment_anything import sam_model_registry

    check_checkpoint_path(path, sam_type)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a checkpoint in torch's legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / non-checkpoint files
        raise OSError(f"cannot read SAM checkpoint {path}: {type(err).__name__}") from err
    with torch.device("meta"):
        expected = sam_model_registry[sam_type](checkpoint=None).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ValueError(f"SAM checkpoint {path} does not fit sam_type {sam_type!r} (missing/unexpected/mis-shaped "
                         "weights); set the sam_type the checkpoint was trained as")


class TransformersSamPredictor:
    """``segment_anything.SamPredictor``'s interface, as far as :class:`GroundedSam` uses it, over transformers'
    ``SamModel``: so SAM can come from a hub id or ``save_pretrained`` folder as well as from a ``.pth`` file.

    Boxes are mapped to the processor's resized frame exactly as segment-anything does (longest side to
    ``size["longest_edge"]``); masks are the processor's post-processed low-resolution masks (upscaled, cropped to
    the unpadded image, resized to the image, thresholded at 0), as ``SamPredictor.predict_torch`` returns them.
    """

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model.eval()
        self.processor = processor
        self.transform = ResizeLongestSide(int(processor.image_processor.size["longest_edge"]))
        self._embeddings: torch.Tensor | None = None
        self._sizes: tuple[Any, Any] | None = None

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the image embedding of an ``(H, W, 3)`` uint8 image (once per image)."""
        if image_format != "RGB":
            raise ValueError(f"image_format must be 'RGB', got {image_format!r}")
        inputs = self.processor(images=np.array(image, copy=True), return_tensors="pt")  # torch wants it writable
        pixels = inputs["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
        with torch.inference_mode():
            self._embeddings = self.model.get_image_embeddings(pixels)
        self._sizes = (inputs["original_sizes"], inputs["reshaped_input_sizes"])

    def predict_torch(self, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                      boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None,
                      multimask_output: bool = True, return_logits: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks ``(boxes, masks per box, H, W)`` for box prompts (already in the resized frame), their IoU
        predictions and the low-resolution logits; points and mask prompts are not supported."""
        if self._embeddings is None or self._sizes is None:
            raise RuntimeError("an image must be set with set_image() before mask prediction")
        if boxes is None or point_coords is not None or mask_input is not None:
            raise ValueError("TransformersSamPredictor supports box prompts only")
        with torch.inference_mode():
            out = self.model(image_embeddings=self._embeddings, input_boxes=boxes[None].to(self._embeddings.dtype),
                             multimask_output=multimask_output)
        masks = self.processor.image_processor.post_process_masks(out.pred_masks.float().cpu(), *self._sizes,
                                                                  binarize=not return_logits)[0]
        return masks.to(self.device), out.iou_scores[0], out.pred_masks[0]
