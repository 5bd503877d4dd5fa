"""Figures of the intervention analyses (PNG files that reports and MLflow both use)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .sensitivity import HeadScores  # noqa: E402
from .weakening import WeakeningCurves  # noqa: E402


def _module_label(layer) -> str:
    return f"{layer.place}{layer.index}"


def head_spike_heatmaps(scores: Sequence[HeadScores], path: str | Path, title: str = "KL head-spike") -> Path:
    """One (modules x heads) heat map per removed word or POS group, on a shared color scale
    (paper 000 Fig. 1-2)."""
    mats = [s.matrix() for s in scores]
    vmax = max(float(np.nanmax(m)) for m in mats) if mats else 1.0
    fig, axes = plt.subplots(1, len(mats), figsize=(2.2 * len(mats) + 1, 4), squeeze=False)
    for ax, s, m in zip(axes[0], scores, mats):
        im = ax.imshow(m, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax or 1.0)
        ax.set_title(s.label, fontsize=9)
        ax.set_xlabel("head")
        ax.set_yticks(range(len(s.layers)), [_module_label(lay) for lay in s.layers], fontsize=6)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="KL (nats)")
    fig.suptitle(title)
    return _save(fig, path)


def top_heads_per_pos(pos_scores: Mapping[str, HeadScores], path: str | Path, k: int = 4) -> Path:
    """Bar plot of the top-k heads per POS group (paper 000 Fig. 2)."""
    groups = list(pos_scores)
    fig, axes = plt.subplots(1, len(groups), figsize=(3 * len(groups), 3), squeeze=False)
    for ax, g in zip(axes[0], groups):
        top = pos_scores[g].top(k)
        ax.barh(range(len(top))[::-1], [v for _, v in top])
        ax.set_yticks(range(len(top))[::-1], [n.replace(", layer: ", " L").replace(", head: ", " h")
                                               for n, _ in top], fontsize=7)
        ax.set_title(g)
        ax.set_xlabel("mean KL")
    return _save(fig, path)


def removal_grid(images: Mapping[str, object], path: str | Path, heat: Mapping[str, np.ndarray] | None = None,
                 spikes: Mapping[str, HeadScores] | None = None) -> Path:
    """Token-removal grid: baseline and each removal (row 1), attribution overlays of each word on
    the baseline (row 2, optional), KL head-spike maps (row 3, optional)."""
    keys = list(images)
    rows = 1 + (heat is not None) + (spikes is not None)
    fig, axes = plt.subplots(rows, len(keys), figsize=(2.2 * len(keys), 2.2 * rows), squeeze=False)
    vmax = max((float(np.nanmax(s.matrix())) for s in (spikes or {}).values()), default=1.0)
    for j, k in enumerate(keys):
        axes[0][j].imshow(images[k])
        axes[0][j].set_title("baseline" if k == "" else f"- {k}", fontsize=8)
        r = 1
        if heat is not None:
            if k in heat:
                axes[r][j].imshow(images[""])
                axes[r][j].imshow(heat[k], cmap="jet", alpha=0.5)
            r += 1
        if spikes is not None:
            m = spikes[k].matrix() if k in spikes else np.zeros((1, 1))
            axes[r][j].imshow(m, aspect="auto", cmap="magma", vmin=0, vmax=vmax or 1.0)
        for ax in axes[:, j]:
            ax.axis("off")
    return _save(fig, path)


def weakening_plot(curves: WeakeningCurves, path: str | Path, ylabel: str = "score") -> Path:
    """Score vs number of weakened heads, MoRHF vs LeRHF (paper 001 Fig. 3b)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for order, style in (("MoRHF", "-o"), ("LeRHF", "-s")):
        ax.plot(curves.n_heads, curves.scores[order], style, label=order, markersize=3)
    ax.set_xlabel("weakened heads")
    ax.set_ylabel(ylabel)
    ax.set_title(f"area between curves: {curves.area_between():.3f}")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
