"""Regenerate docs/img/report.png: run task-a on its first items (no MLflow, throwaway cache and reports
unless given), open the HTML report in headless Chromium and save the top of the page, palette-quantized
so that the PNG stays small. Usage: ``.nox/evalkit/bin/python docs/make_report_screenshot.py [--limit 12]``."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "report.png"


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000) -> Path:
    """The top ``width`` x ``height`` pixels of ``page`` in headless Chromium, as a 256-colour PNG."""
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--allow-file-access-from-files", f"--user-data-dir={Path(tmp) / 'profile'}",
                        "--virtual-time-budget=5000", "--hide-scrollbars", f"--screenshot={raw}",
                        f"--window-size={width},{height}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        with Image.open(raw) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    small.save(out, optimize=True)
    return out


def main() -> None:
    """Run task-a (``--limit`` items), report it, screenshot the report."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=12, help="task-a items to run (default 12)")
    ap.add_argument("--cache-dir", default=None, help="case cache (default: a temporary folder)")
    ap.add_argument("--reports-dir", default=None, help="keep the report here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    from evalkit.suites import execute

    with tempfile.TemporaryDirectory() as tmp:
        _, report = execute("task-a", limit=args.limit, cache_dir=args.cache_dir or Path(tmp) / "cache",
                            reports_dir=args.reports_dir or Path(tmp) / "reports", tracking=False, progress=False)
        out = screenshot(report / "report.html", args.out)
    print(f"{out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
