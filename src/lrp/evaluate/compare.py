"""One call that scores several explanation methods on one model and data set."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .perturbation import class_scores
from ..engine import TargetSpec, class_targets, frozen, model_output
from .complexity import entropy, sparseness
from .features import PatchSpec
from .localisation import pointing_game, relevance_mass_accuracy, relevance_rank_accuracy
from .methods import MethodSpec, method_name, resolve_method
from .perturbation import PerturbationCurve, Replacement, Score, perturbation_curve

Tensor = torch.Tensor
DEFAULT_METHODS = ("epsilon-plus-flat", "epsilon-alpha2-beta1", "gradient", "gradient-x-input",
                   "integrated-gradients", "smoothgrad", "random")


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install pandas (rows() and to_csv() work without it)") \
            from None
    return pandas


def write_csv(rows: list[dict], path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _format(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@dataclass
class Comparison:
    """Per-method means in ``rows``; per-sample curves in ``curves[method][order]``; heatmaps in
    ``relevance[method]``."""

    rows: list[dict]
    curves: dict[str, dict[str, PerturbationCurve]] = field(repr=False)
    relevance: dict[str, Tensor] = field(repr=False)

    def to_pandas(self):
        return _pandas().DataFrame(self.rows).set_index("method")

    def to_csv(self, path) -> None:
        write_csv(self.rows, path)

    def to_markdown(self) -> str:
        keys = list(self.rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_format(row[k]) for k in keys) + " |" for row in self.rows]
        return "\n".join(lines)

    __str__ = to_markdown

    def plot(self, path=None, order: str = "morf", title: Optional[str] = None):
        from .plots import plot_curves
        curves = {name: by_order[order] for name, by_order in self.curves.items() if order in by_order}
        return plot_curves(curves, path, title)


def compare(
    model: torch.nn.Module,
    x: Tensor,
    target: TargetSpec = None,
    methods: Union[Sequence[MethodSpec], Mapping[str, MethodSpec]] = DEFAULT_METHODS,
    *,
    masks: Optional[Tensor] = None,
    orders: Sequence[str] = ("morf", "lerf"),
    steps: Optional[int] = None,
    patch: PatchSpec = 1,
    replace: Replacement = "zero",
    score: Score = "logit",
    batch_size: int = 256,
) -> Comparison:
    """Explain ``x`` with each method and score it: AOPC and AUC of the perturbation curves (``orders``),
    ABPC (``AUC_lerf - AUC_morf``, when both), sparseness and entropy, and with ``masks`` the pointing game,
    relevance mass and rank accuracy. Methods are names (composites or baselines), :class:`lrp.Composite`
    objects, functions ``(model, x, target) -> relevance`` or relevance tensors computed beforehand (no time
    then); a mapping gives them display names. ``ms_per_sample`` is the time to explain, per input, after one
    warm-up call on the first input.
    All methods explain the same target (default: the model's prediction on ``x``)."""
    methods = [methods] if isinstance(methods, str) else methods  # one name, not its letters
    orders = (orders,) if isinstance(orders, str) else orders
    if isinstance(methods, Mapping):
        named = dict(methods)
    else:
        names = [method_name(m) for m in methods]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two methods are called {repeated[0]!r}; pass a mapping {{name: method}} to tell "
                             f"them apart")
        named = dict(zip(names, methods))
    if not named:
        raise ValueError("compare needs at least one method")
    with frozen(model), torch.no_grad():
        idx = class_targets(class_scores(model, x, model_output(model(x))), target)
    rows: list[dict] = []
    curves: dict[str, dict[str, PerturbationCurve]] = {}
    heatmaps: dict[str, Tensor] = {}
    for name, spec in named.items():
        relevance_of = resolve_method(spec)
        if not isinstance(spec, Tensor):  # a warm-up on the first input, as lrp evaluate's report makes: a
            try:  # process's first-call costs are not timed
                relevance_of(model, x[:1], None if idx is None else idx[:1])
            except Exception:  # said by the call on the whole batch below, in its terms
                pass
        began = time.perf_counter()
        relevance = relevance_of(model, x, idx)
        if relevance.is_cuda:
            torch.cuda.synchronize(relevance.device)
        seconds = time.perf_counter() - began
        row: dict = {"method": name}
        curves[name] = {}
        for order in orders:
            curve = perturbation_curve(model, x, relevance, idx, order=order, steps=steps, patch=patch,
                                       replace=replace, score=score, batch_size=batch_size)
            curves[name][order] = curve
            row[f"aopc_{order}"] = float(curve.aopc.mean())
            row[f"auc_{order}"] = float(curve.auc.mean())
        if "morf" in curves[name] and "lerf" in curves[name]:
            row["abpc"] = float((curves[name]["lerf"].auc - curves[name]["morf"].auc).mean())
        row["sparseness"] = float(np.nanmean(sparseness(relevance)))
        row["entropy"] = float(np.nanmean(entropy(relevance)))
        if masks is not None:
            row["pointing_game"] = float(np.nanmean(pointing_game(relevance, masks)))
            row["mass_accuracy"] = float(np.nanmean(relevance_mass_accuracy(relevance, masks)))
            row["rank_accuracy"] = float(np.nanmean(relevance_rank_accuracy(relevance, masks)))
        row["ms_per_sample"] = float("nan") if isinstance(spec, Tensor) else 1000 * seconds / x.shape[0]
        rows.append(row)
        heatmaps[name] = relevance.cpu()
    return Comparison(rows, curves, heatmaps)
