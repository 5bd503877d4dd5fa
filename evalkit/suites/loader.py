"""Load a suite YAML: resolve ``include:``, validate against the schema, and report errors with the
file, the line and a suggestion ("did you mean")."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..resources import builtin_dir
from .schema import SuiteSpec

#: The built-in suites: the checkout's top-level ``suites/``, or the wheel's copy (see :mod:`evalkit.resources`).
SUITES_DIR = builtin_dir("suites")
#: Suites of the user's project: ``./suites`` of the working directory, looked up before the built-in ones.
USER_SUITES = Path("suites")


class SuiteError(ValueError):
    """A malformed suite file; the message names the file, the line and how to fix it."""


def suite_dirs() -> list[Path]:
    """Where a suite name is looked up, first match wins: ``./suites`` of the working directory (when it exists),
    then the built-in suites (once, when the two are the same folder, as in a checkout's root)."""
    dirs = [USER_SUITES.resolve()] if USER_SUITES.is_dir() else []
    if SUITES_DIR.resolve() not in dirs:
        dirs.append(SUITES_DIR)
    return dirs


def find_suite(name_or_path: str, suites_dir: Path | None = None) -> Path:
    """A suite by path, or by name (``task-a`` -> ``task-a.yaml``) in ``suites_dir``, else in :func:`suite_dirs`
    (``./suites`` first, then the built-in suites)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    dirs = [suites_dir] if suites_dir is not None else suite_dirs()
    for d in dirs:
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    known = list_suites(suites_dir)
    close = difflib.get_close_matches(str(name_or_path), known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = " and ".join(str(d) for d in dirs)
    raise SuiteError(f"no suite {name_or_path!r}{hint} (suites in {where}: {', '.join(known) or 'none'})")


def list_suites(suites_dir: Path | None = None) -> list[str]:
    """Names of runnable suites in ``suites_dir``, else in every folder of :func:`suite_dirs` (files starting
    with ``_`` are shared includes)."""
    dirs = [suites_dir] if suites_dir is not None else suite_dirs()
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml") if not p.stem.startswith("_")})


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _compose(path: Path) -> tuple[Any, yaml.Node | None]:
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise SuiteError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from err
    return data, node


def _find_include(path: Path, inc: str) -> Path:
    """An ``include:`` target: relative to the including file, else among the built-in suites (so that a user
    suite in ``./suites`` can ``include: _defaults.yaml`` without copying it)."""
    cands = [path.parent / inc] + ([SUITES_DIR / inc] if not Path(inc).is_absolute() else [])
    for cand in cands:
        if cand.is_file():
            return cand
    raise SuiteError(f"{path}: include {inc!r} not found (looked for {' and '.join(str(c) for c in cands)})")


def _resolve(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, tuple[Path, yaml.Node]]]:
    """Merged mapping plus, per top-level key, the file and node that set it (for error lines)."""
    path = path.resolve()
    if path in seen:
        raise SuiteError(f"{path}: include cycle through {' -> '.join(str(s) for s in seen)}")
    data, node = _compose(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SuiteError(f"{path}:1: a suite must be a mapping of keys (name, methods, metrics, ...)")
    origins: dict[str, tuple[Path, yaml.Node]] = {}
    merged: dict = {}
    includes = data.pop("include", None)
    for inc in [includes] if isinstance(includes, str) else (includes or []):
        inc_path = _find_include(path, inc)
        inc_data, inc_origins = _resolve(inc_path, seen + (path,))
        merged = _merge(merged, inc_data)
        origins.update(inc_origins)
    merged = _merge(merged, data)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            origins[key_node.value] = (path, value_node)
    return merged, origins


def _line(origins: dict[str, tuple[Path, yaml.Node]], loc: tuple, default: Path) -> str:
    """``file:line`` of the YAML node at ``loc`` (as deep as the file spells it)."""
    if not loc or loc[0] not in origins:
        return f"{default}"
    path, node = origins[loc[0]]
    for part in loc[1:]:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return f"{path}:{node.start_mark.line + 1}"


def _overridden(overrides: dict | None, loc: tuple) -> str | None:
    """``override KEY=VALUE`` when the value at ``loc`` came from the command line (``--set``, ``--model``), not
    from a file."""
    node: Any = overrides
    keys: list[str] = []
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            break
        node = node[part]
        keys.append(str(part))
        if not isinstance(node, dict):
            return f"command-line override {'.'.join(keys)}={node!r}"
    return None


def _suggest(field: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(field, allowed, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"


def _allowed_fields(loc: tuple) -> list[str]:
    from . import schema

    model: Any = SuiteSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, schema._Strict)), None)
        if model is None:
            return []
    return list(model.model_fields)


def suite_data(name_or_path: str, overrides: dict | None = None) -> dict:
    """The suite's mapping after ``include:`` and ``overrides``, not yet validated (cheap: YAML only)."""
    return _data(find_suite(name_or_path), overrides)[0]


def _data(path: Path, overrides: dict | None) -> tuple[dict, dict]:
    data, origins = _resolve(path)
    data.setdefault("name", path.stem)
    if overrides:
        data = _merge(data, overrides)
    return data, origins


def load_suite(name_or_path: str, overrides: dict | None = None) -> SuiteSpec:
    """Parse, merge includes, apply ``overrides`` and validate; then check method and metric names."""
    path = find_suite(name_or_path)
    data, origins = _data(path, overrides)
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo explains a "missing"
        loc = tuple(e["loc"])
        where = _overridden(overrides, loc) or _line(origins, loc, path)
        field = ".".join(str(x) for x in loc)
        if e["type"] == "extra_forbidden":
            msg = f"{where}: unknown key {field!r}{_suggest(str(loc[-1]), _allowed_fields(loc))}"
        elif e["type"] == "missing":
            msg = f"{where}: missing key {field!r}: add it to the suite (or to an included file)"
        else:
            msg = f"{where}: {field}: {e['msg']}"
        raise SuiteError(msg) from None
    _check_names(spec, origins, path)
    _resolve_model_hrv(spec, origins, path)
    return spec


def _resolve_model_hrv(spec: SuiteSpec, origins, path: Path) -> None:
    """A method's ``hrv: model`` becomes the vectors that fit the suite's model (after ``--model``): its own
    ``hrv.json`` or the shipped sd14 / sdxl vectors whose heads are its UNet's. When none fit (or they lack the
    method's concept), ``model`` stays:
    :func:`evalkit.suites.resolve_model_hrv` (run, validate) then skips the method with a notice, as ``evalkit
    attribute`` skips hrv-selective, or fails naming it when ``--methods`` asks for it."""
    rows = [(i, m) for i, m in enumerate(spec.methods) if m.params.get("hrv") == "model"]
    if not rows:
        return
    from ..methods import HeadRelevance
    from ..protocols import model_hrv

    for _, m in rows:
        try:
            found = model_hrv(spec.model, m.label, "method")
        except ValueError:
            continue
        concept = m.params.get("concept")
        if concept is None or concept in HeadRelevance.load(found).vectors:
            m.params["hrv"] = found  # else `model` stays and the method is skipped: no vectors for its concept


def _check_names(spec: SuiteSpec, origins, path: Path) -> None:
    from ..methods import get_method_class
    from ..metrics import get_metric_class
    from ..protocols import get_protocol

    try:
        protocol = get_protocol(spec.protocol)
    except KeyError as err:
        raise SuiteError(f"{_line(origins, ('protocol',), path)}: {err}") from None
    try:
        protocol.check_layout(spec)
    except ValueError as err:
        raise SuiteError(f"{_line(origins, ('options',) if spec.options else ('protocol',), path)}: {err}") from None

    for i, m in enumerate(spec.methods):
        try:
            get_method_class(m.name)
        except KeyError as err:
            raise SuiteError(f"{_line(origins, ('methods', i, 'name'), path)}: {err}") from None
    for i, m in enumerate(spec.metrics):
        try:
            get_metric_class(m.name)
        except KeyError as err:
            raise SuiteError(f"{_line(origins, ('metrics', i, 'name'), path)}: {err}") from None
    from .claims import parse_claim

    labels = {"methods": spec.row_labels(), "metrics": [m.label for m in spec.metrics]}
    for i, text in enumerate(spec.expect):
        try:
            parse_claim(text, labels)
        except ValueError as err:
            raise SuiteError(f"{_line(origins, ('expect', i), path)}: {err}") from None
