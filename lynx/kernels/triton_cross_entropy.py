"""Triton kernels for the per-tile math of lynx/kernels/linear_cross_entropy.py.

One program per token row walks the row's vocab columns in BLOCK-wide slices. Every value is loaded, upcast to
fp32, computed in fp32 and cast back only on store: besides being what we want numerically, this keeps the kernels
correct under TRITON_INTERPRET=1, whose bf16 arithmetic is wrong. No loads go through pointers read from memory
(indirect loads): the target column is matched with a comparison, which the interpreter also supports.

The pure-torch twins (update_lse_torch, grad_logits_torch) are the reference these kernels are tested against.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without triton still work with backend="torch"
    triton = None


def triton_available() -> bool:
    return triton is not None


BLOCK = 1024  # vocab columns per step of a row

if triton is not None:

    @triton.jit
    def _round_fp32_to_bf16_grid(x):
        """x rounded to the nearest bf16 value (ties to even), still as fp32, so the cast on store is exact.
        The interpreter truncates on fp32 -> bf16 casts whatever rounding is asked for; on GPUs this equals the
        native round-to-nearest-even cast (a few integer ops on a memory-bound kernel)."""
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits & -65536).to(tl.float32, bitcast=True)  # -65536 = 0xFFFF0000

    @triton.jit
    def _update_lse_kernel(z_ptr, z_row_stride, lse_ptr, n_cols, BLOCK: tl.constexpr):
        """lse[row] <- logaddexp(lse[row], logsumexp(z[row, :])) with an online max."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_row_stride
        m = float("-inf")  # running max
        s = 0.0  # running sum of exp(z - m)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        tile_lse = m + tl.log(s)
        old = tl.load(lse_ptr + row)  # -inf before the first vocab block
        top = tl.maximum(old, tile_lse)
        tl.store(lse_ptr + row, top + tl.log(tl.exp(old - top) + tl.exp(tile_lse - top)))

    @triton.jit
    def _grad_logits_kernel(
        z_ptr, z_row_stride, dz_ptr, dz_row_stride, lse_ptr, targets_ptr, g_ptr, v0, n_cols,
        BLOCK: tl.constexpr, ROUND_TO_BF16: tl.constexpr,
    ):
        """dz[row, :] = (exp(z[row, :] - lse[row]) - [column == target[row]]) * g[row]; dz may alias z."""
        row = tl.program_id(0).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        target_col = tl.load(targets_ptr + row) - v0  # outside [0, n_cols) when not in this tile (or ignored)
        z_row = z_ptr + row * z_row_stride
        dz_row = dz_ptr + row * dz_row_stride
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse) * g
            p = tl.where(cols == target_col, p - g, p)
            if ROUND_TO_BF16:
                p = _round_fp32_to_bf16_grid(p)
            tl.store(dz_row + cols, p.to(dz_row.dtype.element_ty), mask=mask)


def _check_tile(z: torch.Tensor):
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"triton_cross_entropy: expected a row-major 2-D logits tile, got shape {tuple(z.shape)} "
                         f"strides {z.stride()}")


def update_lse(z: torch.Tensor, lse: torch.Tensor) -> None:
    """Triton twin of update_lse_torch: lse [n] fp32 (contiguous) updated in place from the tile z [n, v]."""
    _check_tile(z)
    if z.shape[0] == 0:
        return
    _update_lse_kernel[(z.shape[0],)](z, z.stride(0), lse, z.shape[1], BLOCK=BLOCK)


def grad_logits(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, v0: int):
    """Triton twin of grad_logits_torch; writes the gradient over z in place and returns it."""
    _check_tile(z)
    if z.shape[0] == 0:
        return z
    _grad_logits_kernel[(z.shape[0],)](
        z, z.stride(0), z, z.stride(0), lse, targets, g, v0, z.shape[1], BLOCK=BLOCK,
        ROUND_TO_BF16=z.dtype == torch.bfloat16,
    )
    return z
