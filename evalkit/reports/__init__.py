"""Suite reports: the result table (metric, direction, value, CI95), the claims, and figures, as
``reports/<suite>/<timestamp>/report.md`` plus a self-contained HTML page (:mod:`.html`) that adds the
run's provenance, a chart per metric family (:mod:`.charts`) and per-case overlays (:mod:`.overlays`)."""

from __future__ import annotations

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


HEADER = ["method", "metric", "dir", "value", "CI95", "n", "n_excluded"]


ITEM_COLUMNS = ["method", "metric", "item", "value", "numerator", "denominator", "reduction", "excluded"]
CLAIM_HEADER = ["verdict", "claim", "left", "right", "diff", "CI", "n", "items for 80% power", "note"]


def write_items_csv(items: list[dict], path: Path) -> Path:
    """The per-item table (one row per method, metric and item; ``excluded`` holds the reason)."""
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ITEM_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in items:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in ITEM_COLUMNS})
    return path


def read_items_csv(path: Path) -> list[dict]:
    """Read :func:`write_items_csv` output back (values as floats, None when excluded)."""
    import csv

    def num(x: str):
        return float(x) if x not in ("", None) else None

    with Path(path).open(newline="") as f:
        return [{**r, "value": num(r["value"]), "numerator": num(r["numerator"]),
                 "denominator": num(r["denominator"])} for r in csv.DictReader(f)]


def claim_cells(c) -> list[str]:
    """One claim as table cells (see :data:`CLAIM_HEADER`)."""
    ci = "–" if c.ci is None else f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}] ({100 * c.confidence:.4g}%)"
    note = c.reason
    if c.extra.get("margin"):
        note = f"margin {c.extra['margin']:+g}" + (f"; {note}" if note else "")
    if not c.paired:
        note = "unpaired (rows share no items)" + (f"; {note}" if note else "")
    return [c.verdict, c.text, _fmt(c.left), _fmt(c.right), _fmt(c.diff), ci, str(c.n),
            "" if c.n_needed is None else str(c.n_needed), note]


def reason_lines(rows: list[dict], unassigned: dict[str, str] | None = None) -> list[str]:
    """``count x reason: where`` for every exclusion reason, rows with the same count folded together
    (``every row``, ``miou80_tau0.4 (every method)``, or ``method metric`` pairs), then items in no row."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    present = {(r["method"], r["metric"]) for r in rows}
    groups: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for r in rows:
        for why, k in (r.get("excluded_reasons") or {}).items():
            groups.setdefault((why, k), []).append((r["method"], r["metric"]))
    out = []
    for (why, k), pairs in groups.items():
        have = set(pairs)
        if have == present and len(present) > 1:
            out.append(f"{k} x {why}: every row")
            continue
        whole = [m for m in metrics if len(methods) > 1 and all((x, m) in have for x in methods if (x, m) in present)]
        where = [f"{m} (every method)" for m in whole]
        where += [f"{x} {m}" for x, m in pairs if m not in whole]
        out.append(f"{k} x {why}: {', '.join(where)}")
    if unassigned:
        from collections import Counter

        out += [f"{k} x {why}: in no row" for why, k in Counter(unassigned.values()).most_common()]
    return out


def write_report(result, rows: list[dict], figures: list[Path], root: str | Path = "reports",
                 stamp: str | None = None, items: list[dict] | None = None, overlay_cases: int | None = None) -> Path:
    """Write report.md, report.html (self-contained, :mod:`evalkit.reports.html`), results.json and items.csv;
    returns the report folder. ``overlay_cases``: cases an attribution report draws (default 8)."""
    from .. import __version__
    from ..suites.claims import summary_line
    from .html import library_versions, render_html, short_commit
    from .overlays import DEFAULT_CASES

    spec = result.spec
    now = datetime.now(timezone.utc)
    stamp = stamp or now.strftime("%Y%m%dT%H%M%SZ")
    out = Path(root) / spec.name / stamp
    out.mkdir(parents=True, exist_ok=True)
    unassigned = dict(getattr(result, "unassigned", {}) or {})
    libs = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    lines = [f"# {spec.name}", "", spec.description.strip(), "",
             f"model `{spec.model}`, {result.n_cases} cases, sampler {spec.sampler.model_dump()}", "",
             f"evalkit {__version__} (commit {short_commit()}), {libs}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    reasons = reason_lines(rows, unassigned)
    if reasons:
        lines += ["", "## Excluded items", "", "Items left out of a row's n, with the reason:", ""]
        lines += [f"- {x}" for x in reasons]
    lines += ["", "## Claims", ""]
    if result.claims:
        settings = (f"paired percentile bootstrap ({spec.resamples} resamples), confidence {spec.confidence}, "
                    f"correction {spec.correction}, min_n {spec.min_n}")
        lines += [f"**{summary_line(result.claims)}** ({settings})", "",
                  "| " + " | ".join(CLAIM_HEADER) + " |", "|" + "---|" * len(CLAIM_HEADER)]
        lines += ["| " + " | ".join(x.replace("|", "\\|") for x in claim_cells(c)) + " |" for c in result.claims]
    else:
        lines.append("(none)")
    lines += ["", "Per-item values: [items.csv](items.csv)", "", "## Figures", ""]
    for f in figures:
        if not f.is_file():
            lines.append(f"(figure {f.name} missing)")
            continue
        target = out / f.name
        if f.resolve() != target.resolve():
            target.write_bytes(f.read_bytes())
        lines.append(f"![{f.stem}]({f.name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    page = render_html(result, rows, figures, reasons, now.isoformat(timespec="seconds"),
                       DEFAULT_CASES if overlay_cases is None else overlay_cases)
    (out / "report.html").write_text(page, encoding="utf-8")
    write_items_csv(items or [], out / "items.csv")
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "claims": [c.to_dict() for c in result.claims], "summary": summary_line(result.claims),
         "unassigned": unassigned}, indent=1, default=str))
    return out
