"""ONNX models (the ``lrp[onnx]`` extra): exports of torchvision models explain as the originals do, and a corrupt
file, a missing one, an unsupported op and a missing dependency give errors that say what to do."""

import random
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lrp
from lrp.errors import ModelError
from lrp.pipeline.onnx_model import load_onnx, onnx_input_shape

onnx = pytest.importorskip("onnx", reason="needs the optional extra lrp[onnx]")
pytest.importorskip("onnx2torch", reason="needs the optional extra lrp[onnx]")
torchvision = pytest.importorskip("torchvision")


def _export(model, x, path):
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated; it writes what users have
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    return path


def _rel_l2(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (original, input, converted ONNX export); made once per module, on first use."""
    made = {}

    def get(name):
        if name not in made:
            size = {"resnet18": 64, "vgg11": 224}[name]  # vgg11's adaptive pool exports only at 224 x 224
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            x = torch.randn(1, 3, size, size)
            path = _export(model, x, tmp_path_factory.mktemp("onnx") / f"{name}.onnx")
            made[name] = model, x, load_onnx(path)
        return made[name]

    return get


# alpha-beta is checked on ResNet18 only, to keep the test short. epsilon on VGG11 only: the export folds
# ResNet18's batch norms into its convolutions, which changes the rounding of every pre-activation; epsilon divides
# by pre-activations that are near zero on random weights and blows that up to 2e-5 .. 2e-4 relative L2, depending
# on the input (the composites with z+ or alpha-beta on the convolutions stay below 4e-7).
@pytest.mark.parametrize("name, composite", [
    ("resnet18", "epsilon-plus-flat"), ("resnet18", "epsilon-alpha2-beta1"),
    ("vgg11", "epsilon-plus-flat"), ("vgg11", "epsilon"),
])
def test_export_explains_as_the_original(exported, name, composite):
    model, x, converted = exported(name)
    assert not converted.training
    with torch.no_grad():
        assert _rel_l2(model(x), converted(x)) <= 1e-5
    target = model(x).argmax(1)
    want = lrp.explain(model, x, target, composite=composite).relevance
    got = lrp.explain(converted, x, target, composite=composite).relevance
    assert got.shape == want.shape
    assert _rel_l2(want, got) <= 1e-4


def test_bias_free_export_conserves_relevance(tmp_path):
    """Also the opset lowering: the exporter writes AveragePool-19, onnx2torch converts up to AveragePool-11."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(8, 8, 3, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 4, bias=False),
    ).eval()
    x = torch.randn(3, 3, 14, 14)
    path = _export(model, x[:1], tmp_path / "cnn.onnx")
    assert onnx_input_shape(path) == (None, 3, 14, 14)
    proto = onnx.load(str(path))
    assert "AveragePool" in {node.op_type for node in proto.graph.node} and proto.opset_import[0].version >= 19
    converted = load_onnx(path)
    for composite in ("epsilon", "epsilon-plus"):
        expl = lrp.explain(converted, x, composite=composite)  # batch 3 through a batch-1 export: dynamic axis
        score = expl.logits.gather(1, expl.target[:, None]).squeeze(1)
        torch.testing.assert_close(expl.relevance.sum((1, 2, 3)), score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), b"", b"print('not a model')\n"],
                         ids=["random-bytes", "empty", "text"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"is not an ONNX model \(a protobuf ModelProto"):
        load_onnx(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_onnx(tmp_path / "nothing.onnx")


def test_unsupported_op_names_op_and_node(tmp_path):
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["r"], name="first_relu"), h.make_node("Mish", ["r"], ["y"], name="the_mish")],
        "tiny", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "mish.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(path))
    with pytest.raises(ModelError, match=r"op Mish \(domain ai\.onnx, version 18.*of node 'the_mish'.*\.pt2") as info:
        load_onnx(path)
    assert "first_relu" not in str(info.value)


@pytest.mark.parametrize("module", ["onnx", "onnx2torch"])
def test_missing_dependency_names_the_extra(monkeypatch, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"pip install 'lrp\[onnx\]'"):
        load_onnx(tmp_path / "model.onnx")


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    page = (Path(__file__).resolve().parent.parent / "docs" / "onnx-keras.md").read_text()
    section = page.split("\n## ONNX\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for block in blocks:
            exec(compile(block, "onnx-keras.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "(None, 3, 8, 8)" in printed and "torch.Size([1, 3, 8, 8])" in printed


def test_matmul_add_and_a_separate_conv_bias_become_layers_with_their_bias(tmp_path):
    """A graph written as tf2onnx writes Keras (Conv, then its bias as an Add; Dense as MatMul + Add, or MatMul
    alone) explains as the same network in PyTorch: the layers get the composite's rules with their bias (here a
    large epsilon, which LRP-0 on loose MatMul/Add ops would not give)."""
    from onnx import TensorProto, helper, numpy_helper
    g = torch.Generator().manual_seed(0)
    conv, d1, d2 = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 6 * 6, 8), torch.nn.Linear(8, 5, bias=False)
    for p in (*conv.parameters(), *d1.parameters(), *d2.parameters()):
        p.data = torch.randn(p.shape, generator=g) * 0.5
    twin = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), d1, torch.nn.ReLU(), d2).eval()

    def init(name, t):
        return numpy_helper.from_array(t.detach().numpy().astype("float32"), name)

    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "cb"], ["cz"], name="conv_bias"),
             helper.make_node("Relu", ["cz"], ["ca"]),
             helper.make_node("Flatten", ["ca"], ["f"]),
             helper.make_node("MatMul", ["f", "w1"], ["m1"], name="dense1"),
             helper.make_node("Add", ["m1", "b1"], ["z1"], name="dense1_bias"),
             helper.make_node("Relu", ["z1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["y"], name="dense2")]
    graph = helper.make_graph(
        nodes, "keras_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [init("cw", conv.weight), init("cb", conv.bias.view(1, 4, 1, 1)), init("w1", d1.weight.t()),
         init("b1", d1.bias), init("w2", d2.weight.t())])
    path = tmp_path / "keras_like.onnx"
    import onnx
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    module = load_onnx(path)
    x = torch.rand(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(module(x), twin(x), rtol=1e-5, atol=1e-5)
    comp = lrp.composite("epsilon", epsilon=0.5)
    ours, theirs = lrp.explain(module, x, composite=comp), lrp.explain(twin, x, composite=comp)
    assert len(ours.rules) == 3  # one conv and two dense layers
    assert _rel_l2(ours.relevance, theirs.relevance) < 1e-5


def test_cli_explains_an_onnx_file_at_its_input_size(tmp_path):
    import numpy as np
    from PIL import Image

    from lrp.cli import main
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 14 * 14, 3)).eval()
    path = _export(model, torch.rand(1, 3, 16, 16), tmp_path / "cnn.onnx")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["explain", str(tmp_path / "a.png"), "--model", str(path), "--out", str(tmp_path / "out")]) == 0
    relevance = np.load(tmp_path / "out" / "a_relevance.npy")
    assert relevance.shape == (3, 16, 16)  # resized and cropped to the input the graph declares
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and ",ok" in rows[1]
    assert main(["explain", str(tmp_path / "a.png"), "--model", str(path), "--weights", "w.pt"]) != 0


def test_fused_biases_get_names_of_their_own(tmp_path):
    """A new bias must not take the name of a tensor already in the graph (here an initializer 'm_bias')."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w, b, other = (rng.normal(size=s).astype("float32") for s in ((4, 3), (3,), (3,)))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="m"),
             helper.make_node("Add", ["m", "b"], ["z"]),
             helper.make_node("Add", ["z", "m_bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                               numpy_helper.from_array(other, "m_bias")])
    path = tmp_path / "names.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = torch.rand(2, 4)
    expected = x @ torch.from_numpy(w) + torch.from_numpy(b) + torch.from_numpy(other)
    torch.testing.assert_close(load_onnx(path)(x), expected)
