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
time on a stream of the pool's own, ordered against the caller's current stream, so the memory a program needs
while it runs is held once, not once per program. A graph captured under other TF32 or cuDNN settings than the
current ones is not used. The first replay of a new graph is checked against the program itself on the same
arguments (``Program._run``); its outputs hold NaN until a replay writes them, so a graph that does not run
fails that check even on the inputs it was captured with.

CUDA allows one capture at a time in a process, and no other CUDA work that is not ordered against it: lrp's
own captures take turns (a lock), and a capture happens only in the fourth call of a kind. A program of the
user's own that calls ``torch.cuda.empty_cache()`` or captures graphs in another thread at that moment can make
the capture fail (the replays then run without a graph) or raise in that thread; ``cuda_graphs=False`` avoids
both.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor


class Backend(Protocol):
    """How graphs are captured and replayed: :class:`CUDAGraphs` on a GPU; the tests use an emulation on
    the CPU with the same fixed-address semantics."""

    def supports(self, device: torch.device) -> bool: ...

    def capture(self, run: Callable[[], list[Tensor]], device: torch.device, pool: "GraphPool"
                ) -> tuple[Any, list[Tensor]]:
        """Run ``run`` once to warm up, then capture it; return the graph and its outputs (written anew by
        every replay)."""
        ...

    def ordered(self, device: torch.device, pool: "GraphPool") -> ContextManager[list[Tensor]]:
        """Around copying the inputs in, a replay and copying the outputs out: the order of that work against
        the caller's other work on ``device``. The outputs copied out are added to the list it gives."""
        ...

    def replay(self, graph: Any) -> None: ...

    def new_pool(self) -> Any: ...

    def settings(self) -> tuple:
        """The library settings a capture fixes (TF32, cuDNN): a graph captured under others is not used."""
        ...


_CAPTURE = threading.Lock()  # CUDA allows one capture at a time in a process


class CUDAGraphs:
    """``torch.cuda.CUDAGraph``. Each pool has a stream of its own per device, on which its graphs are warmed
    up, captured and replayed (with the inputs copied in and the outputs out), ordered against the caller's
    current stream both ways: never torch's one process-wide capture stream, which belongs to the device it
    was first used on."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def _stream(self, device: torch.device, pool: "GraphPool") -> Any:
        stream = pool.streams.get(device)
        if stream is None:
            stream = pool.streams[device] = torch.cuda.Stream(device)
        return stream

    def capture(self, run: Callable[[], list[Tensor]], device: torch.device, pool: "GraphPool"
                ) -> tuple[Any, list[Tensor]]:
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)
        with _CAPTURE, torch.cuda.device(device):
            caller = torch.cuda.current_stream()
            stream = self._stream(device, pool)
            stream.wait_stream(caller)
            try:
                with torch.cuda.stream(stream):  # libraries set up their state (handles) outside the capture
                    run()
                # the matmul workspace the warm-up made for this stream lies outside the graph's pool: dropped
                # here, the capture makes one inside the pool, which holds it for as long as its graphs live
                clear()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool.handle(), stream=stream, capture_error_mode="thread_local"):
                    outputs = run()
            finally:
                torch.cuda.set_stream(caller)  # also when the capture failed part way, leaving its stream current
                clear()  # later work on this stream must not find the pool's workspace cached
            caller.wait_stream(stream)
        return graph, outputs

    @contextmanager
    def ordered(self, device: torch.device, pool: "GraphPool") -> Iterator[list[Tensor]]:
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream()
            stream = self._stream(device, pool)
            stream.wait_stream(caller)  # the inputs are ready, and the last outputs' readers are done
            handed: list[Tensor] = []
            try:
                with torch.cuda.stream(stream):
                    yield handed
            finally:
                caller.wait_stream(stream)
                for t in handed:
                    t.record_stream(caller)  # read on the caller's stream: not reused before that is done

    def replay(self, graph: Any) -> None:
        graph.replay()

    def new_pool(self) -> Any:
        # a MemPool counts its users: the pool outlives its graphs for as long as the explainer holds it
        return torch.cuda.MemPool() if hasattr(torch.cuda, "MemPool") else torch.cuda.graph_pool_handle()

    def settings(self) -> tuple:
        matmul, cudnn, cuda = torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cuda
        optional = [getattr(torch._C, "_get_cublas_allow_fp16_accumulation", lambda: None),
                    getattr(cuda, "preferred_blas_library", lambda: None),
                    getattr(cuda, "flash_sdp_enabled", lambda: None),
                    getattr(cuda, "mem_efficient_sdp_enabled", lambda: None),
                    getattr(cuda, "math_sdp_enabled", lambda: None),
                    getattr(cuda, "cudnn_sdp_enabled", lambda: None)]
        return (matmul.allow_tf32, cudnn.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
                matmul.allow_bf16_reduced_precision_reduction, torch.get_float32_matmul_precision(),
                cudnn.enabled, cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
                *(str(get()) for get in optional))


BACKEND: Backend = CUDAGraphs()


class GraphPool:
    """The memory pool the graphs of one explainer share, their streams, and the lock that makes their
    replays take turns (two graphs of one pool must never run at once: each may overwrite memory the other
    uses)."""

    def __init__(self, backend: Optional[Backend] = None):
        self.backend = backend if backend is not None else BACKEND
        self.lock = threading.RLock()
        self.streams: dict[torch.device, Any] = {}
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = self.backend.new_pool()
        return self._handle


def why_not_graphed(graph: torch.fx.GraphModule, args: Sequence[Tensor], copied: int, backend: Backend,
                    writes: bool) -> str:
    """Why the program ``graph`` cannot be captured as a graph for ``args``, of which the first ``copied`` are
    copied into the graph's buffers ("" when it can)."""
    devices = {a.device for a in args if isinstance(a, Tensor)}
    if len(devices) != 1:
        return f"its tensors are on {len(devices)} devices ({', '.join(sorted(map(str, devices)))})"
    device = next(iter(devices))
    if not backend.supports(device):
        return f"graphs run on CUDA devices; this program runs on {device}"
    if writes:
        return "the program writes the model's tensors (a buffer updated in forward)"
    if any(a.numel() and torch._debug_has_internal_overlap(a) == 1 for a in args[:copied]):  # expanded, say
        return "an input has elements that share memory (a graph copies its inputs into buffers of their layout)"
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = getattr(graph, str(node.target))
            if isinstance(value, Tensor) and value.device != device and value.dim() > 0:
                return f"the constant {node.target} lies on {value.device}, not {device}"
        if node.op != "call_function":
            continue
        target = node.target
        if seeded(node):
            return f"the program draws random numbers ({target})"
        for value in _tensors(node.meta.get("val")):
            if value.device != device:
                return f"{target} runs on {value.device}, not {device} (it would run only once, while capturing)"
        if target is torch.ops.aten._local_scalar_dense.default:
            return f"{target} reads a value on the host"
    return ""


def draws(graph: torch.fx.GraphModule) -> bool:
    """Whether the program ``graph`` draws random numbers (a second run would draw others)."""
    return any(seeded(node) for node in graph.graph.nodes)


def seeded(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an operation that draws random numbers."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
        torch.Tag.nondeterministic_seeded in target.tags


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class Graphed:
    """A program captured as a graph for one set of arguments: ``graphed(args)`` copies the ``copied``
    arguments (inputs, targets) into the graph's buffers, replays, and returns copies of the outputs; ``None``
    when an argument read in place is no longer the object the graph was captured with, or the library
    settings differ from the capture's (the caller then runs the program itself and captures anew).

    Right after the capture, the floating-point outputs are filled with NaN: a graph whose replay did not run
    the program (its kernels ran once while capturing, and were not recorded) shows as one that disagrees with
    the program, even on the inputs it was captured with (see ``Program._run``)."""

    def __init__(self, program: Callable[..., list[Tensor]], args: Sequence[Tensor], copied: int, pool: GraphPool,
                 constants: Sequence[Tensor] = ()):
        self.pool, self.copied, self.device = pool, copied, args[0].device
        backend = pool.backend
        with pool.lock:
            with backend.ordered(self.device, pool):
                # the buffers of the inputs, in their layout, on the pool's stream: allocated outside the graph's
                # pool, so no other graph can reuse them
                self.static = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
                               if k < copied else a for k, a in enumerate(args)]
            self.settings = backend.settings()
            self.graph, self.outputs = backend.capture(lambda: list(program(*self.static)), self.device, pool)
            known = {t.untyped_storage().data_ptr() for t in [*self.static, *constants]}
            with backend.ordered(self.device, pool):
                for t in self.outputs:  # what the graph itself makes, never an argument's or a constant's memory
                    if t.untyped_storage().data_ptr() not in known:
                        _poison(t)
        self.checked = False

    def __call__(self, args: Sequence[Tensor]) -> Optional[list[Tensor]]:
        if len(args) != len(self.static) or any(a is not s for a, s in zip(args[self.copied:],
                                                                           self.static[self.copied:])):
            return None
        if any(a.shape != s.shape or a.dtype != s.dtype for a, s in zip(args[:self.copied], self.static)):
            return None
        if self.pool.backend.settings() != self.settings:
            return None
        with self.pool.lock, self.pool.backend.ordered(self.device, self.pool) as handed:
            for buffer, value in zip(self.static[:self.copied], args[:self.copied]):
                buffer.copy_(value)
            self.pool.backend.replay(self.graph)
            handed += [t.clone() for t in self.outputs]
            return handed

    @staticmethod
    def agree(graphed: list[Tensor], plain: list[Tensor], tolerance: Optional[float] = None) -> str:
        try:
            return Graphed._agree(graphed, plain, tolerance)
        except Exception as exc:
            return f"comparing the outputs failed ({type(exc).__name__}: {exc})"

    @staticmethod
    def _agree(graphed: list[Tensor], plain: list[Tensor], tolerance: Optional[float]) -> str:
        """Where a graph's outputs differ from the program's on the same arguments ("" when nowhere): each
        floating-point output to a relative ``max(tolerance, 8 eps)`` of its dtype (``tolerance`` 1e-4 unless
        given), of its largest magnitude (kernels may pick another algorithm inside a capture), every other
        output exactly."""
        for k, (g, p) in enumerate(zip(graphed, plain)):
            if g.shape != p.shape or g.dtype != p.dtype:
                return f"output {k} has shape {tuple(g.shape)} {g.dtype}, not {tuple(p.shape)} {p.dtype}"
            if g.is_floating_point() or g.is_complex():
                tolerance = max(1e-4 if tolerance is None else tolerance, 8 * torch.finfo(g.dtype).eps)
                finite = p.abs()[p.isfinite()]  # inf and NaN must match exactly (equal_nan), not set the scale
                scale = float(finite.max()) if finite.numel() else 0.0
                if not torch.allclose(g, p, rtol=tolerance, atol=tolerance * scale, equal_nan=True):
                    worst = float((g - p).abs().nan_to_num(float("inf")).max())
                    return f"output {k} differs by up to {worst:.3g} (largest magnitude {scale:.3g})"
            elif not torch.equal(g, p):
                return f"output {k} differs"
        return ""


def _poison(t: Tensor) -> None:
    """Fill an output buffer of a new graph with values its program does not give (NaN; an integer dtype's
    lowest value), so that a replay that did not write it fails the graph's check."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)
