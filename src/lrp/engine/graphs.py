"""CUDA graphs around a recorded program (:mod:`lrp.engine.replay`): all its kernels in one launch.

A replayed program still launches its few hundred to few thousand kernels one by one from Python; at batch 1
on a GPU that launching, not the arithmetic, is most of its time. A CUDA graph records the launches once and
replays them with one call. What a graph needs, and how this module gives it:

- **Fixed addresses.** A graph reads and writes the memory it was captured with. The inputs and targets
  (which change from call to call) are copied into buffers of the graph's own before each replay. The model's
  tensors and the program's weight-derived tensors are read where they lie, so a graph is used only while
  those are the very objects it was captured with (the caller records anew, or captures anew, otherwise).
- **Results that outlive the next call.** A graph writes its results into the same memory every time, so
  each replay's results are copied out before they are returned.
- **Nothing but kernels on one GPU.** An operation on the CPU, or one that waits for a value on the host,
  runs once during capture and never again; a program with such an operation is not captured. Nor is one
  that writes the model's tensors or draws random numbers (a second run to check the graph would repeat the
  write or draw other numbers).

All graphs of one :class:`GraphPool` (one per ``lrp.Explainer``) share one memory pool and replay one at a
time, so the memory a program needs while it runs is held once, not once per program. The first replay of a
new graph is checked against the program itself on the same arguments (:meth:`Graphed.check`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor


class Backend(Protocol):
    """How graphs are captured and replayed: :class:`CUDAGraphs` on a GPU; the tests use an emulation on
    the CPU with the same fixed-address semantics."""

    def supports(self, device: torch.device) -> bool: ...

    def capture(self, run: Callable[[], list[Tensor]], device: torch.device, pool: Any) -> tuple[Any, list[Tensor]]:
        """Run ``run`` once to warm up, then capture it; return the graph and its outputs (written anew by
        every replay)."""
        ...

    def replay(self, graph: Any) -> None: ...

    def new_pool(self) -> Any: ...


class CUDAGraphs:
    """``torch.cuda.CUDAGraph``: warm-up on a side stream, capture into a shared pool, replay."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def capture(self, run: Callable[[], list[Tensor]], device: torch.device, pool: Any) -> tuple[Any, list[Tensor]]:
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # libraries set up per-stream state (workspaces) outside the capture
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                outputs = run()
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()


BACKEND: Backend = CUDAGraphs()


class GraphPool:
    """The memory pool the graphs of one explainer share, and the lock that makes their replays take turns
    (two graphs of one pool must never run at once: each may overwrite memory the other uses)."""

    def __init__(self, backend: Optional[Backend] = None):
        self.backend = backend if backend is not None else BACKEND
        self.lock = threading.RLock()
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = self.backend.new_pool()
        return self._handle


def why_not_graphed(graph: torch.fx.GraphModule, args: Sequence[Tensor], backend: Backend, writes: bool) -> str:
    """Why the program ``graph`` cannot be captured as a graph for ``args`` ("" when it can)."""
    devices = {a.device for a in args if isinstance(a, Tensor)}
    if len(devices) != 1:
        return f"its tensors are on {len(devices)} devices ({', '.join(sorted(map(str, devices)))})"
    device = next(iter(devices))
    if not backend.supports(device):
        return f"graphs run on CUDA devices; this program runs on {device}"
    if writes:
        return "the program writes the model's tensors (a buffer updated in forward)"
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
            return f"the program draws random numbers ({target})"
        for value in _tensors(node.meta.get("val")):
            if value.device != device:
                return f"{target} runs on {value.device}, not {device} (it would run only once, while capturing)"
        if target is torch.ops.aten._local_scalar_dense.default:
            return f"{target} reads a value on the host"
    return ""


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class Graphed:
    """A program captured as a graph for one set of arguments: ``graphed(args)`` copies the ``copied``
    arguments (inputs, targets) into the graph's buffers, replays, and returns copies of the outputs; ``None``
    when an argument read in place is no longer the object the graph was captured with (the caller then
    runs the program itself and captures anew)."""

    def __init__(self, program: Callable[..., list[Tensor]], args: Sequence[Tensor], copied: int, pool: GraphPool):
        self.pool, self.copied = pool, copied
        with pool.lock:
            # the buffers of the inputs: allocated outside the graph's pool, so no other graph can reuse them
            self.static = [a.clone() if k < copied else a for k, a in enumerate(args)]
            self.graph, self.outputs = pool.backend.capture(lambda: list(program(*self.static)),
                                                            args[0].device, pool.handle())
        self.checked = False

    def __call__(self, args: Sequence[Tensor]) -> Optional[list[Tensor]]:
        if len(args) != len(self.static) or any(a is not s for a, s in zip(args[self.copied:],
                                                                           self.static[self.copied:])):
            return None
        if any(a.shape != s.shape or a.dtype != s.dtype for a, s in zip(args[:self.copied], self.static)):
            return None
        with self.pool.lock:
            for buffer, value in zip(self.static[:self.copied], args[:self.copied]):
                buffer.copy_(value)
            self.pool.backend.replay(self.graph)
            return [t.clone() for t in self.outputs]

    @staticmethod
    def agree(graphed: list[Tensor], plain: list[Tensor]) -> str:
        """Where a graph's outputs differ from the program's on the same arguments ("" when nowhere): each
        floating-point output to a relative 1e-4 of its largest magnitude (kernels may pick another algorithm
        inside a capture), every other output exactly."""
        for k, (g, p) in enumerate(zip(graphed, plain)):
            if g.shape != p.shape or g.dtype != p.dtype:
                return f"output {k} has shape {tuple(g.shape)} {g.dtype}, not {tuple(p.shape)} {p.dtype}"
            if g.is_floating_point() or g.is_complex():
                scale = float(p.abs().max()) if p.numel() else 0.0
                if not torch.allclose(g, p, rtol=1e-4, atol=1e-4 * scale, equal_nan=True):
                    worst = float((g - p).abs().nan_to_num(float("inf")).max())
                    return f"output {k} differs by up to {worst:.3g} (largest magnitude {scale:.3g})"
            elif not torch.equal(g, p):
                return f"output {k} differs"
        return ""
