"""Where the cross-attention (attn2) layers of a diffusers UNet sit, and what shape their maps have.

The same rule covers SD 1.x, SD 2.x and SDXL: every ``attn2`` of every transformer block counts, so SDXL's
attentions with several transformer layers (``transformer_layers_per_block`` 2 and 10 in SDXL base) give one
layer per transformer block, numbered in forward order within down / mid / up (SDXL base: 24 + 10 + 36 = 70
layers, 1300 heads; SD 1.x: 7 + 1 + 9 = 16 layers, 128 heads), which is how the published HRVs name heads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

_NAME_RE = re.compile(
    r"^(?:(?P<part>down|up)_blocks\.(?P<block>\d+)|(?P<mid>mid_block))\.attentions\.(?P<attn>\d+)"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn2$"
)


@dataclass(frozen=True)
class LayerInfo:
    """One cross-attention layer: its module name, place in the UNet and geometry.

    ``index`` counts attn2 layers within ``place`` (down / mid / up) in forward order, which is
    how published head relevance vectors name heads ("down, layer: 0, head: 3").
    ``downsample`` is the latent-side divisor of this layer (1 = full latent grid, 8 = 1/8 side).
    """

    name: str
    place: str
    block: int
    index: int
    heads: int
    downsample: int

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Spatial grid ``(h, w)`` of this layer's maps for a latent of size ``latent_hw``."""
        h, w = latent_hw
        f = self.downsample
        while f > 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            f //= 2
        return h, w

    def head_names(self) -> list[str]:
        """Head names in the published HRV convention, one per head of this layer."""
        return [f"{self.place}, layer: {self.index}, head: {h}" for h in range(self.heads)]


def _block_downsample(unet: nn.Module, place: str, block: int) -> int:
    """Latent-side divisor at which a down/mid/up block's attentions run."""
    downs = unet.down_blocks
    n_down_samplers = sum(1 for b in downs if getattr(b, "downsamplers", None) is not None)
    if place == "mid":
        return 2**n_down_samplers
    if place == "down":
        return 2 ** sum(1 for b in list(downs)[:block] if getattr(b, "downsamplers", None) is not None)
    ups = unet.up_blocks
    n_up = sum(1 for b in list(ups)[:block] if getattr(b, "upsamplers", None) is not None)
    return 2 ** (n_down_samplers - n_up)


def find_cross_attention_layers(unet: nn.Module) -> list[tuple[LayerInfo, nn.Module]]:
    """All attn2 modules of a ``UNet2DConditionModel`` in forward order (down, mid, up), with metadata."""
    found: dict[str, list[tuple[LayerInfo, nn.Module]]] = {"down": [], "mid": [], "up": []}
    for name, module in unet.named_modules():
        m = _NAME_RE.match(name)
        if m is None:
            continue
        place = "mid" if m.group("mid") else m.group("part")
        block = 0 if place == "mid" else int(m.group("block"))
        info = LayerInfo(
            name=name,
            place=place,
            block=block,
            index=len(found[place]),
            heads=int(module.heads),
            downsample=_block_downsample(unet, place, block),
        )
        found[place].append((info, module))
    layers = found["down"] + found["mid"] + found["up"]
    if not layers:
        raise ValueError(
            "the UNet has no cross-attention modules named '*attentions.*.transformer_blocks.*.attn2': "
            "evalkit traces diffusers UNet2DConditionModel pipelines only"
        )
    return layers


def unet_head_names(config: Mapping) -> list[str]:
    """Head names (HRV convention) of the UNet a ``UNet2DConditionModel`` config describes, built on the meta
    device: no weights are allocated or read, so a full-size SDXL config costs well under a second."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    return [n for info, _ in find_cross_attention_layers(unet) for n in info.head_names()]


def model_head_names(model: str) -> list[str] | None:
    """Head names of ``model``'s UNet or MM-DiT transformer (built-in name, local folder or cached hub id) from
    its config alone; None when the config is not available offline (a hub id not in the cache)."""
    from ..models import transformer_config, unet_config

    config = unet_config(model)
    if config is not None:
        return unet_head_names(config)
    config = transformer_config(model)
    return None if config is None else transformer_head_names(config)


def transformer_head_names(config: Mapping) -> list[str]:
    """Head names of the SD3 or Flux transformer a config describes (``_class_name`` picks the class), built on
    the meta device without weights."""
    import diffusers
    import torch

    from .joint import find_joint_attention_layers

    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None:
        raise ValueError(f"unknown transformer class {config.get('_class_name')!r} in the model's config")
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    return [n for info, *_ in find_joint_attention_layers(model) for n in info.head_names()]
