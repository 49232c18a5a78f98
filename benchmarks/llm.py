"""Speed and memory of lrp's AttnLRP on a causal language model (a random-weight Llama) next to the plain gradient
and LXT 2.1's efficient AttnLRP, on the CPU or a CUDA GPU.

    .venv/bin/python benchmarks/llm.py [--device {cpu,cuda}] [--size {small,1b}] [--dtype {float32,bfloat16}]
                                       [--seqs N,...] [--attn {eager,sdpa}] [--threads N] [--quick]
                                       [--out FILE]

Defaults: --device cpu: --size small, --dtype float32, --seqs 128,512; --device cuda: --size 1b, --dtype
bfloat16, --seqs 512,2048. --attn eager. --threads 2 (torch's CPU threads). --quick: 3 timed repetitions
instead of 7.

Model: LlamaForCausalLM built from a config with transformers' random initialisation (fixed seed), eval mode,
parameters frozen (requires_grad False), cast to --dtype. --size 1b: hidden 2048, 16 layers, 32 heads / 8
key-value heads, intermediate 8192, vocab 32000 (about 1.1B parameters); --size small: hidden 256, 4 layers,
8 / 2 heads, intermediate 1024, vocab 8000. Input: random token ids, batch 1. Every method explains the same
target: the logit of the predicted next token at the last position (the prediction of one forward beforehand).
Every method computes the logits of all positions, as LXT's example and ``lrp.language.NextToken`` do.

Methods (the table's rows):
- forward: ``lm(input_ids=ids)`` under no_grad, for scale.
- gradient x input: the embeddings ``lm.get_input_embeddings()(ids)`` as a leaf, a forward with
  ``inputs_embeds``, the gradient of the target logit; relevance ``(emb * grad).sum(-1)``. The reference of
  the ratios.
- lrp epsilon (AttnLRP): ``lrp.explain(lrp.language.NextToken(lm), ids, target=t, composite="epsilon")``.
- lrp Explainer epsilon: one ``lrp.Explainer(NextToken(lm), composite="epsilon")`` built and called six
  times (eager, recorded, first replay; on a GPU also its CUDA graph's capture, check and first use) before any
  timing or memory measurement: the row is its replays. A note per explainer says whether they ran as a CUDA
  graph and, on a GPU, the memory it holds between calls.
- LXT 2.1 efficient AttnLRP: LXT's monkey patch for Llama (``lxt.efficient.monkey_patch(modeling_llama,
  lxt.efficient.models.llama.attnLRP)``) on its own copy of the model; then as gradient x input. LXT patches
  classes and module globals process-wide, so the patch is applied once, the attributes it changed are
  recorded and restored, and each LXT call switches them on for its duration (forward and backward) and off
  again; the lrp and gradient rows therefore run unpatched (checked: the unpatched model's logits are the same
  before and after). The row is n/a (never replaced by anything else) when ``lxt.efficient`` does not import
  or the installed transformers is not 4.51.x, the version LXT 2.1 patches.
  The LXT row's note gives the agreement of lrp epsilon's relevance with LXT's, per token: cosine similarity
  and relative L2 distance ``||r_lrp - r_lxt|| / ||r_lxt||`` (in float64); also that of lrp's "lrp0"
  composite (computed once, untimed), LXT's exact counterpart (LXT has no epsilon at the linear layers), so
  that what "epsilon" differs by is its epsilon. The gradient row's note gives gradient x input against LXT,
  for scale.

Time: every method is warmed up twice, then called round-robin (the starting method rotates each round) so
that machine drift hits all methods alike; the table shows the median in milliseconds. On cuda,
torch.cuda.synchronize() runs before each timer is read. Memory on the CPU: each (sequence length, method)
runs in a fresh subprocess (``--measure-memory SEQ METHOD``) that reports the rise of its peak resident set
size over one warm-up and one measured call. Memory on cuda (in this process, after the timing):
torch.cuda.max_memory_allocated() over one call minus torch.cuda.memory_allocated() right before it, so model
weights and input are not counted. Ratios are to ``gradient x input`` at the same sequence length.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import traceback
import warnings
from contextlib import contextmanager
from importlib import metadata
from typing import Callable, Iterator, Optional

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

import lrp
import lrp.language

from harness import (argument_parser, check_device, cuda_memory, fmt, gpu_line, int_list,  # benchmarks/harness.py
                     machine_lines, memory_in_subprocesses, print_rss_rise, ratio, refuse, release_memory, report,
                     time_runs, warmed_explainer, EXPLAINER_NOTES)

THREADS = 2
SIZES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1024, vocab_size=8000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=32000),
}
DEFAULTS = {"cpu": dict(size="small", dtype="float32", seqs="128,512"),
            "cuda": dict(size="1b", dtype="bfloat16", seqs="512,2048")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LXT_TRANSFORMERS = "4.51."  # the transformers LXT 2.1's patches are written for
METHODS = {"forward": "forward (no grad)", "grad": "gradient x input", "lrp": "lrp epsilon (AttnLRP)",
           "lrp-explainer": "lrp Explainer epsilon (replayed)", "lxt": "LXT 2.1 efficient AttnLRP"}
REFERENCE = "grad"


# --------------------------------------------------------------------------- LXT

def lxt_unavailable() -> Optional[str]:
    """Why the LXT row cannot run here, or None when it can."""
    try:
        import lxt.efficient  # noqa: F401
        import lxt.efficient.models.llama  # noqa: F401
    except Exception as exc:  # ImportError, or an import-time failure against this transformers
        return f"n/a (lxt not installed / transformers {transformers.__version__}: {type(exc).__name__}: {exc})"
    if not transformers.__version__.startswith(LXT_TRANSFORMERS):
        return (f"n/a (lxt {lxt_version()} patches transformers {LXT_TRANSFORMERS}x; installed transformers "
                f"{transformers.__version__})")
    return None


def lxt_version() -> str:
    try:
        return metadata.version("lxt")
    except metadata.PackageNotFoundError:
        return "not installed"


_MISSING = object()


class LxtPatch:
    """LXT's efficient AttnLRP patch for Llama, applied once and then switched on and off.

    ``lxt.efficient.monkey_patch`` replaces ``forward`` of LlamaMLP, LlamaRMSNorm and nn.Dropout and the
    attention functions of ``modeling_llama`` (``eager_attention_forward``, ``ALL_ATTENTION_FUNCTIONS``) for the
    whole process. Every attribute of every patch target that the patch changed is recorded with its old and
    new value; the old values are restored at once, and :meth:`on` puts the new ones back for a call."""

    def __init__(self) -> None:
        from lxt.efficient import monkey_patch
        from lxt.efficient.models.llama import attnLRP

        targets = list(attnLRP)
        before = [dict(vars(t)) for t in targets]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monkey_patch(modeling_llama, attnLRP)
        self.changes: list[tuple[object, str, object, object]] = []
        for target, old in zip(targets, before):
            new = dict(vars(target))
            for name in set(old) | set(new):
                if old.get(name, _MISSING) is not new.get(name, _MISSING):
                    self.changes.append((target, name, old.get(name, _MISSING), new.get(name, _MISSING)))
        self.off()
        failed = [str(w.message) for w in caught if "patch" in str(w.message).lower()]
        patched = {getattr(t, "__name__", str(t)) for t, *_ in self.changes}
        missing = [getattr(t, "__name__", str(t)) for t in targets if getattr(t, "__name__", str(t)) not in patched]
        if failed or missing:
            raise RuntimeError(f"LXT's Llama patch did not apply cleanly: warnings {failed}, unpatched {missing}")

    def _set(self, which: int) -> None:
        for change in self.changes:
            target, name, value = change[0], change[1], change[2 + which]
            if value is _MISSING:
                if name in vars(target):
                    delattr(target, name)
            else:
                setattr(target, name, value)

    def on(self) -> None:
        self._set(1)

    def off(self) -> None:
        self._set(0)

    def is_off(self) -> bool:
        """Every changed attribute holds its value from before the patch again."""
        return all(vars(t).get(name, _MISSING) is old for t, name, old, _ in self.changes)

    @contextmanager
    def patched(self) -> Iterator[None]:
        self.on()
        try:
            yield
        finally:
            self.off()

    def describe(self) -> str:
        return ", ".join(sorted(f"{getattr(t, '__name__', t)}.{n}" for t, n, *_ in self.changes))


# --------------------------------------------------------------------------- model and methods

def load_model(size: str, dtype: torch.dtype, attn: str, device: str) -> LlamaForCausalLM:
    """Random weights (fixed seed), eval mode, frozen parameters, ``dtype``, on ``device``."""
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_ids(seq: int, vocab: int, device: str) -> torch.Tensor:
    """The same ids on every device (drawn on the CPU, then moved)."""
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)


@torch.no_grad()
def predicted_token(lm: LlamaForCausalLM, ids: torch.Tensor) -> int:
    return int(lm(input_ids=ids, use_cache=False).logits[0, -1].argmax())


def gradient_x_input(lm: LlamaForCausalLM, ids: torch.Tensor, target: int) -> torch.Tensor:
    """(emb * d logit_target / d emb).sum(-1) per token, float32; what LXT computes on its patched model."""
    emb = lm.get_input_embeddings()(ids).detach().requires_grad_(True)
    logit = lm(inputs_embeds=emb, use_cache=False).logits[0, -1, target]
    (grad,) = torch.autograd.grad(logit, emb)
    return (emb.detach().float() * grad.float()).sum(-1)


def make_method(key: str, lm: LlamaForCausalLM, ids: torch.Tensor, target: int,
                lxt: Optional[tuple[LlamaForCausalLM, LxtPatch]]) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one method; what is built once (the Explainer) is built here."""
    if key == "forward":
        def run():
            with torch.no_grad():
                return lm(input_ids=ids, use_cache=False).logits[:, -1]
        return run
    if key == "grad":
        return lambda: gradient_x_input(lm, ids, target)
    if key == "lrp":
        return lambda: lrp.explain(lrp.language.NextToken(lm), ids, target=target, composite="epsilon").relevance
    if key == "lrp-explainer":
        explainer = lrp.Explainer(lrp.language.NextToken(lm), composite="epsilon")
        # eager, recorded, first replay (builds the kept tensors), then on a GPU the CUDA graph's capture and
        # check: then steady replays
        return warmed_explainer(explainer, lambda: explainer(ids, target=target).relevance, ids.device.type,
                                f"seq {ids.shape[-1]} {METHODS[key]}")
    if key == "lxt":
        if lxt is None:
            raise ValueError("LXT is not available here")
        lxt_lm, patch = lxt

        def run():
            with patch.patched():
                return gradient_x_input(lxt_lm, ids, target)
        return run
    raise ValueError(f"unknown method {key!r}")


def build_runs(keys: list[str], lm: LlamaForCausalLM, ids: torch.Tensor, target: int,
               lxt: Optional[tuple[LlamaForCausalLM, LxtPatch]], errors: list[str],
               tag: str) -> dict[str, Callable[[], torch.Tensor]]:
    runs = {}
    for key in keys:
        try:
            runs[key] = make_method(key, lm, ids, target, lxt)
        except Exception:
            errors.append(f"{tag} {METHODS[key]} (setup):\n{traceback.format_exc()}")
    return runs


# --------------------------------------------------------------------------- memory

def measure_memory(args: argparse.Namespace, seq: int, key: str) -> None:
    """(CPU, child process) Print the peak RSS rise (MB) over one warm-up + one measured call, as one JSON line."""
    torch.set_num_threads(args.threads)
    lm = load_model(args.size, DTYPES[args.dtype], args.attn, "cpu")
    ids = make_ids(seq, lm.config.vocab_size, "cpu")
    target = predicted_token(lm, ids)
    lxt = None
    if key == "lxt":
        patch = LxtPatch()
        patch.on()  # this process runs LXT only
        lxt = (lm, patch)
    print_rss_rise(make_method(key, lm, ids, target, lxt), trim=True)


def memory(args: argparse.Namespace, seq: int, keys: list[str], tag: str) -> dict[str, Optional[float]]:
    """(CPU) Peak RSS rise per method, each in a fresh subprocess (``--measure-memory SEQ METHOD``)."""
    def child_args(key: str) -> list[str]:
        return [str(seq), key, "--size", args.size, "--dtype", args.dtype, "--attn", args.attn,
                "--threads", str(args.threads)]
    return memory_in_subprocesses(__file__, keys, child_args, tag)


# --------------------------------------------------------------------------- agreement

def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """Cosine similarity and relative L2 distance ||ours - theirs|| / ||theirs|| over the tokens, float64."""
    a, b = ours.detach().double().flatten().cpu(), theirs.detach().double().flatten().cpu()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cos, ((a - b).norm() / b.norm()).item()


def agreement_notes(runs: dict[str, Callable[[], torch.Tensor]], lrp0: Callable[[], torch.Tensor],
                    errors: list[str], tag: str) -> dict[str, str]:
    """Notes for the LXT row (lrp epsilon and lrp0 vs LXT) and the gradient row (gradient x input vs LXT)."""
    if "lxt" not in runs:
        return {}
    notes = {}
    try:
        theirs = runs["lxt"]()
        if "lrp" in runs:
            cos, rel = agreement(runs["lrp"](), theirs)
            # LXT's efficient AttnLRP has no epsilon at the linear layers: lrp's "lrp0" composite is its exact
            # counterpart (untimed, for the note only), so the residual of "epsilon" is its epsilon's share
            cos0, rel0 = agreement(lrp0(), theirs)
            notes["lxt"] = (f"vs lrp epsilon: cosine {cos:.6f}, relative L2 {rel:.2e}; vs lrp lrp0: cosine "
                            f"{cos0:.6f}, relative L2 {rel0:.2e}")
        if "grad" in runs:
            cos, rel = agreement(runs["grad"](), theirs)
            notes["grad"] = f"vs LXT: cosine {cos:.4f}, relative L2 {rel:.2e}"
    except Exception:
        errors.append(f"{tag} agreement:\n{traceback.format_exc()}")
    return notes


# --------------------------------------------------------------------------- report

def table_rows(seq: int, medians: dict[str, float], mem: dict[str, Optional[float]], notes: dict[str, str],
               time_spec: str) -> list[str]:
    t_ref, m_ref = medians.get(REFERENCE), mem.get(REFERENCE)
    rows = []
    for key, label in METHODS.items():
        t = medians.get(key)
        m = mem.get(key)
        ms = None if t is None else 1000 * t
        rows.append(f"| {seq} | {label} | {fmt(ms, time_spec)} | {fmt(ratio(t, t_ref), '.2f')} | {fmt(m, '.0f')} | "
                    f"{fmt(ratio(m, m_ref), '.2f')} | {notes.get(key, '')} |")
    return rows


def header_lines(args: argparse.Namespace, lm: LlamaForCausalLM, reps: int, lxt_note: Optional[str],
                 patch: Optional[LxtPatch]) -> list[str]:
    s = SIZES[args.size]
    n_params = sum(p.numel() for p in lm.parameters())
    lines = machine_lines([f"transformers {transformers.__version__}", f"lrp {lrp.__version__}",
                           f"lxt {lxt_version()}"])
    if args.device == "cuda":
        lines.append(gpu_line())
    else:
        lines.append("- peak extra MB: rise of the peak resident set size of a fresh process per (length, method) "
                     "over one warm-up and one measured call")
    lines += [
        f"- random-weight LlamaForCausalLM '{args.size}': hidden {s['hidden_size']}, {s['num_hidden_layers']} "
        f"layers, {s['num_attention_heads']} heads / {s['num_key_value_heads']} kv heads, intermediate "
        f"{s['intermediate_size']}, vocab {s['vocab_size']} ({n_params / 1e6:.1f}M parameters); {args.dtype}; "
        f"attention {args.attn}; batch 1, random token ids; target: the predicted next token's logit at the "
        f"last position; all positions' logits computed",
        f"- {reps} timed repetitions after 2 warm-ups, round-robin, median; ratios to gradient x input",
    ]
    if lxt_note is not None:
        lines.append(f"- LXT: {lxt_note}")
    elif patch is not None:
        lines.append(f"- LXT: lxt.efficient.monkey_patch(modeling_llama, attnLRP), switched on per call "
                     f"({patch.describe()}); on its own copy of the model")
    return lines


# --------------------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argument_parser(__doc__)  # with --device
    parser.add_argument("--size", choices=list(SIZES), help="model size (default: cpu small, cuda 1b)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="model dtype (default: cpu float32, cuda bfloat16)")
    parser.add_argument("--seqs", help="comma list of sequence lengths (default: cpu 128,512; cuda 512,2048)")
    parser.add_argument("--attn", choices=["eager", "sdpa"], default="eager", help="attention implementation")
    parser.add_argument("--quick", action="store_true", help="3 timed repetitions instead of 7")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch CPU threads (default {THREADS}, as speed.py; 1 is steadier on a busy machine)")
    parser.add_argument("--out", help="also write the Markdown report to this file")
    parser.add_argument("--measure-memory", nargs=2, metavar=("SEQ", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args: argparse.Namespace) -> list[int]:
    check_device(args.device)
    seqs = int_list(args.seqs)
    if not seqs or min(seqs) < 2:
        refuse(f"--seqs: expected a comma list of integers >= 2, got {args.seqs!r}")
    return seqs


def main() -> None:
    args = parse_args()
    if args.measure_memory:
        seq, key = args.measure_memory
        measure_memory(args, int(seq), key)
        return
    seqs = check_args(args)
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    device, dtype = args.device, DTYPES[args.dtype]

    lm = load_model(args.size, dtype, args.attn, device)
    lxt_note = lxt_unavailable()
    lxt = None
    errors: list[str] = []
    if lxt_note is None:
        try:
            check_ids = make_ids(16, lm.config.vocab_size, device)
            with torch.no_grad():
                before = lm(input_ids=check_ids, use_cache=False).logits
            patch = LxtPatch()
            lxt = (copy.deepcopy(lm), patch)
            if not patch.is_off():
                raise RuntimeError("LXT's patch left attributes changed after it was switched off")
            with torch.no_grad():  # the patch is off again: the model computes what it did
                after = lm(input_ids=check_ids, use_cache=False).logits
            same = torch.equal(before, after) if device == "cpu" else torch.allclose(before, after, 1e-3, 1e-3)
            if not same:
                raise RuntimeError("the model's logits changed after LXT's patch was switched off")
        except Exception:
            errors.append(f"LXT setup:\n{traceback.format_exc()}")
            lxt_note, lxt = "n/a (LXT's patch failed, see Errors)", None
    header = header_lines(args, lm, reps, lxt_note, lxt[1] if lxt else None)
    print("\n".join(header), flush=True)

    keys = [k for k in METHODS if k != "lxt" or lxt is not None]
    rows = ["| tokens | method | median ms | ratio | peak extra MB | MB ratio | note |",
            "|---:|---|---:|---:|---:|---:|---|"]
    time_spec = ".2f" if device == "cuda" else ".1f"
    for seq in seqs:
        tag = f"seq {seq}"
        ids = make_ids(seq, lm.config.vocab_size, device)
        target = predicted_token(lm, ids)
        runs = build_runs(keys, lm, ids, target, lxt, errors, tag)
        medians = time_runs(runs, device, reps, METHODS, errors, tag)
        def lrp0(ids: torch.Tensor = ids, target: int = target) -> torch.Tensor:
            return lrp.explain(lrp.language.NextToken(lm), ids, target=target, composite="lrp0").relevance

        notes = agreement_notes(runs, lrp0, errors, tag)
        if lxt is None:
            notes["lxt"] = lxt_note or ""
        if device == "cuda":
            mem = cuda_memory(runs, METHODS, errors, tag)
        else:
            del runs
            gc.collect()
            release_memory()
            mem = memory(args, seq, keys, tag)
        new_rows = table_rows(seq, medians, mem, notes, time_spec)
        rows += new_rows
        print("\n".join("  " + r for r in new_rows), file=sys.stderr, flush=True)  # partial results
        runs = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    report(header, "\n".join(rows), EXPLAINER_NOTES, errors, args.out)


if __name__ == "__main__":
    main()
