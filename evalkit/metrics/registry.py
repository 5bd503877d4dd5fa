"""Name -> metric class. Built-in metrics register with :func:`register_metric`; suites create them by
name with :func:`create_metric` and list them with :func:`available_metrics`."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from .base import CATEGORIES, DIRECTIONS, REDUCTIONS, Metric

_REGISTRY: dict[str, type[Metric]] = {}


class UnknownMetricError(KeyError):
    """A metric name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_metric(name: str):
    """Class decorator: register a :class:`Metric` subclass under ``name`` (and set its ``name``).

    The class's declared ``direction``, ``category``, ``reduction`` and ``reductions`` are checked
    here, so a misdeclared metric fails at import rather than in a suite.
    """

    def decorate(cls: type[Metric]) -> type[Metric]:
        if not (inspect.isclass(cls) and issubclass(cls, Metric)):
            raise TypeError(f"@register_metric({name!r}) expects a Metric subclass, got {cls!r}")
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
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"metric {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get_metric_class(name: str) -> type[Metric]:
    """The class registered as ``name``; unknown names raise with a "did you mean" suggestion."""
    cls = _REGISTRY.get(name)
    if cls is None:
        known = sorted(_REGISTRY)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownMetricError(f"unknown metric {name!r}{hint} (known: {', '.join(known)})")
    return cls


def _parameters(cls: type[Metric]) -> tuple[list[str], bool]:
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return accepted, has_var_kw


def create_metric(name: str, **params: Any) -> Metric:
    """Instantiate metric ``name`` with ``params``; a wrong parameter is a one-line error."""
    cls = get_metric_class(name)
    accepted, has_var_kw = _parameters(cls)
    bad = [k for k in params if k not in accepted]
    if bad and not has_var_kw:
        raise ValueError(f"metric {name!r} has no parameter(s) {bad}; its parameters are {accepted or 'none'}")
    return cls(**params)


def available_metrics() -> dict[str, dict[str, Any]]:
    """Every registered metric with its metadata: direction, category, reduction (default),
    reductions (supported), summary, source and parameter names."""
    out = {}
    for name, cls in sorted(_REGISTRY.items()):
        out[name] = {
            "direction": cls.direction,
            "category": cls.category,
            "reduction": cls.reduction,
            "reductions": list(cls.reductions),
            "summary": cls.summary,
            "source": cls.source,
            "params": _parameters(cls)[0],
        }
    return out
