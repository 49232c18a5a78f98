"""``lrp demo``: explain held-out MNIST digits with the built-in model and write a small report.

Writes, into the output folder: one heatmap PNG per digit and composite, ``overview.png`` (a grid: digit,
then one heatmap per composite for the predicted class, then the runner-up class), and ``index.html``.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import models
from .composites import composite as make_composite
from .explain import explain
from .visualize import heatmap

COMPOSITES = {
    "epsilon-plus-flat": lambda: make_composite("epsilon-plus-flat"),
    "epsilon-gamma-box": lambda: make_composite("epsilon-gamma-box", low=0.0, high=1.0),
    "layered": lambda: make_composite("layered", low=0.0, high=1.0),
    "lrp0": lambda: make_composite("lrp0"),
}
SCALE = 4  # pixels per MNIST pixel in the pictures


def _pick_digits(model: torch.nn.Module, correct: int, wrong: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    x, y = models.mnist_digits("test")
    with torch.no_grad():
        pred = model(x).argmax(1)
    right = torch.nonzero(pred == y).flatten()
    # one correct example per class first, then misclassified ones
    chosen: list[int] = []
    for k in range(10):
        hits = right[y[right] == k]
        if len(hits) and len(chosen) < correct:
            chosen.append(int(hits[0]))
    misses = torch.nonzero(pred != y).flatten()[:wrong].tolist()
    index = chosen + misses
    return x[index], y[index], index


def _label(image: Image.Image, text: str) -> Image.Image:
    canvas = Image.new("RGB", (image.width, image.height + 14), "white")
    canvas.paste(image, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
    return canvas


def run(out_dir: str | Path = "lrp-demo", correct: int = 10, wrong: int = 4, log=print) -> Path:
    """Build the demo report; returns the path of ``index.html``."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = models.mnist()
    x, y, index = _pick_digits(model, correct, wrong)
    with torch.no_grad():
        logits = model(x)
    probs = torch.softmax(logits, 1)
    top2 = probs.topk(2, dim=1).indices
    pred, runner_up = top2[:, 0], top2[:, 1]

    tiles: list[list[Image.Image]] = []
    rows_html: list[str] = []
    results = {name: explain(model, x, target=pred, composite=make()) for name, make in COMPOSITES.items()}
    contrast = explain(model, x, target=runner_up, composite=COMPOSITES["epsilon-plus-flat"]())
    size = (28 * SCALE, 28 * SCALE)
    for i in range(len(x)):
        status = "correct" if pred[i] == y[i] else "WRONG"
        digit = Image.fromarray(np.uint8(255 - x[i, 0].numpy() * 255))
        digit = digit.resize(size, Image.Resampling.NEAREST).convert("RGB")
        row = [_label(digit, f"label {int(y[i])} ({status})")]
        cells = [f"<td><img src='digit_{i}.png'><br>label {int(y[i])}, predicted {int(pred[i])} "
                 f"({probs[i, pred[i]]:.0%}) <b>{status}</b></td>"]
        digit.save(out / f"digit_{i}.png")
        for name, res in results.items():
            img = heatmap(res.relevance[i], size=size)
            img.save(out / f"digit_{i}_{name}.png")
            row.append(_label(img, f"{name}: {int(pred[i])}"))
            cells.append(f"<td><img src='digit_{i}_{name}.png'><br>{html.escape(name)}: why {int(pred[i])}</td>")
        img = heatmap(contrast.relevance[i], size=size)
        img.save(out / f"digit_{i}_runner_up.png")
        row.append(_label(img, f"runner-up {int(runner_up[i])}"))
        cells.append(f"<td><img src='digit_{i}_runner_up.png'><br>runner-up {int(runner_up[i])} "
                     f"({probs[i, runner_up[i]]:.1%}): what speaks for it</td>")
        tiles.append(row)
        rows_html.append("<tr>" + "".join(cells) + "</tr>")

    tile_w, tile_h = tiles[0][0].size
    grid = Image.new("RGB", (tile_w * len(tiles[0]) + 4 * len(tiles[0]), (tile_h + 4) * len(tiles)), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * (tile_w + 4), r * (tile_h + 4)))
    grid.save(out / "overview.png")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lrp demo</title>
<style>body{{font-family:sans-serif}} td{{text-align:center;font-size:12px;padding:4px}}</style></head><body>
<h1>Why did the network read these digits so?</h1>
<p>The built-in MNIST CNN (held-out accuracy {models.accuracy(model):.2%}) explained with Layer-wise Relevance
Propagation. Red: pixels that speak for the class, blue: against it. The last column explains the runner-up
class instead: what in the digit could also pass for it. Digits {', '.join(map(str, index))} of the held-out
split.</p>
<table>{''.join(rows_html)}</table></body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    log(f"explained {len(x)} held-out digits ({wrong and int((pred != y).sum())} misclassified) with "
        f"{len(COMPOSITES)} composites in {time.perf_counter() - start:.1f} s")
    log(f"wrote {out / 'overview.png'} and {out / 'index.html'}")
    return out / "index.html"
