"""Claims a suite expects to hold, and their verdicts.

A claim compares two rows, ``norm.miou-inf_tau0.4 >= daam.miou-inf_tau0.4``, or a row and a number,
``daam.miou-inf_tau0.4 > 0.2``. A side is ``<row id>.<metric id>`` (split at the first dot), a number,
or a row with a margin, ``daam.miou-inf_tau0.4 - 0.02`` (non-inferiority; the sign needs spaces around it).

Every claim is a statistical statement (docs/suites.md, "Verdicts"): the difference D = left - right
(margins included) is estimated on the per-item values, paired over the items both rows share, with a
seeded percentile-bootstrap interval at the suite's confidence, Holm-corrected over the suite's claims.
PASSED: the whole interval lies on the claimed side; FAILED: wholly on the other side; INCONCLUSIVE:
it straddles, or fewer than ``min_n`` valid items, or a row has no values. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from .. import stats

PASSED, FAILED, INCONCLUSIVE = "PASSED", "FAILED", "INCONCLUSIVE"
VERDICTS = (PASSED, FAILED, INCONCLUSIVE)
#: Comparison operators; ``==``/``!=`` are not claims an interval can decide (use two margins instead).
OPS = (">=", "<=", ">", "<")
_SPLIT = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*")
_MARGIN = re.compile(r"^(?P<ref>\S+)\s+(?P<sign>[+-])\s+(?P<num>[0-9.eE+-]+)$")


@dataclass(frozen=True)
class Side:
    """One side of a claim: a (row, metric) reference plus a constant ``offset``, or a constant alone."""

    method: str | None = None
    metric: str | None = None
    constant: float | None = None
    offset: float = 0.0

    @property
    def is_constant(self) -> bool:
        return self.method is None

    @property
    def value_offset(self) -> float:
        """The constant part of the side (the number itself, or the margin)."""
        return self.constant if self.constant is not None else self.offset

    def __str__(self) -> str:
        if self.constant is not None:
            return f"{self.constant:g}"
        ref = f"{self.method}.{self.metric}"
        return ref if not self.offset else f"{ref} {'+' if self.offset > 0 else '-'} {abs(self.offset):g}"


@dataclass(frozen=True)
class Claim:
    """A parsed claim."""

    text: str
    left: Side
    op: str
    right: Side


@dataclass
class ClaimOutcome:
    """A claim's verdict with the numbers it was decided on.

    ``left``/``right``: the two sides' statistics over the items used (a constant side is its number);
    ``diff`` = left - right; ``ci``: its interval at ``confidence`` (after the multiplicity correction);
    ``n``: items used (paired: shared valid items); ``n_needed``: for an inconclusive claim, items a
    replication needs for 80 % power at the observed difference; ``reason``: why it is inconclusive
    when no interval decided it."""

    text: str
    op: str
    verdict: str
    left: float
    right: float
    diff: float
    ci: tuple[float, float] | None
    confidence: float
    n: int
    paired: bool = True
    n_needed: int | None = None
    p_value: float = math.nan
    reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    @property
    def failed(self) -> bool:
        return self.verdict == FAILED

    def line(self) -> str:
        """pytest-like one-line summary: verdict, claim, both values, difference, interval, n."""
        parts = [f"{self.verdict} {self.text}"]
        nums = f"{_f(self.left)} vs {_f(self.right)}, diff {_f(self.diff, sign=True)}"
        if self.ci is not None:
            nums += f" [{_f(self.ci[0], sign=True)}, {_f(self.ci[1], sign=True)}] {100 * self.confidence:.4g}% CI"
        if self.extra.get("margin"):
            nums += f", margin {_f(self.extra['margin'], sign=True)}"
        nums += f", n={self.n}" + ("" if self.paired else " unpaired")
        parts.append(f"({nums})")
        if self.verdict == INCONCLUSIVE:
            if self.reason:
                parts.append(f"- {self.reason}")
            if self.n_needed is not None:
                parts.append(f"- ~{self.n_needed} items for 80% power")
            elif not self.reason:
                parts.append("- no finite sample size reaches 80% power at this difference")
        return "  ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ClaimOutcome:
        d = dict(d)
        d["ci"] = tuple(d["ci"]) if d.get("ci") is not None else None
        return cls(**d)


def _f(x: float, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.4f}" if sign else f"{x:.4f}"


def _ref(text: str, labels: Mapping[str, list[str]], claim: str) -> tuple[str, str]:
    method, dot, metric = text.partition(".")
    if not dot:
        raise ValueError(f"claim {claim!r}: {text!r} is neither a number nor METHOD.METRIC")
    for kind, name in (("methods", method), ("metrics", metric)):
        if name not in labels[kind]:
            close = difflib.get_close_matches(name, labels[kind], n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"claim {claim!r}: unknown {kind[:-1]} {name!r}{hint} (suite {kind}: {labels[kind]})")
    return method, metric


def _side(text: str, labels: Mapping[str, list[str]], claim: str) -> Side:
    try:
        return Side(constant=float(text))
    except ValueError:
        pass
    m = _MARGIN.match(text)
    if m:
        try:
            margin = float(m["num"])
        except ValueError as err:
            raise ValueError(f"claim {claim!r}: margin {m['num']!r} is not a number") from err
        method, metric = _ref(m["ref"], labels, claim)
        return Side(method=method, metric=metric, offset=margin if m["sign"] == "+" else -margin)
    if " " in text.strip():
        raise ValueError(f"claim {claim!r}: cannot read {text!r}; a side is METHOD.METRIC, a number, or "
                         "METHOD.METRIC - MARGIN (spaces around the sign)")
    return Side(*_ref(text, labels, claim))


def parse_claim(text: str, labels: Mapping[str, list[str]]) -> Claim:
    """Parse ``text``; ``labels`` holds the suite's row and metric ids for validation."""
    parts = _SPLIT.split(text.strip())
    if len(parts) != 3:
        raise ValueError(f"claim {text!r} must be LEFT OP RIGHT with OP one of {', '.join(OPS)}")
    left, op, right = parts
    if op not in OPS:
        raise ValueError(f"claim {text!r}: {op!r} cannot be decided by an interval; write two claims with "
                         f"margins instead (e.g. 'a.m >= b.m - 0.02' and 'a.m <= b.m + 0.02')")
    claim = Claim(text.strip(), _side(left, labels, text), op, _side(right, labels, text))
    if claim.left.is_constant and claim.right.is_constant:
        raise ValueError(f"claim {text!r} compares two numbers; one side must be METHOD.METRIC")
    return claim


@dataclass(frozen=True)
class Settings:
    """How claims are decided (the suite's ``confidence``, ``correction``, ``min_n``, ``resamples``)."""

    confidence: float = 0.95
    correction: str = "holm"
    min_n: int = 10
    resamples: int = stats.N_RESAMPLES
    seed: int = 0


def _comparison(claim: Claim, rows: Mapping[tuple[str, str], stats.RowSample], settings: Settings):
    """(comparison, margin, reason, flipped): the bootstrap of D = left - right (or row - number), the
    margin D is compared with (non-inferiority claims), or None with why it cannot be computed."""
    left, right = claim.left, claim.right
    flip = left.is_constant  # "0.2 < a.m" is "a.m > 0.2" mirrored: estimate with the row on the left
    if flip:
        left, right = right, left
    missing = [f"{s.method}.{s.metric}" for s in (left, right)
               if not s.is_constant and (s.method, s.metric) not in rows]
    if missing:
        return None, 0.0, f"no values for {', '.join(missing)} (the row or metric was skipped)", flip
    a = rows[(left.method, left.metric)]
    seed = stats.seed_for(claim.text, settings.seed)
    if right.is_constant:  # D = row - (number - the row's own offset); no margin
        comp = stats.compare_rows(a, None, right.constant - left.offset, n_resamples=settings.resamples, seed=seed)
        return comp, 0.0, "", flip
    comp = stats.compare_rows(a, rows[(right.method, right.metric)], n_resamples=settings.resamples, seed=seed)
    return comp, right.offset - left.offset, "", flip


def judge(claims: list[Claim], rows: Mapping[tuple[str, str], stats.RowSample],
          settings: Settings = Settings()) -> list[ClaimOutcome]:
    """Verdicts of ``claims`` on per-item values ``rows`` (keyed by (row id, metric id))."""
    alpha = 1.0 - settings.confidence
    prepared = [_comparison(c, rows, settings) for c in claims]

    def usable(i: int) -> bool:
        comp = prepared[i][0]
        return comp is not None and comp.n >= max(2, settings.min_n)

    def verdict_at(i: int, level: float) -> str:
        comp, margin, _, flip = prepared[i]
        ci = comp.interval(1.0 - level)
        if ci is None or not all(math.isfinite(v) for v in ci):
            return INCONCLUSIVE
        op = _MIRROR[claims[i].op] if flip else claims[i].op
        return _decide(op, (ci[0] - margin, ci[1] - margin))

    testable = [i for i in range(len(claims)) if usable(i)]
    levels = {i: alpha for i in range(len(claims))}
    if settings.correction == "holm" and testable:
        p = [prepared[i][0].p_value(prepared[i][1]) for i in testable]
        decided = lambda j, lev: verdict_at(testable[j], lev) != INCONCLUSIVE  # noqa: E731
        for i, lev in zip(testable, stats.holm_levels(p, alpha, decided)):
            levels[i] = lev
    out = []
    for i, claim in enumerate(claims):
        comp, margin, reason, flip = prepared[i]
        level = levels[i]
        if comp is None:
            out.append(ClaimOutcome(claim.text, claim.op, INCONCLUSIVE, math.nan, math.nan, math.nan, None,
                                    1.0 - level, 0, reason=reason))
            continue
        verdict = verdict_at(i, level) if usable(i) else INCONCLUSIVE
        if not usable(i):
            reason = (f"n={comp.n} valid items < min_n={settings.min_n}" if comp.paired
                      else f"n={comp.n_left} and {comp.n_right} valid items, fewer than min_n={settings.min_n}")
        ci = comp.interval(1.0 - level)
        if ci is not None and not all(math.isfinite(v) for v in ci):
            ci = None
        left, right, diff = comp.left, comp.right, comp.diff
        if flip:  # report in the claim's own orientation
            left, right, diff, margin = comp.right, comp.left, -comp.diff, -margin
            ci = None if ci is None else (-ci[1], -ci[0])
        n_needed = (stats.items_for_power(comp, level, null=prepared[i][1])
                    if verdict == INCONCLUSIVE and usable(i) else None)
        out.append(ClaimOutcome(claim.text, claim.op, verdict, left, right, diff, ci, 1.0 - level, comp.n,
                                comp.paired, n_needed, comp.p_value(prepared[i][1]), reason,
                                {"margin": margin} if margin else {}))
    return out


_MIRROR = {">=": "<=", "<=": ">=", ">": "<", "<": ">"}


def _decide(op: str, ci: tuple[float, float]) -> str:
    """PASSED/FAILED/INCONCLUSIVE for ``D op 0`` given D's interval (strictness matters only at 0)."""
    low, high = ci
    if op == ">=":
        return PASSED if low >= 0 else FAILED if high < 0 else INCONCLUSIVE
    if op == ">":
        return PASSED if low > 0 else FAILED if high <= 0 else INCONCLUSIVE
    if op == "<=":
        return PASSED if high <= 0 else FAILED if low > 0 else INCONCLUSIVE
    return PASSED if high < 0 else FAILED if low >= 0 else INCONCLUSIVE  # "<"


def summary_counts(outcomes) -> dict[str, int]:
    """Number of claims per verdict."""
    return {v: sum(o.verdict == v for o in outcomes) for v in VERDICTS}


def summary_line(outcomes) -> str:
    """``3 passed, 1 inconclusive, 0 failed``."""
    c = summary_counts(outcomes)
    return f"{c[PASSED]} passed, {c[INCONCLUSIVE]} inconclusive, {c[FAILED]} failed"


def exit_code(outcomes, strict: bool = False) -> int:
    """0 when no claim FAILED (with ``strict``: and none is INCONCLUSIVE), else 1."""
    bad = {FAILED, INCONCLUSIVE} if strict else {FAILED}
    return 1 if any(o.verdict in bad for o in outcomes) else 0


def row_samples(results: Mapping) -> dict[tuple[str, str], stats.RowSample]:
    """Per-item values of every (row id, metric id) of a suite's results (MetricResults)."""
    out = {}
    for key, r in results.items():
        pooled = r.reduction == "pooled" and len(r.numerators) == len(r.per_sample)
        out[key] = stats.RowSample.build(r.item_keys(), r.per_sample, r.reduction,
                                         r.numerators if pooled else None, r.denominators if pooled else None)
    return out


def settings_of(spec) -> Settings:
    """The claim settings a suite spec sets."""
    return Settings(confidence=spec.confidence, correction=spec.correction, min_n=spec.min_n,
                    resamples=spec.resamples)


def judge_spec(spec, results: Mapping) -> list[ClaimOutcome]:
    """Verdicts of a suite's ``expect:`` claims on its results (keyed by (row id, metric id))."""
    labels = {"methods": spec.row_labels(), "metrics": [m.label for m in spec.metrics]}
    claims = [parse_claim(text, labels) for text in spec.expect]
    return judge(claims, row_samples(results), settings_of(spec))
