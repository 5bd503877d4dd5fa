"""Declarative suites: schema, loader (``include:``), runner with cache/resume, claims; and
:func:`execute`, which runs a suite end to end (table, claims, MLflow, report)."""

from __future__ import annotations

from pathlib import Path

from .cache import CaseCache, content_key
from .claims import Claim, ClaimOutcome, evaluate, parse_claim
from .loader import SUITES_DIR, SuiteError, find_suite, list_suites, load_suite
from .runner import SuiteResult, result_rows, run_suite, save_image_grid
from .schema import DataSpec, MethodSpec, MetricSpec, SamplerSpec, SuiteSpec


def print_summary(result: SuiteResult, rows: list[dict]) -> None:
    """The result table, then the claims as a pytest-like summary."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from ..reports import HEADER, table_rows

    console = Console(width=None if sys.stdout.isatty() else 130)  # logs and pipes get the whole table
    table = Table(title=f"{result.spec.name}: {len(result.cases)} cases ({result.n_computed} computed)")
    for h in HEADER:
        table.add_column(h, no_wrap=True)
    for r in table_rows(rows):
        table.add_row(*r)
    console.print(table)
    if result.claims:
        console.rule("claims")
        for c in result.claims:
            console.print(c.line(), style="green" if c.passed else "red", markup=False)
    n_fail = sum(not c.passed for c in result.claims)
    console.rule(f"{len(result.claims) - n_fail} passed, {n_fail} failed", style="red" if n_fail else "green")


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
) -> tuple[SuiteResult, Path]:
    """Load, run, print, log to MLflow and write the report; returns the result and report folder."""
    spec = load_suite(suite, overrides)
    if methods:
        spec = select_methods(spec, methods)
    result = run_suite(spec, cache_dir=cache_dir, limit=limit, progress=progress)
    rows = result_rows(result)
    print_summary(result, rows)
    cache_dir = Path(cache_dir)
    figures = list(result.figures)  # protocol suites bring their own figures
    if spec.protocol == "attribution":
        key = content_key([c.key for c in result.cases])[:12]
        grid = cache_dir / "figures" / spec.name / f"overlays-{key}.png"
        if not grid.is_file():  # depends only on the cases: a rerun reuses it
            save_image_grid(result, grid)
        figures.insert(0, grid)
    report = _write(result, rows, figures, reports_dir)
    if tracking:
        from ..tracking import log_suite

        key = content_key({"spec": spec.model_dump(), "limit": limit, "cases": [c.key for c in result.cases]})
        log_suite(result, invocation_key=key, state_file=cache_dir / "mlflow-runs.json", tracking_uri=tracking_uri,
                  artifacts=[report / "report.md", report / "report.html", report / "results.json", *figures],
                  samples_table=result.samples)
    print(f"report: {report / 'report.md'}")
    return result, report


def select_methods(spec: SuiteSpec, wanted: list[str]) -> SuiteSpec:
    """Keep only the named method configurations (by id or method name) and the claims about them."""
    import difflib

    labels = [m.label for m in spec.methods]
    names = {m.name for m in spec.methods}
    for w in wanted:
        if w not in labels and w not in names:
            close = difflib.get_close_matches(w, labels, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SuiteError(f"--methods: suite {spec.name!r} has no method {w!r}{hint} (it has {labels})")
    kept = [m for m in spec.methods if m.label in wanted or m.name in wanted]
    keep_labels = {m.label for m in kept}
    lab = {"methods": labels, "metrics": [m.label for m in spec.metrics]}
    claims = []
    for text in spec.expect:
        c = parse_claim(text, lab)
        if all(side.method is None or side.method in keep_labels for side in (c.left, c.right)):
            claims.append(text)
    return spec.model_copy(update={"methods": kept, "expect": claims})


def _write(result, rows, figures, reports_dir):
    from ..reports import write_report

    return write_report(result, rows, figures, reports_dir)


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
    "evaluate",
    "execute",
    "find_suite",
    "list_suites",
    "load_suite",
    "parse_claim",
    "print_summary",
    "result_rows",
    "run_suite",
    "save_image_grid",
]
