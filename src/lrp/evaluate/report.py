"""``lrp evaluate``: compare LRP composites with baseline methods on one model and data set; write a report.

Writes, into the output folder: ``results.csv`` (one row per method and replacement value), perturbation curve
plots ``curves_<replace>_<order>.png``, ``randomisation.csv`` and ``randomisation_<method>.png``, and
``report.md``, which opens with a verdict computed from the results (:func:`verdict`), defines every metric
with its unit (:func:`glossary`) and puts the tables and pictures together.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..engine import class_targets, frozen, model_output
from .compare import Comparison, compare, write_csv
from .methods import MethodSpec, resolve_method
from .randomisation import randomisation_check

Tensor = torch.Tensor

SCORE_TEXT = {"logit": "logit", "probability": "softmax probability"}


def _unit(score) -> str:
    """The unit of AOPC, AUC and ABPC: that of the tracked score."""
    return {"logit": "logits", "probability": "probability (0 to 1)"}.get(score, "units of the score")


def _amount(value: float, score, decimals: int) -> str:
    unit = {"logit": " logits", "probability": " (probability)"}.get(score, "")
    return f"{value:.{decimals}f}{unit}"


# One line per metric; a line is shown when one of its columns is in the report's tables.
GLOSSARY = [
    (("aopc_morf", "aopc_lerf"),
     "`aopc_morf`, `aopc_lerf`: **AOPC**, area over the perturbation curve (Samek et al. 2017): the drop of the "
     "explained class's {score}, f(x) - f(x with the first k regions removed), averaged over the steps k = 0..steps "
     "and the inputs; in {unit}. MoRF: larger is better; LeRF: smaller is better."),
    (("auc_morf", "auc_lerf"),
     "`auc_morf`, `auc_lerf`: **AUC**, area under the perturbation curve (the score against the fraction removed, "
     "0 to 1), averaged over inputs; in {unit}. MoRF: smaller is better; LeRF: larger is better."),
    (("abpc",),
     "`abpc`: **ABPC** = AUC(LeRF) - AUC(MoRF) (Schulz et al. 2020), in {unit}; larger is better."),
    (("aopc_morf", "aopc_lerf", "auc_morf", "auc_lerf"),
     "**MoRF** / **LeRF**: the order of removal, most / least relevant region first."),
    (("sparseness",),
     "`sparseness`: Gini index of |R| (Chalasani et al. 2020), in [0, 1]: 0 = all features equal, near 1 = one "
     "feature holds everything. Describes the heatmap; not better or worse in itself."),
    (("entropy",),
     "`entropy`: Shannon entropy of |R| / sum |R| (Bhatt et al. 2020), in nats: 0 = one feature, log n = {log_n:.2f} "
     "= all {n} features equal. Describes the heatmap; not better or worse in itself."),
    (("pointing_game",),
     "`pointing_game`: **pointing game** (Zhang et al. 2018), the fraction of inputs whose most relevant feature "
     "lies in the mask; in [0, 1], larger is better."),
    (("mass_accuracy",),
     "`mass_accuracy`: **relevance mass accuracy** (Arras et al. 2022), the share of the positive relevance that "
     "lies in the mask, averaged over inputs; in [0, 1], larger is better."),
    (("rank_accuracy",),
     "`rank_accuracy`: **relevance rank accuracy** (Arras et al. 2022), the fraction of the K most relevant "
     "features (K = the mask's size) that lie in the mask, averaged over inputs; in [0, 1], larger is better."),
    (("ms_per_sample",),
     "`ms_per_sample`: time to explain one input, in milliseconds (after one warm-up call)."),
    (("spearman",),
     "`spearman`: Spearman rank correlation of a heatmap with the trained model's, in [-1, 1]; after "
     "randomisation near 0 is a pass, near 1 a fail."),
    (("ssim",),
     "`ssim`: structural similarity (Wang et al. 2004) of the two heatmaps, at most 1 (identical); after "
     "randomisation low is a pass."),
    (("relative_l2",),
     "`relative_l2`: ||R_randomised - R|| / ||R|| of heatmaps scaled to a peak |R| of 1; no unit, 0 = identical; "
     "after randomisation large is a pass."),
]


def glossary(columns, *, score="logit", features: int = 0) -> list[str]:
    """One definition line (with its unit) per metric among ``columns``, in a fixed order."""
    columns = set(columns)
    n = max(1, features)
    return ["- " + text.format(score=SCORE_TEXT.get(score, "score"), unit=_unit(score), n=n, log_n=math.log(n))
            for keys, text in GLOSSARY if columns & set(keys)]


# --------------------------------------------------------------------------- the verdict

def method_kind(name: str, spec: object = None) -> str:
    """``"lrp"`` (a composite), ``"random"`` (the floor) or ``"baseline"`` (any other method)."""
    from ..baselines import random as random_baseline
    from ..composites import COMPOSITES, Composite

    if isinstance(spec, Composite):
        return "lrp"
    key = (spec if isinstance(spec, str) else name).lower().replace("_", "-")
    if key == "random" or spec is random_baseline:
        return "random"
    return "lrp" if key in COMPOSITES else "baseline"


def paired_gap(a: str, b: str, values: Mapping[str, float], samples: Mapping[str, np.ndarray]):
    """(mean difference a - b, its standard error over inputs or None): paired, the inputs being the same."""
    if a in samples and b in samples and len(samples[a]) == len(samples[b]) and len(samples[a]) > 1:
        d = np.asarray(samples[a], dtype=float) - np.asarray(samples[b], dtype=float)
        d = d[~np.isnan(d)]
        if len(d) > 1:
            return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    return values[a] - values[b], None


SMALL = 0.02  # a difference under 2% of the larger AOPC is called small even when it is beyond noise


def _closeness(d: float, se: Optional[float], reference: float) -> str:
    """``"noise"`` (within two standard errors), ``"small"`` (under 2% of ``reference``) or ``"clear"``."""
    if se is not None and abs(d) <= 2 * se:
        return "noise"
    if abs(d) < SMALL * abs(reference):
        return "small"
    return "clear"


def _decimals(values) -> int:
    top = max((abs(v) for v in values if not math.isnan(v)), default=1.0)
    return min(6, max(2, 2 - math.floor(math.log10(top)))) if top > 0 else 2


def _perturbation_verdict(values: Mapping, samples: Mapping, kinds: Mapping[str, str], score, decimals: int) -> str:
    name = SCORE_TEXT.get(score, "score")
    fmt = lambda v: _amount(v, score, decimals)  # noqa: E731

    def diff(d, se):
        return f"{d:+.{decimals}f}" + ("" if se is None else f" ± {2 * se:.{decimals}f}")

    ranked = sorted(values, key=lambda m: values[m], reverse=True)
    kind = {m: kinds.get(m) or method_kind(m) for m in ranked}
    randoms = [m for m in ranked if kind[m] == "random"]
    best = ranked[0]
    if kind[best] == "random":
        others = [m for m in ranked if kind[m] != "random"]
        if not others:
            return f"only `random` was evaluated (MoRF AOPC {fmt(values[best])})."
        runner = others[0]
        d, se = paired_gap(best, runner, values, samples)
        return (f"no method beats random: `{best}` has the highest MoRF AOPC, {fmt(values[best])}, vs "
                f"{values[runner]:.{decimals}f} for `{runner}` ({diff(d, se)}); these rankings do not find what the "
                f"model uses.")
    label = {"lrp": "LRP", "baseline": "baseline"}
    other_kind = {"lrp": "baseline", "baseline": "lrp"}[kind[best]]
    rivals = [m for m in ranked[1:] if kind[m] == other_kind]
    if rivals:
        rival = rivals[0]
        rival_text = f"the best {'baseline' if other_kind == 'baseline' else 'LRP composite'}, `{rival}`"
    else:
        rival = next((m for m in ranked[1:] if kind[m] != "random"), None)
        rival_text = f"the runner-up, `{rival}`"
    who = f"{label[kind[best]]} `{best}`"
    if rival is None:
        text = f"{who} is the only method besides random: MoRF AOPC {fmt(values[best])}"
    else:
        d, se = paired_gap(best, rival, values, samples)
        close = _closeness(d, se, values[best])
        numbers = f"MoRF AOPC {fmt(values[best])} vs {values[rival]:.{decimals}f} for {rival_text} ({diff(d, se)})"
        if close == "noise":
            text = f"no clear winner: {who} leads by less than the noise, {numbers}"
        elif close == "small":
            text = f"{who} is ahead by a small margin ({abs(d) / abs(values[best]):.1%}): {numbers}"
        elif kind[best] == "baseline" and rivals:
            text = f"a baseline wins: {who} lowers the explained {name} fastest, {numbers}"
        else:
            text = f"{who} lowers the explained {name} fastest: {numbers}"
    if randoms:
        floor = randoms[0]
        d, se = paired_gap(best, floor, values, samples)
        if _closeness(d, se, values[best]) == "clear":
            text += f"; random: {values[floor]:.{decimals}f}."
        else:
            text += (f"; but random relevance scores {values[floor]:.{decimals}f} ({diff(d, se)} for the best): no "
                     f"better than chance here.")
    else:
        text += "."
    return text


def _randomisation_verdict(rows: Sequence[Mapping]) -> Optional[str]:
    last: dict[str, float] = {}
    steps: dict[str, int] = {}
    for row in rows:
        m, step = row["method"], int(row["step"])
        if step >= steps.get(m, -1):
            steps[m], last[m] = step, float(row["spearman"])
    if not last or max(steps.values()) == 0:
        return None
    passed = [m for m, rho in last.items() if abs(rho) <= 0.2]
    failed = [m for m, rho in last.items() if rho >= 0.5]
    partly = [m for m in last if m not in passed and m not in failed]
    names = lambda ms: " and ".join(", ".join(f"`{m}`" for m in ms).rsplit(", ", 1))  # noqa: E731
    span = lambda ms: (f"Spearman {last[ms[0]]:.2f}" if len(ms) == 1 else  # noqa: E731
                       f"Spearman {min(last[m] for m in ms):.2f} to {max(last[m] for m in ms):.2f}")
    parts = []
    if passed:
        parts.append(f"the heatmaps of {names(passed)} decorrelate from the trained model's ({span(passed)}; near 0 "
                     f"is a pass)")
    if partly:
        parts.append(f"those of {names(partly)} only partly ({span(partly)})")
    if failed:
        parts.append(f"those of {names(failed)} survive it ({span(failed)}): they depend little on what the model "
                     f"learned")
    return "Randomisation check: with every layer randomised, " + "; ".join(parts) + "."


def _localisation_verdict(rows: Sequence[Mapping], kinds: Mapping[str, str]) -> Optional[str]:
    def values(key):
        out = {}
        for row in rows:
            v = float(row.get(key, "nan") if row.get(key, "") != "" else "nan")
            if not math.isnan(v):
                out[row["method"]] = v
        return out

    mass, rank, point = values("mass_accuracy"), values("rank_accuracy"), values("pointing_game")
    if not mass:
        return None
    kind = lambda m: {"lrp": "LRP ", "baseline": ""}.get(kinds.get(m) or method_kind(m), "")  # noqa: E731
    best = max(mass, key=lambda m: mass[m])
    text = (f"Localisation: {kind(best)}`{best}` puts the largest share of its positive relevance in the mask "
            f"(mass accuracy {mass[best]:.2f}")
    best_rank = max(rank, key=lambda m: rank[m]) if rank else None
    if best_rank == best:
        text += f", rank accuracy {rank[best]:.2f}"
    text += ")"
    if best_rank is not None and best_rank != best:
        text += f"; {kind(best_rank)}`{best_rank}` has the best rank accuracy, {rank[best_rank]:.2f}"
    floor = next((m for m in mass if (kinds.get(m) or method_kind(m)) == "random"), None)
    if floor is not None:
        text += f"; random: {mass[floor]:.2f}"
    if point:
        top = max(point.values())
        hits = [m for m in point if point[m] >= top - 1e-9]
        text += (f". Pointing game: {top:.2f} at best, reached by {len(hits)} of {len(point)} methods"
                 if len(hits) > 1 else f". Pointing game: `{hits[0]}` is best, {top:.2f}")
    return text + "."


def verdict(
    rows: Sequence[Mapping],
    *,
    score="logit",
    inputs: Optional[int] = None,
    per_sample: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
    kinds: Optional[Mapping[str, str]] = None,
    randomisation: Sequence[Mapping] = (),
) -> list[str]:
    """The report's opening lines, from the results: per replacement value, the method with the largest MoRF
    AOPC against the best method of the other family (LRP or baseline) and random, then one line on the
    randomisation check and one on localisation when they ran.

    ``rows`` are the rows of ``results.csv`` (``method``, ``replace``, ``aopc_morf``, optionally the localisation
    columns; strings or numbers). ``per_sample[replace][method]`` holds per-input MoRF AOPC: differences are then
    paired over inputs and one within two standard errors is called noise. Without it, or beyond the noise,
    a difference under 2% of the larger AOPC is called small. ``kinds`` maps methods to ``"lrp"``, ``"baseline"``
    or ``"random"`` (default: by name)."""
    kinds = dict(kinds or {})
    per_sample = per_sample or {}
    by_replace: dict = {}
    for row in rows:
        value = float(row["aopc_morf"]) if row.get("aopc_morf", "") != "" else float("nan")
        if not math.isnan(value):
            by_replace.setdefault(row.get("replace") or None, {})[row["method"]] = value
    if not by_replace:
        return ["**Verdict**: no method has a MoRF AOPC to compare."]
    decimals = _decimals(v for values in by_replace.values() for v in values.values())
    on = f"{inputs:,} inputs; " if inputs else ""
    se = "; ±: two standard errors of the per-input difference" if per_sample else ""
    lines = [f"**Verdict** ({on}MoRF AOPC: how far removing the most relevant regions first lowers the explained "
             f"{SCORE_TEXT.get(score, 'score')}, in {_unit(score)}, larger is better{se}):"]
    for replace, values in by_replace.items():
        text = _perturbation_verdict(values, per_sample.get(replace, {}), kinds, score, decimals)
        lines.append(f"- {'' if replace is None else f'{replace.capitalize()} replacement: '}{text}")
    if randomisation:
        line = _randomisation_verdict(randomisation)
        if line:
            lines.append(f"- {line}")
    first = next(iter(by_replace))
    line = _localisation_verdict([r for r in rows if (r.get("replace") or None) == first], kinds)
    if line:
        lines.append(f"- {line}")
    return lines


REPLACE_TEXT = {"zero": "zero", "mean": "the per-channel mean", "blur": "a Gaussian-blurred copy of the input "
                "(sigma 2)", "uniform": "uniform noise in the input's value range"}


def markdown_table(rows: list[dict], keys: Sequence[str]) -> str:
    """``rows`` as a Markdown table with the columns ``keys`` (floats with 3 decimals)."""
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _explain_all(model: torch.nn.Module, x: Tensor, methods: Mapping[str, MethodSpec], log) -> tuple[dict, dict]:
    """Each method's relevance for ``x`` (the predicted class), and its time per input after one warm-up call."""
    with frozen(model), torch.no_grad():
        idx = class_targets(model_output(model(x)), None)
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
    per_sample: dict[str, dict[str, np.ndarray]] = {}
    columns: list[str] = []
    for replace in replacements:
        t0 = time.perf_counter()
        table = compare(model, x, methods=heatmaps, masks=masks, steps=steps, patch=patch, replace=replace,
                        score=score, batch_size=batch_size)
        for row in table.rows:
            row["ms_per_sample"] = ms_per_sample[row["method"]]
        main = main or table
        per_sample[replace] = {name: c["morf"].aopc for name, c in table.curves.items() if "morf" in c}
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
        columns += [k for k in keys if k not in columns]
        sections.append(f"### Removed features replaced by {REPLACE_TEXT.get(replace, replace)}\n\n"
                        + markdown_table(table.rows, ["method", *keys]) + "\n\n" + " ".join(pictures) + "\n")
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
            f"randomised:\n\n" + markdown_table(last, ["method", "spearman", "ssim", "relative_l2"])
            + "\n\nA method whose heatmap survives randomisation (Spearman near 1) does not explain the model. "
              "Full table: `randomisation.csv`.\n\n" + " ".join(pictures) + "\n")

    assert main is not None
    kinds = {name: method_kind(name, spec) for name, spec in methods.items()}
    opening = verdict(all_rows, score=score, inputs=len(x), per_sample=per_sample, kinds=kinds,
                      randomisation=random_rows)
    if random_rows:
        columns += ["spearman", "ssim", "relative_l2"]
    features = math.prod(x.shape[2:]) if x.ndim >= 3 else x.shape[1]
    lines = [f"# {title}", "", *opening, "", description, "",
             f"{len(x)} inputs, {steps} perturbation steps, patch size {patch} (1: single pixels), score: "
             f"{SCORE_TEXT.get(score, score)}. Every method explains the model's predicted class. Written by "
             f"`lrp evaluate` in {time.perf_counter() - began:.0f} s" + (f" (`{command}`)." if command else "."), "",
             "## What the numbers mean", "",
             *glossary(columns, score=score, features=features),
             "- **random** (relevance drawn at random) is the floor: a method that does not beat it on MoRF AOPC does "
             "not rank features usefully.",
             "- Removed features are replaced by " + ", ".join(REPLACE_TEXT.get(r, r) for r in replacements)
             + ". The choice matters: on MNIST, \"zero\" is the background colour, so removing a background pixel "
               "changes nothing; \"blur\" and \"uniform\" noise remove information everywhere.", ""]
    if masks is not None and mask_note:
        lines += [f"Localisation (pointing game, relevance mass and rank accuracy) uses {mask_note}.", ""]
    lines += ["## Perturbation and complexity", "", *sections, random_section,
              "Raw numbers: `results.csv`" + (", `randomisation.csv`." if random_rows else ".")]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    log(markdown_table(main.rows, ["method", "aopc_morf", "aopc_lerf", "abpc", "sparseness", "ms_per_sample"]))
    log(f"wrote {out / 'report.md'} in {time.perf_counter() - began:.1f} s")
    return out / "report.md"
