"""The one attention function of the model. q, k, v are [B, T, H, D] (k, v may have fewer heads: GQA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention; returns [B, T, Hq, D].

    attn_mask: optional boolean [B, 1, Tq, Tk] (True = attend) that replaces the causal mask; generation uses it
    for left padding and the KV cache, where queries sit at the end of a longer key sequence.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    return out.transpose(1, 2)
