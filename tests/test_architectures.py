"""Modern architectures: gates, normalisations, attention (AttnLRP and CP-LRP), embeddings, text."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp
from architectures import _order_one


class SEBlock(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc(pool(x))) (the gate gets no relevance)."""

    def __init__(self, c=8, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=bias)
        self.fc1 = nn.Conv2d(c, 4, 1, bias=bias)
        self.fc2 = nn.Conv2d(4, c, 1, bias=bias)
        self.head = nn.Linear(c, 4, bias=bias)

    def forward(self, x):
        h = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        h = h * gate
        return self.head(h.mean((2, 3)))


class DenseBlock(nn.Module):
    """DenseNet-style: BN-ReLU-conv, features concatenated."""

    def __init__(self, bias=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(4 + 4 * i), nn.ReLU(), nn.Conv2d(4 + 4 * i, 4, 3, padding=1, bias=bias))
            for i in range(3))
        self.norm = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3, bias=bias)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(F.relu(self.norm(torch.cat(features, 1))).mean((2, 3)))


class Encoder(nn.Module):
    """A transformer encoder block (attention + LayerNorm + MLP) on a sequence, mean-pooled."""

    def __init__(self, bias=False, d=16):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(d, 4, dim_feedforward=32, dropout=0.1, batch_first=True,
                                                bias=bias)
        self.head = nn.Linear(d, 3, bias=bias)

    def forward(self, x):
        return self.head(self.block(x).mean(1))


def _bias_free_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.zero_()
            m.running_mean.zero_()  # a BatchNorm without shift: bias-free
    return model


@pytest.mark.parametrize("make, shape", [
    (lambda: SEBlock(), (3, 3, 8, 8)),
    (lambda: _bias_free_batchnorm(DenseBlock()), (3, 3, 8, 8)),
])
@pytest.mark.parametrize("composite", ["lrp0", "epsilon-plus-flat", "epsilon"])
def test_bias_free_gated_and_dense_blocks_conserve(make, shape, composite):
    torch.manual_seed(0)
    model = _order_one(make()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    res = lrp.explain(model, x, composite=composite)
    tol = 1e-8 if composite == "lrp0" else 1e-4
    torch.testing.assert_close(res.relevance.flatten(1).sum(1), res.start.sum(1), rtol=tol, atol=0)


def test_gate_gets_no_relevance():
    """x * sigmoid(g): relevance goes to x only, so it equals the relevance of a model where the gate is fixed."""
    torch.manual_seed(0)
    model = SEBlock().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = lrp.explain(model, x, composite="lrp0")
    # reference by gradient x input with the gate detached
    x_ = x.clone().requires_grad_(True)
    h = F.relu(model.conv(x_))
    gate = torch.sigmoid(model.fc2(F.relu(model.fc1(h.mean((2, 3), keepdim=True))))).detach()
    out = model.head((h * gate).mean((2, 3)))
    (g,) = torch.autograd.grad(out.gather(1, res.target[:, None]).sum(), x_)
    torch.testing.assert_close(res.relevance, g * x)


def test_transformer_encoder_block_conserves_with_cp_lrp():
    torch.manual_seed(0)
    model = _order_one(Encoder()).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    res = lrp.explain(model, x, composite=lrp.composite("lrp0", attention="cp"))
    torch.testing.assert_close(res.relevance.flatten(1).sum(1), res.start.sum(1), rtol=1e-8, atol=0)
    res = lrp.explain(model, x, composite=lrp.composite("epsilon", attention="cp"))
    torch.testing.assert_close(res.relevance.flatten(1).sum(1), res.start.sum(1), rtol=1e-4, atol=0)


def test_transformer_output_unchanged_and_model_restored():
    torch.manual_seed(0)
    model = Encoder(bias=True)
    model.train()
    x = torch.randn(2, 5, 16)
    res = lrp.explain(model, x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.output, model(x), rtol=1e-5, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())


# --------------------------------------------------------------------------- AttnLRP, written out

def _attnlrp_reference(x, wq, wk, wv, wo, target):
    """Single-head self-attention, sum-pooled, relevance by the AttnLRP rules with explicit loops:
    LRP-0 at linear maps, proportional split and then the uniform rule at the products q.k and A.v,
    and R_S = S * (R_A - A * sum R_A) at the softmax."""
    T, d = x.shape
    q, k, v = x @ wq, x @ wk, x @ wv
    S = q @ k.T / math.sqrt(d)
    A = torch.softmax(S, -1)
    O = A @ v
    y = O.sum(0) @ wo
    R_y = torch.zeros_like(y)
    R_y[target] = y[target]
    # y_j = sum_{t,i} O[t,i] wo[i,j]
    R_O = torch.zeros_like(O)
    for t in range(T):
        for i in range(O.shape[1]):
            R_O[t, i] = sum(O[t, i] * wo[i, j] / y[j] * R_y[j] for j in range(len(y)))
    # O[t,i] = sum_s A[t,s] v[s,i]
    R_A, R_v = torch.zeros_like(A), torch.zeros_like(v)
    for t in range(T):
        for i in range(O.shape[1]):
            for s in range(T):
                share = A[t, s] * v[s, i] / O[t, i] * R_O[t, i]
                R_A[t, s] += share / 2
                R_v[s, i] += share / 2
    R_S = S * (R_A - A * R_A.sum(-1, keepdim=True))
    R_q, R_k = torch.zeros_like(q), torch.zeros_like(k)
    for t in range(T):
        for s in range(T):
            for i in range(d):
                share = q[t, i] * k[s, i] / math.sqrt(d) / S[t, s] * R_S[t, s]
                R_q[t, i] += share / 2
                R_k[s, i] += share / 2
    R_x = torch.zeros_like(x)
    for name, (w, z, R) in {"q": (wq, q, R_q), "k": (wk, k, R_k), "v": (wv, v, R_v)}.items():
        for t in range(T):
            for m in range(d):
                R_x[t, m] += sum(x[t, m] * w[m, i] / z[t, i] * R[t, i] for i in range(z.shape[1]))
    return R_x


class TinyAttention(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64)) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(d, out, generator=g, dtype=torch.float64))

    def forward(self, x):  # x: (N, T, d)
        q, k, v = x @ self.wq, x @ self.wk, x @ self.wv
        A = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), -1)
        return (A @ v).sum(1) @ self.wo


def test_attnlrp_matches_the_formulas_written_out():
    model = TinyAttention(4, 3)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    res = lrp.explain(model, x, composite="lrp0")
    for n in range(2):
        ref = _attnlrp_reference(x[n], model.wq.data, model.wk.data, model.wv.data, model.wo.data,
                                 int(res.target[n]))
        torch.testing.assert_close(res.relevance[n], ref, rtol=1e-9, atol=1e-12)


def test_sdpa_and_multihead_attention_match_explicit_attention():
    """F.scaled_dot_product_attention and nn.MultiheadAttention are decomposed into the same rules."""
    torch.manual_seed(0)
    d = 8
    mha = nn.MultiheadAttention(d, 2, batch_first=True, bias=False).double()

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = mha, nn.Linear(d, 3, bias=False).double()

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    class WithSDPA(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, x):
            n, t, _ = x.shape
            qkv = F.linear(x, mha.in_proj_weight).reshape(n, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            o = F.linear(o.transpose(1, 2).reshape(n, t, d), mha.out_proj.weight)
            return self.m.head(o.mean(1))

    a = WithMHA()
    x = torch.randn(2, 5, d, dtype=torch.float64)
    r1 = lrp.explain(a, x, composite="lrp0")
    r2 = lrp.explain(WithSDPA(a), x, composite="lrp0")
    torch.testing.assert_close(r1.output, r2.output)
    torch.testing.assert_close(r1.relevance, r2.relevance)


# --------------------------------------------------------------------------- text

class TextClassifier(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 12, d))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, bias=False), 2,
            enable_nested_tensor=False)
        self.head = nn.Linear(d, 2, bias=False)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        return self.head(self.encoder(h).mean(1))


def test_token_ids_give_relevance_per_token():
    torch.manual_seed(0)
    model = _order_one(TextClassifier()).double()
    ids = torch.randint(0, 50, (3, 7))
    res = lrp.explain(model, ids, composite=lrp.composite("lrp0", attention="cp"))
    assert res.relevance.shape == (3, 7)
    # the positional embedding is zero, so every bit of relevance reaches the token embeddings
    torch.testing.assert_close(res.relevance.sum(1), res.start.sum(1), rtol=1e-8, atol=0)
    # the same as explaining the embedded sequence directly and summing over the embedding dimension
    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, h):
            return self.m.head(self.m.encoder(h + self.m.pos[:, : h.shape[1]]).mean(1))

    emb = model.embed(ids).detach()
    direct = lrp.explain(Embedded(), emb, composite=lrp.composite("lrp0", attention="cp"))
    torch.testing.assert_close(res.relevance, direct.relevance.sum(-1))


def test_token_html():
    html = lrp.token_html(["the", "<cat>", "sat"], torch.tensor([0.5, -1.0, 0.0]))
    assert "&lt;cat&gt;" in html and "rgb(" in html and html.count("<span") == 3


@pytest.mark.parametrize("norm", [lambda d: nn.RMSNorm(d), lambda d: nn.GroupNorm(2, d, affine=True),
                                  lambda d: nn.LayerNorm(d, bias=False)])
def test_normalisations_conserve_when_bias_free(norm):
    """Normalisations with their statistics held fixed are linear maps without bias: relevance is conserved."""
    torch.manual_seed(0)
    d = 8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(6, d, bias=False), norm(d), nn.Linear(d, 3, bias=False)

        def forward(self, x):
            h = self.fc1(x)
            if isinstance(self.norm, nn.GroupNorm):
                return self.fc2(F.relu(self.norm(h[:, :, None]))[:, :, 0])
            return self.fc2(F.relu(self.norm(h)))

    model = Net().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    res = lrp.explain(model, x, composite="lrp0")
    torch.testing.assert_close(res.relevance.sum(1), res.start.sum(1), rtol=1e-8, atol=0)
