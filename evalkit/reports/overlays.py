"""Overlay figures of attribution suites: for each shown case, every evaluated word's row with the generated
image and each method's normalized heat map over it, the word's ground-truth mask drawn as an outline on
every panel, so that a reader sees where a method looks against where the object is. Read from the case
cache (image.png, masks.npz) and the methods' maps entries of a :class:`~evalkit.suites.runner.SuiteResult`."""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: File-name prefix of the overlay grid figure (report.md, MLflow); the HTML report draws its own per case.
GRID_PREFIX = "overlays-"
#: Version of the figures' layout (part of the cached grid's key: a new layout redraws it).
LAYOUT = 2
#: Cases shown by default (a report of 50 prompts x 7 methods stays readable and small).
DEFAULT_CASES = 8
#: Inches per panel (about 120 px at the report's 100 dpi).
PANEL = 1.2


@dataclass
class CaseOverlay:
    """One shown case: its identity, full prompt, evaluated words (those without ground-truth pixels in
    ``empty``), the methods drawn, and the figure as PNG bytes."""

    item: str
    seed: int
    prompt: str
    words: list[str]
    empty: list[str]
    methods: list[str]
    png: bytes


def has_overlays(result) -> bool:
    """Whether ``result`` holds the cached cases and maps that overlays are drawn from (a stored result
    read back without them does not; its report shows the stored grid figure instead)."""
    return bool(getattr(result, "map_dirs", None)) and bool(getattr(result, "case_dirs", None))


def _case_data(case, case_dir: Path, map_dir: dict[str, Path], methods: list[str]):
    """(image, masks, heat maps per method) of one case, all at the masks' size; words in item order."""
    from PIL import Image

    from ..protocols.attribution import load_case_attribution

    with np.load(case_dir / "masks.npz") as z:
        found = {w: z[w].astype(bool) for w in z.files}
    order = [w for w in case.item.words if w in found] + [w for w in found if w not in case.item.words]
    masks = {w: found[w] for w in order}
    shape = next(iter(masks.values())).shape if masks else None
    image = Image.open(case_dir / "image.png").convert("RGB")
    if shape is not None and image.size != (shape[1], shape[0]):
        image = image.resize((shape[1], shape[0]))
    heats = {m: {w: h.numpy() for w, h in load_case_attribution(case_dir, map_dir[m], m).normalized(shape).items()}
             for m in methods} if shape is not None else {}
    return image, masks, heats


def _outline(ax, mask: np.ndarray) -> None:
    """The mask's contour, a white line on a black one (visible on any heat colour); a note when empty."""
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors="black", linewidths=2.2)
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.0)
    elif not mask.any():
        ax.text(0.5, 0.04, "no GT pixels", transform=ax.transAxes, ha="center", va="bottom", fontsize=6,
                color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})


def _bare(ax) -> None:
    """No ticks or frame, but keep the y label (the word)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _draw(axes, image, masks: dict[str, np.ndarray], heats: dict[str, dict], methods: list[str]) -> None:
    """Fill one case's axes: a row per word, the image then each method's overlay, outlines on all."""
    pixels = np.asarray(image)
    for i, (word, mask) in enumerate(masks.items()):
        row = axes[i]
        row[0].imshow(pixels, interpolation="nearest")
        row[0].set_ylabel(word, fontsize=8, rotation=0, ha="right", va="center")
        for j, m in enumerate(methods):
            ax = row[j + 1]
            ax.imshow(pixels, interpolation="nearest")
            heat = heats.get(m, {}).get(word)
            if heat is not None:
                ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
            else:
                ax.text(0.5, 0.5, "no map", transform=ax.transAxes, ha="center", fontsize=7)
        for ax in row:
            _outline(ax, mask)
            _bare(ax)
        if i == 0:
            row[0].set_title("image + GT", fontsize=7)
            for j, m in enumerate(methods):
                row[j + 1].set_title(m, fontsize=7)


def _figure_png(fig) -> bytes:
    """PNG bytes of ``fig`` (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _shown(result, max_cases: int) -> list[tuple]:
    """(case, case folder, maps folders) of the first ``max_cases`` cases."""
    return list(zip(result.cases, result.case_dirs, result.map_dirs))[:max_cases]


def case_overlays(result, max_cases: int = DEFAULT_CASES) -> list[CaseOverlay]:
    """One figure per shown case (the first ``max_cases``): words as rows, image and methods as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m.label for m in result.spec.methods]
    out = []
    for case, d, md in _shown(result, max_cases):
        image, masks, heats = _case_data(case, d, md, methods)
        if not masks:
            continue
        cols = len(methods) + 1
        fig, axes = plt.subplots(len(masks), cols, figsize=(PANEL * cols, PANEL * len(masks) + 0.2), squeeze=False)
        _draw(axes, image, masks, heats, methods)
        fig.subplots_adjust(wspace=0.06, hspace=0.08)
        out.append(CaseOverlay(case.item.id, case.seed, case.item.prompt, list(masks),
                               [w for w, m in masks.items() if not m.any()], methods, _figure_png(fig)))
    return out


def save_overlay_grid(result, path: Path, max_cases: int = DEFAULT_CASES) -> Path:
    """All shown cases in one PNG (report.md, MLflow): each case a block headed by its full, wrapped prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m.label for m in result.spec.methods]
    data = [(case, *_case_data(case, d, md, methods)) for case, d, md in _shown(result, max_cases)]
    data = [x for x in data if x[2]]
    cols = len(methods) + 1
    width = PANEL * cols + 0.6
    heights = [PANEL * len(masks) + 0.45 for _, _, masks, _ in data] or [1.0]
    fig = plt.figure(figsize=(width, sum(heights)))
    subs = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0] if data else []
    for sub, (case, image, masks, heats) in zip(subs, data):
        prompt = textwrap.fill(f"{case.item.id} seed {case.seed}: {case.item.prompt}", width=int(width * 14))
        sub.suptitle(prompt, fontsize=7, x=0.02, ha="left")
        _draw(sub.subplots(len(masks), cols, squeeze=False), image, masks, heats, methods)
    if not data:
        fig.text(0.5, 0.5, "no cases with evaluated words", ha="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
