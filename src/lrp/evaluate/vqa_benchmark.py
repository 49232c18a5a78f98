"""``lrp evaluate --benchmark shapes-vqa``: a known-answer localisation benchmark on Shapes VQA.

:func:`run` loads the built-in VQA model (:func:`lrp.models.vqa`), answers held-out questions of
:func:`lrp.datasets.shapes_vqa.test_set` (answer accuracy, overall and per question type) and explains the
predicted answer of every *localisable* question (one whose ground-truth mask, the objects it refers to, is not
empty) over the image and the question at once with each method: LRP composites through
``lrp.explain(model, (images, ids), composite=...)``, baselines through :mod:`lrp.baselines` with the same two
inputs (the ids held fixed). The image relevance (channels summed) is scored against the mask with the CLEVR-XAI
metrics (Arras et al. 2022), relevance mass accuracy and relevance rank accuracy, and the pointing game (Zhang et
al. 2018): over the questions the model answers correctly (subset ``correct``, the main table, as in CLEVR-XAI)
and over all localisable ones (``all``), for all question types and each type.

Writes into the output folder ``results.csv`` (a row per method, subset and question type), ``metrics.png`` (the
three metrics per method), ``by_type.png`` (per question type), ``examples.png`` (heatmaps of one question per
type with its mask outlined) and ``report.md`` (a verdict computed from the numbers, how to read them, tables).
"""

from __future__ import annotations

import functools
import math
import textwrap
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .. import baselines
from ..composites import COMPOSITES, composite
from ..datasets.shapes_vqa import ANSWERS, QUESTION_TYPES, TEST_SIZE, Question, test_set
from ..explain import Explanation, explain
from ..vqa import Accuracy, VQANet, batch, vqa, vqa_accuracy
from .compare import write_csv
from .localisation import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy
from .methods import EVALUATE_COMPOSITES
from .plots import new_figure, save_figure
from .report import glossary, markdown_table, paired_gap

Tensor = torch.Tensor
Relevance = Callable[[torch.nn.Module, tuple[Tensor, Tensor], Tensor], tuple[Tensor, Tensor]]

METRICS = {"mass_accuracy": relevance_mass_accuracy, "rank_accuracy": relevance_rank_accuracy,
           "pointing_game": pointing_game}
METRIC_TEXT = {"mass_accuracy": "mass accuracy", "rank_accuracy": "rank accuracy", "pointing_game": "pointing game"}
SUBSETS = ("correct", "all")
OCCLUSION_PATCH = 4  # pixels: the stride of the model's 16 x 16 feature map
PIXEL_RANGE = (0.0, 1.0)  # the images' value range: the z^B bounds of the composites that take them


def default_methods() -> list[str]:
    """What ``lrp evaluate`` compares by default: its LRP composites and every baseline."""
    return [*EVALUATE_COMPOSITES, *baselines.METHODS]


def method_kind(name: str) -> str:
    """``"lrp"`` for a composite, ``"baseline"`` for a baseline (``random`` included)."""
    return "baseline" if name in baselines.METHODS else "lrp"


def resolve(name: str) -> Relevance:
    """``(model, (images, ids), target) -> (image relevance, word relevance)`` for a composite or baseline name."""
    method: Callable[..., Explanation]
    if name in baselines.METHODS:
        method = functools.partial(baselines.occlusion, patch=OCCLUSION_PATCH) if name == "occlusion" \
            else baselines.METHODS[name]
    elif name in COMPOSITES:
        from ..pipeline import needs_bounds

        low, high = PIXEL_RANGE
        method = functools.partial(explain, composite=composite(name, low=low, high=high) if needs_bounds(name)
                                   else composite(name))
    else:
        raise ValueError(f"unknown method {name!r}; give composites ({', '.join(COMPOSITES)}) or baselines "
                         f"({', '.join(baselines.METHODS)})")

    def relevance(model: torch.nn.Module, inputs: tuple[Tensor, Tensor], target: Tensor) -> tuple[Tensor, Tensor]:
        image, words = method(model, inputs, target).relevance  # a tuple: one tensor per input
        return image, words

    return relevance


class Scores(NamedTuple):
    """One method's scores over the localisable questions, in order: each metric, the words' share of the
    absolute relevance, the image relevance of the example questions, and the time spent explaining."""

    metrics: dict[str, np.ndarray]
    word_share: np.ndarray
    examples: dict[int, np.ndarray]
    seconds: float


class Benchmark(NamedTuple):
    """What :func:`run` returns: the path of ``report.md``, the answer accuracy and the rows of ``results.csv``."""

    report: Path
    accuracy: Accuracy
    rows: list[dict]


def _score(model: torch.nn.Module, method: Relevance, questions: Sequence[Question], targets: Tensor,
           batch_size: int, examples: Sequence[int]) -> Scores:
    metrics: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    words: list[Tensor] = []
    shown: dict[int, np.ndarray] = {}
    seconds = 0.0
    x, ids, _ = batch(questions[:1])
    method(model, (x, ids), targets[:1])  # warm-up: first-call costs are not timed
    for start in range(0, len(questions), batch_size):
        part = questions[start:start + batch_size]
        x, ids, _ = batch(part)
        began = time.perf_counter()
        r_image, r_words = method(model, (x, ids), targets[start:start + batch_size])
        seconds += time.perf_counter() - began
        mask = torch.from_numpy(np.stack([q.mask for q in part]))
        for name, metric in METRICS.items():
            metrics[name].append(metric(r_image, mask))
        image_mass, word_mass = r_image.abs().sum((1, 2, 3)), r_words.abs().sum(1)
        words.append(word_mass / (image_mass + word_mass))
        shown.update({k: r_image[k - start].sum(0).numpy() for k in examples if start <= k < start + len(part)})
    return Scores({m: np.concatenate(v) for m, v in metrics.items()}, torch.cat(words).double().numpy(), shown,
                  seconds)


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean over the values that are not NaN."""
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def _rows(scores: dict[str, Scores], types: np.ndarray, correct: np.ndarray, share: np.ndarray) -> list[dict]:
    rows = []
    for subset in SUBSETS:
        for qtype in ("all", *QUESTION_TYPES):
            keep = (correct if subset == "correct" else np.ones_like(correct)) & \
                ((types == qtype) if qtype != "all" else np.ones_like(correct))
            if not keep.any():
                continue
            for name, s in scores.items():
                row: dict = {"method": name, "kind": method_kind(name), "subset": subset, "question_type": qtype,
                             "n": int(keep.sum())}
                for metric in METRICS:
                    mean, se = _mean_se(s.metrics[metric][keep])
                    row[metric], row[f"{metric}_se"] = round(mean, 6), round(se, 6)
                row["mask_share"] = round(float(share[keep].mean()), 6)
                row["word_share"] = round(float(np.nanmean(s.word_share[keep])), 6) if row["kind"] == "lrp" else ""
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- plots

def _colours(names: Sequence[str]) -> dict[str, object]:
    """LRP composites in blues and greens, baselines in warm colours, random grey."""
    from matplotlib import colormaps

    lrp = [n for n in names if method_kind(n) == "lrp"]
    other = [n for n in names if method_kind(n) == "baseline" and n != "random"]
    cool, warm = colormaps["winter"], colormaps["autumn"]
    colours: dict[str, object] = {n: cool(k / max(1, len(lrp) - 1)) for k, n in enumerate(lrp)}
    colours.update({n: warm(0.85 * k / max(1, len(other) - 1)) for k, n in enumerate(other)})
    colours["random"] = "0.6"
    return colours


def _plot_metrics(main: Sequence[dict], chance: float, path: Path, title: str) -> None:
    names = [r["method"] for r in main]
    fig = new_figure(figsize=(max(6.4, 0.7 * len(names) + 1.5), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(names))
    width = 0.8 / len(METRICS)
    for j, metric in enumerate(METRICS):
        values = [r[metric] for r in main]
        errors = [2 * r[f"{metric}_se"] if not math.isnan(r[f"{metric}_se"]) else 0 for r in main]
        ax.bar(x + (j - 1) * width, values, width, yerr=errors, capsize=1.5, label=METRIC_TEXT[metric],
               color=f"C{j}", error_kw={"linewidth": 0.8})
    ax.axhline(chance, color="0.2", linestyle="--", linewidth=1,
               label=f"chance: the masks' mean share of the image ({chance:.2f})")
    lrp = sum(method_kind(n) == "lrp" for n in names)
    if 0 < lrp < len(names):
        ax.axvline(lrp - 0.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xticks(x, [f"{n}\n(LRP)" if method_kind(n) == "lrp" else n for n in names], rotation=35, ha="right",
                  fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("fraction (larger is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    save_figure(fig, path)


def _plot_by_type(rows: Sequence[dict], names: Sequence[str], path: Path) -> None:
    types = [t for t in QUESTION_TYPES if any(r["question_type"] == t for r in rows)]
    colours = _colours(names)
    fig = new_figure(figsize=(max(7.0, 1.6 * len(types) + 2.5), 8.0))
    width = 0.8 / len(names)
    for i, metric in enumerate(METRICS):
        ax = fig.add_subplot(len(METRICS), 1, i + 1)
        for j, name in enumerate(names):
            values = [next(r[metric] for r in rows if r["method"] == name and r["question_type"] == t) for t in types]
            ax.bar(np.arange(len(types)) + (j - (len(names) - 1) / 2) * width, values, width, label=name,
                   color=colours[name])
        for k, t in enumerate(types):
            chance = next(r["mask_share"] for r in rows if r["question_type"] == t)
            ax.hlines(chance, k - 0.42, k + 0.42, color="k", linestyle="--", linewidth=1,
                      label="chance (mask share)" if k == 0 else None)
        counts = {t: next(r["n"] for r in rows if r["question_type"] == t) for t in types}
        ax.set_xticks(np.arange(len(types)), [f"{t}\n(n={counts[t]})" for t in types] if i == len(METRICS) - 1
                      else [""] * len(types))
        ax.set_ylim(0, 1)
        ax.set_ylabel(METRIC_TEXT[metric])
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.set_title("By question type (correct answers; larger is better)", fontsize=10)
            ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def _plot_examples(questions: Sequence[Question], picks: Sequence[int], predicted: Sequence[str],
                   scores: dict[str, Scores], path: Path) -> None:
    from ..visualize import heatmap

    names = list(scores)
    fig = new_figure(figsize=(0.9 * (len(names) + 1) + 0.6, 1.2 * len(picks) + 0.4))
    grid = fig.add_gridspec(len(picks), len(names) + 1, wspace=0.05, hspace=0.45)
    for row, k in enumerate(picks):
        q = questions[k]
        panels = [("image", q.image)] + [(n, np.asarray(heatmap(scores[n].examples[k], "bwr"))) for n in names]
        for col, (name, picture) in enumerate(panels):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(picture, interpolation="nearest")
            ax.contour(q.mask, levels=[0.5], colors="lime" if col == 0 else "k", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name.replace("-", "-\n", 1) if len(name) > 12 else name, fontsize=6)
            if col == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(q.text, 22)) + f"\n{q.answer} (model: {predicted[k]})",
                              fontsize=6)
            else:
                ax.set_xlabel(f"mass {scores[name].metrics['mass_accuracy'][k]:.2f}", fontsize=6, labelpad=1)
    fig.suptitle("One question per type: image relevance of the predicted answer (red for, blue against; each "
                 "map scaled to its own peak), mask outlined", fontsize=8)
    save_figure(fig, path)
    _palette(path)


def _palette(path: Path) -> None:
    """Rewrite a PNG with a palette of 256 colours: a fifth of the size, for pictures full of noise."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


# --------------------------------------------------------------------------- the report

def _pm(mean: float, se: float) -> str:
    return f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {2 * se:.3f}")


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def _names(ms: Sequence[str]) -> str:
    quoted = [f"`{m}`" for m in ms]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _above_chance(values: np.ndarray, share: np.ndarray) -> bool:
    """Whether the per-question difference to chance (the mask's share) is positive beyond two standard errors."""
    d = (values - share)[~np.isnan(values)]
    return len(d) > 1 and d.mean() > 2 * d.std(ddof=1) / math.sqrt(len(d))


def _families(metric: str, values: dict[str, float], samples: dict[str, np.ndarray]) -> str:
    """The best LRP composite against the best baseline (random aside), paired over questions."""
    ranked = sorted(values, key=lambda m: values[m], reverse=True)
    lrp = [m for m in ranked if method_kind(m) == "lrp"]
    other = [m for m in ranked if method_kind(m) == "baseline" and m != "random"]
    if not lrp or not other:
        return ""
    a, b = lrp[0], other[0]
    d, se = paired_gap(a, b, values, samples)
    margin = f"{abs(d):.3f}" + ("" if se is None else f" ± {2 * se:.3f}")
    if d * (values[a] - values[b]) < 0:  # undefined (NaN) questions differ: the paired gap covers fewer
        return (f"the best LRP composite, `{a}`, and the best baseline, `{b}`, order differently on the questions "
                f"both score (paired difference {d:+.3f}) than in the table, whose means cover each one's own "
                f"questions")
    if se is not None and abs(d) <= 2 * se:
        return f"the best LRP composite, `{a}`, and the best baseline, `{b}`, are within the noise ({margin})"
    if d > 0:
        ahead = sum(values[m] > values[b] for m in lrp)
        return (f"the best LRP composite, `{a}`, is ahead of the best baseline, `{b}`, by {margin}; {ahead} of "
                f"{len(lrp)} LRP composites score above `{b}`")
    return f"a baseline leads: `{b}` is ahead of the best LRP composite, `{a}`, by {margin}"


def _verdict(rows: Sequence[dict], subset: str, scores: dict[str, Scores], keep: np.ndarray, share: np.ndarray,
             accuracy: Accuracy, questions: int) -> list[str]:
    main = {r["method"]: r for r in rows if r["subset"] == subset and r["question_type"] == "all"}
    everything = {r["method"]: r for r in rows if r["subset"] == "all" and r["question_type"] == "all"}
    n = next(iter(main.values()))["n"]
    chance = next(iter(main.values()))["mask_share"]
    which = "localisable questions the model answers correctly" if subset == "correct" else "localisable questions"
    lines = [f"**Verdict** ({n:,} {which}, of {questions:,} held-out "
             f"questions; all metrics in [0, 1], larger is better; ±: two standard errors; chance for every metric: "
             f"the masks' mean share of the image, {chance:.3f}):",
             f"- answer accuracy: {accuracy.overall:.3f} (" + ", ".join(
                 f"{t} {a:.3f}" for t, a in accuracy.by_type.items()) + ")."]
    for metric in METRICS:
        values = {m: r[metric] for m, r in main.items() if not math.isnan(r[metric])}
        samples = {m: s.metrics[metric][keep] for m, s in scores.items()}
        ranked = sorted(values, key=lambda m: values[m], reverse=True)
        below = [m for m in ranked if not _above_chance(samples[m], share[keep])]
        text = (f"- {METRIC_TEXT[metric].capitalize()}: " + ", ".join(f"`{m}` {values[m]:.3f}" for m in ranked)
                + ". " + _first_upper(_families(metric, values, samples) or f"`{ranked[0]}` leads") + ".")
        if below:
            text += f" Not clearly above chance: {_names(below)}."
        lines.append(text)
    leaders: dict[str, tuple[str, float]] = {}  # question type -> (best method on mass accuracy, its value)
    for t in QUESTION_TYPES:
        by_t = {r["method"]: r["mass_accuracy"] for r in rows if r["subset"] == subset and r["question_type"] == t
                and r["method"] != "random" and not math.isnan(r["mass_accuracy"])}
        if by_t:
            best = max(by_t, key=lambda m: by_t[m])
            leaders[t] = best, by_t[best]
    if leaders:
        lrp_wins = [t for t, (m, _) in leaders.items() if method_kind(m) == "lrp"]
        lines.append("- By question type (mass accuracy): " + "; ".join(
            f"{t}: `{m}` {v:.3f}" for t, (m, v) in leaders.items())
            + f". An LRP composite leads on {len(lrp_wins)} of {len(leaders)} types.")
    top = lambda table: [m for m in sorted(table, key=lambda m: -table[m]["mass_accuracy"])][:3]  # noqa: E731
    if subset == "correct" and everything[next(iter(everything))]["n"] > n:
        same = top(main) == top(everything)
        lines.append(f"- With the {everything[next(iter(everything))]['n'] - n} wrongly answered localisable "
                     f"questions included (subset `all`), the top three on mass accuracy are "
                     + ("the same: " + _names(top(main)) if same else f"{_names(top(everything))} (correct only: "
                        f"{_names(top(main))})") + ".")
    shares = {m: r["word_share"] for m, r in main.items() if r["kind"] == "lrp"}
    if shares:
        low, high = min(shares.values()), max(shares.values())
        span = f"{low:.1%}" if len(shares) == 1 else f"{low:.1%} to {high:.1%}"
        lines.append(f"- LRP gives the question's words {span} of the absolute relevance (image and words together, "
                     f"mean over questions): " + ", ".join(f"`{m}` {v:.1%}" for m, v in shares.items()) + ".")
    return lines


SETUP = """\
## How it was measured

- Model: the built-in FiLM network (`lrp.models.vqa()`, image and question ids in, 19 answer logits out).
  Every method explains the logit of the answer the model predicts, over both inputs at once.
- Data: {which} held-out questions of `lrp.datasets.shapes_vqa.test_set()`, seeded and regenerated byte for
  byte. The ground-truth mask of a question holds the visible pixels of the objects it
  refers to. {unlocalisable} questions answered "no" (exist) or "zero" (count) have an empty mask (the evidence is
  an absence) and are left out of localisation; {localisable:,} are scored, {correct:,} of them answered
  correctly.
- LRP composites, through `lrp.explain(model, (images, ids), composite=...)`: {composites}. Those that put the
  z^B rule on the first layer get the pixel range 0..1 as bounds.
- Baselines, through `lrp.baselines` with the same two inputs (`method(model, (images, ids), target)`): the
  question ids are held fixed (a gradient is not defined for an id), so only the image gets relevance.
  `gradient` is signed (dS/dx); `gradient-x-input`; `integrated-gradients` from the black image, 32 midpoint
  steps; `smoothgrad`, 16 samples of Gaussian noise with sigma 0.1 of each image's value range; `occlusion`,
  {patch} x {patch} pixel patches set to 0 (black), the drop of the logit shared by the patch's pixels; `random`,
  N(0, 1) per pixel and channel (seed 0).
- Image relevance is summed over the colour channels before scoring.
"""

HOW_TO_READ = """\
- **Chance** for all three metrics is the mask's share of the image's pixels (column `mask_share`): relevance
  that ignores the image puts that share of its positive mass, of its top-K pixels and of its maximum inside the
  mask on average. `random` should land there; a method must beat it to localise anything. The pointing game
  counts a hit when any of the tied maxima lies in the mask, so a map of flat blocks has a higher chance level:
  for `occlusion`'s 4 x 4 blocks, random blocks score about 0.07 rather than 0.04, and breaking occlusion's ties
  at random would lower its pointing game by about 0.1 (measured on 34 questions).
- Subsets (column `subset`): `correct`, the localisable questions the model answers correctly (the main table, as
  in CLEVR-XAI: an explanation of a wrong answer need not point at the right objects); `all`, every localisable
  question.
- `word_share` (LRP only): the question words' share of the absolute relevance, sum |R_words| / (sum |R_image| +
  sum |R_words|), averaged over questions. The baselines hold the ids fixed and give the words none.
- ± is two standard errors of the mean over questions; the verdict compares two methods by the paired
  per-question difference (the same questions for every method).
"""

PLOTS = """\
## Plots

![metrics](metrics.png)

`metrics.png`: the three metrics per method on the main subset; error bars are two standard errors, the dashed
line is chance. LRP composites are left of the dotted line, baselines right of it.

![by type](by_type.png)

`by_type.png`: the same per question type (one panel per metric), with each type's chance level as a dashed
segment. Types differ in what the mask holds: one object (query_colour, query_shape), two (relate) or all
objects matching a description (exist, count).

![examples](examples.png)

`examples.png`: one correctly answered question per type. Left: the image with the mask outlined in green; then
each method's image relevance for the predicted answer (red: for it, blue: against; each map scaled to its own
largest magnitude, so colours do not compare across maps), with the mask outlined and the question's mass
accuracy underneath.
"""

CAVEATS = """\
## Caveats

- The masks hold the referred objects only. To answer, the model may also have to look elsewhere (to count
  triangles it must see that the other objects are not triangles; "is the circle left of the square" needs both
  objects and nothing else, but the model cannot know that without looking): relevance on that context counts
  against every method alike.
- Mass accuracy uses positive relevance only, so evidence against the answer (negative relevance) is ignored;
  rank accuracy and the pointing game use the signed values.
- Small objects make the masks small (see `mask_share`), so chance is low and the metrics are demanding.
"""


def run(
    out,
    *,
    methods: Optional[Sequence[str]] = None,
    limit: int = TEST_SIZE,
    batch_size: int = 50,
    command: str = "",
    log: Callable[[str], object] = print,
) -> Benchmark:
    """The Shapes VQA localisation benchmark on the first ``limit`` held-out questions: write ``report.md``,
    ``results.csv``, ``metrics.png``, ``by_type.png`` and ``examples.png`` into ``out``.

    ``methods``: composite and baseline names (default :func:`default_methods`); ``batch_size``: questions
    explained together. Every method explains the answer the model predicts. Seeded: the same numbers every run."""
    began = time.perf_counter()
    if not 1 <= limit <= TEST_SIZE:
        raise ValueError(f"limit must be between 1 and {TEST_SIZE} (the held-out questions), got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = list(dict.fromkeys(default_methods() if methods is None else methods))
    if not names:
        raise ValueError("give at least one method")
    resolved = {name: resolve(name) for name in names}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    model, _ = vqa()
    questions = test_set(limit)
    accuracy = vqa_accuracy(model, questions, batch_size=250)
    local = [k for k, q in enumerate(questions) if q.localisable]
    scored = [questions[k] for k in local]
    log(f"{len(questions):,} held-out questions, answer accuracy {accuracy.overall:.3f}; explaining the "
        f"{len(scored):,} localisable ones with {len(names)} methods")
    if not scored:
        raise ValueError(f"none of the first {limit} held-out questions has a ground-truth mask to score against")
    predicted = _predict(model, scored, batch_size)
    correct = np.array([accuracy.correct[k] for k in local])
    types = np.array([q.type for q in scored])
    share = np.array([q.mask.mean() for q in scored])
    picks = [next(k for k in range(len(scored)) if types[k] == t and correct[k])
             for t in QUESTION_TYPES if (correct & (types == t)).any()]

    scores: dict[str, Scores] = {}
    for name, method in resolved.items():
        scores[name] = _score(model, method, scored, predicted, batch_size, picks)
        log(f"  {name}: {1000 * scores[name].seconds / len(scored):.1f} ms per question")
    rows = _rows(scores, types, correct, share)
    write_csv(rows, folder / "results.csv")

    main = [r for r in rows if r["subset"] == "correct" and r["question_type"] == "all"] or \
        [r for r in rows if r["subset"] == "all" and r["question_type"] == "all"]
    keep = correct if main[0]["subset"] == "correct" else np.ones_like(correct)
    subset_rows = [r for r in rows if r["subset"] == main[0]["subset"]]
    _plot_metrics(main, main[0]["mask_share"], folder / "metrics.png",
                  f"Shapes VQA: localisation in the ground-truth masks ({main[0]['n']:,} questions)")
    _plot_by_type(subset_rows, names, folder / "by_type.png")
    if picks:
        _plot_examples(scored, picks, [ANSWERS[int(a)] for a in predicted], scores, folder / "examples.png")

    ms = {name: 1000 * s.seconds / len(scored) for name, s in scores.items()}
    lines = ["# Shapes VQA: a known-answer localisation benchmark", "",
             *_verdict(rows, main[0]["subset"], scores, keep, share, accuracy, len(questions)), "",
             f"answer accuracy: {accuracy.overall:.3f}", "",
             SETUP.format(which=f"the first {len(questions):,} of the {TEST_SIZE:,}" if len(questions) < TEST_SIZE
                          else f"the {TEST_SIZE:,}", unlocalisable=len(questions) - len(scored),
                          localisable=len(scored), correct=int(correct.sum()), patch=OCCLUSION_PATCH,
                          composites=", ".join(f"`{n}`" for n in names if method_kind(n) == "lrp") or "none"),
             f"Written by `lrp.evaluate.vqa_benchmark.run` in {{seconds}} s on {torch.get_num_threads()} CPU "
             f"threads" + (f" (`{command}`)." if command else "."), "",
             "## What the numbers mean", "", *glossary(METRICS), HOW_TO_READ,
             "## Results", "", _main_table(main, ms), "", *_type_tables(subset_rows, names), "",
             "### All localisable questions (wrong answers included)", "",
             _main_table([r for r in rows if r["subset"] == "all" and r["question_type"] == "all"], ms), "",
             "### Answer accuracy", "", _accuracy_table(questions, accuracy), "", PLOTS,
             CAVEATS.rstrip("\n"), *_undefined(scores, keep), "",
             "Raw numbers: `results.csv` (a row per method, subset and question type; `_se` columns: standard "
             "errors)."]
    seconds = time.perf_counter() - began
    (folder / "report.md").write_text("\n".join(lines).replace("{seconds}", f"{seconds:.0f}"), encoding="utf-8")
    log(f"wrote {folder / 'report.md'} in {seconds:.1f} s")
    return Benchmark(folder / "report.md", accuracy, rows)


def _predict(model: VQANet, questions: Sequence[Question], batch_size: int) -> Tensor:
    """The model's answer (index) to each question."""
    with torch.no_grad():
        return torch.cat([model(*batch(questions[i:i + batch_size])[:2]).argmax(1)
                          for i in range(0, len(questions), batch_size)])


def _main_table(rows: Sequence[dict], ms: dict[str, float]) -> str:
    shown = [{"method": r["method"], "kind": r["kind"], "n": r["n"],
              **{m: _pm(r[m], r[f"{m}_se"]) for m in METRICS},
              "word_share": f"{r['word_share']:.3f}" if r["word_share"] != "" else "",
              "ms_per_question": f"{ms[r['method']]:.1f}"} for r in rows]
    chance = f"{rows[0]['mask_share']:.3f}"
    shown.append({"method": "chance (mask share)", **{m: chance for m in METRICS}})
    return markdown_table(shown, ["method", "kind", "n", *METRICS, "word_share", "ms_per_question"])


def _type_tables(rows: Sequence[dict], names: Sequence[str]) -> list[str]:
    types = [t for t in QUESTION_TYPES if any(r["question_type"] == t for r in rows)]
    out = ["### By question type", ""]
    for metric in METRICS:
        table = [{"method": name, **{t: next(r[metric] for r in rows if r["method"] == name and r["question_type"] == t)
                                     for t in types}} for name in names]
        table.append({"method": "chance (mask share)",
                      **{t: next(r["mask_share"] for r in rows if r["question_type"] == t) for t in types}})
        table.append({"method": "questions",
                      **{t: str(next(r["n"] for r in rows if r["question_type"] == t)) for t in types}})
        out += [f"{METRIC_TEXT[metric].capitalize()}:", "", markdown_table(table, ["method", *types]), ""]
    return out


def _undefined(scores: dict[str, Scores], keep: np.ndarray) -> list[str]:
    """Caveats on the methods: occlusion's blocks; metrics undefined (NaN) on some questions of the main subset."""
    missing = [f"`{name}` {METRIC_TEXT[metric]} on {count}" for name, s in scores.items() for metric in METRICS
               if (count := int(np.isnan(s.metrics[metric][keep]).sum()))]
    lines = [f"- Occlusion's maps are made of {OCCLUSION_PATCH} x {OCCLUSION_PATCH} blocks, which straddle the "
             f"objects' borders."] if "occlusion" in scores else []
    if not missing:
        return lines
    return lines + ["- Undefined values are left out of a method's mean (mass accuracy: no positive image "
                    "relevance; rank accuracy and pointing game: a constant map), on these numbers of questions: "
                    + ", ".join(missing) + "."]


def _accuracy_table(questions: Sequence[Question], accuracy: Accuracy) -> str:
    rows = []
    for t in ("all", *QUESTION_TYPES):
        picked = [k for k, q in enumerate(questions) if t in ("all", q.type)]
        if picked:
            rows.append({"question_type": t, "questions": len(picked),
                         "accuracy": accuracy.overall if t == "all" else accuracy.by_type[t],
                         "localisable": sum(questions[k].localisable for k in picked),
                         "localisable_and_correct": sum(questions[k].localisable and accuracy.correct[k]
                                                        for k in picked)})
    return markdown_table(rows, ["question_type", "questions", "accuracy", "localisable", "localisable_and_correct"])


__all__ = ["run", "resolve", "default_methods", "Benchmark"]
