"""Running the invariants: :class:`Conformance` checks one method on the chosen models, on demand and
cached, for the pytest plugin and ``evalkit check-method`` alike; :func:`summarize` folds the models into
one line per invariant."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..methods import AttributionMethod
from .checks import INVARIANT_NAMES, INVARIANTS
from .core import (
    FAILED,
    PASSED,
    SKIPPED,
    CheckResult,
    ConformanceError,
    NotApplicable,
    Subject,
    Violation,
    describe_error,
)
from .families import all_models, family_of
from .subject import check_param_names, method_label, resolve_method

_BY_NAME = {inv.name: inv for inv in INVARIANTS}


class Conformance:
    """The invariants of one method on the chosen models (default: every model of every family);
    results are computed on demand and cached, so pytest items and the CLI share one code path."""

    def __init__(self, method: str | type[AttributionMethod], models: Sequence[str] | None = None,
                 params: dict | None = None) -> None:
        self.cls = resolve_method(method)
        self.label = method_label(self.cls)
        self.params = dict(params or {})
        check_param_names(self.cls, self.params)
        backbones = getattr(self.cls, "backbones", frozenset({"unet", "transformer"}))
        # default: every model of every family the method declares it runs on (ConceptAttention: MM-DiT only)
        self.models = list(dict.fromkeys(models)) if models else [
            m for m in all_models() if family_of(m).backbone in backbones]
        for model in self.models:
            family_of(model)
        self._subjects: dict[str, Subject] = {}
        self._results: dict[tuple[str, str], CheckResult] = {}

    def subject(self, model: str) -> Subject:
        """The method on ``model``'s reference trace (traced on first use)."""
        if model not in self._subjects:
            self._subjects[model] = Subject(self.cls, self.label, model, self.params)
        return self._subjects[model]

    def check(self, invariant: str, model: str) -> CheckResult:
        """Run one invariant on one model (cached)."""
        key = (invariant, model)
        if key in self._results:
            return self._results[key]
        if invariant not in _BY_NAME:
            raise ValueError(f"unknown invariant {invariant!r}; invariants: {', '.join(INVARIANT_NAMES)}")
        inv = _BY_NAME[invariant]
        family = family_of(model)
        backbones = getattr(self.cls, "backbones", frozenset({"unet", "transformer"}))
        if family.backbone not in backbones:
            result = CheckResult(self.label, invariant, model, SKIPPED,
                                 f"not checked: the method declares backbones {sorted(backbones)}; {model} "
                                 f"({family.name}) is a {family.backbone} model")
            self._results[key] = result
            return result
        subject = self.subject(model)
        try:
            inv.check(subject)
            status, message = PASSED, inv.title
        except Violation as v:
            status, message = FAILED, f"{v.detail}. Fix: {v.fix or inv.fix}"
        except NotApplicable as n:
            status, message = SKIPPED, f"not checked: {n}"
        except ConformanceError:
            raise
        except Exception as err:  # noqa: BLE001 - a method that crashes a check fails it
            status, message = FAILED, f"the check raised {describe_error(err)}. Fix: {inv.fix}"
        result = CheckResult(self.label, invariant, model, status, message)
        self._results[key] = result
        return result

    def run(self) -> list[CheckResult]:
        """Every invariant on every model, model by model."""
        return [self.check(inv.name, model) for model in self.models for inv in INVARIANTS]


def summarize(results: Sequence[CheckResult]) -> list[CheckResult]:
    """One result per invariant over all models: FAILED if it failed on a model (that model's message),
    SKIPPED if it was skipped everywhere, else PASSED (naming the models)."""
    out = []
    for inv in INVARIANTS:
        rows = [r for r in results if r.invariant == inv.name]
        if not rows:
            continue
        failed = [r for r in rows if r.status == FAILED]
        if failed:
            also = [r.model for r in failed[1:]]
            message = failed[0].message + (f" (fails on {', '.join(also)} too)" if also else "")
            out.append(dataclasses.replace(failed[0], message=message))
            continue
        done = [r.model for r in rows if r.status == PASSED]
        if not done:
            out.append(rows[0])
            continue
        skipped = [r.model for r in rows if r.status == SKIPPED]
        note = f"; not checked on {', '.join(skipped)}" if skipped else ""
        out.append(CheckResult(rows[0].method, inv.name, ", ".join(done), PASSED, f"{inv.title}{note}"))
    return out


def check_method(method: str | type[AttributionMethod], models: Sequence[str] | None = None,
                 params: dict | None = None) -> list[CheckResult]:
    """Every invariant of ``method`` on ``models`` (default: all supported), one result per invariant and model."""
    return Conformance(method, models, params).run()
