"""What an explanation becomes for a person: pictures (heatmap, overlay, one tile per band, a bar per feature),
the raw relevance, and a row of ``summary.csv``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..visualize import channel_grid, heatmap, is_multiband, overlay

if TYPE_CHECKING:
    from .pipeline import Outcome, Pipeline

SUMMARY_FIELDS = ("file", "status", "predicted", "probability", "explained", "score", "relevance_sum", "outputs")


def pictures(outcome: "Outcome", cmap: str = "bwr", labels: Optional[Sequence[str]] = None) -> dict[str, Image.Image]:
    """The pictures of one explanation, by kind: ``heatmap`` (images: the relevance summed over channels;
    cubes: summed over bands), ``overlay`` (over the input picture), ``bands`` (one tile per band or channel,
    labelled, on one colour scale) and ``features`` (a bar per feature, for vectors)."""
    r = outcome.relevance
    picture = outcome.prepared.picture
    shown: dict[str, Image.Image] = {}
    if r.ndim == 1:
        shown["features"] = feature_bars(r, labels)
        return shown
    if is_multiband(tuple(r.shape)):
        shown["bands"] = channel_grid(r, cmap)
        summed = r.reshape(-1, *r.shape[-2:]).sum(0)
        shown["heatmap"] = heatmap(summed, cmap)
        return shown
    if r.ndim in (2, 3):
        size = picture.size if picture is not None else None
        shown["heatmap"] = heatmap(r, cmap, size=size)
        if picture is not None and picture.size == (r.shape[-1], r.shape[-2]):
            shown["overlay"] = overlay(picture, r, cmap)
    return shown


def feature_bars(relevance: torch.Tensor, labels: Optional[Sequence[str]] = None) -> Image.Image:
    """A horizontal bar per feature (red: for the explained class, blue: against)."""
    import io

    from matplotlib.figure import Figure

    values = relevance.detach().double().cpu().numpy()
    names = list(labels) if labels is not None and len(labels) == len(values) else [str(i) for i in range(len(values))]
    shown = min(len(values), 40)  # the largest 40 by magnitude: more bars cannot be read
    order = np.argsort(-np.abs(values))[:shown][::-1]
    fig = Figure(figsize=(5, 0.8 + 0.22 * shown), dpi=100)
    ax = fig.add_subplot()
    ax.barh([names[i] for i in order], values[order], color=["#d62728" if values[i] > 0 else "#1f77b4" for i in order])
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("relevance")
    ax.set_ylabel("feature")
    ax.set_title("relevance per feature" + (f" (largest {shown} of {len(values)})" if shown < len(values) else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def write(outcome: "Outcome", folder: Path, stem: str, cmap: str = "bwr") -> list[str]:
    """Write ``<stem>_relevance.npy`` and the pictures of :func:`pictures` as ``<stem>_<kind>.png``; the names."""
    written = [f"{stem}_relevance.npy"]
    np.save(folder / written[0], outcome.relevance.numpy())
    for kind, image in pictures(outcome, cmap).items():
        written.append(f"{stem}_{kind}.png")
        image.save(folder / written[-1])
    return written


def summary_row(outcome: "Outcome", pipeline: "Pipeline", stem: str) -> dict:
    """The ``summary.csv`` row of an explained input."""
    predicted = outcome.predicted
    probability = outcome.probability
    return {
        "file": outcome.prepared.source, "status": "ok",
        "predicted": pipeline.label(predicted) if predicted is not None else "",
        "probability": f"{probability:.4f}" if probability is not None else "",
        "explained": pipeline.label(outcome.target),
        "score": f"{outcome.score:.6g}",
        "relevance_sum": f"{outcome.relevance_sum:.6g}",
        "outputs": stem,
    }


def failed_row(source: str, reason: str) -> dict:
    """The ``summary.csv`` row of an input that could not be explained."""
    return {**{key: "" for key in SUMMARY_FIELDS}, "file": source, "status": f"failed: {reason}"}


def write_summary(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
