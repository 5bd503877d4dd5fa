"""Name -> attribution method class. Built-ins register with :func:`register_method`; other packages
add theirs through the ``evalkit.methods`` entry-point group, loaded only when first needed."""

from __future__ import annotations

from ..registry import Registry, UnknownNameError
from .base import AttributionMethod

ENTRY_POINT_GROUP = "evalkit.methods"


class UnknownMethodError(UnknownNameError):
    """An attribution method name that is neither registered nor an entry point."""


METHODS: Registry[AttributionMethod] = Registry("attribution method", AttributionMethod, ENTRY_POINT_GROUP,
                                                UnknownMethodError)
_REGISTRY = METHODS.classes  # the registered classes by name (tests unregister their examples here)


def register_method(name: str):
    """Class decorator: register an :class:`AttributionMethod` subclass under ``name``."""
    return METHODS.register(name)


def get_method_class(name: str) -> type[AttributionMethod]:
    """The class registered as ``name``; unknown names raise with a "did you mean" suggestion."""
    return METHODS.get(name)


def create_method(name: str, **params) -> AttributionMethod:
    """Instantiate method ``name`` with ``params``; a wrong parameter is a one-line error."""
    return METHODS.create(name, **params)


def available_methods() -> dict[str, str]:
    """Every known method name with its one-line summary (loads entry points)."""
    return {name: cls.summary for name, cls in METHODS.all().items()}
