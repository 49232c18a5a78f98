"""Speed and memory of lrp.explain next to a plain gradient and zennit, on torchvision vgg16 / resnet50 / vit_b_16,
on the CPU or a CUDA GPU.

    .venv/bin/python benchmarks/speed.py [--device {cpu,cuda}] [--models M,...] [--batches B,...]
                                         [--autocast {none,bf16,fp16}] [--quick] [--compile] [--out FILE]

Defaults: --device cpu: --models vgg16,resnet50, --batches 1,8 (--quick: 1); --device cuda: --models
vgg16,resnet50,vit_b_16, --batches 1,32 (also with --quick). --quick: 3 timed repetitions instead of 7.

Time: every method is warmed up twice, then called round-robin (the starting method rotates each round) so
that machine drift hits all methods alike; the table shows the median. On cuda, torch.cuda.synchronize() runs
before each timer is read, and torch's default TF32 settings are kept. Memory on the CPU: each (model, batch,
method) runs in a fresh subprocess (``--measure-memory MODEL BATCH METHOD``) that reports the rise of its peak
resident set size over one warm-up and one measured call. Memory on cuda (in this process, after the warm-ups):
torch.cuda.max_memory_allocated() over one call minus torch.cuda.memory_allocated() right before it, so model
weights and input are not counted. Ratios are to ``grad x input`` for the same model and batch.

--autocast bf16|fp16 (fp16: cuda only) runs forward, grad x input and the lrp methods inside
torch.autocast(device, dtype) (zennit stays float32) and prints, per model and batch, the cosine similarity
between the lrp epsilon-plus-flat relevance under autocast and in float32 for the same input and target (the
float32 prediction): per sample over the flattened relevance, mean (and min) over the samples; the acceptance
bound is >= 0.99.

Models have random weights (fixed seed); vit_b_16's classifier, which torchvision initialises to zero (all
logits 0, all relevance 0), gets normal(0, 0.02) weights. Zennit is not run on vit_b_16 (n/a): it has no
canonizer or rules for attention. The rows "lrp Explainer ... (replayed)" (one ``lrp.Explainer`` built and
called six times outside the timing, so that every timed call replays its recorded program; on a GPU the last
three calls capture, check and use its CUDA graph) appear only when the installed lrp has ``lrp.Explainer``. Their memory on the CPU is the rise over two replays after the freed memory of the
warm-up calls is given back to the system; the weight-derived tensors the explainer keeps (``W+``, merged
BatchNorms), allocated once by its first replay, are not in it. --compile adds a row of an explainer with
``compile=True`` (its program compiled by torch.compile in the warm-up calls: about a minute per row here). On cuda a note per explainer says whether its
replays ran as a CUDA graph and the memory it holds between calls (graph pool and kept tensors), which the
peak column (allocations during a call) does not show.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import lrp

from harness import (argument_parser, check_device, comma_list, cuda_memory, fmt, gpu_line,  # benchmarks/harness.py
                     int_list, machine_lines, memory_in_subprocesses, print_rss_rise, ratio, refuse, report,
                     time_runs, warmed_explainer, EXPLAINER_NOTES)

THREADS = 2
# model -> zennit canonizer (None: zennit has no canonizer/rules for the model, its rows are n/a)
MODELS: dict[str, Optional[type]] = {"vgg16": VGGCanonizer, "resnet50": ResNetCanonizer, "vit_b_16": None}
DEFAULT_MODELS = {"cpu": "vgg16,resnet50", "cuda": "vgg16,resnet50,vit_b_16"}
DEFAULT_BATCHES = {"cpu": "1,8", "cuda": "1,32"}
QUICK_BATCHES = {"cpu": "1", "cuda": "1,32"}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ZENNIT_NA = ("Zennit 0.5.1 has no canonizer or rules for attention (nn.MultiheadAttention, the class token and "
             "position embedding), so it is not run")


def available_methods() -> dict[str, str]:
    """Method key -> label in the table; "grad x input" is the reference for the ratios. The Explainer rows
    exist only when the installed lrp has ``lrp.Explainer`` (see the module docstring)."""
    methods = {"forward": "forward", "grad": "grad x input", "lrp-epf": "lrp epsilon-plus-flat"}
    if hasattr(lrp, "Explainer"):
        methods["lrp-epf-explainer"] = "lrp Explainer epsilon-plus-flat (replayed)"
        methods["lrp-epf-explainer-compiled"] = "lrp Explainer epsilon-plus-flat (replayed, compiled)"
    methods["lrp-egb"] = "lrp epsilon-gamma-box"
    if hasattr(lrp, "Explainer"):
        methods["lrp-egb-explainer"] = "lrp Explainer epsilon-gamma-box (replayed)"
    methods.update({"zennit-epf": "zennit EpsilonPlusFlat", "zennit-egb": "zennit EpsilonGammaBox"})
    return methods


METHODS = available_methods()
REFERENCE = "grad"


@dataclass(frozen=True)
class Setup:
    device: str  # "cpu" or "cuda"
    autocast: str  # a key of AUTOCAST
    reps: int

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST[self.autocast]


def load_model(name: str, device: str = "cpu") -> torch.nn.Module:
    """Random weights (fixed seed), eval mode, no parameter gradients, on ``device``."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if name.startswith("vit_"):  # torchvision zero-initialises the classifier: every logit and relevance is 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def make_input(batch: int, device: str = "cpu") -> torch.Tensor:
    """The same values on every device (drawn on the CPU, then moved)."""
    torch.manual_seed(1)
    return torch.randn(batch, 3, 224, 224).to(device)


def one_hot_times_output(out: torch.Tensor) -> torch.Tensor:
    """Start relevance for zennit: the predicted class's logit (lrp's default ``start="score"``)."""
    return torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0) * out.detach()


def applicable(key: str, model_name: str) -> bool:
    """zennit only runs on models it has a canonizer for."""
    return not key.startswith("zennit") or MODELS[model_name] is not None


def make_method(key: str, model_name: str, model: torch.nn.Module, x: torch.Tensor,
                stack: contextlib.ExitStack) -> Callable[[], object]:
    """A zero-argument callable running one method on ``x``.

    zennit methods get their own deep copy of the model, with the attributor context entered once on ``stack``
    (hook registration and canonizing are one-off costs); the canonizers change only that copy, so lrp and the
    baselines always run on the untouched model. Likewise the lrp Explainer is built once, outside the timing.
    """
    if key == "forward":
        def run():
            with torch.no_grad():
                return model(x)
        return run
    if key == "grad":
        def run():
            leaf = x.detach().requires_grad_(True)
            out = model(leaf)
            one_hot = torch.zeros_like(out).scatter_(1, out.argmax(1, keepdim=True), 1.0)
            (g,) = torch.autograd.grad(out, leaf, one_hot)  # gradient of the predicted-class logit
            return leaf.detach() * g
        return run
    if key == "lrp-epf":
        return lambda: lrp.explain(model, x, composite="epsilon-plus-flat").relevance
    if key == "lrp-egb":
        comp = lrp.composite("epsilon-gamma-box", low=-3.0, high=3.0)
        return lambda: lrp.explain(model, x, composite=comp).relevance
    if key in ("lrp-epf-explainer", "lrp-egb-explainer", "lrp-epf-explainer-compiled"):
        composite = "epsilon-plus-flat" if key != "lrp-egb-explainer" else \
            lrp.composite("epsilon-gamma-box", low=-3.0, high=3.0)
        explainer = lrp.Explainer(model, composite=composite, compile=key.endswith("-compiled"))
        # explained eagerly, recorded, then replayed (the first replay builds the weight-derived tensors the
        # explainer keeps; on a GPU the next ones capture and check its CUDA graph): every timed or measured call
        # is a replay as the ones that follow
        return warmed_explainer(explainer, lambda: explainer(x).relevance, x.device.type,
                                f"{model_name} batch {x.shape[0]} {METHODS[key]}")
    if key in ("zennit-epf", "zennit-egb"):
        return make_zennit(key, model_name, model, x, stack)
    raise ValueError(f"unknown method {key!r}")


def make_zennit(key: str, model_name: str, model: torch.nn.Module, x: torch.Tensor,
                stack: contextlib.ExitStack) -> Callable[[], object]:
    canonizer = MODELS[model_name]
    if canonizer is None:
        raise ValueError(f"zennit is not run on {model_name}: {ZENNIT_NA}")
    if key == "zennit-epf":
        comp = EpsilonPlusFlat(canonizers=[canonizer()])
    else:
        comp = EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[canonizer()])
    attributor = stack.enter_context(Gradient(model=copy.deepcopy(model), composite=comp))
    # a fresh leaf per call: zennit would otherwise set requires_grad on the shared input in place
    return lambda: attributor(x.detach().requires_grad_(True), one_hot_times_output)[1]


def with_autocast(key: str, run: Callable[[], object], setup: Setup) -> Callable[[], object]:
    """``run`` inside torch.autocast when --autocast is set; zennit methods stay float32."""
    if setup.dtype is None or key.startswith("zennit"):
        return run

    def autocast_run() -> object:
        with torch.autocast(setup.device, dtype=setup.dtype):
            return run()
    return autocast_run


def build_runs(model_name: str, model: torch.nn.Module, x: torch.Tensor, setup: Setup,
               stack: contextlib.ExitStack, errors: list[str], tag: str) -> dict[str, Callable[[], object]]:
    """The callables of every method that applies to the model; a setup that raises is left out."""
    runs: dict[str, Callable[[], object]] = {}
    for key in METHODS:
        if not applicable(key, model_name):
            continue
        try:
            runs[key] = with_autocast(key, make_method(key, model_name, model, x, stack), setup)
        except Exception:
            errors.append(f"{tag} {METHODS[key]} (setup):\n{traceback.format_exc()}")
    return runs


# --------------------------------------------------------------------------- memory

def measure_memory(model_name: str, batch: int, key: str, setup: Setup) -> None:
    """(CPU, child process) Print the peak RSS rise (MB) over one warm-up + one measured call, as one JSON line."""
    torch.set_num_threads(THREADS)
    model = load_model(model_name)
    x = make_input(batch)
    with contextlib.ExitStack() as stack:
        # an explainer's warm-up calls (eager, recording) ran when it was built: its freed memory is given back
        # first (malloc_trim), so that the replays' own allocations count, as the other methods' do
        print_rss_rise(with_autocast(key, make_method(key, model_name, model, x, stack), setup),
                       trim=key.endswith("-explainer"))


def memory(model_name: str, batch: int, keys: list[str], setup: Setup) -> dict[str, Optional[float]]:
    """(CPU) Peak RSS rise per method, each in a fresh subprocess (``--measure-memory MODEL BATCH METHOD``)."""
    def child_args(key: str) -> list[str]:
        return [model_name, str(batch), key, "--autocast", setup.autocast]
    return memory_in_subprocesses(__file__, keys, child_args, f"{model_name} batch {batch}")


# --------------------------------------------------------------------------- one model and batch

def bench(model_name: str, model: torch.nn.Module, batch: int, setup: Setup,
          errors: list[str]) -> tuple[dict[str, float], dict[str, Optional[float]]]:
    """Median seconds and peak extra MB per method (methods that do not apply or failed are missing)."""
    tag = f"{model_name} batch {batch}"
    x = make_input(batch, setup.device)
    with contextlib.ExitStack() as stack:
        runs = build_runs(model_name, model, x, setup, stack, errors, tag)
        medians = time_runs(runs, setup.device, setup.reps, METHODS, errors, tag)
        if setup.device == "cuda":
            return medians, cuda_memory(runs, METHODS, errors, tag)
    del x, runs
    return medians, memory(model_name, batch, [k for k in METHODS if applicable(k, model_name)], setup)


# --------------------------------------------------------------------------- autocast agreement

def autocast_cosine(model: torch.nn.Module, batch: int, setup: Setup) -> tuple[float, float]:
    """Cosine similarity of the epsilon-plus-flat relevance under autocast to the float32 one, per sample
    (flattened), for the float32 prediction as target in both: (mean, min) over the samples."""
    x = make_input(batch, setup.device)
    ref = lrp.explain(model, x, composite="epsilon-plus-flat")
    with torch.autocast(setup.device, dtype=setup.dtype):
        low = lrp.explain(model, x, target=ref.target, composite="epsilon-plus-flat")
    cos = torch.nn.functional.cosine_similarity(low.relevance.flatten(1).double(),
                                                ref.relevance.flatten(1).double(), dim=1)
    return cos.mean().item(), cos.min().item()


def cosine_line(model_name: str, model: torch.nn.Module, batch: int, setup: Setup, errors: list[str]) -> str:
    what = (f"- {model_name} batch {batch}: cosine(lrp epsilon-plus-flat relevance, {setup.autocast} autocast "
            f"vs float32)")
    try:
        mean, low = autocast_cosine(model, batch, setup)
    except Exception:
        errors.append(f"{model_name} batch {batch} autocast cosine:\n{traceback.format_exc()}")
        return f"{what}: n/a (failed, see Errors)"
    return f"{what}: mean {mean:.5f}, min {low:.5f}; bound >= 0.99: {'ok' if mean >= 0.99 else 'NOT MET'}"


# --------------------------------------------------------------------------- report

def table_rows(model_name: str, batch: int, medians: dict[str, float], mem: dict[str, Optional[float]],
               time_spec: str) -> list[str]:
    t_ref, m_ref = medians.get(REFERENCE), mem.get(REFERENCE)
    rows = []
    for key, label in METHODS.items():
        t, m = medians.get(key), mem.get(key)
        rows.append(f"| {model_name} | {batch} | {label} | {fmt(t, time_spec)} | {fmt(ratio(t, t_ref), '.2f')} | "
                    f"{fmt(m, '.0f')} | {fmt(ratio(m, m_ref), '.2f')} |")
    return rows


def header_lines(setup: Setup) -> list[str]:
    lines = machine_lines([f"torchvision {torchvision.__version__}", f"zennit {metadata.version('zennit')}",
                           f"lrp {lrp.__version__}"])
    if setup.device == "cuda":
        lines.append(gpu_line(f"torch's default TF32 settings (float32 matmul precision "
                              f"{torch.get_float32_matmul_precision()!r}, cuDNN allow_tf32 "
                              f"{torch.backends.cudnn.allow_tf32}); "))
    lines.append(f"- float32, 224x224, random weights; {setup.reps} timed repetitions after 2 warm-ups, "
                 f"round-robin, median")
    if setup.dtype is not None:
        lines.append(f"- autocast: forward, grad x input and lrp run under torch.autocast({setup.device!r}, "
                     f"dtype={setup.dtype}) (weights and input stay float32); zennit runs in float32")
    return lines


# --------------------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argument_parser(__doc__)  # with --device
    parser.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: cpu "
                                         f"{DEFAULT_MODELS['cpu']}, cuda {DEFAULT_MODELS['cuda']})")
    parser.add_argument("--batches", help="comma list of batch sizes (default: cpu 1,8, --quick 1; cuda 1,32)")
    parser.add_argument("--autocast", choices=list(AUTOCAST), default="none",
                        help="run forward, gradient and lrp under torch.autocast with this dtype (fp16: cuda only)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 repetitions (and batch 1 on cpu)")
    parser.add_argument("--compile", action="store_true",
                        help="add a row of the Explainer with compile=True (torch.compile: a minute per row to build)")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "BATCH", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Models and batch sizes to run; refuses what cannot run here."""
    check_device(args.device)
    if args.device == "cpu" and args.autocast == "fp16":
        refuse("--autocast fp16 is for --device cuda only; on the CPU use --autocast bf16 or none")
    models = comma_list(args.models or DEFAULT_MODELS[args.device])
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        refuse(f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    batch_text = args.batches or (QUICK_BATCHES if args.quick else DEFAULT_BATCHES)[args.device]
    batches = int_list(batch_text)
    if not batches or min(batches) < 1:
        refuse(f"--batches: expected a comma list of positive integers, got {batch_text!r}")
    return models, batches


def main() -> None:
    args = parse_args()
    if args.measure_memory:
        model_name, batch, key = args.measure_memory
        measure_memory(model_name, int(batch), key, Setup("cpu", args.autocast, 1))
        return
    models, batches = check_args(args)
    if not args.compile:
        METHODS.pop("lrp-epf-explainer-compiled", None)
    torch.set_num_threads(THREADS)
    setup = Setup(args.device, args.autocast, 3 if args.quick else 7)
    header = header_lines(setup)
    print("\n".join(header), flush=True)

    errors: list[str] = []
    cosines: list[str] = []
    rows = ["| model | batch | method | median s | ratio | peak extra MB | MB ratio |",
            "|---|---:|---|---:|---:|---:|---:|"]
    time_spec = ".5f" if setup.device == "cuda" else ".4f"
    for model_name in models:
        model = load_model(model_name, setup.device)
        for batch in batches:
            medians, mem = bench(model_name, model, batch, setup, errors)
            new_rows = table_rows(model_name, batch, medians, mem, time_spec)
            rows += new_rows
            print("\n".join("  " + r for r in new_rows), file=sys.stderr, flush=True)  # partial results
            if setup.dtype is not None:
                cosines.append(cosine_line(model_name, model, batch, setup, errors))
                print("  " + cosines[-1], file=sys.stderr, flush=True)
        del model
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.empty_cache()

    table = "\n".join(rows)
    notes = [f"- zennit on {m}: n/a. {ZENNIT_NA}." for m in models if MODELS[m] is None] + cosines + \
        EXPLAINER_NOTES
    report(header, table, notes, errors, args.out)


if __name__ == "__main__":
    main()
