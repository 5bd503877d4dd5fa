"""Which method is checked and how it is built: user modules imported first (so their
``@register_method`` runs), a registered name or a dotted path resolved to a class, and the
parameters it gets on each model."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..methods import AttributionMethod, HeadRelevance, UnknownMethodError, create_method, get_method_class
from ..trace import Trace


def import_plugins(specs: Iterable[str]) -> None:
    """Import user modules so their methods register: dotted module names (on ``sys.path``, as
    ``evalkit --plugins`` takes them) or paths of ``.py`` files."""
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec.endswith(".py"):
            _import_file(Path(spec))
            continue
        try:
            importlib.import_module(spec)
        except ImportError as err:
            raise ValueError(f"cannot import plugin module {spec!r} ({err}); is it on PYTHONPATH? "
                             "(a file is given by its path, e.g. examples/up_attn.py)") from err


def _import_file(path: Path) -> None:
    """Import one ``.py`` file as a module named after it (once per file)."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"plugin file {str(path)!r} does not exist")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"plugin file {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def resolve_method(method: str | type[AttributionMethod]) -> type[AttributionMethod]:
    """A method class from a registered name, a dotted path (``pkg.module:Class`` or ``pkg.module.Class``)
    or the class itself; an unknown name keeps the registry's "did you mean" message."""
    if inspect.isclass(method):
        if not issubclass(method, AttributionMethod):
            raise TypeError(f"{method!r} is not an AttributionMethod subclass")
        return method
    try:
        return get_method_class(method)
    except UnknownMethodError as unknown:
        if ":" not in method and "." not in method:
            raise
        module, _, attr = method.partition(":") if ":" in method else method.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise UnknownMethodError(f"{unknown}; as a dotted path: {err}") from None
    if not (inspect.isclass(obj) and issubclass(obj, AttributionMethod)):
        raise UnknownMethodError(f"{method!r} is {obj!r}, not an AttributionMethod subclass")
    return obj


def method_label(cls: type[AttributionMethod]) -> str:
    """The name results are reported under: the registered name, else ``module:QualifiedName`` (a name
    inherited from a registered base class would mislabel a subclass)."""
    return cls.name if _registered(cls) else f"{cls.__module__}:{cls.__qualname__}"


def parse_params(items: Sequence[str]) -> dict:
    """``["k=20", "order=least"]`` -> ``{"k": 20, "order": "least"}``; values are JSON when they parse as JSON."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method parameter {item!r} must look like NAME=VALUE, e.g. k=20")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def check_param_names(cls: type[AttributionMethod], params: dict) -> None:
    """Parameters the constructor does not take are an input error, before any model is traced."""
    if not params:
        return
    sig = {} if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        return
    accepted = [p for p in sig if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"method {method_label(cls)!r} has no parameter(s) {unknown}; its parameters are "
                         f"{accepted or 'none'}")


def build_method(cls: type[AttributionMethod], model: str, trace: Trace, params: dict) -> AttributionMethod:
    """Instantiate the method for ``model``: ``params`` plus the model-dependent defaults of :func:`model_params`."""
    params = model_params(cls, model, trace, params)
    if cls.name and _registered(cls):
        return create_method(cls.name, **params)
    return cls(**params)


def _registered(cls: type[AttributionMethod]) -> bool:
    try:
        return get_method_class(cls.name) is cls
    except UnknownMethodError:
        return False


def model_params(cls: type[AttributionMethod], model: str, trace: Trace, params: dict) -> dict:
    """Defaults that depend on the model: a method taking head relevance vectors (``hrv``) gets the
    model's own (as ``evalkit attribute`` finds them), else synthetic ones over the model's heads, since
    the checks test behaviour, not relevance; an absent default ``concept`` becomes the file's first, and a default
    head count ``k`` larger than the model's becomes the same share of its heads as of SD 1.x's 128."""
    from ..preflight import hrv_for_model

    params = dict(params)
    sig = {} if cls.__init__ is object.__init__ else inspect.signature(cls.__init__).parameters
    if "hrv" not in sig or "hrv" in params:
        return params
    heads = trace.head_names()
    found = hrv_for_model(model, heads)
    hrv = HeadRelevance.load(found) if found else synthetic_hrv(model, heads)
    params["hrv"] = hrv
    concept = sig["concept"].default if "concept" in sig else None
    if "concept" in sig and "concept" not in params and concept not in hrv.vectors:
        params["concept"] = next(iter(hrv.vectors))
    k = sig["k"].default if "k" in sig else None
    if "k" not in params and isinstance(k, int) and k > len(heads):  # 30 of 12 heads (tiny-sd3): the same share
        params["k"] = round(k / 128, 2)  # of the heads as k of SD 1.x's 128 (k < 1 is a fraction of the heads)
    return params


def synthetic_hrv(model: str, heads: Sequence[str]) -> HeadRelevance:
    """Head relevance vectors for a model that has none: one concept, relevance falling with head order."""
    n = len(heads)
    scores = tuple(float(n - i) for i in range(n))
    return HeadRelevance(model=f"{model} (synthetic, for conformance checks)", heads=tuple(heads),
                         vectors={"Conformance": scores}, words={"Conformance": ()})
