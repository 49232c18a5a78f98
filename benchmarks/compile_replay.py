"""Would ``torch.compile`` speed up a replayed program? Times one ``lrp.Explainer`` program of a torchvision model
as the explainer runs it and compiled with ``torch.compile`` (inductor), on the same arguments, in one process.

    .venv/bin/python benchmarks/compile_replay.py [--model resnet18] [--batch 1] [--device {cpu,cuda}] [--reps 5]

Random weights (fixed seed), 224x224, epsilon-plus-flat. The program is the main program of the explainer's
recording (forward, rules and backward as ATen operations), its arguments the input, the model's tensors and
the weight-derived tensors, run under no_grad. Prints the compile time (first call), the median of ``--reps``
calls of each after that (alternating), their ratio, and the largest difference of the relevance relative to its largest
magnitude (inductor fuses and reorders floating-point work, so the compiled program is not bit for bit).
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision

import lrp

from harness import argument_parser, check_device, frozen_torchvision, machine_lines  # benchmarks/harness.py


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    check_device(args.device)
    torch.set_num_threads(2)
    model = frozen_torchvision(args.model, args.device)
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    explainer = lrp.Explainer(model, "epsilon-plus-flat", cuda_graphs=False)
    for _ in range(3):  # eager, recorded, replayed
        explainer(x)
    program = next(iter(explainer._programs.values())).program
    assert program is not None, explainer.why_not_replayed
    state = explainer._state.tensors
    arguments = [x, *state, *program._folded(state)]

    def seconds(run) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(*arguments)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        reference = program.main(*arguments)
        start = time.perf_counter()
        compiled = torch.compile(program.main, dynamic=False)
        result = compiled(*arguments)
        compile_seconds = time.perf_counter() - start
        times: dict[str, list[float]] = {"plain": [], "compiled": []}
        for rep in range(args.reps):  # alternating, the first of each pair swapped every time: drift hits both
            order = [("plain", program.main), ("compiled", compiled)]
            for name, run in order if rep % 2 == 0 else order[::-1]:
                times[name].append(seconds(run))
        plain, fast = statistics.median(times["plain"]), statistics.median(times["compiled"])
    difference = float((result[0] - reference[0]).abs().max() / reference[0].abs().max())
    print("\n".join(machine_lines([f"torchvision {torchvision.__version__}", f"lrp {lrp.__version__}"])))
    print(f"{args.model} batch {args.batch} on {args.device}: compile {compile_seconds:.1f} s; replayed program "
          f"{plain * 1000:.1f} ms, compiled {fast * 1000:.1f} ms (ratio {fast / plain:.2f}); relevance differs by up "
          f"to {difference:.2g} of its largest magnitude")


if __name__ == "__main__":
    main()
