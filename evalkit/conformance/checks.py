"""The invariants every attribution method keeps, each a named check whose failure message says what
broke and how to fix it (:data:`INVARIANTS`, in report order)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..methods import AttributionMethod
from ..trace import STAT_DOCS, Trace
from .core import (
    ConformanceError,
    Invariant,
    NotApplicable,
    Subject,
    Violation,
    close,
    describe_diff,
    describe_error,
    same,
    word_map,
)


@contextlib.contextmanager
def _spy_token_maps(method: AttributionMethod) -> Iterator[list[list[int]]]:
    """Record the positions of every ``token_maps`` call the method makes while the context is open."""
    calls: list[list[int]] = []
    original = method.token_maps
    shadowed = "token_maps" in vars(method)

    def spy(trace: Trace, positions: Sequence[int], *args, **kwargs) -> torch.Tensor:
        calls.append([int(p) for p in positions])
        return original(trace, positions, *args, **kwargs)

    try:
        method.token_maps = spy
    except AttributeError as err:
        raise NotApplicable(f"token_maps cannot be observed on this object ({err})") from None
    try:
        yield calls
    finally:
        if shadowed:
            method.token_maps = original
        else:
            del method.token_maps


def _stats_differ(trace: Trace, needs: frozenset[str], first: Sequence[int], positions: Sequence[int]) -> bool:
    """Whether the statistics averaged over ``first`` differ from those averaged over all ``positions``."""
    names = [n for n in needs if n in trace.stats] or list(trace.stats)
    for name in names:
        for x in trace.stats[name]:
            a, b = x[..., list(first)].double().mean(-1), x[..., list(positions)].double().mean(-1)
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max())):
                return True
    return False


def _constant(m: torch.Tensor) -> bool:
    """Whether the finite values of a map are all equal, up to float rounding (a map upsampled from a 1 x 1
    layer grid legitimately is)."""
    finite = m[torch.isfinite(m)].double()
    if finite.numel() < 2:
        return False
    lo, hi = float(finite.min()), float(finite.max())
    return hi - lo <= 1e-6 * max(abs(lo), abs(hi))


def _changed(trace: Trace, pristine: Trace) -> list[str]:
    """``stat[layer]`` entries of ``trace`` that no longer equal the reference trace's."""
    out = []
    for name, per_layer in pristine.stats.items():
        got = trace.stats.get(name, [])
        for i, x in enumerate(per_layer):
            if i >= len(got) or not isinstance(got[i], torch.Tensor) or not same(got[i], x):
                out.append(f"{name}[{i}]")
    return out


# -- the checks ----------------------------------------------------------------------------------------------


def check_families(s: Subject) -> None:
    """The method builds and attributes every probe word on this model."""
    if s.failure is not None:
        raise s.failure


def check_shape(s: Subject) -> None:
    """One (h, w) map per requested word on the latent grid, in request order; to_image() at image size."""
    att, t = s.attribution(), s.pristine
    maps = att.maps if isinstance(att.maps, dict) else {}
    got = list(maps)
    missing = [w for w in s.words if w not in maps]
    extra = [w for w in got if w not in s.words]
    if missing or extra:
        raise Violation(f"asked for {s.words}, got maps of {got}" + (f"; missing {missing}" if missing else "")
                        + (f"; unexpected {extra}" if extra else ""),
                        "return exactly one map per requested word, keyed by the word as requested")
    if got != s.words:
        raise Violation(f"maps come in the order {got}, not the requested {s.words}",
                        "build Attribution.maps in request order (Attribution.words promises it)")
    for w, m in maps.items():
        if not isinstance(m, torch.Tensor):
            raise Violation(f"the map of {w!r} is a {type(m).__name__}, not a torch.Tensor",
                            "return torch tensors of shape trace.latent_hw")
        if tuple(m.shape) != tuple(t.latent_hw):
            raise Violation(f"the map of {w!r} has shape {tuple(m.shape)}; Attribution maps are (h, w) on the "
                            f"latent grid, trace.latent_hw = {t.latent_hw}",
                            "resize each layer's maps to trace.latent_hw (e.g. with evalkit.methods.aggregate) and "
                            "leave image size to Attribution.to_image()")
    if tuple(att.image_hw) != tuple(t.image_hw):
        raise Violation(f"Attribution.image_hw is {tuple(att.image_hw)}, but the image is {t.image_hw}",
                        "set image_hw=trace.image_hw")
    try:
        images = att.to_image()
    except Exception as err:  # noqa: BLE001
        raise Violation(f"Attribution.to_image() raised {describe_error(err)} (upsample={att.upsample!r})",
                        "set upsample to a 2-D mode of torch.nn.functional.interpolate: bilinear, bicubic, "
                        "nearest or area") from None
    for w, img in images.items():
        if tuple(img.shape) != tuple(t.image_hw):
            raise Violation(f"to_image() gives the map of {w!r} at {tuple(img.shape)}, not the image size {t.image_hw}",
                            "return 2-D (h, w) maps so that Attribution.to_image() can upsample them")


def check_finite_float32(s: Subject) -> None:
    """Every map is float32 and finite."""
    att = s.attribution()
    maps = {w: word_map(att, w) for w in att.maps}
    for w, m in maps.items():
        if m.dtype != torch.float32:
            raise Violation(f"the map of {w!r} has dtype {m.dtype}, not torch.float32",
                            "return float32 maps (.float()): suites cache and score float32")
    for w, m in maps.items():
        bad = int((~torch.isfinite(m)).sum())
        if bad:
            raise Violation(f"the map of {w!r} has {bad} non-finite value(s) (NaN or inf) among {m.numel()}",
                            "guard divisions and logarithms (add an epsilon); suites exclude non-finite maps from "
                            "every metric")


def check_deterministic(s: Subject) -> None:
    """Attributing twice on the same trace gives identical maps and leaves the trace's statistics untouched."""
    s.attribution()
    t = s.trace()
    first = s.method.attribute(t, list(s.words))
    second = s.method.attribute(t, list(s.words))
    changed = _changed(t, s.pristine)
    if changed:
        raise Violation(f"attribute() modified the trace's statistics {', '.join(changed[:4])}"
                        + (f" and {len(changed) - 4} more" if len(changed) > 4 else ""),
                        "never write into trace tensors (clone before in-place ops such as clamp_ or mul_): "
                        "`evalkit attribute` and the suites run every method on one shared trace")
    for w in s.present_words():
        a, b = word_map(first, w), word_map(second, w)
        if not same(a, b):
            raise Violation(f"attributing twice on the same trace gives different maps of {w!r} "
                            f"(largest difference {describe_diff(a, b)})",
                            "no randomness (or a torch.Generator seeded inside attribute) and no state carried "
                            "from one call to the next")


def require_deterministic(s: Subject) -> None:
    """Skip a check that compares two computations when the method is not deterministic (checked once)."""
    if not s.determinism_checked:
        s.determinism_checked = True
        try:
            check_deterministic(s)
        except Violation as v:
            s.nondeterminism = v
    if s.nondeterminism is not None:
        raise NotApplicable("it compares two computations, and the method is not deterministic (see deterministic)")


def check_independent_words(s: Subject) -> None:
    """A word's map is the same whether it is requested alone or with others, in any order."""
    s.attribution()
    require_deterministic(s)
    t = s.trace()
    together = s.method.attribute(t, list(s.words))
    reordered = s.method.attribute(t, list(reversed(s.words)))
    fix = "compute each word's map from its own tokens only: no normalization or competition across the requested words"
    for w in s.present_words():
        alone = word_map(s.method.attribute(t, [w]), w)
        with_others = word_map(together, w)
        if not close(alone, with_others):
            raise Violation(f"the map of {w!r} alone differs from its map when {s.words} are requested together "
                            f"(largest difference {describe_diff(alone, with_others)})", fix)
        back = word_map(reordered, w)
        if not close(back, with_others):
            raise Violation(f"the map of {w!r} depends on the order of the requested words (largest difference "
                            f"{describe_diff(back, with_others)})", fix)


def _check_all_positions(s: Subject, word: str, kind: str, first: list[int]) -> None:
    """``word``'s map comes from token_maps over all its positions: the token_maps calls cover them, the
    map is not constant unless its token maps are, it is the mean of the token maps, and it is not the map
    of ``first`` alone when the statistics there differ from the word's."""
    method = s.method
    t = s.trace()
    positions = t.tokens.positions(word)
    pieces = _pieces_by_key(t.tokens)
    with _spy_token_maps(method) as calls:
        att = method.attribute(t, [word])
    m = word_map(att, word)
    if not calls:
        raise Violation(f"attribute() never calls token_maps(trace, positions), so whether the map of {word!r} uses "
                        f"all its {kind}s cannot be checked",
                        "compute maps in token_maps(trace, positions) and call it from attribute() with "
                        "trace.tokens.positions(word), as AttributionMethod.attribute does")
    seen = sorted({p for c in calls for p in c})
    missing = [p for p in positions if p not in seen]
    if missing:
        raise Violation(f"the map of {word!r} ignores its {kind}(s) {[pieces[p] for p in missing]} at token "
                        f"position(s) {missing}: token_maps saw positions {seen}, but {word!r} is at {positions}",
                        "pass every position of trace.tokens.positions(word) (all pieces, all occurrences) to "
                        "token_maps and average the maps")
    token = method.token_maps(t, positions)
    if _constant(m) and not all(_constant(x) for x in token):
        raise Violation(f"the map of {word!r} is constant ({float(m[torch.isfinite(m)][0]):.3g} everywhere) although "
                        "its token maps are not",
                        "average the token maps of the word's positions; do not normalize them away")
    require_deterministic(s)
    expected = token.mean(0)
    if not close(m, expected):
        raise Violation(f"the map of {word!r} is not the mean of token_maps over its positions {positions} (largest "
                        f"difference {describe_diff(m, expected)})",
                        "a word's map is the mean over token_maps(trace, trace.tokens.positions(word)) "
                        "(AttributionMethod.attribute's contract; the positions merge all pieces and occurrences)")
    alone = method.token_maps(t, first).mean(0)
    if _stats_differ(t, frozenset(method.needs), first, positions) and close(m, alone):
        raise Violation(f"the map of {word!r} equals the map of its first {kind} {[pieces[p] for p in first]} alone, "
                        f"although the statistics of its other {kind}s differ: token_maps ignores them",
                        "in token_maps, compute each position's map from that position's own statistics")


def _pieces_by_key(tokens) -> dict[int, str]:
    """Text-key position -> token piece; an MM-DiT's keys hold several tokenizers' sequences end to end."""
    parts = getattr(tokens, "parts", None)
    if parts is None:
        return dict(enumerate(tokens.pieces))
    return {offset + i: piece for _, part, offset in parts for i, piece in enumerate(part.pieces)}


def _token_level(s: Subject) -> None:
    """Token-position invariants hold for methods built on token_maps; a method that declares
    ``token_level = False`` (ConceptAttention: one map per concept, not per token) is not checked by them."""
    if not getattr(type(s.method), "token_level", True):
        raise NotApplicable(f"{s.label} declares token_level = False: it attributes concepts, not token positions")


def check_repeated_words(s: Subject) -> None:
    """A word that occurs twice gets one map from both occurrences (PromptTokens.positions merges them)."""
    _token_level(s)
    s.attribution()
    word = s.probe.repeated
    _check_all_positions(s, word, "occurrence", s.pristine.tokens.positions(word, occurrence=0))


def check_multi_token_words(s: Subject) -> None:
    """A word the tokenizer splits into several pieces gets one map from all of them."""
    _token_level(s)
    s.attribution()
    word = s.probe.multi_token
    _check_all_positions(s, word, "piece", s.pristine.tokens.positions(word)[:1])


class _DeclaredStats(dict):
    """A trace's statistics restricted to the declared ones, remembering every lookup of another."""

    def __init__(self, stats: dict) -> None:
        super().__init__(stats)
        self.undeclared: list[str] = []

    def _note(self, key: object) -> None:
        if not dict.__contains__(self, key) and key not in self.undeclared:
            self.undeclared.append(str(key))

    def __getitem__(self, key: str) -> list[torch.Tensor]:
        self._note(key)
        if not dict.__contains__(self, key):
            raise KeyError(f"trace statistic {key!r} is not declared in the method's needs")
        return dict.__getitem__(self, key)

    def get(self, key: str, default: object = None) -> object:
        self._note(key)
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        self._note(key)
        return dict.__contains__(self, key)


def check_declared_stats(s: Subject) -> None:
    """The method works on a trace that holds only the statistics in its ``needs``, with the same maps."""
    s.attribution()
    method = s.method
    needs = sorted(method.needs)
    unknown = [n for n in needs if n not in STAT_DOCS]
    if unknown:
        raise Violation(f"needs = {needs} names unknown statistic(s) {unknown}; known: {sorted(STAT_DOCS)}",
                        "declare statistics by their names in evalkit.trace.STAT_DOCS")
    t = s.trace()
    stats = _DeclaredStats({k: v for k, v in t.stats.items() if k in needs})
    restricted = dataclasses.replace(t, stats=stats)
    try:
        att = method.attribute(restricted, list(s.words))
    except Exception as err:  # noqa: BLE001
        if stats.undeclared:
            name = stats.undeclared[0]
            raise Violation(f"reads statistic {name!r} it does not declare in needs = {needs}",
                            f"add {name!r} to needs: suites and `evalkit attribute` trace only the statistics "
                            "their methods declare") from None
        raise Violation(f"fails on a trace holding only its declared statistics {needs}: {describe_error(err)}",
                        "read only the statistics listed in needs, and list every statistic the method reads") from None
    require_deterministic(s)
    dropped = sorted(set(t.stats) - set(needs))
    looked = f" (it looked up {stats.undeclared})" if stats.undeclared else ""
    for w in s.present_words():
        a, b = word_map(att, w), word_map(s.attribution(), w)
        if not close(a, b):
            raise Violation(f"the map of {w!r} changes when the undeclared statistics {dropped} are dropped from the "
                            f"trace{looked}: the method reads statistics beyond needs = {needs}",
                            "add every statistic the method reads to needs")


def check_save_load(s: Subject) -> None:
    """Maps survive Attribution.save_npz and the suite runner's cache (method_files / load_case_attribution)."""
    try:  # the suite runner's own cache format, as `evalkit run` writes and reads it
        from ..suites.cache import CaseCache
        from ..suites.runner import load_case_attribution, method_files
    except ImportError as err:
        raise ConformanceError(f"the save-load check cannot import the suite cache: {describe_error(err)}") from err

    att, t = s.attribution(), s.pristine
    with tempfile.TemporaryDirectory(prefix="evalkit-conformance-") as tmp:
        path = Path(tmp) / "maps.npz"
        try:
            att.save_npz(path)
            images = att.to_image()
        except Exception as err:  # noqa: BLE001
            raise Violation(f"Attribution.save_npz raised {describe_error(err)}",
                            "return plain CPU tensors without autograd history (.detach().cpu())") from None
        with np.load(path) as z:
            saved = {w: z[w] for w in z.files}
        if set(saved) != set(att.maps):
            raise Violation(f"save_npz wrote arrays {sorted(saved)} for the maps of {list(att.maps)}",
                            "key Attribution.maps by the requested words")
        for w, arr in saved.items():
            want = images[w].numpy().astype(np.float32)
            if arr.dtype != np.float32 or arr.shape != want.shape or not np.array_equal(arr, want, equal_nan=True):
                raise Violation(f"save_npz stored the map of {w!r} as {arr.dtype} {arr.shape}, not the float32 "
                                f"image-size map to_image() gives {want.shape}",
                                "return 2-D float32 maps; Attribution.save_npz writes their to_image() upsampling")
        cache = CaseCache(Path(tmp) / "cache")
        try:
            files = method_files(s.method, s.trace(), list(s.words))
            case_dir = cache.store("case-entry", {"case.json": {"prompt": t.prompt, "tokens": list(t.tokens.pieces),
                                                                "image_hw": list(t.image_hw)}})
            maps_dir = cache.store("maps-entry", files)
            loaded = load_case_attribution(case_dir, maps_dir, s.label)
        except Exception as err:  # noqa: BLE001
            raise Violation(f"the suite cache cannot store and reload the maps: {describe_error(err)}",
                            "return CPU tensors without autograd history and JSON-serializable params()") from None
    stored = files["maps.npz"]
    for w, arr in stored.items():
        if w not in loaded.maps or not same(loaded.maps[w], torch.from_numpy(np.asarray(arr))):
            raise Violation(f"the map of {w!r} does not come back from the suite cache unchanged",
                            "return float32 (h, w) maps keyed by the requested words")
    if loaded.upsample != att.upsample:
        raise Violation(f"the cache rebuilds maps with the class's upsample={loaded.upsample!r}, but attribute() "
                        f"returned upsample={att.upsample!r}",
                        "set the class attribute upsample rather than a different one per Attribution")
    params = json.loads(json.dumps(att.params, default=str))
    if loaded.params != params:
        raise Violation(f"the cache stores params() = {loaded.params}, but the Attribution carries {params}",
                        "let attribute() record self.params() (AttributionMethod.attribute does)")


#: The invariants, in report order.
INVARIANTS: tuple[Invariant, ...] = (
    Invariant("families", "runs on every model family evalkit supports", check_families,
              "take geometry from the trace (trace.latent_hw, trace.layers, LayerInfo.grid), never from constants"),
    Invariant("shape", "one (h, w) map per requested word on trace.latent_hw, in request order; "
              "to_image() gives image-size maps", check_shape, "return one latent-grid map per requested word"),
    Invariant("finite-float32", "maps are float32 and finite", check_finite_float32, "return finite float32 maps"),
    Invariant("deterministic", "attributing twice on the same trace gives identical maps and leaves the trace "
              "untouched", check_deterministic, "no randomness, no state between calls, no writes into the trace"),
    Invariant("independent-words", "a word's map does not depend on the other requested words or their order",
              check_independent_words, "compute each word's map from its own tokens only"),
    Invariant("repeated-words", "a repeated word's map is the mean of token_maps over all its occurrences",
              check_repeated_words, "use trace.tokens.positions(word), which merges the occurrences"),
    Invariant("multi-token-words", "a word split into several tokens uses all its pieces", check_multi_token_words,
              "use trace.tokens.positions(word), which lists every piece"),
    Invariant("declared-stats", "reads only the trace statistics declared in needs", check_declared_stats,
              "list every statistic the method reads in needs"),
    Invariant("save-load", "maps survive Attribution.save_npz and the suite cache", check_save_load,
              "return float32 CPU maps and JSON-serializable params()"),
)
INVARIANT_NAMES: tuple[str, ...] = tuple(inv.name for inv in INVARIANTS)
