"""Reproduce the built-in VQA model: python scripts/train_vqa.py [--out DIR].

Generates the training questions of Shapes VQA (``lrp.datasets.shapes_vqa``: one scene and one question per
seed, seeds 0 .. ``--train`` - 1; nothing is downloaded), trains :class:`lrp.vqa.VQANet` on them (fixed seed,
AdamW with a one-cycle schedule) and prints the accuracy on a validation set (seeds 900,000 .. 900,999, not
trained on) after each epoch, then the held-out accuracy on the 1,000 questions of ``shapes_vqa.test_set()``
(seeds 1,000,000 ..), overall and per question type. Writes ``vqa_film.pt`` (state dict, config, accuracy) and
``VQA-README.md`` into ``src/lrp/data/``: put the printed accuracies into ``lrp.vqa.VQA_ACCURACY`` and
``VQA_ACCURACY_BY_TYPE``.

``--dev`` reports the validation accuracy only and writes nothing (for choosing settings without looking at the
test set).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lrp import vqa as Q
from lrp.datasets import shapes_vqa as V

VALIDATION_SEED = 900_000  # seeds [900_000, 901_000): validation, never trained on
VALIDATION_SIZE = 1000


CELL = 4  # the stem's map has one cell per 4 x 4 pixels


def cell_labels(q: V.Question) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the stem learns to see, per cell of its 16 x 16 map: the colour and the shape (0: none, else 1 + the
    index) of the object with the most visible pixels in the cell (at least 6 of 16), and whether an object's
    centre lies in the cell."""
    side = V.IMAGE_SIZE // CELL
    colour = np.zeros((side, side), np.int64)
    shape = np.zeros((side, side), np.int64)
    centre = np.zeros((side, side), np.float32)
    best = np.full((side, side), 5)
    for o in q.objects:
        count = o.visible.reshape(side, CELL, side, CELL).sum((1, 3))
        more = count > best
        best = np.where(more, count, best)
        colour[more] = 1 + V.COLOURS.index(o.colour)
        shape[more] = 1 + V.SHAPES.index(o.shape)
        centre[min(int(o.y // CELL), side - 1), min(int(o.x // CELL), side - 1)] = 1.0
    return colour, shape, centre


def _generate(span: tuple[int, int]) -> tuple[list[np.ndarray], list[tuple[int, ...]]]:
    questions = V.questions(span[0], span[1] - span[0])
    labels = [cell_labels(q) for q in questions]
    return [np.stack([q.image.transpose(2, 0, 1) for q in questions]),
            np.array([q.answer_id for q in questions], dtype=np.int64),
            np.array([V.QUESTION_TYPES.index(q.type) for q in questions], dtype=np.int64),
            np.stack([lab[0] for lab in labels]), np.stack([lab[1] for lab in labels]),
            np.stack([lab[2] for lab in labels])], [q.ids for q in questions]


def generate(start: int, n: int, workers: int) -> dict[str, torch.Tensor]:
    """The questions of seeds [start, start + n): ``image`` uint8 (n, 3, 64, 64), ``ids`` (n, L) left-padded,
    ``answer``, ``type``, and the cell labels ``colour``, ``shape``, ``centre`` (n, 16, 16)."""
    chunk = 2000
    spans = [(s, min(s + chunk, start + n)) for s in range(start, start + n, chunk)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_generate, spans)
    else:
        parts = [_generate(s) for s in spans]
    keys = ("image", "answer", "type", "colour", "shape", "centre")
    data = {k: torch.from_numpy(np.concatenate([p[0][i] for p in parts])) for i, k in enumerate(keys)}
    data["ids"] = Q.pad_ids([row for p in parts for row in p[1]])
    return data


class CellHead(nn.Module):
    """Training only: reads each cell's colour (7 classes), shape (5) and whether a centre lies there from the
    stem's map, so that the stem learns to see in a few epochs. Not part of the shipped model."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, len(V.COLOURS) + len(V.SHAPES) + 3, 1)

    def loss(self, features: torch.Tensor, data: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        out = self.conv(features)
        c = len(V.COLOURS) + 1
        return (nn.functional.cross_entropy(out[:, :c], data["colour"][idx])
                + nn.functional.cross_entropy(out[:, c:-1], data["shape"][idx])
                + nn.functional.binary_cross_entropy_with_logits(out[:, -1], data["centre"][idx]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(Q.__file__).parent / "data")
    parser.add_argument("--train", type=int, default=40_000, help="training questions (seeds 0 .. N-1)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--cell-weight", type=float, default=1.0, help="weight of the stem's cell-label loss")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy machine more threads wait on each other)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating the training questions")
    parser.add_argument("--dev", action="store_true", help="report the validation accuracy only; write nothing")
    args = parser.parse_args()
    if args.train > VALIDATION_SEED:
        parser.error(f"--train must be at most {VALIDATION_SEED} (the validation seeds start there)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    data = generate(0, args.train, args.workers)
    x, ids, y = data["image"], data["ids"], data["answer"]
    validation = V.questions(VALIDATION_SEED, VALIDATION_SIZE)
    t_data = time.time() - t0
    print(f"generated {len(x)} training and {len(validation)} validation questions in {t_data:.0f} s "
          f"({x.numel() / 1e6:.0f} MB of pixels); questions of at most {ids.shape[1]} words")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = Q.VQANet()
    cells = CellHead(model.config["width"])
    print(f"VQANet: {sum(p.numel() for p in model.parameters()):,} parameters, config {model.config}")
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.AdamW(list(model.parameters()) + list(cells.parameters()), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
                                                pct_start=0.15)
    t1 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        total, total_cells, hits = 0.0, 0.0, 0
        for i in range(0, len(x), args.batch_size):
            idx = order[i:i + args.batch_size]
            image = x[idx].float().div_(255.0)
            features = model.features(image)
            logits = model.answer(features, ids[idx])
            loss = nn.functional.cross_entropy(logits, y[idx])
            cell_loss = cells.loss(features, data, idx)
            opt.zero_grad()
            (loss + args.cell_weight * cell_loss).backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            total_cells += cell_loss.item() * len(idx)
            hits += int((logits.argmax(1) == y[idx]).sum())
        val = Q.vqa_accuracy(model, validation)
        per_type = ", ".join(f"{t} {a:.3f}" for t, a in val.by_type.items())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(x):.4f} (cells {total_cells / len(x):.4f}), "
              f"train {hits / len(x):.4f}, validation {val.overall:.4f} ({per_type}) [{time.time() - t1:.0f} s]",
              flush=True)
    model.eval()
    t_train = time.time() - t1
    if args.dev:
        print(f"{t_data + t_train:.0f} s in all ({t_data:.0f} s generating, {t_train:.0f} s training)")
        return

    test = V.test_set()
    acc = Q.vqa_accuracy(model, test)
    correct = sum(acc.correct)
    print(f"held-out accuracy {acc.overall:.4f} ({correct}/{len(test)}): "
          + ", ".join(f"{t} {a:.3f}" for t, a in acc.by_type.items()))
    print(f"{t_data + t_train:.0f} s in all ({t_data:.0f} s generating, {t_train:.0f} s training, "
          f"{args.threads} torch thread{'s' if args.threads > 1 else ''})")
    print(f"VQA_ACCURACY = {correct} / {len(test)}")
    print("VQA_ACCURACY_BY_TYPE = {" + ", ".join(
        f'"{t}": {sum(c for c, q in zip(acc.correct, test) if q.type == t)} / {sum(q.type == t for q in test)}'
        for t in V.QUESTION_TYPES) + "}")

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = args.out / Q.VQA_CHECKPOINT
    torch.save({"state_dict": state, "config": model.config, "accuracy": acc.overall, "by_type": acc.by_type,
                "test_digest": V.digest(test), "train": args.train, "epochs": args.epochs, "seed": args.seed,
                "batch_size": args.batch_size, "lr": args.lr, "seconds": {"generating": t_data, "training": t_train},
                "threads": args.threads}, path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    readme = args.out / "VQA-README.md"
    readme.write_text(README.format(
        params=sum(p.numel() for p in model.parameters()), size=path.stat().st_size / 1e6, train=args.train,
        epochs=args.epochs, batch=args.batch_size, lr=args.lr, seed=args.seed, acc=acc.overall, correct=correct,
        n=len(test), by_type="\n".join(f"| {t} | {a:.3f} |" for t, a in acc.by_type.items()),
        cell_weight=args.cell_weight, seconds=t_data + t_train, data_s=t_data, train_s=t_train, threads=args.threads,
        machine=f"{platform.machine()}, {multiprocessing.cpu_count()} cores", torch=torch.__version__,
        numpy=np.__version__, digest=V.digest(test)), encoding="utf-8")
    print(f"wrote {readme}")


README = """# The built-in VQA model: data, provenance and accuracy

Files (written by `python scripts/train_vqa.py`, fixed seed; see `lrp.vqa` for the API):

- `vqa_film.pt`: the model (`lrp.vqa.VQANet`, {params:,} parameters, {size:.2f} MB), its config and held-out
  accuracy. Load it with `lrp.models.vqa()`, which returns `(model, encoder)`.
- `VQA-README.md`: this note.

## Data

Shapes VQA (`lrp.datasets.shapes_vqa`), generated by lrp itself: nothing was downloaded and nothing else is
shipped. A seed gives one 64 x 64 scene (2 to 6 circles, squares, triangles and diamonds in six colours and
two sizes, on a plain or textured grey background, overlapping but each at least 60% visible) and one question
from five templates (exist, query_colour, query_shape, count, relate), with a one-word answer and the mask of
the objects it refers to. Training: seeds 0 to {train:,} - 1; validation (reported per epoch, never trained on):
seeds 900,000 to 900,999; test: seeds 1,000,000 to 1,000,999 (`shapes_vqa.test_set()`, SHA-256 fingerprint
`{digest}` by `shapes_vqa.digest`).

## Model

`lrp.vqa.VQANet`, a small FiLM network (Perez et al. 2018) without a single bias. Image `(N, 3, 64, 64)` in
[0, 1] -> four convolutions (4x4 stride 2, 3x3 stride 2, 3x3, 3x3), each followed by a per-channel scale
(`ChannelScale`: batch norm without the shift) and ReLU: 16 x 16 cells of 32 channels, each seeing 24 x 24
pixels. Question: word embeddings (32) -> GRU (64), its last state -> a linear map to a scale gamma and a
shift beta per channel for two FiLM blocks, `relu(h + gamma * h + beta)`, after a 1x1 convolution (32 -> 64)
and after a 3x3 convolution (64 -> 64), each scaled per channel. Then, per channel, its mass (sum over the map
/ 16) and where it lies (the mean column, from -1 left to +1 right, weighted by h^2) -> dense 128 + ReLU ->
19 answers. Without biases, LRP relevance over the pixels and the words together is conserved; questions are
left-padded with id 0 (zero embedding), which leaves the GRU's state at zero.

While training, and only then, a 1x1 convolution reads from the stem's 16 x 16 map each cell's colour and
shape (of the object with most visible pixels in it) and whether an object's centre lies there, from the
scenes' object lists (`scripts/train_vqa.py`, `CellHead`; weight {cell_weight:g}). This teaches the stem to
see in two epochs instead of many; which objects an answer depends on is learnt from the answers alone. The
head is not shipped.

## Training

{train:,} questions, {epochs} epochs, batch {batch}, AdamW (lr {lr:g}, weight decay 1e-4, one-cycle schedule),
seed {seed}, cross-entropy. {seconds:.0f} s in all on this project's machine ({machine}, shared with other
jobs; {threads} torch thread(s)): {data_s:.0f} s generating the questions, {train_s:.0f} s training. torch
{torch}, numpy {numpy}.

## Held-out accuracy

{correct} of {n} test questions answered right: {acc:.4f}.

| question type | accuracy |
|---|---|
{by_type}
"""


if __name__ == "__main__":
    main()
