"""Report charts: one matplotlib chart per metric family (the metric's name without its parameters), as
PNG bytes that the HTML report inlines. Methods are bars with CI95 whiskers; a family measured at
several thresholds ``tau`` (mIoU-inf) is a line of value against tau per method with its interval band.
Rows without a value (None or NaN) are left out and named in the chart's note, never plotted as 0."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

#: A label's trailing threshold, for rows whose metric is not in the suite (``miou-inf_tau0.4``).
_TAU = re.compile(r"^(?P<family>.+?)_tau(?P<tau>[0-9]+(?:\.[0-9]+)?)$")


@dataclass
class Chart:
    """One metric family's chart (``png`` None when no row of the family has a value) and its notes."""

    family: str
    direction: str
    png: bytes | None
    kind: str  # "bars", "tau" or "none"
    notes: list[str] = field(default_factory=list)


def _finite(x) -> bool:
    """Whether ``x`` is a plottable number (not None, not NaN or infinite)."""
    return isinstance(x, int | float) and math.isfinite(x)


def metric_family(label: str, spec=None) -> tuple[str, float | None]:
    """(family, tau) of a metric label: the suite's metric name and its numeric ``tau`` parameter when the
    label is one of ``spec``'s metrics, else parsed from a ``_tau<x>`` suffix, else the label itself."""
    for m in getattr(spec, "metrics", None) or []:
        if m.label == label:
            tau = m.params.get("tau")
            return m.name, float(tau) if _finite(tau) else None
    hit = _TAU.match(label)
    if hit:
        return hit["family"], float(hit["tau"])
    return label, None


def families(rows: list[dict], spec=None) -> dict[str, list[dict]]:
    """The result rows grouped by metric family, in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(metric_family(r["metric"], spec)[0], []).append(r)
    return out


def _interval(r: dict) -> tuple[float, float] | None:
    """The row's CI95 as (low, high) when both bounds are numbers."""
    lo, hi = r.get("ci95_low"), r.get("ci95_high")
    return (float(lo), float(hi)) if _finite(lo) and _finite(hi) else None


def _png(fig) -> bytes:
    """The figure as PNG bytes (then closed, so that many charts do not pile up in pyplot)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colour(colours: dict[str, int], method: str):
    """The method's colour, the same in every chart of the report (tab10 by the method's row order)."""
    from matplotlib import colormaps

    return colormaps["tab10"](colours.get(method, 0) % 10)


def _bars(ax, family: str, rows: list[dict], methods: list[str], configs: list[str], colours: dict[str, int]) -> None:
    """Grouped bars: one group per method, one bar per metric configuration, CI95 whiskers."""
    import numpy as np
    from matplotlib import colormaps

    width = 0.8 / len(configs)
    by_key = {(r["method"], r["metric"]): r for r in rows}
    for j, cfg in enumerate(configs):
        xs, ys, err, fill = [], [], [[], []], []
        for i, m in enumerate(methods):
            r = by_key.get((m, cfg))
            if r is None:
                continue
            v = float(r["value"])
            ci = _interval(r)
            xs.append(i + (j - (len(configs) - 1) / 2) * width)
            ys.append(v)
            err[0].append(max(v - ci[0], 0.0) if ci else 0.0)
            err[1].append(max(ci[1] - v, 0.0) if ci else 0.0)
            fill.append(colormaps["tab10"](j % 10) if len(configs) > 1 else _colour(colours, m))
        if not xs:
            continue
        ax.bar(xs, ys, width=width * 0.9, color=fill, yerr=np.array(err), capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "#333"}, label=cfg if len(configs) > 1 else None)
        for x, y, hi in zip(xs, ys, err[1]):
            ax.annotate(f"{y:.3g}", (x, y + hi), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(range(len(methods)), methods, rotation=30 if len(methods) > 3 else 0,
                  ha="right" if len(methods) > 3 else "center", fontsize=8)
    ax.set_ylabel(family)
    if len(configs) > 1:
        ax.legend(fontsize=7, frameon=False)


def _tau_lines(ax, family: str, rows: list[dict], methods: list[str], spec, colours: dict[str, int]) -> None:
    """Value against tau per method with CI95 whiskers (dodged apart), and interval bands when few methods
    share the chart (more would hide each other)."""
    all_taus = sorted({t for r in rows if (t := metric_family(r["metric"], spec)[1]) is not None})
    dodge = (all_taus[-1] - all_taus[0]) * 0.012
    for i, m in enumerate(methods):
        pts = sorted(((metric_family(r["metric"], spec)[1], r) for r in rows if r["method"] == m),
                     key=lambda p: p[0] if p[0] is not None else math.inf)
        pts = [(t, r) for t, r in pts if t is not None]
        if not pts:
            continue
        colour = _colour(colours, m)
        ax.plot([t for t, _ in pts], [float(r["value"]) for _, r in pts], marker="o", color=colour, label=m,
                linewidth=1.5, markersize=4)
        band = [(t, float(r["value"]), *ci) for t, r in pts if (ci := _interval(r)) is not None]
        if not band:
            continue
        ts, vs, lo, hi = zip(*band)
        if len(methods) <= 3:
            ax.fill_between(ts, lo, hi, color=colour, alpha=0.12, linewidth=0)
        shift = (i - (len(methods) - 1) / 2) * dodge
        yerr = [[max(v - a, 0.0) for v, a in zip(vs, lo)], [max(b - v, 0.0) for v, b in zip(vs, hi)]]
        ax.errorbar([t + shift for t in ts], vs, yerr=yerr, fmt="none", ecolor=colour, elinewidth=1, capsize=2,
                    alpha=0.8)
    ax.set_xticks(all_taus, [f"{t:g}" for t in all_taus])
    ax.set_xlabel("tau (binarization threshold)")
    ax.set_ylabel(family)
    ax.legend(fontsize=7, frameon=False, ncol=2 if len(methods) > 4 else 1)


def family_chart(family: str, rows: list[dict], spec=None, colours: dict[str, int] | None = None) -> Chart:
    """The chart of one family's rows; rows without a value are named in a note instead of plotted.
    ``colours``: each method's colour index (default: order of appearance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    direction = rows[0]["direction"]
    skipped = [r for r in rows if not _finite(r["value"])]
    notes = []
    if skipped:
        names = ", ".join(f"{r['method']} {r['metric']} (n={r['n']}, {r['excluded']} excluded)" for r in skipped)
        notes.append(f"not plotted, no value: {names}")
    kept = [r for r in rows if _finite(r["value"])]
    if not kept:
        return Chart(family, direction, None, "none", notes)
    methods = list(dict.fromkeys(r["method"] for r in kept))
    colours = colours or {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    configs = list(dict.fromkeys(r["metric"] for r in kept))
    taus = {metric_family(c, spec)[1] for c in configs}
    by_tau = None not in taus and len(taus) > 1
    width = 0.75 * len(methods) + 2.0 if not by_tau else 5.0 + 0.2 * len(methods)
    fig, ax = plt.subplots(figsize=(min(max(4.0, width), 10.0), 3.2))
    if by_tau:
        _tau_lines(ax, family, kept, methods, spec, colours)
    else:
        _bars(ax, family, kept, methods, configs, colours)
    arrow = "↑ higher" if direction == "higher" else "↓ lower"
    ax.set_title(f"{family} ({arrow} is better; whiskers: CI95)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if any(_interval(r) is None for r in kept):
        notes.append("no interval (too few items): " + ", ".join(
            f"{r['method']} {r['metric']}" for r in kept if _interval(r) is None))
    return Chart(family, direction, _png(fig), "tau" if by_tau else "bars", notes)


def charts(rows: list[dict], spec=None) -> list[Chart]:
    """One chart per metric family of the result rows, a method in the same colour in each."""
    colours = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    return [family_chart(f, rs, spec, colours) for f, rs in families(rows, spec).items()]
