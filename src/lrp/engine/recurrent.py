"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) written out step by step in plain torch ops, so that
the engine sees (and applies rules to) each step, as ``attention`` does for attention.

The gates are held fixed (``.detach()``): the LRP-LSTM rule of Arras et al. (2017, 2019), where a product of a
gate and a signal passes all of its relevance to the signal and the gates get none. Each step's input and
hidden projections are dense layers (the composite's rules); ``tanh`` passes relevance on unchanged (identity
rule); the additive cell update splits it in proportion. On a bias-free network with zero initial states
relevance is therefore conserved. Padded (packed) sequences are supported: each step runs on the sequences
that are still going, as ``torch.nn.utils.rnn.PackedSequence`` orders them.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOperationError
from . import values

Tensor = torch.Tensor
# one step of a cell: (input at t, state) -> state; the state is (h,) or (h, c), the output is its first element
Cell = Callable[[Tensor, tuple], tuple]


def _gate(pre: Tensor) -> Tensor:
    """A gate, held fixed: computed from the detached pre-activation, so it gets no relevance (and costs the
    capture nothing)."""
    return torch.sigmoid(pre.detach())


def _lstm_cell(w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor]) -> Cell:
    def step(x_proj: Tensor, state: tuple) -> tuple:
        h, c = state
        i, f, g, o = (x_proj + F.linear(h, w_hh, b_hh)).chunk(4, -1)
        c = _gate(f) * c + _gate(i) * torch.tanh(g)
        h = _gate(o) * torch.tanh(c)
        return (F.linear(h, w_hr) if w_hr is not None else h), c
    return step


def _gru_cell(w_hh: Tensor, b_hh: Optional[Tensor]) -> Cell:
    def step(x_proj: Tensor, state: tuple) -> tuple:
        (h,) = state
        x_r, x_z, x_n = x_proj.chunk(3, -1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
        r, z = _gate(x_r + h_r), _gate(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)
    return step


def _rnn_cell(w_hh: Tensor, b_hh: Optional[Tensor], activation: Callable[[Tensor], Tensor]) -> Cell:
    def step(x_proj: Tensor, state: tuple) -> tuple:
        (h,) = state
        return (activation(x_proj + F.linear(h, w_hh, b_hh)),)
    return step


def _run(cell: Cell, xs: Sequence[Tensor], state: tuple, reverse: bool) -> tuple[list, tuple]:
    """Outputs per step (in time order) and the final state, for sequences of equal length."""
    outputs: list = [None] * len(xs)
    for t in (reversed(range(len(xs))) if reverse else range(len(xs))):
        state = cell(xs[t], state)
        outputs[t] = state[0]
    return outputs, state


def _run_packed(cell: Cell, xs: Sequence[Tensor], sizes: list[int], state: tuple, reverse: bool) -> tuple[list, tuple]:
    """As ``_run`` for a packed batch: step ``t`` has ``sizes[t]`` sequences (the longest first), ``xs[t]``
    their inputs. A sequence's final state is its state after its last step."""
    steps = len(xs)
    outputs: list = [None] * steps
    if reverse:  # every sequence starts at its own last step: rows join as t goes down
        current = tuple(s[:sizes[-1]] for s in state)
        for t in reversed(range(steps)):
            have = current[0].shape[0]
            if sizes[t] > have:
                current = tuple(torch.cat([c, s[have:sizes[t]]]) for c, s in zip(current, state))
            current = cell(xs[t], current)
            outputs[t] = current[0]
        return outputs, current
    current = state
    finals: list = []  # pieces of the final state, from the shortest sequences up
    for t in range(steps):
        ended = current
        current = cell(xs[t], tuple(s[:sizes[t]] for s in ended))
        outputs[t] = current[0]
        after = sizes[t + 1] if t + 1 < steps else 0
        finals.append(tuple(s[after:sizes[t]] for s in current))
    leftover = tuple(s[sizes[0]:] for s in state)  # sequences of length 0 (none in a valid pack)
    pieces = list(reversed(finals)) + [leftover]
    return outputs, tuple(torch.cat([p[k] for p in pieces]) for k in range(len(state)))


def _layers(kind: str, params: Sequence[Tensor], has_biases: bool, num_layers: int, directions: int,
            nonlinearity: Optional[Callable[[Tensor], Tensor]]) -> list[list[tuple]]:
    """``(w_ih, b_ih, cell)`` per layer and direction: the input projection runs once over all steps."""
    per = len(params) // (num_layers * directions)
    cells = []
    for layer in range(num_layers):
        row = []
        for d in range(directions):
            p = list(params[(layer * directions + d) * per:(layer * directions + d + 1) * per])
            w_ih, w_hh = p[0], p[1]
            b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
            w_hr = p[4 if has_biases else 2] if per in (3, 5) else None
            if kind == "lstm":
                cell = _lstm_cell(w_hh, b_hh, w_hr)
            elif kind == "gru":
                cell = _gru_cell(w_hh, b_hh)
            else:
                assert nonlinearity is not None
                cell = _rnn_cell(w_hh, b_hh, nonlinearity)
            row.append((w_ih, b_ih, cell))
        cells.append(row)
    return cells


def _recurrent(kind: str, data: Tensor, batch_sizes: Optional[Tensor], hx: tuple, params: Sequence[Tensor],
               has_biases: bool, num_layers: int, dropout: float, train: bool, bidirectional: bool,
               batch_first: bool, nonlinearity: Optional[Callable[[Tensor], Tensor]] = None) -> tuple:
    if train and dropout > 0:
        raise UnsupportedOperationError(f"nn.{kind.upper()} with dropout between layers in training mode: explain "
                                        f"it in eval mode (the default, eval_mode=True)")
    directions = 2 if bidirectional else 1
    cells = _layers(kind, params, has_biases, num_layers, directions, nonlinearity)
    if batch_sizes is not None:
        sizes = [int(s) for s in values.guard(batch_sizes).tolist()]  # a guard when recorded for replay
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        xs = [data[offsets[t]:offsets[t + 1]] for t in range(len(sizes))]
    else:
        seq = data.transpose(0, 1) if batch_first else data  # (T, N, features)
        xs = list(seq.unbind(0))
    finals: list[tuple] = []
    for layer in range(num_layers):
        per_direction = []
        for d in range(directions):
            state = tuple(s[layer * directions + d] for s in hx)
            w_ih, b_ih, cell = cells[layer][d]
            if batch_sizes is not None:
                projected = list(F.linear(torch.cat(xs), w_ih, b_ih).split(sizes))
                outputs, last = _run_packed(cell, projected, sizes, state, reverse=d == 1)
            else:
                projected = list(F.linear(torch.stack(xs), w_ih, b_ih).unbind(0))
                outputs, last = _run(cell, projected, state, reverse=d == 1)
            per_direction.append(outputs)
            finals.append(last)
        xs = [torch.cat(steps, -1) if directions == 2 else steps[0] for steps in zip(*per_direction)]
    if batch_sizes is not None:
        output = torch.cat(xs, 0)
    else:
        output = torch.stack(xs, 1 if batch_first else 0)
    return (output,) + tuple(torch.stack([f[k] for f in finals]) for k in range(len(hx)))


def _split(args: tuple, packed: bool) -> tuple:
    """``(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)``
    from the arguments of ``torch.lstm``/``gru``/``rnn_*`` in either of their two forms."""
    if packed:
        data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional = args
        return data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional, False
    data, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    return data, None, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first


def lstm(*args: object) -> tuple:
    """``torch.lstm`` (what ``nn.LSTM`` calls), written out: ``(output, h_n, c_n)``."""
    packed = isinstance(args[1], Tensor) and not args[1].is_floating_point()
    data, sizes, hx, *rest = _split(args, packed)
    return _recurrent("lstm", data, sizes, tuple(hx), *rest)  # type: ignore[arg-type]


def gru(*args: object) -> tuple:
    """``torch.gru`` (what ``nn.GRU`` calls), written out: ``(output, h_n)``."""
    packed = isinstance(args[1], Tensor) and not args[1].is_floating_point()
    data, sizes, hx, *rest = _split(args, packed)
    return _recurrent("gru", data, sizes, (hx,), *rest)  # type: ignore[arg-type]


def rnn(nonlinearity: Callable[[Tensor], Tensor]) -> Callable[..., tuple]:
    """``torch.rnn_tanh`` / ``torch.rnn_relu`` (what ``nn.RNN`` calls), written out: ``(output, h_n)``."""
    def run(*args: object) -> tuple:
        packed = isinstance(args[1], Tensor) and not args[1].is_floating_point()
        data, sizes, hx, *rest = _split(args, packed)
        return _recurrent("rnn", data, sizes, (hx,), *rest, nonlinearity=nonlinearity)  # type: ignore[arg-type, misc]
    return run


def lstm_cell(x: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple:
    """``torch.lstm_cell`` (what ``nn.LSTMCell`` calls), written out: ``(h, c)``."""
    return _lstm_cell(w_hh, b_hh, None)(F.linear(x, w_ih, b_ih), tuple(hx))


def gru_cell(x: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    """``torch.gru_cell`` (what ``nn.GRUCell`` calls), written out."""
    return _gru_cell(w_hh, b_hh)(F.linear(x, w_ih, b_ih), (hx,))[0]


def rnn_cell(nonlinearity: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """``torch.rnn_tanh_cell`` / ``torch.rnn_relu_cell`` (what ``nn.RNNCell`` calls), written out."""
    def run(x: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
            b_hh: Optional[Tensor] = None) -> Tensor:
        return _rnn_cell(w_hh, b_hh, nonlinearity)(F.linear(x, w_ih, b_ih), (hx,))[0]
    return run
