"""Declarative suites: schema, loader (``include:``), runner with cache/resume, claims; and
:func:`execute`, which runs a suite end to end (table, claims, MLflow, report)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .cache import CaseCache, content_key
from .claims import Claim, ClaimOutcome, judge, parse_claim
from .loader import SUITES_DIR, SuiteError, find_suite, list_suites, load_suite, suite_data
from .schema import DataSpec, MethodSpec, MetricSpec, SamplerSpec, SuiteSpec

if TYPE_CHECKING:
    from .runner import SuiteResult

#: Names served lazily from .runner (it imports torch; a stored rerun never needs it).
_RUNNER_NAMES = ("SuiteResult", "result_rows", "run_suite", "save_image_grid")


def __getattr__(name: str):
    if name in _RUNNER_NAMES:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def print_summary(result, rows: list[dict]) -> None:
    """The result table, then the claims as a pytest-like summary."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from ..reports import HEADER, reason_lines, table_rows

    console = Console(width=None if sys.stdout.isatty() else 130)  # logs and pipes get the whole table
    corrupt = getattr(result, "n_corrupt", 0)
    rescored = getattr(result, "n_rescored", 0)
    table = Table(title=f"{result.spec.name}: {result.n_cases} cases ({result.n_computed} computed"
                        + (f"; {rescored} re-scored from stored traces" if rescored else "")
                        + (f"; {corrupt} corrupt cache entries recomputed" if corrupt else "") + ")")
    for h in HEADER:
        table.add_column(h, no_wrap=True)
    for r in table_rows(rows):
        table.add_row(*r)
    console.print(table)
    excluded = reason_lines(rows, getattr(result, "unassigned", None))
    if excluded:
        console.print("excluded items (left out of n, by reason):", markup=False)
        for line in excluded:
            console.print(f"  {line}", markup=False, soft_wrap=True)
    from .claims import FAILED, PASSED, summary_line

    if result.claims:
        console.rule("claims")
        for c in result.claims:
            style = "green" if c.verdict == PASSED else "red" if c.verdict == FAILED else "yellow"
            console.print(c.line(), style=style, markup=False, soft_wrap=True)
    n_fail = sum(c.verdict == FAILED for c in result.claims)
    n_pass = sum(c.verdict == PASSED for c in result.claims)
    console.rule(summary_line(result.claims),
                 style="red" if n_fail else "green" if n_pass == len(result.claims) else "yellow")


def execute(
    suite: str,
    *,
    overrides: dict | None = None,
    limit: int | None = None,
    cache_dir: str | Path = ".cache/evalkit",
    reports_dir: str | Path = "reports",
    tracking: bool = True,
    tracking_uri: str | None = None,
    progress: bool = True,
    methods: list[str] | None = None,
    plugins: list[str] | None = None,
):
    """Load, run, print, log to MLflow and write the report; returns the result and report folder.

    An invocation identical to a finished one (same resolved suite, limit, methods, code, model,
    data files and library versions; see :mod:`evalkit.suites.store`) whose MLflow runs are intact
    is read back from the store: the table, claims and a fresh report, with nothing recomputed."""
    from .store import invocation_key, load_result, mlflow_up_to_date, save_result

    cache_dir = Path(cache_dir)
    state_file = cache_dir / "mlflow-runs.json"
    data = suite_data(suite, overrides)
    key = invocation_key(data, limit=limit, methods=methods, plugins=plugins)
    stored = _stored(data, methods, cache_dir, key, load_result) if key is not None else None
    if stored is not None:
        from ..tracking import default_tracking_uri

        uri = tracking_uri or default_tracking_uri()
        if not tracking or mlflow_up_to_date(uri, state_file, stored.mlflow_key):
            print_summary(stored, stored.rows)
            report = _write(stored, stored.rows, stored.figures, reports_dir, stored.items)
            print(f"nothing recomputed: results of an identical invocation ({key[:12]})"
                  + (f"; MLflow runs in {uri} already hold them" if tracking else ""))
            print(f"report: {report / 'report.md'}")
            return stored, report
    from .runner import item_rows, result_rows, run_suite, save_image_grid

    spec = load_suite(suite, overrides)
    if methods:
        spec = select_methods(spec, methods)
    spec = resolve_model_hrv(spec, methods)
    from ..preflight import check_suite, check_writable

    check_suite(spec, limit=limit, reports_dir=reports_dir,
                tracking_uri=(tracking_uri or _default_uri()) if tracking else None)
    check_writable(cache_dir, "cache folder")
    result = run_suite(spec, cache_dir=cache_dir, limit=limit, progress=progress)
    rows = result_rows(result)
    items = item_rows(result)
    print_summary(result, rows)
    figures = list(result.figures)  # protocol suites bring their own figures
    if spec.protocol == "attribution":
        from ..reports.overlays import GRID_PREFIX, LAYOUT

        # depends only on the cases, the methods' maps entries and the layout: a rerun reuses it
        grid_key = content_key({"cases": [c.key for c in result.cases], "layout": LAYOUT,
                                "maps": [{m: p.name for m, p in md.items()} for md in result.map_dirs]})[:12]
        grid = cache_dir / "figures" / spec.name / f"{GRID_PREFIX}{grid_key}.png"
        if not grid.is_file():
            save_image_grid(result, grid)
        figures.insert(0, grid)
    report = _write(result, rows, figures, reports_dir, items)
    mlflow_key = content_key({"spec": spec.model_dump(), "limit": limit, "cases": [c.key for c in result.cases]})
    if key is not None:  # before logging: an interrupted log is finished by the next (fast) invocation
        save_result(cache_dir, key, result, rows, figures, mlflow_key, items)
    if tracking:
        from ..tracking import log_suite

        log_suite(result, invocation_key=mlflow_key, state_file=state_file, tracking_uri=tracking_uri,
                  artifacts=[report / "report.md", report / "report.html", report / "results.json",
                             report / "items.csv", *figures],
                  samples_table=result.samples, items=items)
    print(f"report: {report / 'report.md'}")
    return result, report


def _default_uri() -> str:
    from ..tracking import default_tracking_uri

    return default_tracking_uri()


def _stored(data: dict, methods, cache_dir, key, load_result):
    """The stored invocation ``key`` with its validated spec (``data``: the resolved suite), or None."""
    from pydantic import ValidationError

    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError:
        return None  # never stored; the full path reports the error with file and line
    if methods:
        spec = select_methods(spec, methods)
    stored = load_result(cache_dir, key, spec)
    if stored is not None:  # methods the run skipped (no HRVs fit the model, another backbone) have no rows
        if stored.methods is not None:
            keep = [m.label for m in spec.methods if m.label in stored.methods]
        else:  # a record from before skipped methods were recorded
            rows = {r["method"] for r in stored.rows}
            keep = [m.label for m in spec.methods if m.label in rows or m.params.get("hrv") != "model"]
        if len(keep) < len(spec.methods):
            stored.spec = select_methods(spec, keep)
    return stored


def resolve_model_hrv(spec: SuiteSpec, requested: list[str] | None = None) -> SuiteSpec:
    """Methods that cannot run on the suite's model are skipped with a notice, with their claims, as ``evalkit
    attribute`` skips them: a method made for another backbone (``AttributionMethod.backbones``: ConceptAttention
    needs an MM-DiT), and one whose ``params.hrv`` is still ``model`` (no head relevance vectors fit the model,
    see ``loader._resolve_model_hrv``). Named in ``requested`` (``--methods``), or when nothing else is left,
    that is an error."""
    spec = _skip_other_backbones(spec, requested)
    users = [m for m in spec.methods if m.params.get("hrv") == "model"]
    if not users:
        return spec
    from ..protocols import model_hrv

    try:
        found = model_hrv(spec.model, users[0].label, "method")
    except ValueError as err:
        asked = [m.label for m in users if requested and (m.label in requested or m.name in requested)]
        if asked or len(users) == len(spec.methods):
            raise SuiteError(f"suite {spec.name!r}: {err}") from None
        for m in users:
            print(f"{m.label} skipped: {str(err).split(': ', 1)[-1]}")
        return select_methods(spec, [m.label for m in spec.methods if m not in users])
    from ..methods import HeadRelevance

    known = HeadRelevance.load(found).vectors
    lacking = [m for m in users if m.params.get("concept") is not None and m.params["concept"] not in known]
    for m in lacking:  # vectors fit the model's heads but were not built for this concept
        why = (f"{m.label}: the model's head relevance vectors ({found}) have no concept {m.params['concept']!r} "
               f"(concepts: {', '.join(known)}); build vectors for it (evalkit.analysis.build_hrv) or set "
               f"params.hrv to a file that has it")
        if (requested and (m.label in requested or m.name in requested)) or len(lacking) == len(spec.methods):
            raise SuiteError(f"suite {spec.name!r}: {why}")
        print(f"{m.label} skipped: {why.split(': ', 1)[1]}")
    if lacking:
        spec = select_methods(spec, [m.label for m in spec.methods if m not in lacking])
    methods = [m.model_copy(update={"params": {**m.params, "hrv": found}}) if m.params.get("hrv") == "model" else m
               for m in spec.methods]
    return spec.model_copy(update={"methods": methods})


def _skip_other_backbones(spec: SuiteSpec, requested: list[str] | None) -> SuiteSpec:
    """Drop (with a notice) the methods whose class does not support the model's backbone (unet/transformer)."""
    from ..methods import get_method_class
    from ..models import ModelLoadError, model_family

    try:
        backbone = model_family(spec.model).backbone
    except ModelLoadError:
        return spec  # an unreadable model fails later with its own error
    other = [m for m in spec.methods if backbone not in get_method_class(m.name).backbones]
    if not other:
        return spec
    kinds = {"unet": "UNet", "transformer": "MM-DiT"}
    for m in other:
        runs_on = " and ".join(kinds[b] for b in sorted(get_method_class(m.name).backbones))
        why = f"{m.label}: method {m.name!r} runs on {runs_on} models; {spec.model!r} is a {kinds[backbone]} model"
        if (requested and (m.label in requested or m.name in requested)) or len(other) == len(spec.methods):
            raise SuiteError(f"suite {spec.name!r}: {why}")
        print(f"{m.label} skipped: {why.split(': ', 1)[1]}")
    return select_methods(spec, [m.label for m in spec.methods if m not in other])


def parse_set(items: list[str], into: dict | None = None) -> dict:
    """Command-line ``--set KEY=VALUE`` overrides as a nested mapping merged into ``into``: dotted keys
    (``ground_truth.detector=/models/dino`` -> ``{"ground_truth": {"detector": "/models/dino"}}``), YAML values
    (``1``, ``0.3``, ``null``, ``[1, 2]``; anything else stays a string)."""
    import yaml

    out = into if into is not None else {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise SuiteError(f"--set {item!r} must look like KEY=VALUE with a dotted suite key, e.g. sampler.steps=1")
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                node[part] = {}  # a later, deeper --set replaces a scalar set before
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def select_methods(spec: SuiteSpec, wanted: list[str]) -> SuiteSpec:
    """Keep only the named rows and the claims about them: method configurations (by id or method
    name) of an attribution suite, variants (by id) of a protocol suite."""
    import difflib

    rows = spec.row_labels()
    names = set() if spec.variants else {m.name for m in spec.methods}
    kind = "variant" if spec.variants else "method"
    for w in wanted:
        if w not in rows and w not in names:
            close = difflib.get_close_matches(w, rows, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SuiteError(f"--methods: suite {spec.name!r} has no {kind} {w!r}{hint} (it has {rows})")
    if spec.variants:
        update: dict = {"variants": [v for v in spec.variants if v.id in wanted]}
    else:
        update = {"methods": [m for m in spec.methods if m.label in wanted or m.name in wanted]}
    keep = {v.id for v in update["variants"]} if spec.variants else {m.label for m in update["methods"]}
    lab = {"methods": rows, "metrics": [m.label for m in spec.metrics]}
    claims = []
    for text in spec.expect:
        c = parse_claim(text, lab)
        if all(side.method is None or side.method in keep for side in (c.left, c.right)):
            claims.append(text)
    return spec.model_copy(update={**update, "expect": claims})


def _write(result, rows, figures, reports_dir, items):
    from ..reports import write_report

    return write_report(result, rows, figures, reports_dir, items=items)


__all__ = [
    "SUITES_DIR",
    "CaseCache",
    "Claim",
    "ClaimOutcome",
    "DataSpec",
    "MethodSpec",
    "MetricSpec",
    "SamplerSpec",
    "SuiteError",
    "SuiteResult",
    "SuiteSpec",
    "content_key",
    "judge",
    "execute",
    "find_suite",
    "list_suites",
    "load_suite",
    "parse_claim",
    "parse_set",
    "print_summary",
    "resolve_model_hrv",
    "result_rows",
    "run_suite",
    "save_image_grid",
    "suite_data",
]
