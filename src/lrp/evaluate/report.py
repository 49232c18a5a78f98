"""``lrp evaluate``: compare LRP composites with baseline methods on one model and data set; write a report.

Writes, into the output folder: ``results.csv`` (one row per method and replacement value), perturbation curve
plots ``curves_<replace>_<order>.png``, ``randomisation.csv`` and ``randomisation_<method>.png``, and
``report.md``, which puts the tables and pictures together and says how to read them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..explain import _select_output, _targets, _untouched
from .compare import Comparison, compare, write_csv
from .methods import MethodSpec, resolve_method
from .randomisation import randomisation_check

Tensor = torch.Tensor

READING = """\
How to read it:
- **AOPC** (area over the perturbation curve, Samek et al. 2017): mean drop of the explained score (the target
  class's {score}) while regions are removed in the method's order. MoRF (most relevant first): larger is
  better, the method found what the model uses. LeRF (least relevant first): smaller is better.
- **AUC**: area under the mean curve over the fraction removed; **ABPC** = AUC(LeRF) - AUC(MoRF), larger is
  better (Schulz et al. 2020).
- **sparseness** (Gini index of |R|, 0 = uniform, 1 = one pixel) and **entropy** of |R| describe how
  concentrated a heatmap is; neither is better in itself.
- **random** is the floor: a method that does not beat it on MoRF AOPC does not rank features usefully.
- Removal replaces features by: {replace}. The choice matters: on MNIST, "zero" is the background colour, so
  removing a background pixel changes nothing; "blur" and "uniform" noise remove information everywhere.
"""

REPLACE_TEXT = {"zero": "zero", "mean": "the per-channel mean", "blur": "a Gaussian-blurred copy of the input "
                "(sigma 2)", "uniform": "uniform noise in the input's value range"}


def _table(rows: list[dict], keys: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _explain_all(model: torch.nn.Module, x: Tensor, methods: Mapping[str, MethodSpec], log) -> tuple[dict, dict]:
    """Each method's relevance for ``x`` (the predicted class), and its time per input after one warm-up call."""
    with _untouched(model, True), torch.no_grad():
        idx = _targets(_select_output(model(x)), None)
    heatmaps, ms = {}, {}
    for name, spec in methods.items():
        relevance_of = resolve_method(spec)
        relevance_of(model, x[:1], None if idx is None else idx[:1])  # warm-up: first-call costs are not timed
        began = time.perf_counter()
        heatmaps[name] = relevance_of(model, x, idx)
        if heatmaps[name].is_cuda:
            torch.cuda.synchronize(heatmaps[name].device)
        ms[name] = 1000 * (time.perf_counter() - began) / len(x)
    log(f"explained {len(x)} inputs with {len(methods)} methods")
    return heatmaps, ms


def run(
    model: torch.nn.Module,
    x: Tensor,
    out_dir,
    methods: Mapping[str, MethodSpec],
    *,
    replacements: Sequence[str] = ("blur",),
    steps: int = 50,
    patch=1,
    score: str = "logit",
    masks: Optional[Tensor] = None,
    mask_note: str = "",
    randomisation_methods: Sequence[str] = (),
    randomisation_samples: int = 16,
    batch_size: int = 256,
    title: str = "Evaluation",
    description: str = "",
    command: str = "",
    log=print,
) -> Path:
    """Evaluate ``methods`` on ``model`` and ``x``; write the report into ``out_dir``; return ``report.md``."""
    began = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heatmaps, ms_per_sample = _explain_all(model, x, methods, log)
    all_rows: list[dict] = []
    sections: list[str] = []
    main: Optional[Comparison] = None
    for replace in replacements:
        t0 = time.perf_counter()
        table = compare(model, x, methods=heatmaps, masks=masks, steps=steps, patch=patch, replace=replace,
                        score=score, batch_size=batch_size)
        for row in table.rows:
            row["ms_per_sample"] = ms_per_sample[row["method"]]
        main = main or table
        log(f"replace={replace}: {len(methods)} methods x {len(x)} inputs x {steps} steps x 2 orders "
            f"in {time.perf_counter() - t0:.1f} s")
        for row in table.rows:
            all_rows.append({"method": row["method"], "replace": replace,
                             **{k: v for k, v in row.items() if k != "method"}})
        pictures = []
        for order in ("morf", "lerf"):
            name = f"curves_{replace}_{order}.png"
            table.plot(out / name, order, title=f"{order.upper()}, removed features replaced by {replace}")
            pictures.append(f"![{order} curves]({name})")
        keys = [k for k in table.rows[0] if k != "method"]
        sections.append(f"### Removed features replaced by {REPLACE_TEXT.get(replace, replace)}\n\n"
                        + _table(table.rows, ["method", *keys]) + "\n\n" + " ".join(pictures) + "\n")
    write_csv(all_rows, out / "results.csv")

    random_rows: list[dict] = []
    random_section = ""
    if randomisation_methods and randomisation_samples > 0:
        xs = x[:randomisation_samples]
        pictures = []
        for name in randomisation_methods:
            res = randomisation_check(model, xs, method=methods.get(name, name))
            res.method = name
            random_rows += [{"method": name, **row} for row in res.rows()]
            safe = name.replace("/", "_")
            res.plot(out / f"randomisation_{safe}.png")
            pictures.append(f"![randomisation {name}](randomisation_{safe}.png)")
        write_csv(random_rows, out / "randomisation.csv")
        last = [row for row in random_rows if row["step"] == max(r["step"] for r in random_rows)]
        random_section = (
            f"## Randomisation sanity check (Adebayo et al. 2018)\n\nLayers re-initialised cumulatively from the "
            f"output down, on {len(xs)} inputs; similarity of each heatmap to the trained model's. All layers "
            f"randomised:\n\n" + _table(last, ["method", "spearman", "ssim", "relative_l2"])
            + "\n\nA method whose heatmap survives randomisation (Spearman near 1) does not explain the model. "
              "Full table: `randomisation.csv`.\n\n" + " ".join(pictures) + "\n")

    assert main is not None
    lines = [f"# {title}", "", description, "",
             f"{len(x)} inputs, {steps} perturbation steps, patch size {patch} (1: single pixels), score: "
             f"{score}. Every method explains the model's predicted class. Written by `lrp evaluate` in "
             f"{time.perf_counter() - began:.0f} s" + (f" (`{command}`)." if command else "."), "",
             READING.format(score=score, replace=", ".join(REPLACE_TEXT.get(r, r) for r in replacements)), ""]
    if masks is not None and mask_note:
        lines += [f"Localisation (pointing game, relevance mass and rank accuracy) uses {mask_note}.", ""]
    lines += ["## Perturbation and complexity", "", *sections, random_section,
              "Raw numbers: `results.csv`" + (", `randomisation.csv`." if random_rows else ".")]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    log(_table(main.rows, ["method", "aopc_morf", "aopc_lerf", "abpc", "sparseness", "ms_per_sample"]))
    log(f"wrote {out / 'report.md'} in {time.perf_counter() - began:.1f} s")
    return out / "report.md"
