"""Recurrent layers (issue 13, item 4): ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (uni- and bidirectional, several
layers, ``batch_first``, packed sequences) and their cells, with the LRP-LSTM rule of Arras et al.: gates are
held fixed and get no relevance, the signal takes all. Relevance comes out per time step and is conserved on
bias-free networks with zero initial states."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lrp

F_IN, H, T, N = 3, 5, 6, 4
KINDS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn-tanh": nn.RNN, "rnn-relu": nn.RNN}


class Classifier(nn.Module):
    """recurrent layer -> (the last step's output, or the final hidden states) -> fc."""

    def __init__(self, kind: str, bias: bool = True, bidirectional: bool = False, layers: int = 1,
                 batch_first: bool = True, packed: bool = False, final_state: bool = False):
        super().__init__()
        torch.manual_seed(0)
        extra = {"nonlinearity": kind.split("-")[1]} if kind.startswith("rnn") else {}
        self.rnn = KINDS[kind](F_IN, H, num_layers=layers, bias=bias, bidirectional=bidirectional,
                               batch_first=batch_first, **extra)
        self.fc = nn.Linear(H * (2 if bidirectional else 1) * (layers if final_state else 1), 2, bias=bias)
        self.batch_first, self.packed, self.final_state = batch_first, packed, final_state

    def forward(self, x, lengths=None):
        if self.packed:
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = self.rnn(x if self.batch_first or self.packed else x.transpose(0, 1))
        if self.final_state:
            h = state[0] if isinstance(state, tuple) else state
            return self.fc(h.transpose(0, 1).reshape(h.shape[1], -1))
        if self.packed:
            out, _ = pad_packed_sequence(out, batch_first=True)
            return self.fc(out.sum(1))
        return self.fc((out if self.batch_first else out.transpose(0, 1))[:, -1])


def _x(n: int = N, t: int = T) -> torch.Tensor:
    return torch.randn(n, t, F_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


CASES = [dict(), dict(bidirectional=True), dict(layers=2), dict(batch_first=False),
         dict(bidirectional=True, layers=2, final_state=True)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_bias_free_recurrent_networks_conserve_relevance(kind, case):
    model = Classifier(kind, bias=False, **case).double().eval()
    x = _x()
    res = lrp.explain(model, x, target=0, composite="lrp0")
    torch.testing.assert_close(res.output, model(x))
    assert res.relevance.shape == x.shape  # relevance per time step and feature
    torch.testing.assert_close(res.conservation["input"], torch.ones(N, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_gates_get_no_relevance():
    # a one-step LSTM with zero state: h = o * tanh(i * tanh(g)); with the gates held fixed and LRP-0 everywhere
    # the input relevance is the one of the signal path only, x * d(h)/dx with o and i as constants
    model = Classifier("lstm", bias=False).double().eval()
    x = _x(t=1)
    res = lrp.explain(model, x, target=0, composite="lrp0")
    w_ih = model.rnn.weight_ih_l0
    w_i, w_f, w_g, w_o = w_ih.chunk(4, 0)
    with torch.no_grad():
        i, g, o = torch.sigmoid(x[:, 0] @ w_i.T), x[:, 0] @ w_g.T, torch.sigmoid(x[:, 0] @ w_o.T)
        h = o * torch.tanh(i * torch.tanh(g))  # the forget gate multiplies the zero initial cell
        r_h = h * model.fc.weight[0]  # relevance of h for class 0 (bias-free fc)
        # identity at both tanh, gates fixed: the relevance of g is r_h, split over x by LRP-0 of W_g
        expected = x[:, 0] * ((r_h / g) @ w_g)
    assert w_f.shape == (H, F_IN)
    torch.testing.assert_close(res.relevance[:, 0], expected, rtol=1e-9, atol=1e-12)


class CellLoop(nn.Module):
    """The same LSTM / GRU / RNN run step by step with its cell module (``torch.lstm_cell`` & co.)."""

    def __init__(self, kind: str):
        super().__init__()
        ref = Classifier(kind)
        cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}.get(kind, nn.RNNCell)
        extra = {"nonlinearity": kind.split("-")[1]} if kind.startswith("rnn") else {}
        self.cell, self.fc, self.kind = cell(F_IN, H, **extra), ref.fc, kind
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.cell, name).copy_(getattr(ref.rnn, name + "_l0"))

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if isinstance(state, tuple) else state
        return self.fc(h)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("composite", ["epsilon", "epsilon-plus"])
def test_a_layer_and_its_cell_in_a_loop_give_the_same_relevance(kind, composite):
    layer, loop = Classifier(kind).double().eval(), CellLoop(kind).double().eval()
    x = _x()
    torch.testing.assert_close(loop(x), layer(x))
    torch.testing.assert_close(lrp.explain(loop, x, target=1, composite=composite).relevance,
                               lrp.explain(layer, x, target=1, composite=composite).relevance, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences_are_explained_sequence_by_sequence(kind, bidirectional):
    # padding gets no relevance, and each sequence gets what it gets when explained alone, unpadded
    model = Classifier(kind, bidirectional=bidirectional, packed=True).double().eval()
    lengths = torch.tensor([6, 2, 4, 1])
    x = _x() * (torch.arange(T)[None, :, None] < lengths[:, None, None])

    class Fixed(nn.Module):
        def __init__(self, lengths):
            super().__init__()
            self.model, self.lengths = model, lengths

        def forward(self, x):
            return self.model(x, self.lengths)

    res = lrp.explain(Fixed(lengths), x, target=0, composite="epsilon")
    for n, length in enumerate(lengths.tolist()):
        assert torch.equal(res.relevance[n, length:], torch.zeros_like(res.relevance[n, length:]))
        alone = lrp.explain(Fixed(lengths[n:n + 1]), x[n:n + 1, :length], target=0, composite="epsilon")
        torch.testing.assert_close(res.relevance[n, :length], alone.relevance[0], rtol=1e-9, atol=1e-12)
