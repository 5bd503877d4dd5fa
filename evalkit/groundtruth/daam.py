"""Import DAAM's experiment folders (COCO-Gen, Unreal-Gen) into a :class:`~evalkit.groundtruth.coco.GroundTruth`.

DAAM (Tang et al., 2023) distributes its human-annotated sets as one folder per prompt::

    root/
      452/
        prompt.txt        the prompt
        seed.txt          the integer seed
        output.png        the generated image (512 x 512 in the releases)
        dog.gt.png        ground-truth mask for "dog" in the ALPHA channel (DAAM writes mask * 255 to all of RGBA)
        frisbee.gt.png
        ...               other files (generation.pt, *.heat_map.png, *.pred.png, annotations.json) are ignored

Binarisation is ``alpha > 0``, the rule of DAAM's own ``daam.evaluate.load_mask``, so IoUs computed here match the
paper's pipeline even for masks with anti-aliased (partially transparent) edges. Words are taken from the file
name before ``.gt.png`` and lower-cased, and masks whose words coincide after lower-casing are united -- again as
DAAM's loader does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .coco import GroundTruth, GroundTruthError

__all__ = ["import_daam_folder"]

_MASK_SUFFIX = ".gt.png"
_DAAM_FILES = ("prompt.txt", "seed.txt", "output.png")


def import_daam_folder(
    root: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> GroundTruth:
    """Convert a DAAM experiment folder to a :class:`GroundTruth`; also write it as COCO JSON when ``output`` is set.

    Every direct sub-folder that holds any DAAM file (``prompt.txt``, ``seed.txt``, ``output.png`` or a
    ``*.gt.png``) is a prompt folder and must be complete; other sub-folders (caches, hidden folders) are skipped.
    Image ids are the folder names when all are integers (as in the releases), else 1..n in sorted order;
    ``file_name`` is ``<folder>/output.png`` relative to ``root``. Prompt folders without masks are kept as images
    without annotations. The returned object's :attr:`~GroundTruth.root` is ``root``; a JSON written to ``output``
    stores paths relative to ``root``, so put it in ``root`` (the default name there is ``groundtruth.json``).

    Raises :class:`GroundTruthError` naming the offending file for a missing/empty ``prompt.txt``, a missing or
    non-integer ``seed.txt``, a missing or unreadable ``output.png`` or mask, a mask without an alpha channel, or a
    mask whose size differs from the image's.
    """
    root = Path(root)
    if not root.is_dir():
        raise GroundTruthError(f"{root}: not a folder")
    folders = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _looks_like_daam(d)]
    if not folders:
        raise GroundTruthError(f"{root}: no DAAM prompt folders (sub-folders with prompt.txt, seed.txt, output.png)")
    numeric = all(re.fullmatch(r"\d+", d.name) for d in folders)
    folders.sort(key=(lambda d: int(d.name)) if numeric else (lambda d: d.name))

    gt = GroundTruth(root=root, info={"description": f"imported from DAAM experiment folder {root.name}"})
    for index, folder in enumerate(folders, start=1):
        prompt = _read_text(folder / "prompt.txt")
        if not prompt:
            raise GroundTruthError(f"{folder / 'prompt.txt'}: empty prompt")
        seed_text = _read_text(folder / "seed.txt")
        try:
            seed = int(seed_text)
        except ValueError:
            raise GroundTruthError(f"{folder / 'seed.txt'}: not an integer seed: {seed_text!r}") from None
        width, height = _image_size(folder / "output.png")
        image = gt.add_image(f"{folder.name}/output.png", height, width, prompt, seed,
                             image_id=int(folder.name) if numeric else index)

        masks: dict[str, np.ndarray] = {}
        for mask_path in sorted(folder.glob(f"*{_MASK_SUFFIX}")):
            word = mask_path.name[: -len(_MASK_SUFFIX)].lower()
            mask = _read_alpha_mask(mask_path)
            if mask.shape != (height, width):
                raise GroundTruthError(
                    f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) != image size {width}x{height} "
                    f"of {folder / 'output.png'}"
                )
            masks[word] = masks[word] | mask if word in masks else mask
        for word, mask in masks.items():
            gt.add_mask(image.id, word, mask)

    if output is not None:
        gt.save(output)
    return gt


def _looks_like_daam(folder: Path) -> bool:
    return any((folder / name).exists() for name in _DAAM_FILES) or any(folder.glob(f"*{_MASK_SUFFIX}"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: missing (every DAAM prompt folder needs {', '.join(_DAAM_FILES)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GroundTruthError(f"{path}: unreadable ({err})") from err


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise GroundTruthError(f"{path}: missing")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise GroundTruthError(f"{path}: unreadable image ({err})") from err
    return image


def _image_size(path: Path) -> tuple[int, int]:
    return _open_image(path).size


def _read_alpha_mask(path: Path) -> np.ndarray:
    """``alpha > 0`` of a ``*.gt.png``; a mask without alpha is rejected rather than guessed at."""
    image = _open_image(path)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" not in image.getbands():
        raise GroundTruthError(
            f"{path}: no alpha channel (mode {image.mode}); DAAM ground-truth masks are stored in the alpha channel"
        )
    return np.asarray(image.getchannel("A")) > 0
