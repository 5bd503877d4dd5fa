"""Tracing a generation: install recording processors on every attn2 module of a UNet (or wrap every joint
attention of an MM-DiT, see :mod:`evalkit.trace.joint`), run the pipeline once, restore the original processors
(also after an exception), and hand back one :class:`~evalkit.trace.record.Trace` per conditional batch item."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .batch import StepBatch
from .concept import DEFAULT_EXTRA, ConceptStream, concept_embeddings
from .joint import READINGS, JointTracingProcessor, find_joint_attention_layers, is_mmdit, pipeline_tokenizer, t5_length
from .joint_edits import attach_joint_edit, check_joint_edit
from .layers import LayerInfo, find_cross_attention_layers
from .processor import STAT_DOCS, LayerEdit, LayerRecorder, TracingAttnProcessor
from .record import Trace
from .tokens import PromptTokens, check_same_positions, tokenize_prompt


class Tracer:
    """Context manager that records cross-attention statistics of a denoiser while a pipeline runs: the attn2
    layers of a UNet, or the image-query x text-key block of an MM-DiT's joint attention (SD3, Flux; see
    :mod:`evalkit.trace.joint`, ``reading`` picks how that block is read).

    ``n_cond`` is the number of conditional rows per denoiser call; with classifier-free guidance the
    batch is ``[unconditional; conditional]`` and only the last ``n_cond`` rows are recorded. ``defer`` (UNets)
    records each UNet call's layers together when the call returns (:mod:`evalkit.trace.batch`, fewer kernel
    launches); ``False`` records every layer where it is called (the reference path; same statistics).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        stats: Iterable[str],
        *,
        n_cond: int,
        cfg: bool,
        edits: dict[str, LayerEdit] | None = None,
        observers: dict[str, object] | None = None,
        reading: str = "joint",
        concept_embeddings: torch.Tensor | None = None,
        concept_pooled: torch.Tensor | None = None,
        defer: bool = True,
    ) -> None:
        self.unet = unet
        self.defer = defer
        self.concept_embeddings = concept_embeddings
        self.concept_pooled = concept_pooled
        self.concepts: ConceptStream | None = None
        self.observers = dict(observers or {})
        self.stats = frozenset(stats)
        self.n_cond = n_cond
        self.cfg = cfg
        self.reading = reading
        self.joint = is_mmdit(unet)
        if "concept" in self.stats and (not self.joint or concept_embeddings is None):
            raise ValueError("the 'concept' statistic (ConceptAttention) needs an MM-DiT model (SD3, Flux) and "
                             "concept embeddings; UNet models have no concept stream")
        self._joint_layers = find_joint_attention_layers(unet) if self.joint else []
        self.layers = ([(info, module) for info, module, _, _ in self._joint_layers] if self.joint
                       else find_cross_attention_layers(unet))
        self.edits = dict(edits or {})
        unknown = set(self.edits) - {info.name for info, _ in self.layers}
        if unknown:
            raise ValueError(f"edits name layers the {type(unet).__name__} does not have: {sorted(unknown)[:3]}")
        for info, module in self.layers if self.joint else []:
            if info.name in self.edits:
                check_joint_edit(info.name, module, self.edits[info.name])
        self.recorders: list[LayerRecorder] = []
        self._originals: list[tuple[torch.nn.Module, object]] = []
        self._hooks: list = []
        self._joint_processors: list[JointTracingProcessor] = []
        self._text_len: int | None = None
        self.batch: StepBatch | None = None

    def __enter__(self) -> Tracer:
        rows = slice(self.n_cond, 2 * self.n_cond) if self.cfg else slice(0, self.n_cond)
        self.recorders = []
        self._originals = []
        if self.joint:
            try:
                self._enter_joint(rows)
            except BaseException:
                self._restore()
                raise
            return self
        try:
            if self.stats and self.defer:  # the recorders' work waits for the end of each UNet call (batch.py)
                self.batch = StepBatch()
                self._hooks.append(self.unet.register_forward_hook(lambda *_: self.batch.flush()))
            for info, module in self.layers:
                edit = self.edits.get(info.name)
                observer = self.observers.get(info.name)
                if not self.stats and edit is None and observer is None:
                    continue
                recorder = LayerRecorder(self.stats, rows, batch=self.batch) if self.stats else None
                self._originals.append((module, module.processor))
                module.set_processor(TracingAttnProcessor(recorder, edit, rows, observer))
                if recorder is not None:
                    self.recorders.append(recorder)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.batch is not None:
            if exc_type is None:
                self.batch.flush()
            else:
                self.batch.discard()  # calls of a UNet call that did not finish
        self._restore()

    def _enter_joint(self, rows: slice) -> None:
        """Wrap every joint-attention processor; a pre-hook notes the text length (Flux single blocks see one
        sequence, text first)."""

        def note_text_len(_module, args, kwargs) -> None:
            ehs = kwargs.get("encoder_hidden_states")
            self._text_len = None if ehs is None else int(ehs.shape[1])

        self._hooks.append(self.unet.register_forward_pre_hook(note_text_len, with_kwargs=True))
        recorded = self.stats - {"concept"}
        if "concept" in self.stats:
            blocks = [(i, block) for i, (_, _, kind, block) in enumerate(self._joint_layers) if kind != "flux-single"]
            self.concepts = ConceptStream(self.unet, self.concept_embeddings, rows, blocks, self.concept_pooled)
            self.concepts.install()
        for info, module, kind, block in self._joint_layers:  # edits first: the tracer's hooks see their result
            if info.name in self.edits:
                self._hooks.extend(attach_joint_edit(module, kind, block, self.edits[info.name], rows,
                                                     lambda: self._text_len))
        for info, module, kind, block in self._joint_layers:
            observer = self.observers.get(info.name)
            stream = self.concepts if kind != "flux-single" else None
            if not recorded and observer is None and stream is None:
                continue
            out_weight = None
            if kind == "flux-single":  # the attention output's columns of proj_out
                out_weight = block.proj_out.weight[:, : module.heads * module.head_dim]
            recorder = LayerRecorder(recorded, None, out_weight) if recorded else None
            self._originals.append((module, module.processor))
            edit = self.edits.get(info.name)
            processor = JointTracingProcessor(module.processor, kind, recorder, rows, self.reading,
                                              lambda: self._text_len, observer, stream,
                                              edit.prob_scale if edit is not None else None)
            module.set_processor(processor)
            self._hooks.extend(processor.attach(module))
            self._joint_processors.append(processor)
            if recorder is not None:
                self.recorders.append(recorder)

    def _restore(self) -> None:
        for module, processor in reversed(self._originals):
            module.set_processor(processor)
        self._originals = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.concepts is not None:
            self.concepts.remove()

    def n_steps(self) -> int:
        """Number of UNet calls seen (denoising steps); equal across layers."""
        if self.batch is not None:
            self.batch.flush()
        if self.recorders:
            return self.recorders[0].n_calls
        return self._joint_processors[0].n_calls if self._joint_processors else 0

    def item_stats(self, item: int) -> dict[str, list[torch.Tensor]]:
        """Per-layer statistics of conditional batch item ``item``."""
        if self.batch is not None:
            self.batch.flush()
        out: dict[str, list[torch.Tensor]] = {}
        if "concept" in self.stats:
            sums = self.concepts.sums if self.concepts is not None else {}
            if not sums:
                raise RuntimeError("the pipeline never called the traced transformer: nothing was recorded")
            shape = next(iter(sums.values())).shape[1:]
            out["concept"] = [sums[i][item][None] if i in sums else torch.zeros((0, *shape))
                              for i in range(len(self.layers))]
        for name in sorted(self.stats - {"concept"}):
            per_layer = []
            for rec in self.recorders:
                if name in rec.sums:
                    per_layer.append(rec.sums[name][item])
                elif name in rec.steps:
                    per_layer.append(torch.stack([s[item] for s in rec.steps[name]]))
                else:
                    raise RuntimeError("the pipeline never called the traced UNet: nothing was recorded")
            out[name] = per_layer
        return out


@dataclass
class Generation:
    """What one traced pipeline call produced: images and one trace per prompt."""

    images: list[Image.Image]
    traces: list[Trace]


def generate(
    pipe,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] = 0,
    steps: int = 30,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    stats: Iterable[str] = ("attn",),
    truncate: bool = False,
    interventions: Sequence = (),
    reading: str = "joint",
    concepts: Sequence[str] | None = None,
    defer: bool = True,
) -> Generation:
    """Generate one image per prompt (batched in one pipeline call) and trace it.

    Each item gets its own CPU ``torch.Generator`` seeded with its seed (on any device), so an item's initial
    noise does not depend on its batch neighbours or on the device. Works for SD 1.x/2.x and SDXL pipelines
    (SDXL's pooled embedding and time ids are the pipeline's own; token positions come from
    ``pipe.tokenizer``) and for SD3 and Flux (joint attention, read as ``reading``; text keys CLIP + T5 or T5,
    see :mod:`evalkit.trace.joint`); the ``concept`` statistic (ConceptAttention, MM-DiT only) runs ``concepts``
    (default: every word of the prompts plus "background") through the joint blocks, see
    :mod:`evalkit.trace.concept`. Prompts longer than the context raise (see
    :func:`evalkit.trace.tokens.tokenize_prompt`). ``interventions`` (see
    :mod:`evalkit.interventions`) rewrite the prompt and/or edit attn2 layers; edits that depend
    on token positions must agree across the batch. ``defer``: see :class:`Tracer`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for iv in interventions:
        prompts = [iv.rewrite(p) for p in prompts]
    seed_list = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seed_list) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(seed_list)} seeds: give one seed per prompt")
    unknown = set(stats) - set(STAT_DOCS)
    if unknown:
        raise ValueError(f"unknown trace statistics {sorted(unknown)}; known: {sorted(STAT_DOCS)}")
    if reading not in READINGS:
        raise ValueError(f"unknown joint-attention reading {reading!r}; choose one of {list(READINGS)}")
    denoiser = denoiser_of(pipe)
    joint = is_mmdit(denoiser)
    tokens = [tokenize_prompt(pipeline_tokenizer(pipe), p, truncate=truncate) for p in prompts]
    if not joint and getattr(pipe, "tokenizer_2", None) is not None:  # SDXL: the first tokenizer's positions
        for tok in tokens:
            check_same_positions(pipe.tokenizer_2, tok)
    layer_infos = ([info for info, *_ in find_joint_attention_layers(denoiser)] if joint
                   else [info for info, _ in find_cross_attention_layers(denoiser)])
    edits = _edits_for(interventions, layer_infos, tokens)
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    sample_hw = default_image_hw(pipe)
    height = int(height or sample_hw[0])
    width = int(width or sample_hw[1])
    multiple = scale * (2 if joint else 1)  # MM-DiT latents are patchified 2x2
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    cfg = _uses_cfg(pipe, denoiser, guidance)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seed_list]
    extra = {"max_sequence_length": t5_length(pipe)} if joint else {}
    concept_list, embeddings, pooled = None, None, None
    if "concept" in set(stats):
        if not joint:
            raise ValueError(f"the 'concept' statistic (ConceptAttention) needs an MM-DiT model (SD3, Flux); "
                             f"{type(denoiser).__name__} has no joint attention")
        concept_list = list(dict.fromkeys(concepts if concepts is not None else [
            w.text for tok in tokens for w in tok.words if w.text.isalnum()] + list(DEFAULT_EXTRA)))
        embeddings, pooled = concept_embeddings(pipe, concept_list)
    with Tracer(denoiser, stats, n_cond=len(prompts), cfg=cfg, edits=edits, reading=reading,
                concept_embeddings=embeddings, concept_pooled=pooled, defer=defer) as tracer:
        out = pipe(
            prompt=prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generators if len(generators) > 1 else generators[0],
            output_type="pil",
            **extra,
        )
    latent_hw = (height // scale, width // scale)
    settings = {"steps": steps, "guidance": guidance, "height": height, "width": width,
                "scheduler": type(pipe.scheduler).__name__,
                "interventions": [iv.describe() for iv in interventions]}
    if joint:
        settings["reading"] = reading
    if concept_list is not None:
        settings["concepts"] = concept_list
    traces = [
        Trace(
            prompt=p,
            tokens=tok,
            layers=[info for info, _ in tracer.layers],
            stats=tracer.item_stats(i) if tracer.stats else {},
            n_steps=tracer.n_steps(),
            latent_hw=latent_hw,
            image_hw=(height, width),
            seed=int(seed_list[i]),
            settings=settings,
        )
        for i, (p, tok) in enumerate(zip(prompts, tokens))
    ]
    return Generation(images=list(out.images), traces=traces)


def denoiser_of(pipe) -> torch.nn.Module:
    """The network a pipeline denoises with: ``pipe.unet`` (SD 1.x/2.x, SDXL) or ``pipe.transformer``
    (SD3, Flux)."""
    denoiser = getattr(pipe, "unet", None)
    if denoiser is None:
        denoiser = getattr(pipe, "transformer", None)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has neither a UNet nor a transformer: evalkit traces "
                         "StableDiffusion(XL), StableDiffusion3 and Flux pipelines")
    return denoiser


def default_image_hw(pipe) -> tuple[int, int]:
    """The image size a pipeline generates by default: the UNet's or SD3 transformer's ``sample_size`` times
    the VAE factor; Flux's transformer has none, so its VAE's ``sample_size`` (FLUX.1: 1024)."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    denoiser = denoiser_of(pipe)
    sample = getattr(denoiser.config, "sample_size", None)
    if sample is None:
        side = int(pipe.vae.config.sample_size)
        return side, side
    return (sample * scale, sample * scale) if isinstance(sample, int) else (sample[0] * scale, sample[1] * scale)


def _uses_cfg(pipe, denoiser, guidance: float) -> bool:
    """Whether the pipeline batches ``[unconditional; conditional]`` rows: SD pipelines with guidance > 1
    (unless guidance-distilled, ``time_cond_proj_dim``); Flux never does (its guidance is an embedding, and
    true CFG is a second call that evalkit does not request)."""
    if type(denoiser).__name__ == "FluxTransformer2DModel":
        return False
    return guidance > 1.0 and getattr(denoiser.config, "time_cond_proj_dim", None) is None


def _edits_for(interventions: Sequence, layers: list[LayerInfo], tokens: list[PromptTokens]) -> dict[str, LayerEdit]:
    """Merge the layer edits of all interventions; they must not differ between batch items."""
    merged: dict[str, LayerEdit] = {}
    for iv in interventions:
        per_item = [iv.edits(layers, tok) for tok in tokens]
        first = per_item[0]
        for other in per_item[1:]:
            if first.keys() != other.keys() or any(not _same_edit(first[k], other[k]) for k in first):
                raise ValueError(
                    f"intervention {iv.describe()} edits different token positions for the prompts of one batch: "
                    "generate those prompts separately"
                )
        for name, edit in first.items():
            merged[name] = merged[name].merged(edit) if name in merged else edit
    return merged


def _same_edit(a: LayerEdit, b: LayerEdit) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (eq(a.prob_scale, b.prob_scale) and eq(a.value_scale, b.value_scale) and eq(a.head_scale, b.head_scale)
            and a.value_steps == b.value_steps)
