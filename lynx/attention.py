"""The one attention function of the model. q, k, v are [B, T, H, D] (k, v may have fewer heads: GQA).

Three paths:
- plain causal attention (training on unpacked batches, prefill without padding);
- an explicit boolean mask (generation: left padding and the KV cache);
- packed sequences (`cu_seqlens`): several documents per row, attention never crosses a document boundary. On CUDA
  with flash-attn installed this is `flash_attn_varlen_func`; otherwise SDPA with a block-diagonal causal mask, which
  computes exactly the same thing (slower: the mask is dense).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: `pip install lynx[gpu]`; tests monkeypatch this name with a pure-torch stand-in
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None


def use_flash_varlen(q: torch.Tensor) -> bool:
    """Whether the packed path runs through flash-attn: installed, on CUDA, in a dtype its kernels support.
    (Kept as a function so tests can force the flash path on CPU with a fake varlen function.)"""
    return flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Causal attention; returns [B, T, Hq, D].

    attn_mask: optional boolean [B, 1, Tq, Tk] (True = attend) that replaces the causal mask; generation uses it
    for left padding and the KV cache, where queries sit at the end of a longer key sequence.
    cu_seqlens: int32 [num_segments + 1], cumulative segment lengths over the flattened B * T tokens (starts at 0,
    ends at B * T; padding counts as its own segment). Every row boundary b * T must be a segment boundary: a
    document never spans two rows (what `lynx.sft_data.PackedLoader` produces). Attention is causal within each
    segment and zero across segments.
    max_seqlen: the longest segment (flash-attn needs it as a Python int; computed from cu_seqlens if omitted).
    """
    if cu_seqlens is not None:
        if attn_mask is not None:
            raise ValueError("attention: pass either attn_mask or cu_seqlens, not both")
        return packed_attention(q, k, v, cu_seqlens, max_seqlen)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def packed_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> torch.Tensor:
    """Causal attention within the segments given by cu_seqlens; q, k, v [B, T, H, D] -> [B, T, Hq, D]."""
    B, T, Hq, D = q.shape
    if k.shape[1] != T:
        raise ValueError(f"packed attention needs as many keys as queries (got {k.shape[1]} keys, {T} queries)")
    if use_flash_varlen(q):
        # flash-attn reads int32 offsets only, from the GPU.
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        # flash-attn takes the batch flattened into one token axis; GQA (fewer k/v heads) is native.
        out = flash_attn_varlen_func(
            q.reshape(B * T, Hq, D), k.reshape(B * T, k.shape[2], D), v.reshape(B * T, v.shape[2], D),
            cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
        )
        return out.view(B, T, Hq, D)
    mask = block_causal_mask(cu_seqlens, B, T, q.device)
    return attention(q, k, v, attn_mask=mask)


def block_causal_mask(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = attend): causal, and only within the same segment of cu_seqlens."""
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int64)
    positions = torch.arange(batch_size * seq_len, device=device)
    if not torch.compiler.is_compiling():
        # A segment spanning two rows would be silently cut in two by the per-row mask below; refuse it instead.
        row_starts = positions[::seq_len]
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != batch_size * seq_len or not torch.isin(row_starts, cu_seqlens).all():
            raise ValueError(
                f"cu_seqlens must start at 0, end at B*T = {batch_size * seq_len} and include every row start "
                f"b*T (no segment may span two rows); got {cu_seqlens.tolist()}"
            )
    # Segment index of every flattened token (searchsorted keeps shapes static, unlike repeat_interleave).
    segment = torch.searchsorted(cu_seqlens[1:], positions, right=True).view(batch_size, seq_len)
    same_segment = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    return (same_segment & causal)[:, None]
