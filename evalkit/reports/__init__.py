"""Suite reports: the result table (metric, direction, value, CI95), the claims, and figures, as
``reports/<suite>/<timestamp>/report.md`` plus an HTML rendering of the same content."""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Rows of the printed/report table."""
    out = []
    for r in rows:
        ci = "–" if r["ci95_low"] is None else f"[{_fmt(r['ci95_low'])}, {_fmt(r['ci95_high'])}]"
        arrow = "↑" if r["direction"] == "higher" else "↓"
        out.append([r["method"], r["metric"], arrow, _fmt(r["value"]), ci, str(r["n"]), str(r["excluded"])])
    return out


HEADER = ["method", "metric", "dir", "value", "CI95", "n", "excluded"]


def write_report(result, rows: list[dict], figures: list[Path], root: str | Path = "reports",
                 stamp: str | None = None) -> Path:
    """Write report.md, report.html and results.json; returns the report folder."""
    spec = result.spec
    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(root) / spec.name / stamp
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {spec.name}", "", spec.description.strip(), "",
             f"model `{spec.model}`, {result.n_cases} cases, sampler {spec.sampler.model_dump()}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    lines += ["", "## Claims", ""]
    lines += [f"- `{c.line()}`" for c in result.claims] or ["(none)"]
    lines += ["", "## Figures", ""]
    for f in figures:
        target = out / f.name
        if f.resolve() != target.resolve():
            target.write_bytes(f.read_bytes())
        lines.append(f"![{f.stem}]({f.name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.html").write_text(_html(spec, rows, result, figures))
    (out / "results.json").write_text(json.dumps({"rows": rows, "claims": [c.line() for c in result.claims]},
                                                 indent=1, default=str))
    return out


def _html(spec, rows, result, figures) -> str:
    head = "".join(f"<th>{h}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table_rows(rows))
    claims = "".join(
        f"<li style='color:{'green' if c.passed else 'red'}'>{html.escape(c.line())}</li>" for c in result.claims
    )
    figs = "".join(f"<figure><img src='{f.name}' style='max-width:100%'><figcaption>{f.stem}</figcaption></figure>"
                   for f in figures)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{spec.name}</title></head><body>"
            f"<h1>{html.escape(spec.name)}</h1><p>{html.escape(spec.description)}</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table><h2>Claims</h2><ul>{claims}</ul>"
            f"<h2>Figures</h2>{figs}</body></html>")
