"""One name -> class registry shape for methods, metrics and protocols: a class decorator, lazily loaded entry
points, "did you mean" errors and a parameter check when a class is built from a suite's keywords."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is neither registered nor an entry point (the message names the closest known one)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Classes derived from ``base`` by name. ``kind`` words the errors ("attribution method"), ``group`` is the
    entry-point group other packages register under (loaded only when a name is missing or all are listed),
    ``error`` the :class:`UnknownNameError` subclass raised for an unknown name, and ``check`` an extra test of a
    class at registration (e.g. a metric's declared direction)."""

    def __init__(self, kind: str, base: type[T], group: str | None, error: type[UnknownNameError] = UnknownNameError,
                 check: Callable[[str, type[T]], None] | None = None) -> None:
        self.kind = kind
        self.base = base
        self.group = group
        self.error = error
        self.check = check
        self.classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register a ``base`` subclass under ``name`` (and set its ``name``)."""

        def decorate(cls: type[T]) -> type[T]:
            if not (inspect.isclass(cls) and issubclass(cls, self.base)):
                raise TypeError(f"registering {self.kind} {name!r} expects a {self.base.__name__} subclass, "
                                f"got {cls!r}")
            if self.check is not None:
                self.check(name, cls)
            existing = self.classes.get(name)
            if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing.__module__}")
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorate

    def entry_points(self) -> dict:
        """The installed entry points of the group, by name (none without a group)."""
        return {ep.name: ep for ep in entry_points(group=self.group)} if self.group else {}

    def _load(self, name: str) -> type[T] | None:
        ep = self.entry_points().get(name)
        if ep is None:
            return None
        cls = ep.load()
        if not (inspect.isclass(cls) and issubclass(cls, self.base)):
            raise TypeError(f"entry point {name!r} ({ep.value}) is not a {self.base.__name__} subclass")
        if name not in self.classes:
            self.register(name)(cls)
        return self.classes[name]

    def get(self, name: str) -> type[T]:
        """The class registered as ``name`` (or its entry point); unknown names raise with a suggestion."""
        cls = self.classes.get(name) or self._load(name)
        if cls is None:
            known = sorted(set(self.classes) | set(self.entry_points()))
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.error(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known)})")
        return cls

    def all(self) -> dict[str, type[T]]:
        """Every known class by name, sorted (loads the entry points not loaded yet)."""
        for name in self.entry_points():
            if name not in self.classes:
                self._load(name)
        return dict(sorted(self.classes.items()))

    def create(self, name: str, **params: Any) -> T:
        """An instance of ``name`` built with ``params``; a parameter it does not take is a one-line error."""
        cls = self.get(name)
        accepted, has_var_kw = parameters(cls)
        bad = [k for k in params if k not in accepted]
        if bad and not has_var_kw:
            raise ValueError(f"{self.kind} {name!r} has no parameter(s) {bad}; its parameters are "
                             f"{accepted or 'none'}")
        return cls(**params)


def parameters(cls: type) -> tuple[list[str], bool]:
    """The keyword parameters ``cls(...)`` accepts, and whether it takes ``**kwargs``."""
    if cls.__init__ is object.__init__:
        return [], False
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    return accepted, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
