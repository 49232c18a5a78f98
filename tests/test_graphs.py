"""CUDA graphs around replayed programs (issue 12, ``lrp.engine.graphs``).

CI has no GPU, so most tests run the graph logic on the CPU with :class:`Emulated`, a backend with a CUDA
graph's semantics: the captured program reads and writes the buffers it was captured with, and every replay
writes its results into the same output tensors. A graph that forgot to copy an input in, read a stale
weight-derived tensor or returned its output buffers would give wrong or overwritten heatmaps here as it would
on a GPU. The test on the lane device (``make test-gpu``) runs real CUDA graphs.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.fx.experimental.proxy_tensor import make_fx

import lrp
from lrp.engine import graphs
from test_explainer import Net, _image
from test_replay import _same, _varied


class Emulated:
    """A CUDA graph's semantics on the CPU (see the module docstring); ``corrupt`` makes replays wrong,
    ``fail`` makes captures fail."""

    def __init__(self, corrupt: bool = False, fail: bool = False, empty: bool = False):
        self.corrupt, self.fail, self.empty = corrupt, fail, empty
        self.captures = self.replays = 0
        self.tf32 = False

    def supports(self, device):
        return device.type == "cpu"

    def capture(self, run, device, pool):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        run()  # the warm-up
        outputs = run()
        self.captures += 1
        return (run, outputs), outputs

    def replay(self, graph):
        run, outputs = graph
        self.replays += 1
        if self.empty:  # a graph whose kernels ran while capturing and were not recorded
            return
        with torch.no_grad():
            for buffer, value in zip(outputs, run()):  # into the captured outputs, as a graph writes
                buffer.copy_(value + 1 if self.corrupt and buffer.is_floating_point() else value)

    @contextlib.contextmanager
    def ordered(self, device, pool):
        yield []

    def settings(self):
        return (self.tf32,)

    def new_pool(self):
        return object()


def _install(monkeypatch, backend):
    monkeypatch.setattr(graphs, "BACKEND", backend)


@pytest.fixture
def emulated(monkeypatch):
    """Every explainer built in the test captures graphs with an :class:`Emulated` backend."""
    backend = Emulated()
    _install(monkeypatch, backend)
    return backend


def _model():
    torch.manual_seed(0)
    return Net().double().eval()


def test_graphed_replays_equal_explain_and_outlive_the_next_call(emulated):
    """From the sixth call on a graph gives the result; every result equals ``explain`` bit for bit, also after
    later calls ran (a graph's output buffers are copied out, never returned)."""
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, lrp.composite("epsilon-gamma-box", low=-3.0, high=3.0))
    inputs = [_varied(x, seed) for seed in range(9)]
    results = [explainer(xs) for xs in inputs]
    assert explainer.calls == {"eager": 1, "recorded": 1, "replayed": 3, "graphed": 4}
    assert emulated.captures == 1 and emulated.replays == 5  # one checked against the program, four used
    assert explainer.why_not_graphed is None
    for xs, res in zip(inputs, results):
        _same(res, lrp.explain(model, xs, composite=explainer.composite))


@pytest.mark.parametrize("target", ["given", "predicted"])
def test_targets_are_copied_into_the_graph(emulated, target):
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    for seed in range(8):
        t = torch.tensor([seed % 5, (seed + 3) % 5]) if target == "given" else None
        xs = _varied(x, seed)
        _same(explainer(xs, t), lrp.explain(model, xs, t, composite="epsilon-plus-flat"))
    assert explainer.calls["graphed"] == 3


def test_changed_weights_capture_anew_and_then_stop(emulated):
    """Weights written in place rebuild the weight-derived tensors (``W+``) the graph reads where they lie: the
    call runs the program itself, the next captures a new graph; after three such captures replays run
    without graphs. Every result stays right."""
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    conv = model.conv1 if hasattr(model, "conv1") else next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    for call in range(16):
        if call >= 6 and call % 2 == 0:
            with torch.no_grad():
                conv.weight.mul_(1.1)
        xs = _varied(x, call)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon-plus-flat"))
    assert emulated.captures == 3
    assert "built anew" in explainer.why_not_graphed


def test_a_graph_that_disagrees_with_the_program_is_dropped(monkeypatch):
    backend = Emulated(corrupt=True)
    _install(monkeypatch, backend)
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    for seed in range(8):
        xs = _varied(x, seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon-plus-flat"))
    assert explainer.calls["graphed"] == 0 and explainer.calls["replayed"] == 6
    assert "disagreed" in explainer.why_not_graphed and "output 0 differs" in explainer.why_not_graphed


def test_a_graph_that_does_not_run_is_caught_on_the_inputs_it_was_captured_with(monkeypatch):
    """A graph whose replay does nothing leaves its outputs as they were after the capture (NaN): the check
    sees it even where every call has the same input, as a benchmark's or a server's warm-up calls have."""
    _install(monkeypatch, Emulated(empty=True))
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    ref = lrp.explain(model, x, composite="epsilon-plus-flat")
    for _ in range(8):
        _same(explainer(x), ref)
    assert explainer.calls["graphed"] == 0
    assert "disagreed" in explainer.why_not_graphed


def test_other_library_settings_capture_anew(emulated):
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon")
    for seed in range(6):
        explainer(_varied(x, seed))
    assert explainer.calls["graphed"] == 1 and emulated.captures == 1
    emulated.tf32 = True
    for seed in range(6, 10):
        xs = _varied(x, seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon"))
    assert emulated.captures == 2 and explainer.calls["graphed"] == 3


def test_a_graph_that_fails_is_dropped_and_the_program_runs(emulated, monkeypatch):
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon")
    for seed in range(6):
        explainer(_varied(x, seed))
    assert explainer.calls["graphed"] == 1

    def broken(graph):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\ndetail")

    monkeypatch.setattr(emulated, "replay", broken)
    for seed in range(6, 10):
        xs = _varied(x, seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon"))
    assert explainer.calls["graphed"] == 1 and explainer.calls["replayed"] == 7
    assert explainer.why_not_graphed == "its CUDA graph failed: RuntimeError: CUDA error: an illegal memory access " \
        "was encountered"
    assert explainer.why_not_replayed is None


def test_a_capture_that_fails_leaves_plain_replays(monkeypatch):
    _install(monkeypatch, Emulated(fail=True))
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon")
    for seed in range(6):
        xs = _varied(x, seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon"))
    assert explainer.calls["replayed"] == 4 and explainer.calls["graphed"] == 0
    assert explainer.why_not_graphed == ("capturing it failed: RuntimeError: operation not permitted when "
                                         "stream is capturing")


def test_graphs_from_several_threads(emulated):
    """The graphs of one explainer share their buffers' pool and take turns: threads get their own results."""
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    for seed in range(6):
        explainer(_varied(x, seed))
    inputs = [_varied(x, 100 + k) for k in range(12)]
    results: dict[int, lrp.Explanation] = {}

    def work(k):
        results[k] = explainer(inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert explainer.calls["graphed"] >= 12
    for k, xs in enumerate(inputs):
        _same(results[k], lrp.explain(model, xs, composite="epsilon-plus-flat"))


def test_two_shapes_two_graphs(emulated):
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon")
    for seed in range(14):
        xs = _varied(x if seed % 2 else x[:1], seed)
        _same(explainer(xs), lrp.explain(model, xs, composite="epsilon"))
    assert emulated.captures == 2 and explainer.calls["graphed"] == 4


def test_poisoned_outputs_are_the_graphs_own():
    """Right after a capture the outputs the graph itself allocated hold NaN (or an integer dtype's lowest
    value) until a replay writes them; outputs that are an argument's or a constant's memory are left alone."""
    table = torch.arange(4.0)
    program = make_fx(lambda x: [x * 2, table[:2], x[1:], x.argmax()])(torch.randn(3))
    x = torch.randn(3)
    constants = [getattr(program, str(n.target)) for n in program.graph.nodes if n.op == "get_attr"]
    graphed = graphs.Graphed(program, [x], 1, graphs.GraphPool(Emulated()), constants)
    doubled, same_table, tail, index = graphed.outputs
    assert doubled.isnan().all() and index.item() == torch.iinfo(torch.int64).min
    assert torch.equal(table, torch.arange(4.0)) and torch.equal(same_table, table[:2])
    assert torch.equal(tail, x[1:])  # a view of the graph's input buffer
    assert [torch.equal(a, b) for a, b in zip(graphed([x]), program(x))] == [True] * 4


def test_the_check_with_nan_and_inf():
    nan, inf = float("nan"), float("inf")
    assert graphs.Graphed.agree([torch.tensor([1.0, nan, inf])], [torch.tensor([1.0, nan, inf])]) == ""
    assert "differs" in graphs.Graphed.agree([torch.tensor([5.0, inf])], [torch.tensor([1.0, inf])])
    assert "differs" in graphs.Graphed.agree([torch.tensor([1.0, nan])], [torch.tensor([1.0, 2.0])])
    assert graphs.Graphed.agree([torch.tensor([3])], [torch.tensor([3])]) == ""
    assert "output 0 differs" == graphs.Graphed.agree([torch.tensor([3])], [torch.tensor([4])])


def test_why_not_graphed():
    model, x = _model(), _image()
    explainer = lrp.Explainer(model, "epsilon")
    assert explainer.why_not_graphed == "no call of this kind has been replayed"
    for seed in range(3):
        explainer(_varied(x, seed))
    assert explainer.why_not_graphed.startswith("not yet")
    explainer(_varied(x, 3))
    assert explainer.why_not_graphed == "graphs run on CUDA devices; this program runs on cpu"
    assert explainer.calls["replayed"] == 2
    off = lrp.Explainer(model, "epsilon", cuda_graphs=False)
    assert off.why_not_graphed == "CUDA graphs are off (cuda_graphs=False)"


def test_programs_that_cannot_be_graphed(emulated):
    """Random numbers, buffers written in ``forward`` and work on another device are never captured."""
    def other_device(x):
        return (x * 2).to("meta").sum()

    def random(x):
        return x + torch.rand_like(x)

    def writes(x, buffer):
        buffer.add_(1)
        return x * buffer

    x = torch.randn(3)
    for function, args, written, reason in [
            (other_device, [x], False, "aten.mul.Tensor runs on cpu, not meta"),
            (random, [x], False, "draws random numbers"),
            (writes, [x, torch.zeros(3)], True, "writes the model's tensors")]:
        program = make_fx(function)(*args)
        device = torch.device("meta") if function is other_device else x.device
        backend = Emulated()
        backend.supports = lambda d, device=device: d == device  # type: ignore[method-assign]
        args = [a.to("meta") for a in args] if function is other_device else args
        assert reason in graphs.why_not_graphed(program, args, 1, backend, written)
    assert graphs.why_not_graphed(make_fx(lambda a: a * 2)(x), [x, x.to("meta")], 1, Emulated(), False) == \
        "its tensors are on 2 devices (cpu, meta)"
    table = torch.randn(5, 3)  # a constant of the program on another device than its arguments
    meta = Emulated()
    meta.supports = lambda d: d.type == "meta"  # type: ignore[method-assign]
    program = make_fx(lambda a: a + table.to("meta"))(torch.randn(5, 3, device="meta"))
    assert "lies on cpu, not meta" in graphs.why_not_graphed(program, [torch.randn(5, 3, device="meta")], 1,
                                                             meta, False)
    expanded = torch.randn(3, 1).expand(3, 4)
    assert "share memory" in graphs.why_not_graphed(make_fx(lambda a: a * 2)(expanded), [expanded], 1,
                                                    Emulated(), False)


def test_a_model_with_dropout_in_training_mode_is_replayed_without_graphs(emulated):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    explainer = lrp.Explainer(model, "epsilon", eval_mode=False)
    for seed in range(5):
        explainer(torch.randn(4, 6))
    assert explainer.calls["replayed"] == 3
    assert "draws random numbers" in explainer.why_not_graphed


# ----------------------------------------------------------------------------- the device lane

def test_cuda_graphs_on_the_lane_device(device):
    """On a CUDA lane device (``make test-gpu``) replays run as real CUDA graphs and give what ``explain``
    gives there (float64; kernels may sum in another order, so to 1e-9)."""
    if device.type != "cuda":
        pytest.skip(f"CUDA graphs need a CUDA device; the lane device is {device}")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).double().eval().to(device)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    explainer = lrp.Explainer(model, "epsilon-plus-flat")
    results = []
    for seed in range(8):
        xs = _varied(x, seed).to(device)
        results.append((xs, explainer(xs)))
    assert explainer.calls["graphed"] == 3, explainer.why_not_graphed
    for xs, res in results:
        ref = lrp.explain(model, xs, composite="epsilon-plus-flat")
        torch.testing.assert_close(res.relevance, ref.relevance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.output, ref.output, rtol=1e-9, atol=1e-12)
