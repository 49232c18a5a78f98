"""Mamba (issue 13, item 5): the MambaLRP rules (Jafari et al., NeurIPS 2024) on Hugging Face's ``MambaMixer``.

MambaLRP holds the selection (the input-dependent ``Δ, B, C``) fixed, gives SiLU the identity rule, splits a
product of two activations evenly and holds RMSNorm's scale fixed. Its authors compute it as gradient x input of
a forward with those values detached; that forward is written out here, independently of lrp's capture, as the
reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lrp
from lrp.engine import ssm

from architectures import LastToken

transformers = pytest.importorskip("transformers")


def _mamba(bias_free: bool = False):
    config = transformers.MambaConfig(vocab_size=100, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                                      conv_kernel=4, residual_in_fp32=False)
    torch.manual_seed(0)
    lm = transformers.MambaForCausalLM(config).double().eval()
    if bias_free:  # dt_proj's bias is part of the selection (held fixed): it takes no relevance
        for name, p in lm.named_parameters():
            if name.endswith("bias") and "dt_proj" not in name:
                p.data.zero_()
    return lm


def _ids(n: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 100, (n, length), generator=torch.Generator().manual_seed(1))


def test_mamba_is_explained_without_registration_and_left_as_it_was():
    lm = _mamba()
    model = LastToken(lm)
    ids = _ids()
    before = model(ids)
    res = lrp.explain(model, ids, composite="epsilon")
    assert res.relevance.shape == ids.shape and torch.isfinite(res.relevance).all()
    assert (res.relevance != 0).all()
    assert all("forward" not in m.__dict__ for m in lm.modules())  # the stand-in forward is gone again
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)


def test_the_stand_in_forward_computes_what_the_mixer_computes():
    mixer = _mamba().backbone.layers[0].mixer
    torch.manual_seed(5)
    mixer.in_proj.bias = torch.nn.Parameter(torch.randn(mixer.in_proj.out_features, dtype=torch.float64))
    with torch.no_grad():
        mixer.conv1d.bias.normal_()
    h = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    # the mixer casts B to float32 also in a float64 model: agreement to float32's precision
    torch.testing.assert_close(ssm.mixer_forward(mixer, h), mixer(h), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ssm.mixer_forward(mixer, h, attention_mask=mask), mixer(h, attention_mask=mask),
                               rtol=1e-6, atol=1e-9)


def test_mamba_conserves_relevance_when_bias_free():
    res = lrp.explain(LastToken(_mamba(bias_free=True)), _ids(), composite="lrp0")
    # RMSNorm computes in float32 also in a float64 model: conservation to float32's precision
    torch.testing.assert_close(res.conservation["input"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def _rms(norm, x):
    x32 = x.to(torch.float32)
    scale = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
    return norm.weight * (x32 * scale).to(x.dtype)


def _silu(x):
    return x * torch.sigmoid(x).detach()


def _half(a, b):  # a product of two activations: each factor gets half the relevance
    p = a * b
    return 0.5 * p + 0.5 * p.detach()


def _mixer(m, x):
    n = x.shape[1]
    u, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    u = _silu(m.conv1d(u)[..., :n])
    step, B, C = torch.split(m.x_proj(u.transpose(1, 2)), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size],
                             dim=-1)
    delta = F.softplus(m.dt_proj(step)).transpose(1, 2).detach()
    A = -torch.exp(m.A_log)
    decay, B, C = torch.exp(A[None, :, None, :] * delta[..., None]), B.detach(), C.detach()
    h = torch.zeros(x.shape[0], u.shape[1], m.ssm_state_size, dtype=x.dtype)
    ys = []
    for t in range(n):
        h = decay[:, :, t] * h + (delta[:, :, t, None] * B[:, None, t]) * u[:, :, t, None]
        ys.append(h @ C[:, t, :, None])
    y = torch.cat(ys, -1) + u * m.D[None, :, None]
    return m.out_proj(_half(y, _silu(z)).transpose(1, 2))


def test_mambalrp_matches_its_formulas_written_out():
    lm = _mamba()
    ids = _ids()
    res = lrp.explain(LastToken(lm), ids, composite="lrp0")
    emb = lm.backbone.embeddings(ids).detach().requires_grad_(True)
    h = emb
    for block in lm.backbone.layers:
        h = h + _mixer(block.mixer, _rms(block.norm, h))
    logits = lm.lm_head(_rms(lm.backbone.norm_f, h))[:, -1]
    logits.gather(1, res.target[:, None]).sum().backward()
    reference = (emb * emb.grad).sum(-1)
    torch.testing.assert_close(res.relevance, reference, rtol=1e-6, atol=1e-9)


def test_a_continuation_refuses_padded_prompts():
    lm = _mamba()
    ids = _ids()
    ids[1, 0] = 0
    with pytest.raises(lrp.LRPError, match="padding"):
        lrp.explain(lrp.language.Continuation(lm, 5, pad_token_id=0), ids)


def test_incremental_decoding_is_refused_with_the_way_out():
    lm = _mamba()

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=True).logits[:, -1]

    with pytest.raises(lrp.UnsupportedOperationError, match="use_cache=False"):
        lrp.explain(WithCache(), _ids())
