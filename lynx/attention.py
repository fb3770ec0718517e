"""The one attention function of the model. q, k, v are [B, T, H, D] (k, v may have fewer heads: GQA).

Three paths:
- plain causal attention (training on unpacked batches, prefill without padding);
- an explicit boolean mask (generation: left padding and the KV cache);
- packed sequences (`cu_seqlens`): several documents per row, attention never crosses a document boundary. On CUDA
  with flash-attn installed this is `flash_attn_varlen_func`; otherwise causal SDPA run on each segment separately
  (under torch.compile, or with CPU_PACKED_IMPL = "mask": one SDPA call with a dense block-diagonal causal mask,
  which computes the same thing).

Shared prefix (`prefix_len` P > 0, packed sequences only): every row starts with the same P-token prefix (the
fixed part of a prompt, e.g. the judge instruction) as its first segment, and every later segment of the row attends
to those keys as well as causally to itself, as if the prefix had been repeated in front of each document. The
prefix is then computed (and back-propagated) once per row instead of once per document.
Cached prefix (`prefix_kv`, packed sequences only, inference): the prefix's keys and values were computed once
beforehand (a KV cache filled by a forward pass of the prefix alone); the rows hold documents only, and every segment
attends to those keys as well as causally to itself. Judging computes the prefix once for all its packed passes.

Why per segment rather than the dense mask: SDPA's CPU flash kernel skips the key blocks above the diagonal only
with is_causal=True; with a dense mask it computes every [T, T] score and builds the mask in every layer. Per
segment, the work is sum(L_i^2) / 2 instead of T^2. (benchmarks/bench_train_step.py --demo measures both.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # optional: `pip install lynx[gpu]`; tests monkeypatch this name with a pure-torch stand-in
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# Segments after a prefix (longer than it) go through `prefix_causal_attention` in inference when both its call and the
# masked one have at least this many query rows (P + L padded; group * L folded): from 768 rows on, SDPA's CPU flash
# kernel splits the queries into blocks of 256 in both, and the two give the same bits in fp32 as in bf16 (below, the
# splits may differ, and fp32 results then differ in the last bit).
PREFIX_CAUSAL_MIN_QUERIES = 768

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
    prefix_len: int = 0,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    read_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention; returns [B, T, Hq, D].

    attn_mask: optional boolean [B, 1, Tq, Tk] (True = attend) that replaces the causal mask; generation uses it
    for left padding and the KV cache, where queries sit at the end of a longer key sequence.
    cu_seqlens: int32 [num_segments + 1], cumulative segment lengths over the flattened B * T tokens (starts at 0,
    ends at B * T; padding counts as its own segment). Every row boundary b * T must be a segment boundary: a
    document never spans two rows (what `lynx.sft_data.PackedLoader` produces). Attention is causal within each
    segment and zero across segments.
    max_seqlen: the longest segment (flash-attn needs it as a Python int; computed from cu_seqlens if omitted).
    prefix_len: with cu_seqlens, the shared prefix of every row (see the module docstring); 0 = none.
    prefix_kv: with cu_seqlens, a cached prefix's keys and values [1 or B, P, Hkv, D] every segment also attends to
    (see the module docstring); not with prefix_len.
    read_positions: with cu_seqlens, q holds the queries of these flat positions of the B * T tokens only,
    [1, N, Hq, D] (packed judging's last block: one position per document is read); returns [1, N, Hq, D].
    """
    if cu_seqlens is not None:
        if attn_mask is not None:
            raise ValueError("attention: pass either attn_mask or cu_seqlens, not both")
        if read_positions is not None:
            return packed_attention_at(q, k, v, read_positions, cu_seqlens, prefix_len, prefix_kv)
        return packed_attention(q, k, v, cu_seqlens, max_seqlen, prefix_len, prefix_kv)
    if prefix_len or prefix_kv is not None or read_positions is not None:
        raise ValueError("attention: prefix_len, prefix_kv and read_positions apply to packed sequences "
                         "(cu_seqlens) only")
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


def packed_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                     prefix_len: int = 0, prefix_kv=None) -> torch.Tensor:
    """Causal attention within the segments given by cu_seqlens (each row's later segments also seeing its first
    `prefix_len` tokens, or every segment the cached prefix_kv); q, k, v [B, T, H, D] -> [B, T, Hq, D]."""
    B, T, Hq, D = q.shape
    if k.shape[1] != T:
        raise ValueError(f"packed attention needs as many keys as queries (got {k.shape[1]} keys, {T} queries)")
    prefix_kv = _checked_prefix_kv(prefix_kv, prefix_len, k, q.dtype)
    if use_flash_varlen(q):
        # flash-attn reads int32 offsets only, from the GPU.
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        q, k, v = (t.reshape(B * T, t.shape[2], D) for t in (q, k, v))  # the batch as one token axis
        cu_k = cu_seqlens
        if prefix_len or prefix_kv is not None:
            # Each later segment's keys are its row's prefix followed by its own; causal=True aligns the causal mask
            # to the bottom right (flash-attn >= 2.1), so every query sees the whole prefix and its own past.
            cached = 0
            if prefix_kv is not None:  # the cached prefix's keys go in front of the flat keys
                cached = prefix_kv[0].shape[1]
                k, v = (torch.cat([p_.reshape(-1, p_.shape[2], D), t]) for p_, t in zip(prefix_kv, (k, v)))
            index, cu_k = shared_prefix_key_index(cu_seqlens.tolist(), B, T, prefix_len, cached,
                                                  prefix_kv[0].shape[0] if cached else 1)
            index = torch.tensor(index, device=q.device)
            k, v = k[index], v[index]
            cu_k = torch.tensor(cu_k, device=q.device, dtype=torch.int32)
        lengths_q, lengths_k = cu_seqlens[1:] - cu_seqlens[:-1], cu_k[1:] - cu_k[:-1]
        exact = max_seqlen is None or prefix_len or prefix_kv is not None
        max_q = int(lengths_q.max()) if exact else max_seqlen
        max_k = int(lengths_k.max()) if exact else max_seqlen
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_k, max_q, max_k, causal=True)  # GQA is native
        return out.view(B, T, Hq, D)
    if CPU_PACKED_IMPL == "segments" and not torch.compiler.is_compiling():
        return segment_attention(q, k, v, cu_seqlens, prefix_len, prefix_kv)
    if CPU_PACKED_IMPL not in ("segments", "mask"):
        raise ValueError(f"lynx.attention.CPU_PACKED_IMPL must be 'segments' or 'mask', got {CPU_PACKED_IMPL!r}")
    mask = block_causal_mask(cu_seqlens, B, T, q.device, prefix_len)
    if prefix_kv is not None:  # every row's keys: the cached prefix's (all visible), then its own
        k, v = (torch.cat([p_.expand(B, -1, -1, -1), t], dim=1) for p_, t in zip(prefix_kv, (k, v)))
        P = prefix_kv[0].shape[1]
        mask = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool, device=q.device), mask], dim=-1)
    return attention(q, k, v, attn_mask=mask)


def _checked_prefix_kv(prefix_kv, prefix_len: int, k: torch.Tensor, dtype: torch.dtype):
    if prefix_kv is None:
        return None
    if prefix_len:
        raise ValueError("attention: a cached prefix (prefix_kv) replaces the in-row one; pass prefix_len=0")
    B, pk = k.shape[0], prefix_kv[0]
    if pk.shape[0] not in (1, B) or pk.shape[2:] != k.shape[2:] or prefix_kv[1].shape != pk.shape:
        raise ValueError(f"attention: prefix_kv must be [1 or B={B}, P, {k.shape[2]}, {k.shape[3]}] keys and values, "
                         f"got {tuple(pk.shape)} and {tuple(prefix_kv[1].shape)}")
    return tuple(t.to(dtype) for t in prefix_kv)  # a cache kept in the weights' dtype, read under autocast


def packed_attention_at(q, k, v, positions: torch.Tensor, cu_seqlens: torch.Tensor, prefix_len: int = 0,
                        prefix_kv=None) -> torch.Tensor:
    """What packed_attention gives at some flat positions only: q [1, N, Hq, D], the queries of `positions` (int [N]
    into the B * T tokens of k, v [B, T, Hkv, D]) -> [1, N, Hq, D]. One SDPA call over all the flat keys under a
    mask (each query: its segment up to itself, its row's prefix, the cached prefix): N is small."""
    B, T, Hkv, D = k.shape
    if q.shape[:2] != (1, positions.numel()) or positions.dim() != 1:
        raise ValueError(f"attention: read_positions [N] need queries [1, N, H, D]; got {tuple(positions.shape)} "
                         f"positions and queries {tuple(q.shape)}")
    _check_cu_seqlens(cu_seqlens.tolist(), B, T, prefix_len)
    prefix_kv = _checked_prefix_kv(prefix_kv, prefix_len, k, q.dtype)
    positions = positions.to(device=q.device, dtype=torch.int64)
    if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < B * T:
        raise ValueError(f"attention: read_positions must lie in 0..{B * T - 1}, got {positions.tolist()}")
    flat = torch.arange(B * T, device=q.device)
    segment = torch.searchsorted(cu_seqlens.to(device=q.device, dtype=torch.int64)[1:], flat, right=True)
    same_segment = segment[None] == segment[positions][:, None]
    in_row_prefix = (flat[None] // T == positions[:, None] // T) & (flat[None] % T < prefix_len)
    visible = (same_segment | in_row_prefix) & (flat[None] <= positions[:, None])  # [N, B * T]
    k, v = (t.reshape(1, B * T, Hkv, D) for t in (k, v))
    if prefix_kv is not None:  # the cached prefix's keys in front: all visible (or only its own row's)
        rows, P = prefix_kv[0].shape[:2]
        cached_row = torch.arange(rows * P, device=q.device) // P
        sees_cached = (cached_row[None] == positions[:, None] // T) | (rows == 1)
        visible = torch.cat([sees_cached, visible], dim=1)
        k, v = (torch.cat([p_.reshape(1, rows * P, Hkv, D), t], dim=1) for p_, t in zip(prefix_kv, (k, v)))
    return attention(q, k, v, attn_mask=visible[None, None])


def shared_prefix_key_index(bounds: list[int], batch_size: int, seq_len: int, prefix_len: int,
                            cached_len: int = 0, cached_rows: int = 1):
    """For flash-attn's varlen keys with a shared prefix: the flat token index of every segment's keys (its row's
    prefix, then itself; the prefix segment itself: just itself) and their cumulative lengths. With a cached prefix
    (cached_len > 0: its cached_rows * cached_len keys placed in front of the flat keys), every segment's keys are
    its row's cached prefix (or the one shared by all rows), then itself."""
    _check_cu_seqlens(bounds, batch_size, seq_len, prefix_len)
    index, cu_k = [], [0]
    offset = cached_rows * cached_len  # where the flat keys start
    for s, e in zip(bounds[:-1], bounds[1:]):
        row_start = s - s % seq_len
        if cached_len:
            first = (s // seq_len if cached_rows > 1 else 0) * cached_len
            index += range(first, first + cached_len)
        elif prefix_len and s != row_start:
            index += range(row_start, row_start + prefix_len)
        index += range(offset + s, offset + e)
        cu_k.append(len(index))
    return index, cu_k


def segment_attention(q, k, v, cu_seqlens: torch.Tensor, prefix_len: int = 0, prefix_kv=None) -> torch.Tensor:
    """Causal SDPA on each segment of cu_seqlens separately (q, k, v [B, T, H, D] -> [B, T, Hq, D]); with a shared
    prefix (the row's first prefix_len tokens, or prefix_kv), each later segment's keys are the prefix's and its own,
    under a mask [L, P + L] (prefix all visible, then causal).

    The batch is flattened to one token axis, so a segment is a contiguous run of tokens. Segments of equal length
    (one document per row, or unpacked batches) go through one batched call."""
    B, T, Hq, D = q.shape
    bounds = cu_seqlens.tolist()
    _check_cu_seqlens(bounds, B, T, prefix_len)
    q, k, v = (t.reshape(B * T, t.shape[2], D) for t in (q, k, v))
    lengths = {e - s for s, e in zip(bounds[:-1], bounds[1:])}
    if len(lengths) == 1 and not prefix_len and prefix_kv is None:
        n = lengths.pop()
        return attention(*(t.view(B * T // n, n, t.shape[1], D) for t in (q, k, v))).view(B, T, Hq, D)
    Hkv = k.shape[1]
    group = Hq // Hkv
    # (Masks are not cached under fake tensors, as `lynx.plan` traces a step: the cache would keep a fake mask.)
    make_mask = prefix_causal_mask.__wrapped__ if torch._guards.detect_fake_mode(q) else prefix_causal_mask
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        row_start, L = s - s % T, e - s
        if prefix_kv is not None or (prefix_len and s != row_start):
            if prefix_kv is not None:
                row = s // T if prefix_kv[0].shape[0] > 1 else 0
                pk, pv = (t[row].transpose(0, 1) for t in prefix_kv)  # [Hkv, P, D]
            else:
                pk, pv = (t[row_start : row_start + prefix_len].transpose(0, 1) for t in (k, v))
            ks, vs = (torch.cat([p_, t[s:e].transpose(0, 1)], dim=1)[None] for p_, t in ((pk, k), (pv, v)))
            # Long segments (inference): no mask, the causal kernel. Otherwise the masked call, which also has a
            # backward and is as fast when the prefix is most of the keys.
            P = pk.shape[1]
            causal = (L > P and min(P + L, group * L) >= PREFIX_CAUSAL_MIN_QUERIES
                      and not (torch.is_grad_enabled() and q.requires_grad))
            fn = prefix_causal_attention if causal else functools.partial(prefix_masked_attention, make_mask=make_mask)
            outs.append(fn(q[s:e], ks, vs))
        else:
            # Contiguous [1, H, L, D] copies: the CPU flash kernel's backward runs ~1.5x faster on them than on
            # strided views, and the copies are small next to the attention itself.
            qs, ks, vs = (t[s:e].transpose(0, 1)[None].contiguous() for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=group > 1)
            outs.append(out[0].transpose(0, 1))
    return torch.cat(outs).view(B, T, Hq, D)


def prefix_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, make_mask=None) -> torch.Tensor:
    """One segment after a prefix every query sees, under a mask: q [L, Hq, D], k, v [1, Hkv, P + L, D] (the P prefix
    keys, then the segment's own) -> [L, Hq, D]. GQA heads folded into the query axis, [1, Hkv, group * L, D] (query
    head j * group + i reads KV head j), with an additive mask made once per shape (`prefix_causal_mask`): the CPU
    flash kernel then runs 15-35% faster than with enable_gqa and a boolean mask it converts on every call."""
    L, Hq, D = q.shape
    Hkv = k.shape[1]
    group, P = Hq // Hkv, k.shape[2] - L
    qs = q.view(L, Hkv, group, D).permute(1, 2, 0, 3).reshape(1, Hkv, group * L, D)
    mask = (make_mask or prefix_causal_mask)(L, P, group, q.dtype, q.device)
    out = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)
    return out.view(Hkv, group, L, D).permute(2, 0, 1, 3).reshape(L, Hq, D)


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One segment after a prefix every query sees, without a mask: q [L, Hq, D], k, v [1, Hkv, P + L, D] (the P
    prefix keys, then the segment's own) -> [L, Hq, D].

    The queries go in behind P rows of zeros, so that SDPA's top-left causal rule (query i sees keys 0..i) gives
    each real query the whole prefix and its own past; is_causal lets the CPU flash kernel skip the key blocks above
    the diagonal, where `prefix_masked_attention` computes every [L, P + L] score and adds the mask to each. The zero
    rows cost P^2 / 2 scores and are dropped. Per query the kernel sees the same keys in the same blocks as under the
    mask, and the outputs are bit-identical to the masked call's (tested); for long segments (inference, L > P) it is
    about 1.5x faster at 2,048 tokens and more beyond: the masked work grows as L (P + L), this as L (P + L / 2)."""
    L, Hq, D = q.shape
    P = k.shape[2] - L
    padded = q.new_empty(1, Hq, P + L, D)
    padded[0, :, :P] = 0
    padded[0, :, P:] = q.transpose(0, 1)
    out = F.scaled_dot_product_attention(padded, k, v, is_causal=True, enable_gqa=Hq != k.shape[1])
    return out[0, :, P:].transpose(0, 1)


@functools.lru_cache(maxsize=64)  # the shapes of one packed batch, reused by every layer
def prefix_causal_mask(length: int, prefix_len: int, group: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask [group * length, prefix_len + length]: 0 where a query sees the key (every prefix key, then
    causally its own segment's), -inf elsewhere; the block of `length` rows repeated for each folded query head."""
    visible = torch.ones(length, prefix_len + length, dtype=torch.bool, device=device)
    visible[:, prefix_len:] = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return mask.repeat(group, 1)


def _check_cu_seqlens(bounds: list[int], batch_size: int, seq_len: int, prefix_len: int = 0) -> None:
    # A segment spanning two rows would be silently cut in two by the per-row mask; refuse it instead.
    n = batch_size * seq_len
    if (bounds[0] != 0 or bounds[-1] != n or any(e <= s for s, e in zip(bounds[:-1], bounds[1:]))
            or not set(range(0, n, seq_len)) <= set(bounds)):
        raise ValueError(
            f"cu_seqlens must start at 0, end at B*T = {n}, increase, and include every row start b*T "
            f"(no segment may span two rows); got {bounds}"
        )
    if prefix_len and not (0 < prefix_len < seq_len and set(range(prefix_len, n, seq_len)) <= set(bounds)):
        raise ValueError(f"prefix_len={prefix_len}: every row's first segment must be the prefix (cu_seqlens must "
                         f"include b*T + prefix_len for every row); got {bounds}")


def block_causal_mask(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int, device=None,
                      prefix_len: int = 0) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = attend): causal, and only within the same segment of cu_seqlens or to the
    row's first prefix_len tokens."""
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
    in_prefix = torch.arange(seq_len, device=device) < prefix_len  # keys every later segment of the row also sees
    return ((same_segment | in_prefix[None, None, :]) & causal)[:, None]
