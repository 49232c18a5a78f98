"""Selective state-space layers (Mamba's mixer) with the MambaLRP rules (Jafari et al., NeurIPS 2024).

A Mamba mixer computes, for the signal ``u = silu(conv(in_proj(x)))`` and the gate ``z`` (the other half of
``in_proj(x)``)::

    Δ, B, C = softplus(dt_proj(.)), ., .  of  x_proj(u)          (the selection: input-dependent parameters)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,   y_t = C_t · h_t + D u_t,   out = out_proj(y ⊙ silu(z))

MambaLRP holds the selection ``Δ, B, C`` fixed, which makes the scan a linear map of ``u`` (relevance follows its
gradient, exactly conserved), gives SiLU the identity rule and splits the relevance of ``y ⊙ silu(z)`` evenly
between its factors (the uniform rule lrp uses for every product of two activations). :func:`mixer_forward` is
that computation written with the selection detached; while ``explain`` captures a model it stands in for the
``forward`` of each Mamba mixer (same output), so the engine sees the scan as products with fixed factors.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOperationError

Tensor = torch.Tensor


def _masks_input() -> bool:
    import transformers
    return int(transformers.__version__.split(".")[0]) >= 5


_PARTS = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj", "A_log", "D", "act", "ssm_state_size",
          "time_step_rank")


def is_mamba_mixer(module: torch.nn.Module) -> bool:
    """A Mamba (v1) mixer as Hugging Face ``transformers`` writes it (``MambaMixer``). Its relatives with norms
    on the selection (Falcon-Mamba, Jamba) are not: they stop at an op without a rule instead."""
    return (type(module).__name__ == "MambaMixer" and type(module).__module__.startswith("transformers.")
            and all(hasattr(module, part) for part in _PARTS))


def mixer_forward(mixer: Any, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The mixer's output for ``hidden_states`` (batch, length, hidden), the selection held fixed."""
    cache = kwargs.get("cache_params", kwargs.get("cache", args[0] if args else None))
    if cache is not None:
        raise UnsupportedOperationError(
            f"the Mamba mixer {type(mixer).__name__} was called with a cache (incremental decoding); lrp explains "
            f"a whole sequence at once: call the model with use_cache=False")
    mask: Optional[Tensor] = kwargs.get("attention_mask")
    if mask is None and len(args) >= 3 and isinstance(args[2], Tensor):
        mask = args[2]
    unknown = [key for key, value in kwargs.items()
               if value is not None and key not in ("cache_params", "cache", "cache_position", "attention_mask")]
    if unknown:
        raise UnsupportedOperationError(
            f"the Mamba mixer {type(mixer).__name__} was called with {', '.join(unknown)}, which lrp's MambaLRP "
            f"forward does not support (e.g. packed sequences); call the model with input_ids and at most an "
            f"attention_mask")
    length = hidden_states.shape[1]
    dtype = hidden_states.dtype
    masked_input = mask is not None and _masks_input()
    if masked_input:  # transformers 5 masks the mixer's input, 4.x the signal after in_proj
        hidden_states = hidden_states * mask.unsqueeze(-1).to(hidden_states.dtype)  # type: ignore[union-attr]
    u, z = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (batch, inner, length) each
    if mask is not None and not masked_input:
        u = u * mask.unsqueeze(1).to(u.dtype)
    u = mixer.act(mixer.conv1d(u)[..., :length])
    if mask is not None:
        u = u * mask.unsqueeze(1).to(u.dtype)
    # the selection, from the signal's values only: held fixed
    fixed = u.detach()
    step, B, C = torch.split(mixer.x_proj(fixed.transpose(1, 2)),
                             [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1)
    work = torch.promote_types(dtype, torch.float32)
    delta = F.softplus(mixer.dt_proj(step).to(work)).transpose(1, 2)  # (batch, inner, length)
    A = -torch.exp(mixer.A_log.detach().to(work))  # (inner, state)
    decay = torch.exp(A[None, :, None, :] * delta[..., None])  # (batch, inner, length, state)
    inflow = delta[..., None] * B.to(work)[:, None, :, :]  # Δ_t B_t
    C = C.to(work)
    signal = u.to(work)
    h: Optional[Tensor] = None
    outputs = []
    for t in range(length):
        step_in = inflow[:, :, t] * signal[:, :, t, None]  # (batch, inner, state)
        h = step_in if h is None else decay[:, :, t] * h + step_in
        outputs.append((h * C[:, None, t]).sum(-1))
    y = torch.stack(outputs, dim=-1) + signal * mixer.D.to(work)[None, :, None]
    y = y.to(dtype) * mixer.act(z)
    return mixer.out_proj(y.transpose(1, 2))
