"""Fused linear + cross-entropy: the loss of `hidden @ weight.T` without ever materialising the [N, V] logits.

With Llama-3's 128,256-token vocabulary, 8,192 tokens of fp32 logits take 4.2 GB and their gradient as much again.
Here the logits only ever exist as one tile at a time, along one of two paths, picked by the memory they would use:

4-matmul path (vocab blocks outside; [token chunk, vocab block] tiles):
    forward   for each vocab block: z = h @ W_b.T -> online log-sum-exp per token (lse [N], fp32)
              loss_i = lse_i - h_i . W[y_i]         (target logit as an fp32 dot product)
    backward  for each vocab block: recompute z, dz = (softmax(z) - onehot(y)) * g   (g = dloss/dloss_i)
              dh += dz @ W_b   (fp32 accumulator [N, H])
              dW_b = dz.T @ h  (one matmul over all tokens, fp32 accumulation inside it; with several token chunks
                                the partial products are summed in a small fp32 [vocab block, H] accumulator)

3-matmul path (token chunks outside; [token chunk, V] tiles; the gradients computed in forward, Liger style):
    forward   for each token chunk: z = h_c @ W.T over the whole vocabulary -> its exact lse, loss, and
              dz = (softmax(z) - onehot(y)) * g written over z;  dh_c = dz @ W;  dW^T += h_c^T @ dz (fp32 [H, V]
              accumulator when there are several chunks)
    backward  scale dh and dW by the incoming gradient
  Taken when its buffers (the tile, the accumulator, one [H, vocab block] partial product) fit THREE_MATMUL_BYTES
  (256 MiB), and only when a gradient is wanted (under torch.no_grad forward is the 4-matmul path's single matmul).
  At SmolLM2's head (V=49,152, H=576; accumulator 113 MB) it runs; at Llama-3's 128,256 x 1,024 (525 MB) it does
  not, unless the output projection is frozen (no dW, no accumulator).

Why two paths:
  - The 3-matmul path walks token chunks over the whole vocabulary, so with several chunks dW is summed in a [V, H]
    fp32 buffer (525 MB at Llama-3's head, more than the bf16 dW itself), and its dW matmul has only K = chunk
    tokens, which runs well below the matmul peak on CPU.
  - With vocab blocks outside, the log-sum-exp must be complete before any softmax, hence two passes and the extra
    matmul; but each block's dW comes from one matmul over all tokens straight into the output, and the only other
    buffers are one logits tile and dh's fp32 accumulator. Given two passes, running the second in backward costs
    training nothing, makes an evaluation forward a single matmul, and keeps no gradient buffer alive between
    forward and backward. The price is 4/3 of the matmul work.
  - Where the accumulator is small (a small vocabulary and hidden size, as SmolLM2's), the extra matmul is what
    costs most, so the 3-matmul path is taken.
  Measurements behind these choices (time and peak memory against plain torch and cut-cross-entropy, both heads)
  are in docs/experiments.md and benchmarks/bench_fused_linear_cross_entropy.py.
Ignored tokens are dropped before any matmul.

Backends: "torch" is the pure-torch twin (the CPU path and the test oracle). "triton" runs the per-tile softmax /
log-sum-exp / gradient-of-logits math as Triton kernels (lynx/kernels/triton_cross_entropy.py) and leaves the matmuls
to cuBLAS (or torch on CPU under TRITON_INTERPRET=1). "auto" is triton on CUDA when triton is importable, else torch.
Both backends share this file's loop, so they run exactly the same math.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum")
BACKENDS = ("auto", "torch", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tile budget in elements: the [token chunk, vocab block] logits tile. 8M elements = 32 MB in fp32.
# A tile covers all tokens when it can (one matmul over all N for each dW block) and as many vocab columns as fit.
TILE_ELEMENTS = 8 * 1024 * 1024
MAX_TOKEN_CHUNK = 16384  # above this, tokens are chunked too (dW blocks then accumulate in fp32)
MIN_VOCAB_BLOCK = 512  # smaller blocks make the dh matmul (K = vocab block) inefficient
MAX_VOCAB_BLOCK = 8192


def tile_sizes(n_tokens: int, vocab: int) -> tuple[int, int]:
    """(token chunk, vocab block) for the logits tile."""
    token_chunk = max(1, min(n_tokens, MAX_TOKEN_CHUNK))
    vocab_block = TILE_ELEMENTS // token_chunk
    vocab_block = max(MIN_VOCAB_BLOCK, min(MAX_VOCAB_BLOCK, vocab_block, vocab))
    return token_chunk, max(1, min(vocab_block, vocab))


# The 3-matmul path (see the module docstring) is taken when its buffers fit this budget: the [token chunk, V]
# logits tile (the gradient is written over it), one [vocab block, H] partial product of dW, and its [H, V] or
# [V, H] accumulator (fp32 over several token chunks). 256 MiB: SmolLM2's 49,152 x 576 head (fp32 accumulator
# 113 MB) runs in 1,366-token chunks at N=4096; Llama-3's 128,256 x 1,024 (525 MB) does not fit and keeps the
# 4-matmul path's ~0.4 GB peak, unless dW is not needed (a frozen output projection: no accumulator).
# In between, V=128,256 at H=576 (accumulator 295 MB) measured on the loaded 2-core VM at N=4096: with a 512 MiB
# budget the 3-matmul path ran about as fast as naive torch (9.9 s against 10.0 s; the 4-matmul path 12.6 s) but
# peaked at 658 MB above its inputs (0.22x naive's 3.0 GB; 4-matmul: 248 MB, 0.08x): over the 0.2x memory target
# for Llama-3's vocabulary, so the default budget keeps the 4-matmul path there.
THREE_MATMUL_BYTES = 256 * 2**20
MIN_THREE_MATMUL_CHUNK = 256  # dW's matmul runs over K = token chunk: shorter chunks make it inefficient
# dW as (h^T @ dz)^T above this many tokens per chunk, as dz^T @ h at or below (see loss_and_grads_three_matmul).
TRANSPOSED_DW_MIN_CHUNK = 512


def three_matmul_chunk(n_tokens: int, hidden_size: int, vocab: int, itemsize: int, need_dweight: bool) -> int | None:
    """Token chunk of the 3-matmul path, or None when its buffers would not fit THREE_MATMUL_BYTES (or there are no
    tokens): then the 4-matmul path runs. Chunks are balanced (the last one is not a small remainder)."""
    if n_tokens == 0:
        return None
    row = vocab * itemsize  # one token's row of the logits tile
    partial = hidden_size * min(vocab, MAX_VOCAB_BLOCK) * itemsize if need_dweight else 0
    # One chunk: dW is written directly, or (long chunk) as dW^T in the input dtype, transposed at the end.
    single = vocab * hidden_size * itemsize if need_dweight and n_tokens > TRANSPOSED_DW_MIN_CHUNK else 0
    if n_tokens * row + partial + single <= THREE_MATMUL_BYTES:
        return n_tokens
    accumulator = vocab * hidden_size * 4 if need_dweight else 0
    chunk = (THREE_MATMUL_BYTES - partial - accumulator) // row
    if chunk < min(MIN_THREE_MATMUL_CHUNK, n_tokens):
        return None
    n_chunks = -(-n_tokens // chunk)
    return -(-n_tokens // n_chunks)


# --- per-tile math, pure torch (the twin of the Triton kernels) -------------------------------------------------


def update_lse_torch(z: torch.Tensor, lse: torch.Tensor) -> None:
    """lse <- logaddexp(lse, logsumexp(z, dim=1)), in fp32. z: [n, v] logits tile; lse: [n] fp32 running value."""
    torch.logaddexp(lse, torch.logsumexp(z.float(), dim=1), out=lse)


def grad_logits_torch(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, v0: int):
    """dloss/dz for one tile, in z's dtype: (exp(z - lse) - [column == target]) * g.

    z: [n, v] logits of vocab columns v0..v0+v; lse, g: [n] fp32 (g = 0 for ignored tokens); targets: [n] int64.
    May overwrite z (it is a temporary)."""
    p = z.float().sub_(lse[:, None]).exp_().mul_(g[:, None])
    col = targets - v0
    in_tile = (col >= 0) & (col < z.shape[1])
    # scatter instead of boolean indexing: no host sync on GPU, and ignored / out-of-tile rows add exactly 0.
    p.scatter_add_(1, col.clamp(0, z.shape[1] - 1)[:, None], torch.where(in_tile, -g, 0.0)[:, None])
    return p.to(z.dtype)


# The same math written for torch.compile: inductor turns each into one vectorised pass over the tile (reading bf16,
# computing in fp32), 5-10x faster than the eager ops above, which make a pass over an fp32 copy per op. Used on CPU
# for large problems only, where the one-time compile (~20 s) pays; tiny ones (tests, toy models) stay eager.
COMPILE_MIN_LOGITS = 2**25  # N * V at or above which the CPU path compiles its tile math


def _tile_lse(z):
    return torch.logsumexp(z.float(), dim=1)


def _tile_grad(z, lse, target_col, g):
    """Writes the gradient over z (a temporary) and returns it: one pass, no second tile in memory."""
    p = torch.exp(z.float() - lse[:, None]) * g[:, None]
    is_target = torch.arange(z.shape[1], device=z.device)[None, :] == target_col[:, None]
    return z.copy_(torch.where(is_target, p - g[:, None], p))


_compiled = {}


def _compiled_tile_ops():
    if not _compiled:
        _compiled["lse"] = torch.compile(_tile_lse, dynamic=True)
        _compiled["grad"] = torch.compile(_tile_grad, dynamic=True)
    lse_fn, grad_fn = _compiled["lse"], _compiled["grad"]

    def update_lse(z, lse):
        torch.logaddexp(lse, lse_fn(z), out=lse)

    def grad_logits(z, lse, targets, g, v0):
        return grad_fn(z, lse, targets - v0, g)  # the offset outside: v0 changes per tile, the graph must not

    return update_lse, grad_logits


def _tile_ops(backend: str, device: torch.device, n_logits: int):
    """(update_lse, grad_logits) for a backend."""
    if backend == "triton":
        from lynx.kernels import triton_cross_entropy

        return triton_cross_entropy.update_lse, triton_cross_entropy.grad_logits
    if device.type == "cpu" and n_logits >= COMPILE_MIN_LOGITS:
        return _compiled_tile_ops()
    return update_lse_torch, grad_logits_torch


# --- the two passes ----------------------------------------------------------------------------------------------


def target_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024):
    """z[i, targets[i]] as fp32 dot products (more exact than reading it from a low-precision logits tile)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for t0 in range(0, hidden.shape[0], chunk):
        t1 = min(t0 + chunk, hidden.shape[0])
        out[t0:t1] = (hidden[t0:t1].float() * weight[targets[t0:t1]].float()).sum(-1)
    return out


def logsumexp_over_vocab(hidden: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """log sum_v exp(hidden @ weight.T)[:, v] as fp32 [N], one logits tile at a time."""
    N, V = hidden.shape[0], weight.shape[0]
    update_lse, _ = _tile_ops(backend, hidden.device, N * V)
    token_chunk, vocab_block = tile_sizes(N, V)
    lse = torch.full((N,), float("-inf"), dtype=torch.float32, device=hidden.device)
    for v0 in range(0, V, vocab_block):
        w_block = weight[v0 : v0 + vocab_block]
        for t0 in range(0, N, token_chunk):
            z = hidden[t0 : t0 + token_chunk] @ w_block.T
            update_lse(z, lse[t0 : t0 + token_chunk])
    return lse


def loss_grads(hidden, weight, targets, lse, g, backend: str, need_dhidden: bool, need_dweight: bool):
    """Gradients of sum_i g_i * loss_i w.r.t. hidden and weight, in the input dtype (None where not needed)."""
    N, V = hidden.shape[0], weight.shape[0]
    _, grad_logits = _tile_ops(backend, hidden.device, N * V)
    token_chunk, vocab_block = tile_sizes(N, V)
    one_token_chunk = token_chunk >= N
    dhidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dhidden else None
    dweight = None
    if need_dweight:  # every block is written below, unless there are no tokens at all
        dweight = torch.empty_like(weight) if N > 0 else torch.zeros_like(weight)
    for v0 in range(0, V, vocab_block):
        w_block = weight[v0 : v0 + vocab_block]
        dw_acc = None
        if need_dweight and not one_token_chunk:
            dw_acc = torch.zeros(w_block.shape, dtype=torch.float32, device=weight.device)
        for t0 in range(0, N, token_chunk):
            t1 = min(t0 + token_chunk, N)
            h = hidden[t0:t1]
            dz = grad_logits(h @ w_block.T, lse[t0:t1], targets[t0:t1], g[t0:t1], v0)
            if need_dhidden:
                if dz.dtype == torch.float32:
                    dhidden[t0:t1].addmm_(dz, w_block)
                else:  # low-precision matmul (fp32 inside), summed over vocab blocks in fp32
                    dhidden[t0:t1] += dz @ w_block
            if need_dweight:
                if one_token_chunk:  # the whole token sum happens inside one matmul: write the block directly
                    torch.mm(dz.T, h, out=dweight[v0 : v0 + vocab_block])
                else:
                    dw_acc += dz.T @ h
        if dw_acc is not None:
            dweight[v0 : v0 + vocab_block] = dw_acc
    if dhidden is not None:
        dhidden = dhidden.to(hidden.dtype)
    return dhidden, dweight


def loss_and_grads_three_matmul(hidden, weight, targets, g, backend: str, need_dhidden: bool, need_dweight: bool,
                                chunk: int):
    """The 3-matmul path, in forward: per token chunk, the logits over the whole vocabulary (matmul 1), their exact
    log-sum-exp, the gradient of the logits written over them, dh = dz @ W (matmul 2, K = V: one rounding) and dW
    (matmul 3, per vocab block). Returns (sum of token losses, dhidden, dweight), the gradients those of
    sum_i g_i * loss_i in the input dtype (None where not needed).

    dW's orientation: this CPU's oneDNN runs dz^T @ h (a transposed operand) at about half the rate of h^T @ dz once
    K = chunk tokens is long (174 against 303 GFLOP/s at 2,048 tokens, SmolLM2's head; equal at 256). So long chunks
    accumulate dW^T and transpose it once at the end (~80 ms there), short ones write dW directly."""
    N, H = hidden.shape
    V = weight.shape[0]
    update_lse, grad_logits = _tile_ops(backend, hidden.device, N * V)
    lse = torch.full((N,), float("-inf"), dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if need_dhidden else None
    dweight = acc = None
    transposed, single = chunk > TRANSPOSED_DW_MIN_CHUNK, chunk >= N
    if need_dweight:
        dweight = torch.empty_like(weight)
        if not single:  # several chunks: summed in fp32
            acc = torch.zeros((H, V) if transposed else (V, H), dtype=torch.float32, device=weight.device)
        elif transposed:
            acc = torch.empty((H, V), dtype=weight.dtype, device=weight.device)
    for t0 in range(0, N, chunk):
        t1 = min(t0 + chunk, N)
        h = hidden[t0:t1]
        z = h @ weight.T
        update_lse(z, lse[t0:t1])
        dz = grad_logits(z, lse[t0:t1], targets[t0:t1], g[t0:t1], 0)
        del z
        if need_dhidden:
            torch.mm(dz, weight, out=dhidden[t0:t1])
        if need_dweight:
            h_t = h.T.contiguous() if transposed else None
            for v0 in range(0, V, MAX_VOCAB_BLOCK):  # vocab blocks: the partial product stays small
                v1 = min(v0 + MAX_VOCAB_BLOCK, V)
                block = dz[:, v0:v1]
                if acc is None:  # one short chunk: straight into dW
                    torch.mm(block.T, h, out=dweight[v0:v1])
                elif single:  # one long chunk: dW^T in the input dtype
                    acc[:, v0:v1] = h_t @ block
                elif dz.dtype == torch.float32:
                    (acc[:, v0:v1].addmm_(h_t, block) if transposed else acc[v0:v1].addmm_(block.T, h))
                else:  # low-precision matmul (fp32 inside), summed over token chunks in fp32
                    if transposed:
                        acc[:, v0:v1] += h_t @ block
                    else:
                        acc[v0:v1] += block.T @ h
        del dz
    if acc is not None:
        if transposed:  # a transposing copy is slow on CPU (~60 ms for SmolLM2's dW in bf16): do it in the out dtype
            dweight.copy_(acc.to(weight.dtype).T)
        else:
            dweight.copy_(acc)
    loss = (lse - target_logits(hidden, weight, targets)).sum()
    return loss, dhidden, dweight


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Ignored tokens are dropped up front (one host sync to count them): their loss and gradients are zero, so
    every matmul runs over the kept rows only. In SFT, where prompts are masked, that is most of the work saved.

    need_grads: (dhidden, dweight) wanted (grad mode on and the input requires grad; ctx.needs_input_grad does not
    see torch.no_grad). With either wanted, the 3-matmul path runs when its buffers fit THREE_MATMUL_BYTES: the
    gradients are computed here and only scaled by the incoming gradient in backward. Otherwise forward is the
    log-sum-exp pass and backward the second pass of the 4-matmul path."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, reduction: str, backend: str, need_grads):
        valid = targets != ignore_index
        n_valid = int(valid.sum())
        keep = None if n_valid == hidden.shape[0] else valid.nonzero().squeeze(1)
        h, y = (hidden, targets) if keep is None else (hidden[keep], targets[keep])
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0  # none kept: 0 loss, 0 gradients (never 0/0)
        need_dhidden, need_dweight = need_grads
        chunk = None
        if need_dhidden or need_dweight:
            chunk = three_matmul_chunk(h.shape[0], h.shape[1], weight.shape[0], h.element_size(), need_dweight)
        ctx.three_matmul = chunk is not None
        ctx.n_valid, ctx.reduction, ctx.backend = n_valid, reduction, backend
        if chunk is not None:
            g = torch.full((h.shape[0],), scale, dtype=torch.float32, device=h.device)
            loss, dh, dweight = loss_and_grads_three_matmul(h, weight, y, g, backend, need_dhidden, need_dweight,
                                                            chunk)
            ctx.hidden_shape = hidden.shape
            ctx.save_for_backward(dh, dweight, keep)
        else:
            lse = logsumexp_over_vocab(h, weight, backend)
            loss = (lse - target_logits(h, weight, y)).sum()
            ctx.save_for_backward(hidden, weight, y, lse, keep)
        if reduction == "mean":
            loss = loss / max(n_valid, 1)
        return loss  # fp32 whatever the input dtype: a bf16 loss near 12 would be off by up to 0.03

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 5
        if ctx.three_matmul:
            dh, dweight, keep = ctx.saved_tensors
            if bool(grad_loss != 1):  # e.g. the trainer's 1 / (target tokens): one more rounding in bf16
                # (computed in fp32 per element, no fp32 copy; not in place, so a retained graph can run it again)
                dh = None if dh is None else dh * grad_loss.float()
                dweight = None if dweight is None else dweight * grad_loss.float()
            dhidden = dh
            if dh is not None and keep is not None:
                dhidden = dh.new_zeros(ctx.hidden_shape)
                dhidden[keep] = dh
            return dhidden, dweight, *nones
        hidden, weight, y, lse, keep = ctx.saved_tensors
        need_dhidden, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dhidden or need_dweight):
            return None, None, *nones
        h = hidden if keep is None else hidden[keep]
        scale = grad_loss.float() / max(ctx.n_valid, 1) if ctx.reduction == "mean" else grad_loss.float()
        g = scale.expand(h.shape[0]).contiguous()
        dh, dweight = loss_grads(h, weight, y, lse, g, ctx.backend, need_dhidden, need_dweight)
        dhidden = dh
        if need_dhidden and keep is not None:
            dhidden = torch.zeros_like(hidden)
            dhidden[keep] = dh
        return dhidden, dweight, *nones


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"fused_linear_cross_entropy: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return backend
    from lynx.kernels.triton_cross_entropy import triton_available

    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("fused_linear_cross_entropy: backend='triton' needs the triton package, which is not installed")
    if device.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"fused_linear_cross_entropy: backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use backend='torch' or 'auto' on CPU"
            )
    return backend


def _check_inputs(hidden, weight, targets, ignore_index, reduction):
    name = "fused_linear_cross_entropy"
    for arg, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"{name}: expected hidden [N, H], weight [V, H], targets [N]; got hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"{name}: {targets.shape[0]} targets for {hidden.shape[0]} hidden rows")
    if weight.shape[0] == 0:
        raise ValueError(f"{name}: weight has an empty vocabulary")
    if hidden.dtype not in DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(
            f"{name}: hidden and weight must share one dtype in {[str(d) for d in DTYPES]}; "
            f"got {hidden.dtype} and {weight.dtype}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: targets must be int64 or int32, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{name}: tensors on different devices: {hidden.device}, {weight.device}, {targets.device}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):  # one host sync; a wrong target would otherwise be a silent wrong loss
        first = int(targets[bad][0])
        raise ValueError(f"{name}: target {first} out of range [0, {weight.shape[0]}) (ignore_index={ignore_index})")


def fused_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean", backend="auto"):
    """Cross-entropy of the logits `hidden @ weight.T` against `targets`, without materialising the logits.

    hidden [N, H], weight [V, H] (same dtype: fp32, bf16 or fp16), targets [N] (int; `ignore_index` = no loss).
    reduction "mean" averages over non-ignored tokens (0 with zero gradients when all are ignored), "sum" adds.
    Returns an fp32 scalar, differentiable w.r.t. hidden and weight (gradients in the input dtype).
    """
    _check_inputs(hidden, weight, targets, ignore_index, reduction)
    backend = _resolve_backend(backend, hidden.device)
    grad = torch.is_grad_enabled()
    need_grads = (grad and hidden.requires_grad, grad and weight.requires_grad)
    return FusedLinearCrossEntropy.apply(
        hidden.contiguous(), weight.contiguous(), targets.long().contiguous(), ignore_index, reduction, backend,
        need_grads,
    )
