"""Claims a suite expects to hold, written as comparisons over results:
``norm.miou-inf@0.4 >= daam.miou-inf@0.4`` or ``daam.miou-inf@0.4 > 0.3``.

A side is ``<method id>.<metric id>`` (split at the first dot) or a number. The claim holds when
the comparison of the two reduced values holds; a NaN side makes it fail (there is no evidence).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
       "!=": operator.ne}
_SPLIT = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*")


@dataclass(frozen=True)
class Side:
    """One side of a claim: a (method, metric) reference or a constant."""

    method: str | None = None
    metric: str | None = None
    constant: float | None = None

    def __str__(self) -> str:
        return f"{self.constant:g}" if self.constant is not None else f"{self.method}.{self.metric}"


@dataclass(frozen=True)
class Claim:
    """A parsed claim."""

    text: str
    left: Side
    op: str
    right: Side


@dataclass
class ClaimOutcome:
    """A claim with the numbers it was decided on."""

    claim: Claim
    left: float
    right: float
    passed: bool

    def line(self) -> str:
        """pytest-like one-line summary."""
        status = "PASSED" if self.passed else "FAILED"
        return f"{status} {self.claim.text}  ({self.left:.4f} {self.claim.op} {self.right:.4f})"


def _side(text: str, labels: Mapping[str, list[str]], claim: str) -> Side:
    try:
        return Side(constant=float(text))
    except ValueError:
        pass
    method, dot, metric = text.partition(".")
    if not dot:
        raise ValueError(f"claim {claim!r}: {text!r} is neither a number nor METHOD.METRIC")
    import difflib

    for kind, name in (("methods", method), ("metrics", metric)):
        if name not in labels[kind]:
            close = difflib.get_close_matches(name, labels[kind], n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"claim {claim!r}: unknown {kind[:-1]} {name!r}{hint} (suite {kind}: {labels[kind]})")
    return Side(method=method, metric=metric)


def parse_claim(text: str, labels: Mapping[str, list[str]]) -> Claim:
    """Parse ``text``; ``labels`` holds the suite's method and metric ids for validation."""
    parts = _SPLIT.split(text.strip())
    if len(parts) != 3:
        raise ValueError(f"claim {text!r} must be LEFT OP RIGHT with OP one of {', '.join(OPS)}")
    left, op, right = parts
    return Claim(text.strip(), _side(left, labels, text), op, _side(right, labels, text))


def evaluate(claim: Claim, values: Mapping[tuple[str, str], float]) -> ClaimOutcome:
    """Decide ``claim`` on reduced values keyed by (method id, metric id)."""

    def get(side: Side) -> float:
        return side.constant if side.constant is not None else float(values.get((side.method, side.metric), math.nan))

    lv, rv = get(claim.left), get(claim.right)
    ok = not (math.isnan(lv) or math.isnan(rv)) and OPS[claim.op](lv, rv)
    return ClaimOutcome(claim, lv, rv, bool(ok))
