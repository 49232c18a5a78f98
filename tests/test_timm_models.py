"""timm models that once stopped ``explain`` (GhostNet: ``x += shortcut`` into a slice; ConvNeXt-V2:
GlobalResponseNorm's ``norm``; ResMLP: Affine's ``addcmul``; ConViT: GPSA's ``div`` by the attention's row sums;
EVA-02: the rotary embedding's ``type_as``; Sequencer2D: ``nn.LSTM``): each must be explained soundly.

Random weights, small inputs, batch 1. Each model is checked (1) as built, in float32, with ``epsilon`` and
``epsilon-plus-flat``: the relevance has the input's shape and is finite, the forward under ``explain`` gives the
model's own output, and the model is left as it was (output, modes, flags, hooks); and (2) on a float64 copy with
every additive constant zeroed (biases, BatchNorm running means, ResMLP's Affine beta, class tokens and absolute
position embeddings; RoPE tables, LayerScale and BatchNorm scales stay), with LRP-0 and CP-LRP
(``attention="cp"``: attention weights held fixed): there the relevance at the input must add up to the start
relevance. On these copies the deviation measured is at most 2e-14 (float64 round-off); ``CONSERVATION_TOL``
leaves room for other BLAS builds and still catches a rule that loses or invents relevance (ConViT with its GPSA
attention not recognised as attention gave 3.7 and 0.65).

Two need engine changes (as of this file): GhostNet v1/v2 (an in-place add into a view of a tensor that depends
on the input is refused) and ConViT (GPSA mixes its softmax with a fixed positional attention and renormalises;
the mix is not recognised as attention weights, so CP-LRP does not hold it fixed, and AttnLRP's softmax rule is
not applied: relevance is lost to the positional term).
"""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

import lrp  # noqa: E402

CONSERVATION_TOL = 1e-9

# name: (timm.create_model keywords, input size): the smallest variant, at a small input size
MODELS = {
    "ghostnet_050": ({}, 32),  # GhostBottleneck: ``x += shortcut`` into a slice of a concatenation
    "ghostnetv2_100": ({}, 48),  # the same, and the DFC attention's sigmoid gate
    "convnextv2_atto": ({}, 32),  # GlobalResponseNorm: x * norm(x) / mean(norm(x)), addcmul
    "resmlp_12_224": ({"img_size": 32}, 32),  # Affine: addcmul(beta, alpha, x)
    # GPSA: a softmax mixed with a fixed positional attention (weight sigmoid(1) = 0.73 at init), renormalised
    "convit_tiny": ({"img_size": 32}, 32),
    "eva02_tiny_patch14_224": ({"img_size": 28}, 28),  # rotary embedding (type_as), SwiGLU, fused attention
    "sequencer2d_s": ({"layers": [2, 1, 1, 1]}, 28),  # bidirectional nn.LSTM over rows and columns (fewer blocks)
}

# additive constants: zeroed on the copy that checks conservation (parameters, and these buffers)
ADDITIVE = ("bias", "beta", "cls_token", "pos_embed", "bias_ih_l0", "bias_hh_l0", "bias_ih_l0_reverse",
            "bias_hh_l0_reverse", "q_bias", "k_bias", "v_bias")
ADDITIVE_BUFFERS = ("running_mean", "k_bias")


def _build(name: str) -> tuple[torch.nn.Module, int]:
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                torch.nn.init.normal_(module.weight, std=0.1)  # zero-initialised heads (MLP-Mixer family)
            if type(module).__name__ == "GlobalResponseNorm":
                module.weight.normal_()  # zero-initialised: GRN would be x + bias
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # fresh statistics are 0 and 1
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        for param_name, param in model.named_parameters():
            if param_name.rsplit(".", 1)[-1] in ("ls1", "ls2"):  # ResMLP's LayerScale starts at 1e-4
                param.uniform_(0.5, 1.0)
    return model, size


def _bias_free(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ADDITIVE:
                param.zero_()
        for name, buffer in model.named_buffers():
            if name.rsplit(".", 1)[-1] in ADDITIVE_BUFFERS:
                buffer.zero_()
    return model


def _state(model: torch.nn.Module) -> tuple:
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_is_explained(name):
    model, size = _build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    state = _state(model)
    with torch.no_grad():
        before = model(x)
    for comp in ("epsilon", "epsilon-plus-flat"):
        res = lrp.explain(model, x, target=0, composite=comp)
        assert res.relevance.shape == x.shape
        assert torch.isfinite(res.relevance).all()
        assert res.relevance.abs().sum() > 0
        torch.testing.assert_close(res.output, before)  # the forward under explain is the model's own
        assert _state(model) == state
        with torch.no_grad():
            assert torch.equal(model(x), before)

    exact = _bias_free(model)
    res = lrp.explain(exact, x.double(), target=0, composite=lrp.composite("lrp0", attention="cp"))
    assert res.start.abs().sum() > 0
    torch.testing.assert_close(res.conservation["input"], torch.ones(1, dtype=torch.float64), rtol=0.0,
                               atol=CONSERVATION_TOL)
