"""What the conformance checks share: the outcome of a check (:class:`CheckResult`), how a check reports
a broken invariant (:class:`Violation`) or that it cannot run (:class:`NotApplicable`), the method under
test on one model's reference trace (:class:`Subject`), and map comparisons."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..methods import Attribution, AttributionMethod
from ..trace import Trace
from .families import family_of, fresh_copy, probe, reference_trace
from .subject import build_method

PASSED, FAILED, SKIPPED = "PASSED", "FAILED", "SKIPPED"
#: Tolerance of "the same map" where two computations may batch differently (relative, and absolute
#: as a fraction of the larger map's largest magnitude); real violations differ by far more.
RTOL, ATOL = 1e-4, 1e-6


class Violation(Exception):
    """A broken invariant: what was observed and how to fix it."""

    def __init__(self, detail: str, fix: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


class ConformanceError(RuntimeError):
    """The kit itself cannot run a check (e.g. part of evalkit fails to import): not a finding about the method."""


class NotApplicable(Exception):
    """A check that cannot run because another invariant already failed: reported as skipped, not failed."""


@dataclass(frozen=True)
class Invariant:
    """One named property of a method, its one-line statement, its check and the generic fix."""

    name: str
    title: str
    check: Callable[[Subject], None]
    fix: str


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one invariant for one method on one model."""

    method: str
    invariant: str
    model: str
    status: str
    message: str

    @property
    def report(self) -> str:
        """The one-line report: invariant, model and message."""
        return f"{self.invariant} [{self.model}]: {self.message}"


class Subject:
    """One method on one model's reference trace; builds the method once and caches what several checks share."""

    def __init__(self, cls: type[AttributionMethod], label: str, model: str, params: dict) -> None:
        self.cls, self.label, self.model, self.params = cls, label, model, params
        self.pristine = reference_trace(model)  # never handed to the method: see trace()
        self.probe = probe(self.pristine)
        self.words = list(self.probe.words)
        self._method: AttributionMethod | None = None
        self._baseline: Attribution | None = None
        self._failure: Violation | None = None
        self._ran = False
        self.nondeterminism: Violation | None = None  # set by checks.require_deterministic
        self.determinism_checked = False

    def trace(self) -> Trace:
        """A fresh copy of the reference trace (a method writing into it harms no other check)."""
        return fresh_copy(self.pristine)

    def run(self) -> None:
        """Build the method and attribute every probe word once; a failure is kept for ``families``."""
        if self._ran:
            return
        self._ran = True
        family = family_of(self.model)
        try:
            self._method = build_method(self.cls, self.model, self.pristine, self.params)
        except Exception as err:  # noqa: BLE001 - any failure is the finding
            self._failure = Violation(f"cannot be constructed for {self.model}: {describe_error(err)}",
                                      "the constructor must work on every model with its defaults "
                                      "(or the parameters given)")
            return
        try:
            att = self._method.attribute(self.trace(), list(self.words))
        except Exception as err:  # noqa: BLE001
            self._failure = Violation(f"attribute(trace, {self.words}) raised {describe_error(err)} on {self.model} "
                                      f"({family.name}: {family.description}, latent {self.pristine.latent_hw})")
            return
        if not isinstance(att, Attribution):
            self._failure = Violation(f"attribute() returned a {type(att).__name__}, not an Attribution",
                                      "return evalkit.methods.Attribution (AttributionMethod.attribute builds it)")
            return
        self._baseline = att

    @property
    def method(self) -> AttributionMethod:
        """The built method (only after :meth:`attribution` succeeded)."""
        self.attribution()
        assert self._method is not None
        return self._method

    def attribution(self) -> Attribution:
        """The baseline attribution of every probe word; skips the check when the method does not run."""
        self.run()
        if self._baseline is None:
            raise NotApplicable(f"the method does not run on {self.model} (see families)")
        return self._baseline

    @property
    def failure(self) -> Violation | None:
        """Why the method does not build or run on this model (None when it does)."""
        self.run()
        return self._failure

    def present_words(self) -> list[str]:
        """The probe words the baseline has a tensor map of (a missing one is the shape check's finding)."""
        maps = self.attribution().maps
        return [w for w in self.words if isinstance(maps.get(w) if isinstance(maps, dict) else None, torch.Tensor)]


def describe_error(err: BaseException) -> str:
    """An exception as "Type: message", for one-line reports."""
    return f"{type(err).__name__}: {err}"


def word_map(att: Attribution, word: str) -> torch.Tensor:
    """The map of ``word``; a missing or non-tensor map is the shape check's finding, so skip here."""
    m = att.maps.get(word) if isinstance(getattr(att, "maps", None), dict) else None
    if not isinstance(m, torch.Tensor):
        raise NotApplicable(f"there is no tensor map of {word!r} (see shape)")
    return m


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical shape, dtype and values (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to :data:`RTOL`/:data:`ATOL` (NaN equal to NaN)."""
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    mags = torch.cat([a[torch.isfinite(a)].abs(), b[torch.isfinite(b)].abs()])
    scale = float(mags.max()) if mags.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=RTOL, atol=ATOL * scale, equal_nan=True))


def describe_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    """The largest absolute difference, for messages."""
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    d = (a.double() - b.double()).abs().nan_to_num(nan=0.0, posinf=0.0)
    return f"{float(d.max()):.3g}"
