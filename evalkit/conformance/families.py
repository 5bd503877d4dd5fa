"""The model families a method must work on, the built-in models that stand for each, and the one
reference trace per model that every check reuses (generated once per process)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from ..trace import STAT_DOCS, Trace


def trace_sd_unet(model: str, family: ModelFamily) -> Trace:
    """Trace the family's probe prompt on an SD-style UNet pipeline, recording every statistic."""
    import torch

    from ..models import load
    from ..trace import generate

    torch.manual_seed(0)  # random-weight fixtures draw nothing, but keep any lazy init reproducible
    pipe = load(model)
    stats = sorted(STAT_DOCS) if family.backbone == "transformer" else sorted(set(STAT_DOCS) - {"concept"})
    gen = generate(pipe, family.prompt, seeds=0, steps=family.steps, guidance=7.5, height=family.size,
                   width=family.size, stats=stats)
    return gen.traces[0]


@dataclass(frozen=True)
class ModelFamily:
    """A kind of denoiser evalkit traces (layer layout, tokenizer, latent geometry) and the built-in
    models that represent it; ``tracer`` makes a model's reference trace, so a family with another
    pipeline (SDXL, MM-DiT) brings its own."""

    name: str
    description: str
    models: tuple[str, ...]
    #: must contain a word that occurs twice and a word the family's tokenizer splits into several tokens
    prompt: str
    size: int = 64
    steps: int = 1
    tracer: Callable[[str, ModelFamily], Trace] = trace_sd_unet
    backbone: str = "unet"  # or "transformer" (MM-DiT); a method runs on the families its ``backbones`` name


#: Every family evalkit supports; a new family is one more entry. Every pipeline goes through
#: :func:`evalkit.trace.generate`, so one tracer serves them all.
FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="sd1",
        description="Stable Diffusion 1.x UNet with a CLIP BPE text encoder",
        models=("tiny-sd", "shapesworld"),  # 8x8 latent with attn2 at 1..1/8 side, and 16x16 at 1..1/2
        prompt="a red circle beside a blue hexagon and a circle",  # "circle" twice, "hexagon" = hex + agon
    ),
    ModelFamily(
        name="sd2",
        description="Stable Diffusion 2.x UNet (v-prediction, linear projections, per-block head counts)",
        models=("tiny-sd2",),
        prompt="a red circle beside a blue hexagon and a circle",
    ),
    ModelFamily(
        name="sdxl",
        description="SDXL UNet with two CLIP text encoders (positions from the first)",
        models=("tiny-sdxl",),
        prompt="a red circle beside a blue hexagon and a circle",
    ),
    ModelFamily(
        name="sd3",
        description="SD3 MM-DiT: joint attention over CLIP (77) + T5 text keys",
        models=("tiny-sd3",),
        prompt="a red circle beside a blue hexagon and a circle",  # words and pieces from the CLIP part
        backbone="transformer",
    ),
    ModelFamily(
        name="flux",
        description="FLUX.1 MM-DiT: double- and single-stream joint attention over T5 text keys, RoPE",
        models=("tiny-flux",),
        prompt="a red circle beside a blue quokka and a circle",  # "quokka": several pieces of the built T5 vocab
        backbone="transformer",
    ),
)


def all_models() -> list[str]:
    """Every model of every family, in family order."""
    return [m for family in FAMILIES for m in family.models]


def family_of(model: str) -> ModelFamily:
    """The family a conformance model belongs to; unknown models list the known ones."""
    for family in FAMILIES:
        if model in family.models:
            return family
    raise ValueError(f"unknown conformance model {model!r}; the checks run on {', '.join(all_models())}")


@dataclass(frozen=True)
class Probe:
    """What the checks ask for on a reference trace: every word, one repeated word, one multi-token word."""

    words: tuple[str, ...]
    repeated: str
    multi_token: str


def probe(trace: Trace) -> Probe:
    """Derive the probe words from the trace's own tokenization (so a new tokenizer cannot fool the checks)."""
    words = trace.tokens.words
    texts = list(dict.fromkeys(w.text for w in words if w.text.isalnum()))
    repeated = [t for t in texts if sum(w.text == t for w in words) > 1]
    multi = [w.text for w in words if len(w.positions) > 1 and w.text.isalnum()]
    if not repeated or not multi:
        raise ValueError(f"the probe prompt {trace.prompt!r} needs a repeated word and a word split into several "
                         f"tokens (tokens: {list(trace.tokens.pieces)}); change ModelFamily.prompt")
    return Probe(words=tuple(texts), repeated=max(repeated, key=len), multi_token=multi[0])


@functools.cache
def reference_trace(model: str) -> Trace:
    """The model's reference trace, generated on first use and kept for the process; hand methods
    :func:`fresh_copy` of it, never this object."""
    family = family_of(model)
    return family.tracer(model, family)


def fresh_copy(trace: Trace) -> Trace:
    """A copy of ``trace`` with cloned statistics, so a method that writes into them harms no other check."""
    stats = {name: [x.clone() for x in per_layer] for name, per_layer in trace.stats.items()}
    return dataclasses.replace(trace, stats=stats, layers=list(trace.layers), settings=dict(trace.settings))
