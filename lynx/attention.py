"""The one attention function of the model. q, k, v are [B, T, H, D] (k, v may have fewer heads: GQA).

Three paths:
- plain causal attention (training on unpacked batches, prefill without padding);
- an explicit boolean mask (generation: left padding and the KV cache);
- packed sequences (`cu_seqlens`): several documents per row, attention never crosses a document boundary. On CUDA
  with flash-attn installed this is `flash_attn_varlen_func`; otherwise causal SDPA run on each segment separately
  (under torch.compile, or with CPU_PACKED_IMPL = "mask": one SDPA call with a dense block-diagonal causal mask,
  which computes the same thing).

Why per segment rather than the dense mask: SDPA's CPU flash kernel skips the key blocks above the diagonal only
with is_causal=True; with a dense mask it computes every [T, T] score and builds the mask in every layer. Per
segment, the work is sum(L_i^2) / 2 instead of T^2. (benchmarks/bench_train_step.py --demo measures both.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: `pip install lynx[gpu]`; tests monkeypatch this name with a pure-torch stand-in
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# CPU / no-flash packed path: "segments" (causal SDPA per segment, eager) or "mask" (dense block-causal mask).
# torch.compile always takes "mask": the per-segment loop depends on the values in cu_seqlens.
CPU_PACKED_IMPL = "segments"


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
    if q.shape[2] == 1 and attn_mask is not None:
        return single_query_attention(q, k, v, attn_mask).transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if attn_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def single_query_attention(q, k, v, attn_mask) -> torch.Tensor:
    """One query per sequence (a decode step): q [B, Hq, 1, D], k/v [B, Hkv, T, D], attn_mask [B, 1, 1, T].

    Two small matmuls: for a single query SDPA's CPU kernel is several times slower (it tiles for long query blocks).
    Query heads are grouped by the KV head they share (GQA: heads j*g .. j*g+g-1 use KV head j, as transformers'
    repeat_kv), so K and V are never copied."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    scores = (q.view(B, Hkv, Hq // Hkv, D) @ k.transpose(-1, -2)).float() * D**-0.5  # [B, Hkv, g, T]
    probs = torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1).to(v.dtype)
    return (probs @ v).view(B, Hq, 1, D)


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
    if CPU_PACKED_IMPL == "segments" and not torch.compiler.is_compiling():
        return segment_attention(q, k, v, cu_seqlens)
    if CPU_PACKED_IMPL not in ("segments", "mask"):
        raise ValueError(f"lynx.attention.CPU_PACKED_IMPL must be 'segments' or 'mask', got {CPU_PACKED_IMPL!r}")
    mask = block_causal_mask(cu_seqlens, B, T, q.device)
    return attention(q, k, v, attn_mask=mask)


def segment_attention(q, k, v, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on each segment of cu_seqlens separately (q, k, v [B, T, H, D] -> [B, T, Hq, D]).

    The batch is flattened to one token axis, so a segment is a contiguous run of tokens. Segments of equal length
    (one document per row, or unpacked batches) go through one batched call."""
    B, T, Hq, D = q.shape
    bounds = cu_seqlens.tolist()
    _check_cu_seqlens(bounds, B, T)
    q, k, v = (t.reshape(B * T, t.shape[2], D) for t in (q, k, v))
    lengths = {e - s for s, e in zip(bounds[:-1], bounds[1:])}
    if len(lengths) == 1:
        n = lengths.pop()
        return attention(*(t.view(B * T // n, n, t.shape[1], D) for t in (q, k, v))).view(B, T, Hq, D)
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        # Contiguous [1, H, L, D] copies: the CPU flash kernel's backward runs ~1.5x faster on them than on strided
        # views, and the copies are small next to the attention itself.
        qs, ks, vs = (t[s:e].transpose(0, 1)[None].contiguous() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs).view(B, T, Hq, D)


def _check_cu_seqlens(bounds: list[int], batch_size: int, seq_len: int) -> None:
    # A segment spanning two rows would be silently cut in two by the per-row mask; refuse it instead.
    n = batch_size * seq_len
    if (bounds[0] != 0 or bounds[-1] != n or any(e <= s for s, e in zip(bounds[:-1], bounds[1:]))
            or not set(range(0, n, seq_len)) <= set(bounds)):
        raise ValueError(
            f"cu_seqlens must start at 0, end at B*T = {n}, increase, and include every row start b*T "
            f"(no segment may span two rows); got {bounds}"
        )


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
