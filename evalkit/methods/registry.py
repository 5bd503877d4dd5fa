"""Name -> attribution method class. Built-ins register with :func:`register_method`; other packages
add theirs through the ``evalkit.methods`` entry-point group, loaded only when first needed."""

from __future__ import annotations

import difflib
import inspect
from importlib.metadata import entry_points

from .base import AttributionMethod

ENTRY_POINT_GROUP = "evalkit.methods"
_REGISTRY: dict[str, type[AttributionMethod]] = {}


class UnknownMethodError(KeyError):
    """An attribution method name that is neither registered nor an entry point."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_method(name: str):
    """Class decorator: register an :class:`AttributionMethod` subclass under ``name``."""

    def decorate(cls: type[AttributionMethod]) -> type[AttributionMethod]:
        if not (inspect.isclass(cls) and issubclass(cls, AttributionMethod)):
            raise TypeError(f"@register_method({name!r}) expects an AttributionMethod subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"attribution method {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_entry_point(name: str) -> type[AttributionMethod] | None:
    ep = _entry_points().get(name)
    if ep is None:
        return None
    cls = ep.load()
    if not (inspect.isclass(cls) and issubclass(cls, AttributionMethod)):
        raise TypeError(f"entry point {name!r} ({ep.value}) is not an AttributionMethod subclass")
    if name not in _REGISTRY:
        register_method(name)(cls)
    return _REGISTRY[name]


def get_method_class(name: str) -> type[AttributionMethod]:
    """The class registered as ``name``; unknown names raise with a "did you mean" suggestion."""
    cls = _REGISTRY.get(name) or _load_entry_point(name)
    if cls is None:
        known = sorted(set(_REGISTRY) | set(_entry_points()))
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(f"unknown attribution method {name!r}{hint} (known: {', '.join(known)})")
    return cls


def create_method(name: str, **params) -> AttributionMethod:
    """Instantiate method ``name`` with ``params``; a wrong parameter is a one-line error."""
    cls = get_method_class(name)
    if cls.__init__ is object.__init__:
        accepted, has_var_kw = [], False
    else:
        sig = inspect.signature(cls.__init__)
        accepted = [p for p in sig.parameters if p != "self"]
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    bad = [k for k in params if k not in accepted]
    if bad and not has_var_kw:
        raise ValueError(
            f"method {name!r} has no parameter(s) {bad}; its parameters are {accepted or 'none'}"
        )
    return cls(**params)


def available_methods() -> dict[str, str]:
    """Every known method name with its one-line summary (loads entry points)."""
    for ep_name in _entry_points():
        if ep_name not in _REGISTRY:
            _load_entry_point(ep_name)
    return {name: cls.summary for name, cls in sorted(_REGISTRY.items())}
