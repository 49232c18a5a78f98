"""Which models lrp explains: every torchvision classification model and the project's test architectures.

    python scripts/coverage.py [--out docs/coverage.md] [--only NAME ...]

For each model (random weights, one input, float32, CPU) it runs ``lrp.explain`` with ``epsilon-plus-flat``
and ``lrp0`` and reports the conservation error (|sum of input relevance / start relevance - 1|), for
ReLU-only models the relative difference of LRP-0 to gradient x input, and the seconds each call took.
A model that fails is listed with its error, never dropped.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import lrp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# modules whose presence means the model is not ReLU-only (LRP-0 then differs from gradient x input by design)
NON_RELU = (nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LayerNorm, nn.GroupNorm,
            nn.MultiheadAttention, nn.Softmax, nn.ReLU6, nn.ELU)
# models with a fixed input size or a minimum above the default
SIZES = {"vit": 224, "swin": 224, "maxvit": 224, "inception": 96, "googlenet": 64}
DEFAULT_SIZE = 64


def input_size(name: str) -> int:
    return next((size for prefix, size in SIZES.items() if name.startswith(prefix)), DEFAULT_SIZE)


def relu_only(model: nn.Module, name: str) -> bool:
    if any(isinstance(m, NON_RELU) for m in model.modules()):
        return False
    return not name.startswith(("efficientnet", "regnet_y", "mobilenet_v3", "convnext"))


def randomize_head(model: nn.Module) -> None:
    """Some torchvision models start their classifier at zero (ViT); give every layer random weights."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02)


def test_architectures() -> dict:
    """name -> (model, input, ReLU-only?); the flag is given, as these use functional activations."""
    from architectures import Conv1dNet, Hyperspectral, Residual, TabularMLP
    from test_architectures import TextClassifier
    return {
        "hyperspectral 3D CNN (tests)": (Hyperspectral(), torch.randn(1, 1, 6, 16, 16), True),
        "text CNN (Conv1d, tests)": (Conv1dNet(), torch.randn(1, 2, 64), True),
        "text transformer encoder (tokens, tests)": (TextClassifier(), torch.randint(0, 50, (1, 12)), False),
        "tabular MLP, sigmoid output (tests)": (TabularMLP(), torch.randn(1, 10), False),
        "residual CNN (tests)": (Residual(), torch.randn(1, 3, 16, 16), True),
    }


def gradient_times_input(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return g * x


def check(name: str, model: nn.Module, x: torch.Tensor, is_relu: bool) -> dict:
    row = {"name": name, "input": "x".join(map(str, x.shape[1:])), "relu": is_relu}
    for composite in ("epsilon-plus-flat", "lrp0"):
        start = time.perf_counter()
        res = lrp.explain(model, x, composite=composite)
        row[f"{composite} s"] = time.perf_counter() - start
        row[f"{composite} conservation"] = float((res.conservation["input"] - 1).abs().max())
        if composite == "lrp0" and is_relu:
            model.eval()
            reference = gradient_times_input(model, x, res.target)
            row["lrp0 vs gxi"] = float((res.relevance - reference).norm() / reference.norm())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/coverage.md")
    parser.add_argument("--only", nargs="*", help="model names to check (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = torchvision.models.list_models(module=torchvision.models)
    if args.only:
        names = [n for n in names if n in args.only]
    rows, failures = [], []
    for name in names:
        torch.manual_seed(0)
        try:
            model = torchvision.models.get_model(name, weights=None).eval()
            randomize_head(model)
            size = input_size(name)
            x = torch.rand(1, 3, size, size) * 2 - 1
            rows.append(check(name, model, x, relu_only(model, name)))
            print(f"{name}: ok", flush=True)
        except Exception as exc:  # the report lists failures with their error
            failures.append((name, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            print(f"{name}: FAILED {failures[-1][1]}", flush=True)
            traceback.print_exc()
        finally:
            model = None
    if not args.only:
        for name, (model, x, is_relu) in test_architectures().items():
            torch.manual_seed(0)
            try:
                rows.append(check(name, model, x, is_relu))
                print(f"{name}: ok", flush=True)
            except Exception as exc:
                failures.append((name, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
    write_report(Path(args.out), rows, failures, len(names))
    print(f"{len(rows)} models explained, {len(failures)} failed; wrote {args.out}")
    return 0 if not failures else 1


def write_report(path: Path, rows: list, failures: list, n_torchvision: int) -> None:
    lines = [
        "# Model coverage",
        "",
        "Generated by `make coverage` (`scripts/coverage.py`): every torchvision classification model",
        f"({n_torchvision} in torchvision {torchvision.__version__}, random weights, one input in [-1, 1]) and the",
        f"project's test architectures, on torch {torch.__version__}, CPU, 2 threads, float32.",
        "Conservation: max |sum of input relevance / start relevance - 1|; models with biases and BatchNorm shifts",
        "do not conserve exactly (biases absorb relevance), so these figures show scale, not a pass mark. With",
        "random weights some models give tiny logits (mnasnet: ~1e-8), where epsilon = 1e-6 absorbs everything, as",
        "the epsilon rule should; AttnLRP's softmax rule is not conservative (ViT, Swin, the text transformer).",
        "Seconds are wall time of one call and only indicative (see `benchmarks/speed.py` for speed).",
        "LRP-0 vs gradient x input: relative L2 difference, for ReLU-only models (where the two are equal).",
        "",
        "| model | input | epsilon-plus-flat s | conservation | lrp0 s | conservation | LRP-0 vs grad x input |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gxi = f"{r['lrp0 vs gxi']:.1e}" if "lrp0 vs gxi" in r else "n/a (not ReLU-only)"
        lines.append(f"| {r['name']} | {r['input']} | {r['epsilon-plus-flat s']:.2f} | "
                     f"{r['epsilon-plus-flat conservation']:.2e} | {r['lrp0 s']:.2f} | "
                     f"{r['lrp0 conservation']:.2e} | {gxi} |")
    lines += ["", f"Explained: {len(rows)}. Failed: {len(failures)}.", ""]
    if failures:
        lines += ["## Failures", "", "| model | error |", "|---|---|"]
        lines += [f"| {name} | {error.replace('|', '/')} |" for name, error in failures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
