"""Name -> metric class. Built-in metrics register with :func:`register_metric`, other packages through the
``evalkit.metrics`` entry-point group (loaded when first needed); suites create them by name with
:func:`create_metric` and list them with :func:`available_metrics`."""

from __future__ import annotations

from typing import Any

from ..registry import Registry, UnknownNameError, parameters
from .base import CATEGORIES, DIRECTIONS, REDUCTIONS, Metric

ENTRY_POINT_GROUP = "evalkit.metrics"


class UnknownMetricError(UnknownNameError):
    """A metric name that is neither registered nor an entry point."""


def _check_declaration(name: str, cls: type[Metric]) -> None:
    """A metric's declared ``direction``, ``category``, ``reduction`` and ``reductions`` are checked when it
    registers, so a misdeclared metric fails at import rather than in a suite."""
    if cls.direction not in DIRECTIONS:
        raise ValueError(f"metric {name!r}: direction must be one of {DIRECTIONS}, got {cls.direction!r}")
    if cls.category not in CATEGORIES:
        raise ValueError(f"metric {name!r}: category must be one of {CATEGORIES}, got {cls.category!r}")
    bad = [r for r in (cls.reduction, *cls.reductions) if r not in REDUCTIONS]
    if bad or cls.reduction not in cls.reductions:
        raise ValueError(
            f"metric {name!r}: reduction {cls.reduction!r} must be one of its reductions {cls.reductions}, "
            f"each one of {REDUCTIONS}"
        )


METRICS: Registry[Metric] = Registry("metric", Metric, ENTRY_POINT_GROUP, UnknownMetricError, _check_declaration)
_REGISTRY = METRICS.classes  # the registered classes by name


def register_metric(name: str):
    """Class decorator: register a :class:`Metric` subclass under ``name`` (and set its ``name``), after checking
    its declared metadata."""
    return METRICS.register(name)


def get_metric_class(name: str) -> type[Metric]:
    """The class registered as ``name``; unknown names raise with a "did you mean" suggestion."""
    return METRICS.get(name)


def create_metric(name: str, **params: Any) -> Metric:
    """Instantiate metric ``name`` with ``params``; a wrong parameter is a one-line error."""
    return METRICS.create(name, **params)


def available_metrics() -> dict[str, dict[str, Any]]:
    """Every known metric with its metadata: direction, category, reduction (default), reductions (supported),
    summary, source and parameter names."""
    return {
        name: {
            "direction": cls.direction,
            "category": cls.category,
            "reduction": cls.reduction,
            "reductions": list(cls.reductions),
            "summary": cls.summary,
            "source": cls.source,
            "params": parameters(cls)[0],
        }
        for name, cls in METRICS.all().items()
    }
