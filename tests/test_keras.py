"""Keras 3 models on the torch backend: the relevance equals that of the same network written in PyTorch with the
weights copied across (kernels transposed, channels last handled), BatchNorm merged as in the PyTorch path,
conservation on bias-free networks, LRP-0 = gradient x input; .keras and .h5 files load through ``--model``, with
Keras' preprocessing; clear errors for bad files, a wrong backend and a missing extra; nothing left on the layers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras 3 is not installed: pip install 'lrp[keras]'")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras runs on {keras.backend.backend()}; these tests need KERAS_BACKEND=torch",
                allow_module_level=True)
pytest.importorskip("h5py", reason="h5py is not installed: pip install 'lrp[keras]'")

import lrp  # noqa: E402
from lrp.cli import main  # noqa: E402
from lrp.errors import ModelError  # noqa: E402
from lrp.pipeline import Pipeline  # noqa: E402
from lrp.pipeline.inputs import CAFFE_MEAN_BGR
from lrp.pipeline.keras_model import import_keras  # noqa: E402

L = keras.layers
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
COMPOSITES = ["lrp0", "epsilon", "epsilon-plus-flat", "epsilon-alpha2-beta1"]


# ----------------------------------------------------------------------------- the same network in PyTorch

class _Permute(nn.Module):
    def __init__(self, *order: int):
        super().__init__()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.order)


class _Pad(nn.Module):
    """TensorFlow's "same" padding: the odd pixel goes right and bottom."""

    def __init__(self, k: int, stride: int):
        super().__init__()
        self.k, self.stride = k, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n in (x.shape[3], x.shape[2]):
            total = max((-(-n // self.stride) - 1) * self.stride + self.k - n, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _t(variable) -> torch.Tensor:
    return torch.tensor(np.asarray(variable.numpy()))


def torch_twin(model) -> nn.Sequential:
    """A PyTorch network computing what a Keras Sequential of Conv2D (valid/same), DepthwiseConv2D, SeparableConv2D,
    BatchNormalization, MaxPooling2D, Flatten, Dense and ReLU computes, on channels-first input, its weights copied
    (written layer by layer with torch.nn, independently of lrp's Keras support)."""
    mods: list[nn.Module] = []
    for layer in model.layers:
        if isinstance(layer, (L.SeparableConv2D, L.DepthwiseConv2D, L.Conv2D)):
            k, s = layer.kernel_size[0], layer.strides[0]
            pad = 0
            if layer.padding == "same":  # symmetric: the convolution pads; else F.pad first, as TensorFlow does
                total = max((-(-layer.input.shape[1] // s) - 1) * s + k - layer.input.shape[1], 0)
                if total % 2:
                    mods.append(_Pad(k, s))
                else:
                    pad = total // 2
            if isinstance(layer, L.SeparableConv2D):
                dk = _t(layer.depthwise_kernel)  # (k, k, in, mult)
                cin, mult = dk.shape[2], dk.shape[3]
                dw = nn.Conv2d(cin, cin * mult, k, s, pad, groups=cin, bias=False)
                dw.weight.data = dk.permute(2, 3, 0, 1).reshape(cin * mult, 1, k, k)
                pw = nn.Conv2d(cin * mult, layer.filters, 1, bias=layer.use_bias)
                pw.weight.data = _t(layer.pointwise_kernel).permute(3, 2, 0, 1).contiguous()
                if layer.use_bias:
                    pw.bias.data = _t(layer.bias)
                mods += [dw, pw]
            elif isinstance(layer, L.DepthwiseConv2D):
                dk = _t(layer.kernel)
                cin, mult = dk.shape[2], dk.shape[3]
                conv = nn.Conv2d(cin, cin * mult, k, s, pad, groups=cin, bias=layer.use_bias)
                conv.weight.data = dk.permute(2, 3, 0, 1).reshape(cin * mult, 1, k, k)
                if layer.use_bias:
                    conv.bias.data = _t(layer.bias)
                mods.append(conv)
            else:
                w = _t(layer.kernel)
                conv = nn.Conv2d(w.shape[2], w.shape[3], k, s, pad, bias=layer.use_bias)
                conv.weight.data = w.permute(3, 2, 0, 1).contiguous()
                if layer.use_bias:
                    conv.bias.data = _t(layer.bias)
                mods.append(conv)
        elif isinstance(layer, L.BatchNormalization):
            mean = _t(layer.moving_mean)
            bn = (nn.BatchNorm2d if len(layer.input.shape) == 4 else nn.BatchNorm1d)(len(mean), eps=layer.epsilon)
            bn.running_mean.data, bn.running_var.data = mean, _t(layer.moving_variance)
            bn.weight.data, bn.bias.data = _t(layer.gamma), _t(layer.beta)
            mods.append(bn)
        elif isinstance(layer, L.MaxPooling2D):
            mods.append(nn.MaxPool2d(layer.pool_size[0]))
        elif isinstance(layer, L.Flatten):
            mods += [_Permute(0, 2, 3, 1), nn.Flatten()]  # Keras flattens channels last
        elif isinstance(layer, L.Dense):
            w = _t(layer.kernel)
            dense = nn.Linear(w.shape[0], w.shape[1], bias=layer.use_bias)
            dense.weight.data = w.t().contiguous()
            if layer.use_bias:
                dense.bias.data = _t(layer.bias)
            mods.append(dense)
        elif isinstance(layer, L.ReLU):
            mods.append(nn.ReLU())
        else:
            raise AssertionError(f"no twin for {type(layer).__name__}")
        activation = getattr(layer, "activation", None)
        if activation is keras.activations.relu:
            mods.append(nn.ReLU())
        else:
            assert activation in (None, keras.activations.linear), activation
    return nn.Sequential(*mods).eval()


def randomise(model, seed: int = 0) -> None:
    """Random weights, biases and BatchNorm statistics (Keras starts biases and BatchNorm at zero and one)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for v in layer.weights:
            shape = tuple(v.shape)
            if "variance" in v.path:
                value = rng.uniform(0.5, 2.0, shape)
            elif "gamma" in v.path:
                value = rng.uniform(-1.5, 1.5, shape)  # negative scales too: the merge must keep their sign
            else:
                value = rng.normal(0, 0.3, shape)
            v.assign(value.astype("float32"))


def small_cnn(bias: bool = True):
    """Even input (asymmetric "same" padding at stride 2: F.pad first), BatchNorm after a conv and after a dense
    layer (merged), depthwise and separable convolutions."""
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        L.Conv2D(8, 3, strides=2, padding="same", use_bias=bias), L.BatchNormalization(), L.ReLU(),
        L.DepthwiseConv2D(3, padding="same", use_bias=bias, activation="relu"),
        L.SeparableConv2D(12, 3, use_bias=bias, activation="relu"),
        L.MaxPooling2D(2), L.Flatten(),
        L.Dense(16, use_bias=bias), L.BatchNormalization(), L.ReLU(),
        L.Dense(5, use_bias=bias),
    ], name="small_cnn")


def vgg_style(bias: bool = True, name: str = "vgg_style"):
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        L.Conv2D(8, 3, padding="same", activation="relu", use_bias=bias),
        L.Conv2D(8, 3, padding="same", activation="relu", use_bias=bias), L.MaxPooling2D(2),
        L.Conv2D(16, 3, padding="same", activation="relu", use_bias=bias),
        L.Conv2D(16, 3, padding="same", activation="relu", use_bias=bias), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(32, activation="relu", use_bias=bias), L.Dense(4, use_bias=bias),
    ], name=name)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cnn():
    model = small_cnn()
    randomise(model)
    return model


@pytest.fixture(scope="module")
def vgg():
    model = vgg_style()
    randomise(model, 1)
    return model


# ----------------------------------------------------------------------------- relevance as in PyTorch

@pytest.mark.parametrize("which", ["cnn", "vgg"])
def test_relevance_equals_the_pytorch_twin(which, request):
    model = request.getfixturevalue(which)
    twin = torch_twin(model)
    shape = model.input_shape[1:]
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    x_cf = x.permute(0, 3, 1, 2)
    torch.testing.assert_close(model(x), twin(x_cf), rtol=1e-4, atol=1e-4)
    for name in COMPOSITES:
        ours = lrp.explain(model, x, composite=name)
        theirs = lrp.explain(twin, x_cf, composite=name)
        assert ours.relevance.shape == x.shape  # channels last, as the model reads
        assert relative(ours.relevance.permute(0, 3, 1, 2), theirs.relevance) < 1e-4, name
    # max-pooling read as average pooling (the brain-MRI VGG setting)
    comp = lrp.composite("epsilon-plus-flat", maxpool="average")
    ours = lrp.explain(model, x, composite=comp).relevance.permute(0, 3, 1, 2)
    assert relative(ours, lrp.explain(twin, x_cf, composite=comp).relevance) < 1e-4
    # z^B with one bound per channel (as for Caffe-style preprocessing)
    low, high = torch.tensor([-0.1, -0.2, -0.3]), torch.tensor([1.0, 1.1, 1.2])
    comp = lrp.composite("epsilon-gamma-box", low=low, high=high)
    ours = lrp.explain(model, x, composite=comp).relevance.permute(0, 3, 1, 2)
    assert relative(ours, lrp.explain(twin, x_cf, composite=comp).relevance) < 1e-4


def test_layers_are_named_and_batchnorm_merged(cnn):
    x = torch.rand(2, 16, 16, 3)
    res = lrp.explain(cnn, x, composite="epsilon-plus-flat")
    names = [layer.name for layer in cnn.layers if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense,
                                                                     L.SeparableConv2D))]
    assert [n for n in names if n in res.rules or f"{n}#1" in res.rules] == names
    assert res.rules[names[0]].startswith("Flat")  # the first layer reads the pixels
    # merged: the conservation at the conv's output is that of its merged BatchNorm (no LRP-0 layer between)
    twin = torch_twin(cnn)
    theirs = lrp.explain(twin, x.permute(0, 3, 1, 2), composite="epsilon-plus-flat")
    torch.testing.assert_close(res.conservation[names[0]], theirs.conservation["0"] if "0" in theirs.conservation
                               else theirs.conservation["1"], rtol=1e-4, atol=1e-5)


def test_conservation_and_gradient_x_input_without_biases():
    model = vgg_style(bias=False)
    randomise(model, 2)
    x = torch.rand(4, 16, 16, 3)
    for name in ("lrp0", "epsilon-plus-flat", "epsilon-alpha2-beta1"):
        res = lrp.explain(model, x, composite=name)
        explained = res.logits.gather(1, res.target[:, None])[:, 0]
        torch.testing.assert_close(res.relevance.sum((1, 2, 3)), explained, rtol=1e-4, atol=1e-5)
    res = lrp.explain(model, x, composite="lrp0")
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf).gather(1, res.target[:, None]).sum(), leaf)
    torch.testing.assert_close(res.relevance, grad * x, rtol=1e-4, atol=1e-6)


def test_explain_leaves_the_layers_as_they_were(cnn):
    before = {id(layer): dict(layer.__dict__) for layer in cnn._flatten_layers(include_self=False)}
    weights = [w.numpy().copy() for w in cnn.weights]
    lrp.explain(cnn, torch.rand(1, 16, 16, 3))
    with pytest.raises(lrp.TargetError):
        lrp.explain(cnn, torch.rand(1, 16, 16, 3), target=99)
    for layer in cnn._flatten_layers(include_self=False):
        assert "call" not in layer.__dict__
        assert layer.__dict__.keys() == before[id(layer)].keys()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(weights, cnn.weights))


# ----------------------------------------------------------------------------- files, preprocessing, the CLI

@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_saved_models_load_and_explain_as_the_model_in_memory(tmp_path, vgg, suffix):
    path = tmp_path / f"model{suffix}"
    vgg.save(path)
    pipeline = Pipeline.load(str(path))
    assert pipeline.loaded.kind == "keras" and pipeline.input_shape == (3, 16, 16)
    assert pipeline.pre.scale == 255.0 and pipeline.pre.bgr  # named vgg...: Caffe's convention, as Keras' VGG16
    given = Pipeline.load(str(path), pixels="tf").pre
    assert given.scale == 1.0 and not given.bgr and given.mean == (0.5, 0.5, 0.5) and given.size == 16
    x = torch.rand(2, 3, 16, 16)
    loaded = lrp.explain(pipeline.model, x).relevance
    direct = lrp.explain(vgg, x.permute(0, 2, 3, 1)).relevance.permute(0, 3, 1, 2)
    assert relative(loaded, direct) < 1e-5


def test_caffe_preprocessing_and_its_bounds(tmp_path):
    from PIL import Image
    model = vgg_style(name="vgg16")  # a keras.applications VGG's name: Caffe's preprocessing
    randomise(model, 3)
    path = tmp_path / "vgg16.keras"
    model.save(path)
    pipeline = Pipeline.load(str(path))
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    x = pipeline.image(tmp_path / "in.png").x
    expected = torch.tensor(pixels[..., ::-1].copy(), dtype=torch.float32).permute(2, 0, 1) \
        - torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-3)
    comp, note = pipeline.composite("epsilon-gamma-box")
    low, high = pipeline.pre.pixel_range()
    torch.testing.assert_close(low, -torch.tensor(CAFFE_MEAN_BGR))
    torch.testing.assert_close(high, 255 - torch.tensor(CAFFE_MEAN_BGR))
    assert "0..255" in note


def test_cli_explains_keras_files(tmp_path, vgg, capsys):
    from PIL import Image
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for suffix in (".keras", ".h5"):
        vgg.save(tmp_path / f"m{suffix}")
        out = tmp_path / f"out{suffix[1:]}"
        assert main(["explain", str(tmp_path / "a.png"), "--model", str(tmp_path / f"m{suffix}"), "--out",
                     str(out)]) == 0
        rows = (out / "summary.csv").read_text().splitlines()
        assert len(rows) == 2 and ",ok" in rows[1]
        assert np.load(out / "a_relevance.npy").shape == (3, 16, 16)
    # a convention given by hand: the same model read as Caffe's VGG reads (BGR, 0..255 minus the mean)
    assert main(["explain", str(tmp_path / "a.png"), "--model", str(tmp_path / "m.keras"), "--pixels", "caffe",
                 "--composite", "epsilon-gamma-box", "--out", str(tmp_path / "caffe")]) == 0
    assert "0..255" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", str(tmp_path / "a.png"), "--model", str(tmp_path / "m.keras"), "--pixels", "bgr"])


def test_bad_files_are_refused_in_one_line(tmp_path, capsys):
    corrupt = tmp_path / "broken.keras"
    corrupt.write_bytes(os.urandom(256))
    not_hdf5 = tmp_path / "model.h5"
    not_hdf5.write_text("not a model")
    unknown = tmp_path / "model.bin"
    unknown.write_bytes(os.urandom(64))
    for path, words in ((corrupt, "cannot load"), (not_hdf5, "not an HDF5 file"),
                        (unknown, "expected a torch.export program"), (tmp_path / "none.keras", "does not exist")):
        with pytest.raises(ModelError, match=words) as info:
            Pipeline.load(str(path))
        assert "\n" not in str(info.value)
    import h5py
    weights_only = tmp_path / "vgg16_weights.h5"
    with h5py.File(weights_only, "w") as f:
        f.create_group("block1_conv1")
    with pytest.raises(ModelError, match="keras:VGG16 --weights"):
        Pipeline.load(str(weights_only))
    with pytest.raises(ModelError, match="keras.applications has no 'VGG17'"):
        Pipeline.load("keras:VGG17")
    assert main(["explain", str(tmp_path), "--model", str(corrupt)]) != 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_wrong_backend_and_a_missing_keras_are_named(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ModelError, match="KERAS_BACKEND=torch"):
        import_keras()
    with pytest.raises(ModelError, match="KERAS_BACKEND=torch"):
        lrp.explain(vgg_style(), torch.rand(1, 16, 16, 3))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras raises ImportError
    with pytest.raises(ModelError, match=r"lrp\[keras\]"):
        import_keras()


def test_keras_applications_architecture_with_weights(tmp_path):
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(96, 96, 3))
    weights = tmp_path / "mnv3.weights.h5"
    model.save_weights(weights)
    pipeline = Pipeline.load("keras:MobileNetV3Small", weights=str(weights))
    assert pipeline.pre.scale == 255.0  # MobileNetV3 rescales inside the model
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(model.weights, pipeline.model.model.weights))
    assert Path(weights).exists()


def test_the_docs_example_runs(capsys):
    import re
    page = (Path(__file__).resolve().parent.parent / "docs" / "onnx-keras.md").read_text()
    section = page.split("\n## Keras\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "onnx-keras.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([2, 32, 32, 3])" in printed
    assert re.search(r"\['conv2d(_\d+)?', 'dense(_\d+)?'\]", printed)  # Keras numbers layer names per session


def test_lrp_serve_explains_a_keras_model(tmp_path, vgg):
    pytest.importorskip("fastapi", reason="the web extra is not installed: pip install 'lrp[web]'")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from lrp.web.app import create_app
    vgg.save(tmp_path / "m.keras")
    client = TestClient(create_app([str(tmp_path / "m.keras")], warm_up=False))
    listed = client.get("/api/models").json()["models"][0]
    assert listed["input_shape"] == [3, 16, 16]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    response = client.post("/api/explain", files={"image": ("x.png", buffer.getvalue(), "image/png")},
                           data={"composite": "epsilon-plus-flat"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["probabilities"]) == 4 and body["heatmap"].startswith("data:image/png;base64,")


def test_a_model_cut_after_a_convolution_does_not_run_the_batchnorm_that_follows_it(cnn):
    """The conv feeds a BatchNorm in the full model's graph; a feature extractor cut at the conv never calls it."""
    conv = cnn.layers[0]
    features = keras.Model(cnn.inputs, conv.output)
    x = torch.rand(2, 16, 16, 3)
    res = lrp.explain(features, x, composite="epsilon-plus-flat", start=torch.ones(2, 8, 8, 8))
    torch.testing.assert_close(res.output, features(x))
    head = keras.Sequential([features, L.Flatten(), L.Dense(3)])
    torch.testing.assert_close(lrp.explain(head, x).output, head(x))


def test_training_mode_batchnorm_is_refused_in_one_line_and_a_frozen_one_is_explained():
    inp = keras.Input((8, 8, 3))
    bn = L.BatchNormalization()
    out = L.Dense(2)(L.Flatten()(bn(L.Conv2D(4, 3)(inp), training=True)))
    model = keras.Model(inp, out)
    with pytest.raises(lrp.UnsupportedOperationError, match="training=True") as info:
        lrp.explain(model, torch.rand(1, 8, 8, 3))
    assert "\n" not in str(info.value) and "Exception encountered" not in str(info.value)
    assert not any("call" in layer.__dict__ for layer in model._flatten_layers(include_self=False))
    bn.trainable = False  # Keras runs a frozen BatchNorm in inference mode
    x = torch.rand(2, 8, 8, 3)
    torch.testing.assert_close(lrp.explain(model, x).output, model(x))


def test_channels_first_models_and_files_without_a_suffix_load(tmp_path):
    from PIL import Image
    model = keras.Sequential([keras.Input((3, 16, 16)), L.Conv2D(4, 3, data_format="channels_first"), L.Flatten(),
                              L.Dense(3)])
    model.save(tmp_path / "cf.keras")
    pipeline = Pipeline.load(str(tmp_path / "cf.keras"))
    assert pipeline.input_shape == (3, 16, 16) and pipeline.model is not None
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    torch.testing.assert_close(pipeline.explain([pipeline.image(tmp_path / "a.png")])[0].relevance.shape,
                               torch.Size([3, 16, 16]))
    (tmp_path / "model_without_suffix").write_bytes((tmp_path / "cf.keras").read_bytes())
    assert Pipeline.load(str(tmp_path / "model_without_suffix")).loaded.kind == "keras"
