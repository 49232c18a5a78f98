"""Attention written out in plain torch ops, so that the engine sees (and applies rules to) each step.

``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` are fused or monolithic; during
``explain`` they are replaced by these equivalents (same outputs in eval mode), whose products of two
activations get the AttnLRP uniform rule and whose softmax gets the AttnLRP softmax rule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOperationError

Tensor = torch.Tensor


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Boolean masks (True = attend, as in SDPA) become 0/-inf; float masks are added as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """``softmax(q k^T * scale + mask) v``, as ``F.scaled_dot_product_attention`` without dropout."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    if is_causal:
        causal = _additive_mask(torch.ones(L, S, dtype=torch.bool, device=query.device).tril(), scores.dtype)
        assert causal is not None
        scores = scores + causal
    mask = _additive_mask(attn_mask, scores.dtype)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def multi_head_attention_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                                 bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                                 training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                                 is_causal=False):
    """``F.multi_head_attention_forward`` (inputs ``(L, N, E)`` or ``(L, E)``) in plain ops, without dropout."""
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        raise UnsupportedOperationError(
            "nn.MultiheadAttention with add_bias_kv, add_zero_attn or static keys/values is not supported by lrp; "
            "build the attention without them")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S = key.shape[0]
    heads, head_dim = num_heads, E // num_heads
    if use_separate_proj_weight:
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).reshape(L, N * heads, head_dim).transpose(0, 1)
    k = F.linear(key, w_k, b_k).reshape(S, N * heads, head_dim).transpose(0, 1)
    v = F.linear(value, w_v, b_v).reshape(S, N * heads, head_dim).transpose(0, 1)

    mask = None
    if attn_mask is not None:
        # nn.MultiheadAttention's boolean masks are True where attention is NOT allowed
        mask = (torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype))
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
    elif is_causal:
        mask = torch.zeros(L, S, dtype=q.dtype, device=q.device).masked_fill(
            torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf")).unsqueeze(0)
    if key_padding_mask is not None:
        pad = (torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            key_padding_mask, float("-inf")) if key_padding_mask.dtype == torch.bool else key_padding_mask.to(q.dtype))
        pad = pad.reshape(N, 1, 1, S).expand(N, heads, 1, S).reshape(N * heads, 1, S)
        mask = pad if mask is None else mask + pad

    scores = torch.bmm(q * (1.0 / math.sqrt(head_dim)), k.transpose(1, 2))
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights, v)  # (N * heads, L, head_dim)
    out = out.transpose(0, 1).reshape(L * N, E)
    out = F.linear(out, out_proj_weight, out_proj_bias).reshape(L, N, E)
    if unbatched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.reshape(N, heads, L, S)
    if average_attn_weights:
        weights = weights.mean(dim=1)
    if unbatched:
        weights = weights.squeeze(0)
    return out, weights
