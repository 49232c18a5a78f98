"""Model randomisation sanity check (Adebayo et al. 2018).

Layers are re-initialised from the top (output) layer down: cumulatively (``"cascading"``) or one at a time
(``"independent"``). At each step the heatmap is compared with the one of the trained model by Spearman rank
correlation, SSIM and relative L2 change (of heatmaps scaled to a peak |R| of 1). An explanation that depends on
what the model learned changes as its layers are randomised; one that does not (an edge detector) stays the same.
The model itself is never touched: the check works on a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from ..explain import explain
from ..engine import TargetSpec, class_targets, frozen, model_output
from .methods import MethodSpec, method_name, resolve_method
from .similarity import SIMILARITIES

Tensor = torch.Tensor


@dataclass
class RandomisationResult:
    """``similarity[metric]`` is ``(steps, N)``: row 0 compares the trained model with an untouched copy of
    itself; row ``k`` is after randomising ``layers[k]`` (and, cascading, all layers before it)."""

    method: str
    mode: str
    layers: list[str]
    similarity: dict[str, np.ndarray]
    relevance: list[Tensor] = field(repr=False, default_factory=list)  # per step, the first samples
    layer_types: list[str] = field(default_factory=list)  # module class per step ("" for "none")

    def mean(self, metric: str) -> np.ndarray:
        return np.nanmean(self.similarity[metric], axis=1)

    def rows(self) -> list[dict]:
        return [{"step": k, "randomised": name, **{m: float(self.mean(m)[k]) for m in self.similarity}}
                for k, name in enumerate(self.layers)]

    def to_pandas(self):
        from .compare import _pandas
        return _pandas().DataFrame(self.rows())

    def to_csv(self, path) -> None:
        from .compare import write_csv
        write_csv(self.rows(), path)

    def plot(self, path=None, cmap: str = "bwr"):
        from .plots import plot_randomisation
        return plot_randomisation(self, path, cmap)


def parameter_layers(model: torch.nn.Module, x: Tensor) -> list[str]:
    """Names of the modules that own parameters, in the order a forward pass first runs them."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: order.append(name) if name not in order else None))
    try:
        with frozen(model), torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Re-initialise ``module``'s parameters from ``seed``. The new values are drawn on the CPU, on a copy of the
    module, and copied into it: a GPU draws other numbers from the same seed, so drawing on the module's own device
    would make the check's result depend on the device."""
    on_cpu = all(t.device.type == "cpu" for t in module.state_dict().values())
    work = module if on_cpu else copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the caller's random state stays as it was
        torch.manual_seed(seed)
        reset = getattr(work, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            for p in work.parameters(recurse=False):
                p.normal_(0.0, float(p.std()) if p.numel() > 1 else 1.0)
    if work is not module:
        module.load_state_dict(work.state_dict())  # copies into the module's tensors, on their devices


def randomisation_check(
    model: torch.nn.Module,
    x: Tensor,
    target: TargetSpec = None,
    method: MethodSpec = "epsilon-plus-flat",
    *,
    mode: str = "cascading",
    layers: Optional[Sequence[str]] = None,
    metrics: Optional[Sequence[str]] = None,
    absolute: bool = False,
    normalise: bool = True,
    seed: int = 0,
    keep: int = 4,
) -> RandomisationResult:
    """Randomise layers top-down and compare each heatmap with the trained model's.

    Args:
        target: class to explain (default: the trained model's prediction), kept for every step.
        method: a composite or baseline name, an :class:`lrp.Composite`, or ``(model, x, target) -> relevance``.
        mode: ``"cascading"`` (randomisations accumulate) or ``"independent"`` (one layer at a time).
        layers: names of the modules to randomise, in this order (default: every module with parameters,
            from the output back to the input). ``[]`` randomises nothing.
        metrics: any of ``"spearman"``, ``"ssim"`` (2-D inputs only), ``"relative_l2"`` (default: all three for
            inputs ``(N, C, H, W)`` of at least 7x7, the other two otherwise).
        absolute: compare ``|R|`` instead of signed relevance.
        normalise: divide each heatmap by its largest ``|R|`` first, so that SSIM and the L2 change measure a
            change of shape, not of scale (a randomised model's outputs, and so its relevance, are smaller).
        keep: heatmaps kept per step (first samples), for the plot.
    """
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    metrics = [metrics] if isinstance(metrics, str) else metrics  # one name, not its letters
    layers = [layers] if isinstance(layers, str) else layers
    if metrics is None:
        images = x.ndim == 4 and min(x.shape[2:]) >= 7
        metrics = ("spearman", "ssim", "relative_l2") if images else ("spearman", "relative_l2")
    unknown = [m for m in metrics if m not in SIMILARITIES]
    if unknown:
        raise ValueError(f"unknown similarity {unknown[0]!r}; choose from {sorted(SIMILARITIES)}")
    relevance_of = resolve_method(method)
    names = dict(model.named_modules())
    if layers is None:
        layers = parameter_layers(model, x)[::-1]
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"no module named {missing[0]!r} in the model; module names look like "
                         f"{[n for n in names if n][:4]}")
    fixed = [name for name in layers if next(names[name].parameters(), None) is None]
    if fixed:  # a ReLU, a Flatten: nothing to randomise, and its step would read as "the method ignores the model"
        raise ValueError(f"module {fixed[0]!r} ({type(names[fixed[0]]).__name__}) has no parameters to randomise; "
                         f"name modules with weights (default: every module with parameters)")
    with frozen(model), torch.no_grad():
        out = model_output(model(x))
    if out.ndim == 2 and out.shape[1] >= 2 or out.ndim > 2:
        idx = class_targets(out, target)
    else:  # one score: the class lrp.explain explains (a binary sigmoid head: the predicted one of two)
        idx = explain(model, x, target, composite="epsilon").target
    reference = relevance_of(model, x, idx)

    def prepare(heatmap: Tensor) -> Tensor:
        heatmap = heatmap.abs() if absolute else heatmap
        if normalise:
            peak = heatmap.abs().reshape(len(heatmap), -1).max(1).values
            heatmap = heatmap / torch.where(peak > 0, peak, torch.ones_like(peak)).view(-1, *[1] * (heatmap.ndim - 1))
        return heatmap

    ref = prepare(reference)
    scores: dict[str, list] = {m: [] for m in metrics}
    kept: list[Tensor] = []

    def record(heatmap: Tensor) -> None:
        compared = prepare(heatmap)
        for m in metrics:
            scores[m].append(SIMILARITIES[m](ref, compared))
        kept.append(heatmap[:keep].cpu())

    twin = copy.deepcopy(model)
    twin_modules = dict(twin.named_modules())
    record(relevance_of(twin, x, idx))
    for k, name in enumerate(layers, start=1):
        module = twin_modules[name]
        saved = {key: value.clone() for key, value in module.state_dict().items()}
        _randomise(module, seed + k)
        record(relevance_of(twin, x, idx))
        if mode == "independent":
            module.load_state_dict(saved)
    return RandomisationResult(method_name(method), mode, ["none", *layers],
                               {m: np.stack(v) for m, v in scores.items()}, kept,
                               ["", *(type(names[name]).__name__ for name in layers)])
