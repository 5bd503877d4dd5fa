"""The conformance tests :mod:`evalkit.conformance.plugin` adds to a pytest run: one per method, model
and invariant, failing with the invariant's message (no traceback) and skipped when a prerequisite failed."""

from __future__ import annotations

import pytest

from .core import FAILED, SKIPPED


def test_invariant(evalkit_case) -> None:
    """The method keeps this invariant on this model."""
    conformance, model, invariant = evalkit_case
    result = conformance.check(invariant, model)
    if result.status == SKIPPED:
        pytest.skip(result.report)
    if result.status == FAILED:
        pytest.fail(f"{result.method}: {result.report}", pytrace=False)
