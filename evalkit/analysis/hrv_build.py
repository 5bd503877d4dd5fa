"""Head relevance vector construction (paper 001 sec. 3; paper 002 sec. 2.1.3).

For each generation, one concept-word per concept is sampled (seeded) and encoded on its own by
the text encoder; its semantic tokens (start/end/padding dropped) are key-projected by each attn2
layer. At every step and head, the image queries of the conditional rows attend over the
concatenated semantic tokens of all concepts (softmax over those tokens only); multi-token words
are averaged over their tokens, the map is averaged over space, and the concept with the largest
value gets +1 at that head. Finally each concept's vector is scaled to L1 norm = number of heads.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..methods.hrv import HeadRelevance
from ..trace import Tracer, default_image_hw, find_cross_attention_layers, find_joint_attention_layers, is_mmdit
from ..trace.concept import concept_embeddings
from ..trace.joint import t5_length


@torch.no_grad()
def _concept_embeddings(pipe, words: Sequence[str]) -> list[torch.Tensor]:
    """Semantic-token text embeddings ``(n_tokens, D)`` of each word, encoded on its own by the pipeline's own
    prompt encoder (SD: the text encoder's last layer; SDXL: both encoders' penultimate layers, concatenated)."""
    out = []
    for w in words:
        n = len(pipe.tokenizer(w).input_ids)
        emb = pipe.encode_prompt(prompt=w, device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0][0]
        out.append(emb[1:n - 1])
    return out


class _HeadVoter:
    """Observer for one attn2 layer: counts, per head, which concept wins at each call."""

    def __init__(self, keys: torch.Tensor, groups: list[int], n_concepts: int, heads: int) -> None:
        self.keys = keys  # (H, N', d) key-projected semantic tokens of all concepts
        self.groups = torch.tensor(groups)  # token -> concept
        self.n_concepts = n_concepts
        self.counts = torch.zeros(n_concepts, heads, dtype=torch.long)

    def __call__(self, attn, query, key, value, rows) -> None:
        q = query[rows].float()  # (B, H, Q, d)
        probs = (torch.matmul(q, self.keys.transpose(-1, -2)) * attn.scale).softmax(dim=-1)  # (B, H, Q, N')
        strength = probs.mean(dim=2)  # spatial mean: (B, H, N')
        per_concept = torch.zeros(strength.shape[0], strength.shape[1], self.n_concepts)
        per_concept.index_add_(2, self.groups, strength)
        sizes = torch.bincount(self.groups, minlength=self.n_concepts).clamp(min=1)
        per_concept = per_concept / sizes  # multi-token words: mean over their tokens
        winners = per_concept.argmax(dim=-1)  # (B, H)
        for b in range(winners.shape[0]):
            self.counts[winners[b], torch.arange(winners.shape[1])] += 1


def build_hrv(
    pipe,
    concepts: Mapping[str, Sequence[str]],
    prompts: Sequence[str],
    *,
    n_generations: int = 10,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    model_name: str = "",
    progress: bool = True,
) -> HeadRelevance:
    """Construct HRVs for ``concepts`` (name -> concept-words) from ``n_generations`` generations of
    ``prompts`` (cycled; generation g uses seed ``seed + g``). Deterministic for fixed arguments."""
    if not concepts or any(not words for words in concepts.values()):
        raise ValueError("give at least one concept with at least one concept-word")
    if not prompts:
        raise ValueError("give at least one prompt to generate from")
    names = list(concepts)
    if getattr(pipe, "unet", None) is None and is_mmdit(getattr(pipe, "transformer", None)):
        return _build_hrv_mmdit(pipe, concepts, prompts, n_generations=n_generations, seed=seed, steps=steps,
                                guidance=guidance, height=height, width=width, model_name=model_name,
                                progress=progress)
    layers = find_cross_attention_layers(pipe.unet)
    total = {info.name: torch.zeros(len(names), info.heads, dtype=torch.long) for info, _ in layers}
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    cfg = guidance > 1.0
    for g in tqdm(range(n_generations), desc="HRV generations", disable=not progress):
        rng = random.Random(seed + g)
        words = [rng.choice(list(concepts[c])) for c in names]
        embs = _concept_embeddings(pipe, words)
        groups = [ci for ci, e in enumerate(embs) for _ in range(e.shape[0])]
        stacked = torch.cat(embs, dim=0)
        voters = {}
        for info, module in layers:
            k = module.to_k(stacked.to(module.to_k.weight.dtype))
            d = k.shape[-1] // module.heads
            keys = k.view(-1, module.heads, d).transpose(0, 1).float()
            voters[info.name] = _HeadVoter(keys, groups, len(names), module.heads)
        gen = torch.Generator(device="cpu").manual_seed(seed + g)
        with Tracer(pipe.unet, (), n_cond=1, cfg=cfg, observers=voters):
            pipe(prompts[g % len(prompts)], num_inference_steps=steps, guidance_scale=guidance, height=height,
                 width=width, generator=gen, output_type="latent")
        for name, voter in voters.items():
            total[name] += voter.counts
    counts = torch.cat([total[info.name] for info, _ in layers], dim=1).double()  # (N, total heads)
    n_heads = counts.shape[1]
    sums = counts.sum(dim=1, keepdim=True)
    vectors = torch.where(sums > 0, counts / sums.clamp(min=1) * n_heads, counts)
    heads = [n for info, _ in layers for n in info.head_names()]
    return HeadRelevance(
        model=model_name,
        heads=tuple(heads),
        vectors={c: tuple(float(v) for v in vectors[i]) for i, c in enumerate(names)},
        words={c: tuple(concepts[c]) for c in names},
    )


def _build_hrv_mmdit(pipe, concepts: Mapping[str, Sequence[str]], prompts: Sequence[str], *, n_generations: int,
                     seed: int, steps: int, guidance: float, height: int | None, width: int | None, model_name: str,
                     progress: bool) -> HeadRelevance:
    """:func:`build_hrv` on SD3 / Flux. An MM-DiT has no fixed text-key projection: a layer's text keys come
    from the text stream as the earlier blocks made it. So each generation's concept-words travel as concept
    tokens through the joint (SD3) / double-stream (Flux) blocks, as ConceptAttention's do (one token per word,
    the first T5 token; they never influence the image, see :mod:`evalkit.trace.concept`), and at each layer
    and step the image queries attend over those concept tokens' keys (softmax over concepts); the spatial
    mean decides the head's vote, as on a UNet. Flux's single-stream heads carry no concept tokens and get no
    votes (relevance 0)."""
    names = list(concepts)
    layers = find_joint_attention_layers(pipe.transformer)
    counts = [torch.zeros(len(names), info.heads, dtype=torch.long) for info, *_ in layers]
    default_h, default_w = default_image_hw(pipe)
    height, width = height or default_h, width or default_w
    cfg = guidance > 1.0 and type(pipe.transformer).__name__ != "FluxTransformer2DModel"

    def vote(index: int, attn, q_img: torch.Tensor, keys: torch.Tensor) -> None:
        scale = float(getattr(attn, "scale", q_img.shape[-1] ** -0.5))
        probs = (torch.matmul(q_img.float(), keys.float().transpose(-1, -2)) * scale).softmax(dim=-1)  # (B,H,N,C)
        winners = probs.mean(dim=2).argmax(dim=-1)  # (B, H)
        for b in range(winners.shape[0]):
            counts[index][winners[b], torch.arange(winners.shape[1])] += 1

    for g in tqdm(range(n_generations), desc="HRV generations", disable=not progress):
        rng = random.Random(seed + g)
        words = [rng.choice(list(concepts[c])) for c in names]
        embeddings, pooled = concept_embeddings(pipe, words)
        gen = torch.Generator(device="cpu").manual_seed(seed + g)
        with Tracer(pipe.transformer, ("concept",), n_cond=1, cfg=cfg, concept_embeddings=embeddings,
                    concept_pooled=pooled) as tracer:
            tracer.concepts.key_observer = vote
            pipe(prompts[g % len(prompts)], num_inference_steps=steps, guidance_scale=guidance, height=height,
                 width=width, generator=gen, output_type="latent", max_sequence_length=t5_length(pipe))
    total = torch.cat(counts, dim=1).double()
    n_heads = total.shape[1]
    sums = total.sum(dim=1, keepdim=True)
    vectors = torch.where(sums > 0, total / sums.clamp(min=1) * n_heads, total)
    heads = [n for info, *_ in layers for n in info.head_names()]
    return HeadRelevance(
        model=model_name,
        heads=tuple(heads),
        vectors={c: tuple(float(v) for v in vectors[i]) for i, c in enumerate(names)},
        words={c: tuple(concepts[c]) for c in names},
    )
