"""The method conformance kit (evalkit.conformance): every built-in method keeps every invariant, the
README's example passes through the pytest plugin and `evalkit check-method`, and each deliberately
broken method below fails exactly its invariant, with a message that names it and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evalkit.cli import main
from evalkit.conformance import FAMILIES, INVARIANT_NAMES, Conformance
from evalkit.conformance.core import FAILED, PASSED, SKIPPED, CheckResult
from evalkit.conformance.families import family_of, probe, reference_trace
from evalkit.methods import Attribution, AttributionMethod, aggregate, available_methods, get_method_class
from evalkit.methods.registry import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "up_attn.py"
pytest_plugins = ["pytester"]
MODELS = [m for family in FAMILIES for m in family.models]


@pytest.fixture(scope="module", autouse=True)
def traces() -> None:
    """Trace every conformance model once for the module (later calls reuse the process-wide cache)."""
    for model in MODELS:
        reference_trace(model)


def _failed(results: list[CheckResult]) -> dict[str, list[CheckResult]]:
    out: dict[str, list[CheckResult]] = {}
    for r in results:
        if r.status == FAILED:
            out.setdefault(r.invariant, []).append(r)
    return out


# -- deliberately broken methods (not registered: the checks take the class) ----------------------------------


class Plain(AttributionMethod):
    """A correct baseline: DAAM-style aggregation over every attn2 head."""

    needs = frozenset({"attn"})

    def token_maps(self, trace, positions):
        return aggregate(trace, "attn", positions)


class NanMaps(Plain):
    """One NaN pixel per map."""

    def token_maps(self, trace, positions):
        maps = super().token_maps(trace, positions)
        maps[:, 0, 0] = float("nan")
        return maps


class Float64Maps(Plain):
    """Double-precision maps."""

    def token_maps(self, trace, positions):
        return super().token_maps(trace, positions).double()


class NoisyMaps(Plain):
    """Random noise added on every call."""

    def token_maps(self, trace, positions):
        maps = super().token_maps(trace, positions)
        return maps + 1e-3 * float(maps.max()) * torch.rand_like(maps)


class WritesIntoTrace(Plain):
    """Clamps a statistic of the shared trace in place."""

    def token_maps(self, trace, positions):
        trace.stats["attn"][0].mul_(0.5)
        return super().token_maps(trace, positions)


class CrossTalk(Plain):
    """Normalizes over all requested tokens, so a word's map depends on the other requested words."""

    def token_maps(self, trace, positions):
        maps = super().token_maps(trace, positions)
        return maps / maps.sum()


class _Selective(Plain):
    """Attributes each word from a subset of its positions (``select``), bypassing the base attribute."""

    def select(self, trace, word: str) -> list[int]:
        raise NotImplementedError

    def attribute(self, trace, words):
        maps = {w: self.token_maps(trace, self.select(trace, w)).mean(0) for w in words}
        return Attribution(method=self.name, prompt=trace.prompt, tokens=list(trace.tokens.pieces), maps=maps,
                           image_hw=trace.image_hw, upsample=self.upsample, params=self.params())


class FirstPieceOnly(_Selective):
    """Uses only the first piece of a multi-token word."""

    def select(self, trace, word):
        mine = set(trace.tokens.positions(word))
        parts = getattr(trace.tokens, "parts", None) or [("", trace.tokens, 0)]  # SD3: CLIP and T5 keys
        return [off + w.positions[0] for _, tok, off in parts for w in tok.words if off + w.positions[0] in mine]


class FirstOccurrenceOnly(_Selective):
    """Uses only the first occurrence of a repeated word."""

    def select(self, trace, word):
        return trace.tokens.positions(word, occurrence=0)


class FirstPieceTokenMaps(Plain):
    """Calls token_maps with every piece, but token_maps returns the first piece's map for all of them."""

    def token_maps(self, trace, positions):
        first = {p: w.positions[0] for w in trace.tokens.words for p in w.positions}
        return super().token_maps(trace, [first.get(p, p) for p in positions])


class ReadsUndeclared(Plain):
    """Declares attn but reads norm."""

    def token_maps(self, trace, positions):
        return aggregate(trace, "norm", positions)


class ImageSizeMaps(Plain):
    """Returns maps at image size instead of the latent grid."""

    def token_maps(self, trace, positions):
        return F.interpolate(super().token_maps(trace, positions)[None], size=trace.image_hw, mode="bilinear")[0]


class DropsLastWord(Plain):
    """Loses the last requested word when several are requested."""

    def attribute(self, trace, words):
        att = super().attribute(trace, words)
        if len(att.maps) > 1:
            att.maps.pop(list(att.maps)[-1])
        return att


class UnserializableParams(Plain):
    """params() holds an object the suite cache cannot write as JSON."""

    def params(self):
        return {"device": torch.device("cpu")}


class FixedLatentSide(Plain):
    """Assumes an 8x8 latent (tiny-sd's at 64 px), so it breaks on shapesworld's 16x16."""

    def token_maps(self, trace, positions):
        return super().token_maps(trace, positions).reshape(len(positions), 8, 8)


class ConstantMaps(Plain):
    """Flattens each word's map to its mean: every word map is constant, its token maps are not."""

    def attribute(self, trace, words):
        att = super().attribute(trace, words)
        att.maps = {w: torch.full_like(m, float(m.mean())) for w, m in att.maps.items()}
        return att


class MidBlockOnly(Plain):
    """Correct, but on tiny-sd the mid block's grid is 1 x 1, so its maps are constant there."""

    backbones = frozenset({"unet"})  # MM-DiTs have no mid block

    def token_maps(self, trace, positions):
        return aggregate(trace, "attn", positions, layer_filter=lambda layer, latent_hw: layer.place == "mid")


BROKEN = [
    (NanMaps, "finite-float32", "non-finite value(s)"),
    (Float64Maps, "finite-float32", "torch.float64"),
    (NoisyMaps, "deterministic", "gives different maps"),
    (WritesIntoTrace, "deterministic", "modified the trace's statistics"),
    (CrossTalk, "independent-words", "differs from its map when"),
    (FirstOccurrenceOnly, "repeated-words", "ignores its occurrence(s)"),
    (FirstPieceOnly, "multi-token-words", "ignores its piece(s) ['agon</w>']"),
    (FirstPieceTokenMaps, "multi-token-words", "equals the map of its first piece"),
    (ReadsUndeclared, "declared-stats", "reads statistic 'norm' it does not declare in needs = ['attn']"),
    (ImageSizeMaps, "shape", "Attribution maps are (h, w) on the latent grid"),
    (DropsLastWord, "shape", "missing ['and']"),
    (UnserializableParams, "save-load", "the suite cache cannot store"),
    (FixedLatentSide, "families", "on shapesworld"),
]


# -- tests ------------------------------------------------------------------------------------------------------


def test_probe_prompt_has_a_repeated_and_a_multi_token_word():
    """Each model's reference trace gives the checks a repeated word and a word of several tokens."""
    for model in MODELS:
        trace = reference_trace(model)
        p = probe(trace)
        once = trace.tokens.positions(p.repeated, occurrence=0)  # SD3: its CLIP and its T5 token
        assert len(trace.tokens.positions(p.repeated)) == 2 * len(once)
        assert len(trace.tokens.positions(p.multi_token)) > 1
        assert p.repeated in p.words and p.multi_token in p.words


@pytest.mark.parametrize("name", sorted(n for n in available_methods()
                                        if get_method_class(n).__module__.startswith("evalkit.methods")))
def test_builtin_method_keeps_every_invariant(name):
    """Every built-in method passes every check on every model of the backbones it declares (none skipped, except
    the token-position checks of a method that declares ``token_level = False``: ConceptAttention)."""
    cls = get_method_class(name)
    results = Conformance(name).run()
    token_checks = {"repeated-words", "multi-token-words"}
    bad = [r.report for r in results
           if r.status != PASSED and not (r.status == SKIPPED and not cls.token_level and r.invariant in token_checks)]
    assert not bad, "\n".join(bad)
    models = [m for m in MODELS if family_of(m).backbone in cls.backbones]
    assert len(results) == len(INVARIANT_NAMES) * len(models)


def test_correct_plain_method_passes():
    """The baseline the broken methods derive from is itself conformant."""
    assert all(r.status == PASSED for r in Conformance(Plain).run())


@pytest.mark.parametrize(("cls", "invariant", "fragment"), BROKEN, ids=[c.__name__ for c, _, _ in BROKEN])
def test_broken_method_fails_exactly_its_invariant(cls, invariant, fragment):
    """Each broken method fails its invariant and no other (others pass or are skipped as not checkable)."""
    results = Conformance(cls).run()
    failed = _failed(results)
    assert set(failed) == {invariant}, "\n".join(r.report for rs in failed.values() for r in rs)
    first = failed[invariant][0]
    assert fragment in first.message, first.message
    assert "Fix: " in first.message and first.report.startswith(f"{invariant} [")


def test_constant_maps_fail_only_where_the_token_maps_are_not_constant():
    """A word map flattened to a constant fails both position checks; a coarse layer's constant maps pass."""
    failed = _failed(Conformance(ConstantMaps).run())
    assert set(failed) == {"repeated-words", "multi-token-words"}
    assert "is constant" in failed["repeated-words"][0].message
    assert all(r.status == PASSED for r in Conformance(MidBlockOnly).run())


def test_nondeterminism_skips_the_comparisons_instead_of_failing_them():
    """Checks that compare two computations are skipped, and say why, when the method is not deterministic."""
    results = Conformance(NoisyMaps, models=["shapesworld"]).run()
    skipped = {r.invariant: r.message for r in results if r.status == SKIPPED}
    assert "independent-words" in skipped and "see deterministic" in skipped["independent-words"]


def test_unknown_names_and_parameters_are_input_errors():
    """A misspelt method keeps the registry's suggestion; unknown models and parameters are named."""
    with pytest.raises(KeyError, match="did you mean 'raw-attn'"):
        Conformance("raw-atn")
    with pytest.raises(ValueError, match="unknown conformance model 'sd-huge'"):
        Conformance("daam", models=["sd-huge"])
    with pytest.raises(ValueError, match="has no parameter"):
        Conformance("daam", params={"k": 3})
    assert Conformance(f"{__name__}:Plain").cls is Plain


def test_check_method_cli_exit_codes(capsys):
    """`evalkit check-method`: one line per invariant; 0 all hold, 1 one failed, 2 unknown method."""
    assert main(["check-method", "raw-attn", "--models", "shapesworld"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:-1]] == [[PASSED, inv] for inv in INVARIANT_NAMES]
    assert main(["check-method", f"{__name__}:NanMaps"]) == 1
    out = capsys.readouterr().out
    assert "FAILED   finite-float32     [tiny-sd] the map of 'a' has 1 non-finite value(s)" in out
    assert "(fails on shapesworld" in out and "1 of 9 invariants FAILED: finite-float32" in out
    assert main(["check-method", "up-atn"]) == 2
    assert "unknown attribution method 'up-atn'" in capsys.readouterr().err


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, check=False, timeout=300)


def test_readme_example_passes_through_the_pytest_plugin(tmp_path):
    """`pytest -p evalkit.conformance.plugin --evalkit-plugins examples/up_attn.py --evalkit-method up-attn`
    from a project of one's own runs one test per (model, invariant), all passing."""
    res = _run([sys.executable, "-m", "pytest", "-p", "evalkit.conformance.plugin", "-p", "no:cacheprovider",
                "--evalkit-plugins", str(EXAMPLE), "--evalkit-method", "up-attn", "-q", "-rA"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    unet_models = [m for m in MODELS if family_of(m).backbone == "unet"]  # up-attn declares backbones {"unet"}
    assert f"{len(INVARIANT_NAMES) * len(unet_models)} passed" in res.stdout
    assert "test_invariant[up-attn/shapesworld/multi-token-words]" in res.stdout


def test_readme_example_passes_through_the_cli(monkeypatch, capsys):
    """`evalkit --plugins up_attn check-method up-attn` (the README's --plugins convention) exits 0."""
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    sys.modules.pop("up_attn", None)
    try:
        assert main(["--plugins", "up_attn", "check-method", "up-attn"]) == 0
    finally:
        _REGISTRY.pop("up-attn", None)
        sys.modules.pop("up_attn", None)
    out = capsys.readouterr().out
    assert out.count(PASSED) == len(INVARIANT_NAMES) and "all 9 invariants hold" in out
    assert out.startswith("check-method up-attn on tiny-sd, shapesworld")


def test_pytest_plugin_reports_a_broken_method(pytester):
    """A failing invariant is a failed test whose message names it; the unaffected ones pass."""
    result = pytester.runpytest_inprocess("-p", "evalkit.conformance.plugin", "--evalkit-method",
                                          f"{__name__}:Float64Maps", "--evalkit-model", "shapesworld", "-v")
    result.assert_outcomes(passed=len(INVARIANT_NAMES) - 1, failed=1)
    result.stdout.fnmatch_lines(["*finite-float32 [[]shapesworld[]]: the map of 'a' has dtype torch.float64*"])
    result.stdout.fnmatch_lines(["*test_invariant[[]test_conformance:Float64Maps/shapesworld/shape[]] PASSED*"])
    usage = pytester.runpytest_inprocess("-p", "evalkit.conformance.plugin", "--evalkit-method", "up-atn")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR
    usage.stderr.fnmatch_lines(["*unknown attribution method 'up-atn'; did you mean*"])
    pytester.makepyfile(test_own="def test_own():\n    pass\n")
    inert = pytester.runpytest_inprocess("-p", "evalkit.conformance.plugin")  # no --evalkit-method: nothing added
    inert.assert_outcomes(passed=1)
