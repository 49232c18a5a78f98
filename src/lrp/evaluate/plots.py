"""PNG plots of evaluation results (matplotlib figures built without pyplot: the caller's backend and open
figures are left alone)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def new_figure(**kwargs):
    """A matplotlib ``Figure`` made without pyplot (``kwargs``: ``figsize`` and so on)."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def save_figure(fig, path):
    """Write ``fig`` to ``path`` as a PNG (120 dpi, tight) unless ``path`` is None; return ``fig``."""
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_curves(curves: dict, path=None, title: Optional[str] = None):
    """Mean perturbation curve per method (``{name: PerturbationCurve}``), AOPC in the legend."""
    from ..baselines import METHODS

    from matplotlib import colormaps

    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colours = iter(list(getattr(colormaps["tab10"], "colors")) * 3)
    for name, curve in curves.items():
        baseline = name in METHODS or name.startswith("occlusion")  # LRP solid, baselines dashed
        style = dict(color="0.4", linestyle=":") if name == "random" else \
            dict(color=next(colours), linestyle="--" if baseline else "-")
        ax.plot(curve.fractions, curve.mean, label=f"{name} (AOPC {curve.aopc.mean():.3g})", **style)
    order = next(iter(curves.values())).order if curves else "morf"
    ax.set_xlabel("fraction of regions removed (" + ("most" if order == "morf" else "least") + " relevant first)")
    ax.set_ylabel("score of the explained class")
    ax.set_title(title or ("Perturbation curves, " + order.upper()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_randomisation(result, path=None, cmap: str = "bwr"):
    """Similarity to the trained model's heatmap at each randomisation step, and the first sample's heatmaps."""
    from ..visualize import heatmap

    steps = len(result.layers)
    shown = list(np.unique(np.linspace(0, steps - 1, min(steps, 8)).round().astype(int)))
    fig = new_figure(figsize=(max(6.4, 1.1 * len(shown)), 6.0))
    grid = fig.add_gridspec(2, len(shown), height_ratios=[3, 1.3])
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(steps)
    for metric in result.similarity:
        values = result.similarity[metric]
        mean, std = np.nanmean(values, 1), np.nanstd(values, 1)
        label = "relative L2 change (0: unchanged)" if metric == "relative_l2" else metric
        ax.plot(x, mean, marker="o", label=label)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    labels = [f"{name}\n{kind}" if kind else name
              for name, kind in zip(result.layers, result.layer_types or [""] * steps)]
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("randomised " + ("down to this layer" if result.mode == "cascading" else "layer alone"))
    ax.set_ylabel("compared with the trained model's heatmap")
    ax.set_title(f"Randomisation check ({result.mode}): {result.method}")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if result.relevance and result.relevance[0].ndim == 4 and len(result.relevance[0]):
        for col, k in enumerate(shown):
            sub = fig.add_subplot(grid[1, col])
            sub.imshow(heatmap(result.relevance[k][0], cmap))
            sub.set_title(result.layers[k], fontsize=7)
            sub.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
