"""The self-contained HTML report: one file with inline CSS, every chart and figure inlined as a ``data:``
URI (the only link goes to the sibling items.csv), so that it can be mailed or attached as it is. It holds
the run's provenance (model, sampler, data, versions, commit), the styled result table, a chart per metric
family, the claims coloured by verdict, the overlays of attribution suites and the protocols' figures; an
inline script counts the images the browser decoded into ``#render-check`` (the tests read it). Order: what
was run, the verdicts, the charts, the exact numbers, then the pictures."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

#: Libraries whose versions the header names.
LIBRARIES = ("torch", "diffusers", "transformers")
_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
_VERDICT_CLASS = {"PASSED": "passed", "FAILED": "failed", "INCONCLUSIVE": "inconclusive"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:24px 28px 40px;background:#fff}
h1{margin:0 0 4px;font-size:26px}
h2{margin:28px 0 10px;font-size:19px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.desc{color:#444;max-width:900px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:12px 0;font-size:13px}
dl.meta dt{color:#57606a}dl.meta dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f0f3f6;font-weight:600}tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums;font-family:ui-monospace,Menlo,monospace}
td.dir{text-align:center}td.warn{color:#9a6700;font-weight:600}
tr.passed td{background:#e6f4ea}tr.failed td{background:#fdecea}tr.inconclusive td{background:#fff8e1}
.verdict{font-weight:700}tr.passed .verdict{color:#1a7f37}tr.failed .verdict{color:#b3261e}
tr.inconclusive .verdict{color:#8a6d00}
.summary{display:inline-block;padding:6px 12px;border-radius:6px;font-weight:600;margin:4px 0}
.summary.passed{background:#e6f4ea;color:#1a7f37}.summary.failed{background:#fdecea;color:#b3261e}
.summary.inconclusive{background:#fff8e1;color:#8a6d00}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px;align-items:start}
figure{margin:0;padding:8px;border:1px solid #e5e7eb;border-radius:6px;background:#fff}
figcaption{font-size:12px;color:#57606a;margin-top:4px;max-width:640px}img.rendered{max-width:100%;height:auto;display:block}
.note{color:#9a6700;font-size:12px;margin:4px 0}.chart-missing{margin:10px 0;font-size:13px}
.case{border:1px solid #e5e7eb;border-radius:6px;padding:10px;margin:10px 0}
.prompt{font-size:15px;margin:2px 0 6px}.case .id{color:#57606a;font-size:12px}
.word{display:inline-block;background:#eef2ff;border-radius:4px;padding:0 6px;margin:0 4px 2px 0;font-size:12px}
.word.empty{background:#fdecea}
#render-check{color:#57606a;font-size:11px;margin-top:24px}
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.rendered"), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var el = document.getElementById("render-check");
  el.textContent = "rendered " + ok + " of " + imgs.length + " images";
  el.setAttribute("data-rendered", ok); el.setAttribute("data-total", imgs.length);
});
"""


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` ("absent" when not installed), without importing them."""
    from ..suites.store import library_versions as versions

    return versions(LIBRARIES)


def short_commit() -> str:
    """The evalkit checkout's commit, abbreviated; "unknown" for an installed wheel or without git."""
    from ..tracking import git_commit

    commit = git_commit()
    return commit[:10] if commit != "unknown" else commit


def sampler_text(spec) -> str:
    """The sampler as one phrase: scheduler, steps, guidance and image size."""
    s = spec.sampler
    size = f"{s.height}x{s.width} px" if s.height and s.width else "the model's default size"
    return f"{s.scheduler or 'model default'} scheduler, {s.steps} steps, guidance {s.guidance:g}, {size}"


def data_text(spec) -> str:
    """Where the prompts and masks come from, as one phrase."""
    d = spec.data
    where = f"{d.path}, " if d.path else ""
    text = f"{d.source} ({where}n={d.n}, seed {d.seed}, {d.size} px)"
    if spec.seeds is not None:
        text += f", seeds {spec.seeds}"
    gt = spec.ground_truth
    source = getattr(gt, "source", gt)  # a spec object (source plus model settings) or a plain name
    if source == "grounded-sam":
        source += f" ({gt.detector} + {gt.segmenter})"
    return text + f", ground truth {source}"


def provenance(spec, n_cases: int, timestamp: str) -> list[tuple[str, str]]:
    """The header's (label, value) pairs: what was run, on what, with which code and libraries, when."""
    from .. import __version__

    libs = library_versions()
    return [("protocol", spec.protocol), ("model", spec.model), ("sampler", sampler_text(spec)),
            ("data", data_text(spec)), ("cases", str(n_cases)), ("evalkit", __version__),
            ("commit", short_commit()), *((lib, libs[lib]) for lib in LIBRARIES), ("generated", timestamp)]


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    """``payload`` as a base64 ``data:`` URI."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _img(payload: bytes, alt: str, kind: str, mime: str = "image/png") -> str:
    """An inlined image the render check counts."""
    return f"<img class='rendered {kind}' alt='{escape(alt)}' src='{data_uri(payload, mime)}'>"


def _table(header: list[str], body: str) -> str:
    return "<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + f"</tr></thead>{body}</table>"


def _results(rows: list[dict]) -> str:
    """The styled result table: numbers right-aligned, direction arrows with a tooltip, exclusions flagged."""
    from . import HEADER, table_rows

    body = []
    for r, cells in zip(rows, table_rows(rows)):
        method, metric, arrow, value, ci, n, excl = (escape(c) for c in cells)
        tip = "higher is better" if r["direction"] == "higher" else "lower is better"
        body.append(f"<tr><td>{method}</td><td>{metric}</td><td class='dir' title='{tip}'>{arrow}</td>"
                    f"<td class='num'>{value}</td><td class='num'>{ci}</td><td class='num'>{n}</td>"
                    f"<td class='num{' warn' if r['excluded'] else ''}'>{excl}</td></tr>")
    return _table(HEADER, "<tbody>" + "".join(body) + "</tbody>")


def _charts(rows: list[dict], spec) -> str:
    """A figure per metric family, with notes for rows left out."""
    from .charts import charts

    out, missing = [], []
    for c in charts(rows, spec):
        notes = "".join(f"<p class='note'>{escape(n)}</p>" for n in c.notes)
        if c.png is None:
            missing.append(f"<div class='chart-missing' data-family='{escape(c.family)}'>"
                           f"<p>{escape(c.family)}: no chart, no row has a value</p>{notes}</div>")
            continue
        kind = "value against tau per method" if c.kind == "tau" else "value per method"
        img = _img(c.png, f"chart: {c.family}", "chart")
        out.append(f"<figure class='chart' data-family='{escape(c.family)}'>{img}"
                   f"<figcaption>{escape(c.family)}: {kind}, CI95 whiskers</figcaption>{notes}</figure>")
    if not out and not missing:
        return "<p>(no rows)</p>"
    return "<div class='charts'>" + "".join(out) + "</div>" + "".join(missing)


def _claims(result, spec) -> str:
    """The claims table coloured by verdict, headed by the summary line and the decision settings."""
    from ..suites.claims import summary_line
    from . import CLAIM_HEADER, claim_cells

    if not result.claims:
        return "<p>(none)</p>"
    verdicts = {c.verdict for c in result.claims}
    tone = "failed" if "FAILED" in verdicts else "passed" if verdicts == {"PASSED"} else "inconclusive"
    settings = (f"paired percentile bootstrap ({spec.resamples} resamples), confidence {spec.confidence}, "
                f"correction {spec.correction}, min_n {spec.min_n}")
    body = []
    for c in result.claims:
        cells = claim_cells(c)
        tds = [f"<td class='verdict'>{escape(cells[0])}</td>", f"<td>{escape(cells[1])}</td>"]
        tds += [f"<td class='num'>{escape(x)}</td>" for x in cells[2:8]] + [f"<td>{escape(cells[8])}</td>"]
        body.append(f"<tr class='claim {_VERDICT_CLASS.get(c.verdict, '')}'>{''.join(tds)}</tr>")
    return (f"<div class='summary {tone}'>{escape(summary_line(result.claims))}</div>"
            f"<p class='note' style='color:#57606a'>{escape(settings)}</p>"
            + _table(CLAIM_HEADER, "<tbody>" + "".join(body) + "</tbody>"))


def _overlays(result, max_cases: int) -> str:
    """Per shown case: its full prompt, its evaluated words and the overlay figure."""
    from .overlays import case_overlays

    shown = case_overlays(result, max_cases)
    out = [f"<p>Showing {len(shown)} of {result.n_cases} cases (the first {max_cases} at most). Each row is an "
           "evaluated word: the generated image, then each method's normalized map (jet, 50 %), the word's "
           "ground-truth mask outlined in white on every panel.</p>"]
    for c in shown:
        words = "".join(f"<span class='word{' empty' if w in c.empty else ''}'>{escape(w)}</span>" for w in c.words)
        empty = (f"<p class='note'>no ground-truth pixels (excluded): {escape(', '.join(c.empty))}</p>"
                 if c.empty else "")
        out.append(f"<div class='case'><div class='id'>{escape(c.item)}, seed {c.seed}</div>"
                   f"<p class='prompt'>{escape(c.prompt)}</p><div>words: {words}</div>{empty}"
                   f"{_img(c.png, f'overlays: {c.prompt}', 'overlay')}</div>")
    return "".join(out)


def _figures(figures: list[Path], skip_grid: bool) -> str:
    """The run's figure files, inlined; the overlay grid is skipped when the overlays are drawn per case."""
    from .overlays import GRID_PREFIX

    out = []
    for f in figures:
        f = Path(f)
        if skip_grid and f.name.startswith(GRID_PREFIX):
            continue
        mime = _MIME.get(f.suffix.lower())
        if mime is None or not f.is_file():
            why = "not an image" if f.is_file() else "missing"
            out.append(f"<p class='note'>figure {escape(f.name)} not shown ({why})</p>")
            continue
        out.append(f"<figure class='figure'>{_img(f.read_bytes(), f.stem, 'figure', mime)}"
                   f"<figcaption>{escape(f.stem)}</figcaption></figure>")
    return "".join(out)


def render_html(result, rows: list[dict], figures: list[Path], reasons: list[str], timestamp: str,
                overlay_cases: int) -> str:
    """The whole report page (see the module docstring)."""
    from .overlays import has_overlays

    spec = result.spec
    meta = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in provenance(spec, result.n_cases, timestamp))
    parts = [f"<h1>{escape(spec.name)}</h1><p class='desc'>{escape(spec.description.strip())}</p>",
             f"<dl class='meta'>{meta}</dl>", "<h2>Claims</h2>", _claims(result, spec),
             "<h2>Charts</h2>", _charts(rows, spec), "<h2>Results</h2>", _results(rows)]
    if reasons:
        parts += ["<h3>Excluded items</h3><p>Items left out of a row's n, with the reason:</p><ul>",
                  "".join(f"<li>{escape(x)}</li>" for x in reasons), "</ul>"]
    parts.append("<p>Per-item values (one row per method, metric and item): <a href='items.csv'>items.csv</a></p>")
    overlays = has_overlays(result)
    if overlays:
        parts += ["<h2>Overlays</h2>", _overlays(result, overlay_cases)]
    figs = _figures(figures, skip_grid=overlays)
    if figs:
        parts += ["<h2>Figures</h2>", figs]
    parts.append("<div id='render-check'>render check did not run</div>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(spec.name)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main><script>{SCRIPT}</script></body></html>")
