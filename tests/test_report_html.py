"""The HTML report as a reader gets it: one self-contained file (images inlined, only items.csv linked) with
the run's provenance, a chart per metric family, the claims, and per-case overlays naming the full prompt
and every evaluated word; opened in headless Chromium, every image decodes and the page is not blank."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html import escape
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from evalkit.suites import load_suite

SUITE = """
name: html-check
description: Report check with two methods and mIoU-inf at two thresholds.
model: tiny-sd
sampler: {steps: 1, guidance: 7.5, height: 64, width: 64}
data: {source: shapesworld, n: 3, seed: 0, size: 64}
options: {masks: reference}
min_n: 2
methods: [{name: daam}, {name: norm}]
metrics:
  - {name: miou-inf, params: {tau: 0.3}}
  - {name: miou-inf, params: {tau: 0.4}}
  - {name: relevance-mass}
  - {name: miou80, params: {tau: 0.4}}
expect:
  - daam.miou-inf_tau0.4 >= 0.0
  - norm.relevance-mass > daam.relevance-mass
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("EVALKIT_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (CI installs it and sets EVALKIT_REQUIRE_BROWSER)")
#: Cases the test report draws (of the suite's 3): the report must say so.
SHOWN = 2


@pytest.fixture(scope="module")
def report(tiny_pipe, tmp_path_factory) -> tuple[object, Path]:
    """A real attribution suite run (tiny-sd, 3 ShapesWorld cases, 1 step), reported as `execute` does."""
    from evalkit.reports import write_report
    from evalkit.suites.runner import item_rows, result_rows, run_suite, save_image_grid

    root = tmp_path_factory.mktemp("report")
    (root / "html-check.yaml").write_text(SUITE)
    result = run_suite(load_suite(str(root / "html-check.yaml")), cache_dir=root / "cache", progress=False,
                       pipe=tiny_pipe)
    grid = save_image_grid(result, root / "figures" / "overlays-test.png", max_cases=SHOWN)
    out = write_report(result, result_rows(result), [grid], root / "reports", stamp="t0", items=item_rows(result),
                       overlay_cases=SHOWN)
    return result, out


def _chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` (offline, throwaway profile)."""
    assert CHROMIUM is not None, "EVALKIT_REQUIRE_BROWSER is set but chromium is missing: apt-get install chromium"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         *args, url], capture_output=True, text=True, timeout=120, check=False)


def _links(page: str) -> list[str]:
    """Every src= and href= target and every CSS url() of the page."""
    return re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", page) + re.findall(r"url\(([^)]*)\)", page)


def test_html_is_self_contained_with_provenance_charts_claims_and_overlays(report):
    """Only items.csv is linked; header, one chart per family, claim rows, full prompts and all words."""
    from evalkit import __version__
    from evalkit.reports.html import short_commit
    from evalkit.suites.runner import result_rows

    result, out = report
    page = (out / "report.html").read_text(encoding="utf-8")
    links = _links(page)
    assert [x for x in links if not x.startswith("data:image/")] == ["items.csv"], links
    assert (out / "items.csv").is_file() and (out / "report.md").is_file()
    # provenance
    for label, value in [("model", "tiny-sd"), ("cases", "3"), ("evalkit", __version__), ("commit", short_commit()),
                         ("sampler", "model default scheduler, 1 steps, guidance 7.5, 64x64 px")]:
        assert f"<dt>{label}</dt><dd>{escape(value)}</dd>" in page, label
    if shutil.which("git") and (Path(__file__).parents[1] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{10}", short_commit())  # a checkout: its commit
    assert all(f"<dt>{lib}</dt>" in page for lib in ("torch", "diffusers", "transformers"))
    assert "<dt>data</dt><dd>shapesworld (n=3" in page and "<dt>generated</dt>" in page
    md = (out / "report.md").read_text()
    assert f"evalkit {__version__} (commit {short_commit()}), torch " in md and "## Claims" in md
    # one chart per metric family; miou-inf against tau; miou80 has no value (not a COCO class): a note
    fams = re.findall(r"<(?:figure|div) class='chart(?:-missing)?' data-family='([^']+)'>", page)
    assert fams == ["miou-inf", "relevance-mass", "miou80"]
    assert page.count("<img class='rendered chart'") == 2
    assert "miou-inf: value against tau per method" in page and "relevance-mass: value per method" in page
    assert "miou80: no chart, no row has a value" in page and "not plotted, no value: daam miou80_tau0.4" in page
    # the result table, styled, every row with its direction
    rows = result_rows(result)
    assert page.count("<td class='dir' title='higher is better'>↑</td>") == len(rows) == 8
    # claims: one coloured row each, and the summary line
    for c in result.claims:
        assert f"<td>{escape(c.text)}</td>" in page
    assert len(re.findall(r"<tr class='claim (passed|failed|inconclusive)'>", page)) == len(result.claims) == 2
    assert "<div class='summary " in page
    # overlays: the first SHOWN cases, full prompts, every evaluated word (the masks' words)
    assert f"Showing {SHOWN} of 3 cases" in page
    assert page.count("<img class='rendered overlay'") == SHOWN
    for case, d in list(zip(result.cases, result.case_dirs))[:SHOWN]:
        assert f"<p class='prompt'>{escape(case.item.prompt)}</p>" in page
        with np.load(d / "masks.npz") as z:
            words = list(z.files)
        assert words and all(re.search(rf"<span class='word[^']*'>{re.escape(w)}</span>", page) for w in words)
    assert escape(result.cases[SHOWN].item.prompt) not in page  # not shown: the cap holds
    # the grid figure (report.md, MLflow) is not repeated in the page, which draws its overlays per case
    assert "overlays-test" not in page and "![overlays-test](overlays-test.png)" in md
    with Image.open(out / "overlays-test.png") as im:
        assert im.width > 200 and im.height > 200


@needs_browser
def test_report_renders_in_headless_chromium(report, tmp_path):
    """The page's own check counts every chart and overlay as decoded; a screenshot is not blank."""
    _, out = report
    url = (out / "report.html").resolve().as_uri()
    dom = _chromium(tmp_path, url, "--dump-dom")
    hit = re.search(r"rendered (\d+) of (\d+) images", dom.stdout)
    assert hit, dom.stdout[-2000:] + dom.stderr[-2000:]
    assert int(hit[1]) == int(hit[2]) == 2 + SHOWN  # two charts, the overlays of the shown cases
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars")
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 2000)
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200  # text, charts and heat maps, not a blank page
        assert np.asarray(rgb).std() > 10


def test_protocol_report_inlines_figures_and_notes_missing_values(tmp_path, monkeypatch):
    """A protocol suite (no overlays) gets its figures inlined; a row without a value is a note, not a crash;
    outside a git checkout the commit reads "unknown"."""
    import evalkit.resources
    from evalkit.reports import write_report

    monkeypatch.setattr(evalkit.resources, "source_checkout", lambda: tmp_path)  # no repository here
    spec = load_suite("seed-control")
    fig = tmp_path / "pos-head-spikes.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(fig)
    table = [("fixed-seed", "avg-kl", 0.5, 0.4, 0.6), ("varying-seed", "avg-kl", 0.3, None, None),
             ("fixed-seed", "variance", float("nan"), None, None), ("varying-seed", "variance", None, None, None)]
    rows = [{"method": v, "metric": m, "direction": "higher", "value": val, "ci95_low": lo, "ci95_high": hi,
             "n": 6, "excluded": 0 if val is not None else 6, "reduction": "mean", "excluded_reasons": {}}
            for v, m, val, lo, hi in table]
    result = SimpleNamespace(spec=spec, claims=[], n_cases=6, unassigned={})
    out = write_report(result, rows, [fig, tmp_path / "gone.png"], tmp_path / "reports", stamp="t1")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<dt>commit</dt><dd>unknown</dd>" in page and "<dt>protocol</dt><dd>seed-control</dd>" in page
    assert "<img class='rendered figure'" in page and "<figcaption>pos-head-spikes</figcaption>" in page
    assert "figure gone.png not shown (missing)" in page and "<h2>Overlays</h2>" not in page
    assert "no interval (too few items): varying-seed avg-kl" in page
    assert "variance: no chart, no row has a value" in page
    assert [x for x in _links(page) if not x.startswith("data:image/")] == ["items.csv"]
