"""lynx.kernels.fused_linear_cross_entropy against the fp32 reference F.cross_entropy(F.linear(h, w).float(), y).

The Triton backend runs in a subprocess with TRITON_INTERPRET=1 set before triton is imported (this file is the
subprocess's script: see `python tests/test_fused_linear_cross_entropy.py --triton-interpret`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lynx.kernels import fused_linear_cross_entropy
from lynx.kernels import linear_cross_entropy as flce_module


def make_inputs(N, H, V, *, dtype=torch.float32, ignore_frac=0.2, logit_scale=1.0, seed=0):
    """Random hidden/weight with logits of std ~logit_scale*3, targets with `ignore_frac` set to -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (3.0 * logit_scale / H**0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    ignored = torch.rand(N, generator=g) < ignore_frac
    ignored[:1] = False  # at least one real target (the reference's mean of nothing is NaN)
    targets[ignored] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kwargs)
    loss.backward()
    return loss.detach().float(), h.grad, w.grad


def reference(h, w, y, reduction="mean", ignore_index=-100):
    """The fp32 reference (inputs upcast first)."""
    return F.cross_entropy(F.linear(h.float(), w.float()), y, reduction=reduction, ignore_index=ignore_index)


def plain_torch(h, w, y, reduction="mean"):
    """What plain torch does in the input dtype (the bar for low-precision error)."""
    return F.cross_entropy(F.linear(h, w), y, reduction=reduction)


def small_tiles(monkeypatch_setattr):
    """Force several vocab blocks and token chunks on small shapes, so every loop path runs."""
    monkeypatch_setattr(flce_module, "TILE_ELEMENTS", 48 * 70)  # ragged last chunk / block on every shape below
    monkeypatch_setattr(flce_module, "MAX_TOKEN_CHUNK", 48)
    monkeypatch_setattr(flce_module, "MIN_VOCAB_BLOCK", 37)


PATHS = ("four", "three", "three_t", "three_chunked", "three_chunked_t")


def force_path(monkeypatch_setattr, path, chunk=40):
    """Which path the loss takes: "four" (logits recomputed in backward), "three" (gradients in forward, one token
    chunk: what the default budget gives these small shapes) or "three_chunked" (gradients in forward over token
    chunks of `chunk` tokens, the last one ragged, and dW in vocab blocks of 300 columns accumulated in fp32; the
    budget arithmetic that picks chunks is test_path_choice_by_memory's). "_t": dW computed transposed (as long
    chunks do)."""
    if path.endswith("_t"):
        monkeypatch_setattr(flce_module, "TRANSPOSED_DW_MIN_CHUNK", 0)
        path = path.removesuffix("_t")
    if path == "four":
        monkeypatch_setattr(flce_module, "THREE_MATMUL_BYTES", 0)
    elif path == "three_chunked":
        monkeypatch_setattr(flce_module, "MAX_VOCAB_BLOCK", 300)
        monkeypatch_setattr(flce_module, "three_matmul_chunk", lambda n, *_: min(n, chunk) if n else None)
    else:
        assert path == "three", path


def count_three_matmul_calls(monkeypatch_setattr) -> list:
    """Record every run of the 3-matmul path (its token chunk)."""
    calls, three = [], flce_module.loss_and_grads_three_matmul

    def spy(*args):
        calls.append(args[-1])
        return three(*args)

    monkeypatch_setattr(flce_module, "loss_and_grads_three_matmul", spy)
    return calls


def assert_matches_reference(backend, N, H, V, reduction, dtype=torch.float32):
    hidden, weight, targets = make_inputs(N, H, V, dtype=dtype)
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, reduction=reduction,
                                  backend=backend)
    ref_loss, ref_dh, ref_dw = loss_and_grads(reference, hidden.float(), weight.float(), targets, reduction=reduction)
    assert dh.dtype == dtype and dw.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-6)


def rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def assert_low_precision_no_worse_than_torch(backend, N, H, V, dtype):
    """CCE-style bar: our error against the fp32 reference is at most plain torch's error in `dtype` plus a margin."""
    hidden, weight, targets = make_inputs(N, H, V, dtype=dtype)
    ours = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, backend=backend)
    torch_lp = loss_and_grads(plain_torch, hidden, weight, targets)
    ref = loss_and_grads(reference, hidden.float(), weight.float(), targets)
    for name, o, t, r in zip(("loss", "dhidden", "dweight"), ours, torch_lp, ref):
        assert torch.isfinite(o).all(), name
        if name != "loss":
            assert o.dtype == dtype, name
        ours_err, torch_err = rel_err(o, r), rel_err(t, r)
        assert ours_err <= 1.1 * torch_err + 1e-4, f"{name}: ours {ours_err:.2e} vs plain torch {torch_err:.2e}"


# --- torch backend (in this process) ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(127, 67, 1031), (200, 32, 4099), (1, 8, 3), (64, 16, 100)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_torch_matches_fp32_reference(shape, reduction, tiles, monkeypatch):
    """The 4-matmul path (vocab blocks outside, logits recomputed in backward)."""
    force_path(monkeypatch.setattr, "four")
    calls = count_three_matmul_calls(monkeypatch.setattr)
    if tiles == "small":
        small_tiles(monkeypatch.setattr)
        if shape[2] > 2000:  # fewer, still ragged, vocab blocks: keeps the test fast
            monkeypatch.setattr(flce_module, "TILE_ELEMENTS", 48 * 700)
        token_chunk, vocab_block = flce_module.tile_sizes(shape[0], shape[2])
        assert shape == (1, 8, 3) or (vocab_block < shape[2] and token_chunk < shape[0])
    assert_matches_reference("torch", *shape, reduction)
    assert not calls


@pytest.mark.parametrize("shape", [(127, 67, 1031), (200, 32, 4099), (1, 8, 3), (64, 16, 100)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("path", ["three", "three_t", "three_chunked", "three_chunked_t"])
def test_three_matmul_path_matches_fp32_reference(shape, reduction, path, monkeypatch):
    """The 3-matmul path (token chunks over the whole vocabulary, gradients in forward) against torch in fp32."""
    force_path(monkeypatch.setattr, path)
    calls = count_three_matmul_calls(monkeypatch.setattr)
    assert_matches_reference("torch", *shape, reduction)
    n_valid = int((make_inputs(*shape)[2] != -100).sum())
    assert calls, "the 3-matmul path did not run"
    if path.startswith("three_chunked"):
        assert calls == [min(40, n_valid)]
        assert n_valid <= 40 or n_valid % 40, "expected several token chunks, the last one ragged"
    else:
        assert calls == [n_valid]


@pytest.mark.parametrize("path", ["four", "four_small_tiles", *PATHS[1:]])
def test_torch_bf16_error_no_worse_than_plain_torch(path, monkeypatch):
    if path == "four_small_tiles":
        monkeypatch.setattr(flce_module, "TILE_ELEMENTS", 256 * 512)
        monkeypatch.setattr(flce_module, "MAX_TOKEN_CHUNK", 256)
        path = "four"
    force_path(monkeypatch.setattr, path, chunk=150)
    calls = count_three_matmul_calls(monkeypatch.setattr)
    assert_low_precision_no_worse_than_torch("torch", 512, 128, 8192, torch.bfloat16)
    assert bool(calls) == (path != "four")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["four", "three_chunked_t"])
def test_compiled_tile_math_matches(dtype, path, monkeypatch):
    """Large CPU problems run the tile math through torch.compile; force that path on a small shape."""
    monkeypatch.setattr(flce_module, "COMPILE_MIN_LOGITS", 0)
    monkeypatch.setattr(flce_module, "TILE_ELEMENTS", 200 * 1000)  # 5 vocab blocks, the last one ragged
    force_path(monkeypatch.setattr, path, chunk=70)
    calls, compiled_tile_ops = [], flce_module._compiled_tile_ops
    monkeypatch.setattr(flce_module, "_compiled_tile_ops", lambda: calls.append(1) or compiled_tile_ops())
    if dtype == torch.float32:
        assert_matches_reference("torch", 200, 32, 4099, "mean")
    else:
        assert_low_precision_no_worse_than_torch("torch", 200, 32, 4099, dtype)
    # The 4-matmul path runs tile math in forward and backward, the 3-matmul path in forward only.
    assert len(calls) == (2 if path == "four" else 1), "the compiled path did not run"


def test_path_choice_by_memory():
    """The 3-matmul path where its buffers fit THREE_MATMUL_BYTES, the 4-matmul path where they do not."""
    smollm2 = flce_module.three_matmul_chunk(4096, 576, 49152, 2, need_dweight=True)
    assert smollm2 == 1366  # fp32 dW accumulator 113 MB + 3 chunks of 1,366 tokens (134 MB tiles)
    assert flce_module.three_matmul_chunk(4096, 1024, 128256, 2, need_dweight=True) is None  # 525 MB accumulator
    assert flce_module.three_matmul_chunk(4096, 1024, 128256, 2, need_dweight=False) is not None  # frozen head
    assert flce_module.three_matmul_chunk(300, 576, 49152, 2, need_dweight=True) == 300  # one chunk, no accumulator
    assert flce_module.three_matmul_chunk(0, 576, 49152, 2, need_dweight=True) is None


def test_no_gradient_work_without_grad(monkeypatch):
    """Under torch.no_grad (evaluation), or with nothing requiring grad, forward is the log-sum-exp pass only."""
    calls = count_three_matmul_calls(monkeypatch.setattr)
    hidden, weight, targets = make_inputs(40, 8, 30)
    with torch.no_grad():
        a = fused_linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), targets)
    b = fused_linear_cross_entropy(hidden.detach(), weight.detach(), targets)
    assert not calls
    c = fused_linear_cross_entropy(hidden, weight, targets)
    assert calls and not a.requires_grad and c.requires_grad
    torch.testing.assert_close(a, reference(hidden.detach(), weight.detach(), targets))
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(c.detach(), a)


def test_auto_backend_on_cpu_is_torch():
    hidden, weight, targets = make_inputs(16, 8, 50)
    a = fused_linear_cross_entropy(hidden, weight, targets, backend="auto")
    b = fused_linear_cross_entropy(hidden, weight, targets, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction, dtype):
    hidden, weight, _ = make_inputs(10, 8, 30, dtype=dtype)
    targets = torch.full((10,), -100)
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, reduction=reduction)
    assert loss.item() == 0.0
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_empty_batch():
    hidden, weight, targets = make_inputs(0, 8, 30)
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets)
    assert loss.item() == 0.0 and dh.shape == (0, 8) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_stay_finite(dtype):
    # Logits of magnitude ~100-1000: exp() would overflow without the max-shifted log-sum-exp.
    hidden, weight, targets = make_inputs(64, 32, 500, dtype=dtype, logit_scale=100.0)
    assert F.linear(hidden.float(), weight.float()).abs().max() > 100
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets)
    ref_loss, ref_dh, ref_dw = loss_and_grads(reference, hidden.float(), weight.float(), targets)
    assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(dh, ref_dh, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-4)
    else:
        assert abs(loss - ref_loss) / ref_loss < 0.02


def test_custom_ignore_index_and_int32_targets():
    hidden, weight, targets = make_inputs(40, 8, 30, ignore_frac=0.0)
    targets[::3] = 7  # every third token is "ignored" via ignore_index=7
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets.int(), ignore_index=7)
    ref_loss, ref_dh, ref_dw = loss_and_grads(reference, hidden, weight, targets, ignore_index=7)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(dh, ref_dh)
    torch.testing.assert_close(dw, ref_dw)


@pytest.mark.parametrize("path", PATHS)
def test_only_the_needed_gradients(path, monkeypatch):
    force_path(monkeypatch.setattr, path, chunk=9)
    hidden, weight, targets = make_inputs(40, 8, 30)
    h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy(h, weight, targets).backward()  # frozen output projection
    ref_h = hidden.clone().requires_grad_()
    reference(ref_h, weight, targets).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    w = weight.clone().requires_grad_()
    fused_linear_cross_entropy(hidden, w, targets).backward()
    ref_w = weight.clone().requires_grad_()
    reference(hidden, ref_w, targets).backward()
    torch.testing.assert_close(w.grad, ref_w.grad)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_output_scales_gradients(path, dtype, monkeypatch):
    force_path(monkeypatch.setattr, path, chunk=9)
    hidden, weight, targets = make_inputs(40, 8, 30)
    if dtype == torch.bfloat16:  # the trainer's backward of loss / (target tokens): gradients scaled in bf16
        ours = loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, reduction="sum") / 77, hidden.bfloat16(),
                              weight.bfloat16(), targets)
        ref = loss_and_grads(lambda *a: reference(*a, reduction="sum") / 77, hidden.bfloat16().float(),
                             weight.bfloat16().float(), targets)
        for o, r in zip(ours[1:], ref[1:]):
            assert o.dtype == torch.bfloat16 and rel_err(o, r) < 1e-2
        return
    loss, dh, dw = loss_and_grads(lambda *a: 3.0 * fused_linear_cross_entropy(*a), hidden, weight, targets)
    ref_loss, ref_dh, ref_dw = loss_and_grads(lambda *a: 3.0 * reference(*a), hidden, weight, targets)
    torch.testing.assert_close(dh, ref_dh)
    torch.testing.assert_close(dw, ref_dw)


@pytest.mark.parametrize("path", ["four", "three"])
def test_backward_twice_with_retained_graph(path, monkeypatch):
    """The 3-matmul path's backward only scales gradients computed in forward: a second backward gets them again."""
    force_path(monkeypatch.setattr, path)
    hidden, weight, targets = make_inputs(40, 8, 30)
    h = hidden.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, weight, targets)
    (2.0 * loss).backward(retain_graph=True)
    first = h.grad.clone()
    (2.0 * loss).backward()
    torch.testing.assert_close(h.grad, 2 * first)


def test_non_contiguous_inputs():
    hidden, weight, targets = make_inputs(40, 8, 30)
    h_t = hidden.t().contiguous().t()  # same values, column-major
    loss = fused_linear_cross_entropy(h_t, weight, targets)
    torch.testing.assert_close(loss, reference(hidden, weight, targets))


@pytest.mark.parametrize(
    "hidden_shape, weight_shape, targets_shape, kwargs, error, match",
    [
        ((4, 8), (30, 8), (4,), {"reduction": "none"}, ValueError, "unknown reduction"),
        ((4, 8), (30, 8), (4,), {"backend": "cuda"}, ValueError, "unknown backend"),
        ((2, 4, 8), (30, 8), (4,), {}, ValueError, r"expected hidden \[N, H\]"),
        ((4, 8), (30, 9), (4,), {}, ValueError, "hidden size mismatch"),
        ((4, 8), (30, 8), (5,), {}, ValueError, "5 targets for 4 hidden rows"),
        ((4, 8), (0, 8), (4,), {}, ValueError, "empty vocabulary"),
    ],
)
def test_bad_shapes_and_options_raise(hidden_shape, weight_shape, targets_shape, kwargs, error, match):
    targets = torch.zeros(targets_shape, dtype=torch.long)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(torch.randn(hidden_shape), torch.randn(weight_shape), targets, **kwargs)


def test_bad_dtypes_and_targets_raise():
    h, w, y = torch.randn(4, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear_cross_entropy(h.bfloat16(), w, y)
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear_cross_entropy(h.double(), w.double(), y)
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        fused_linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match=r"target 30 out of range \[0, 30\)"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 30, -100, 1]))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fused_linear_cross_entropy(h.tolist(), w, y)


def test_triton_on_cpu_without_interpreter_raises():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    h, w, y = torch.randn(4, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_cross_entropy(h, w, y, backend="triton")


# --- triton backend, in the interpreter (subprocess) --------------------------------------------------------------


def run_triton_interpreter_checks():
    """Run in a process started with TRITON_INTERPRET=1: the triton backend against the reference and the twin."""
    from lynx.kernels import triton_cross_entropy as tce

    # Per-tile kernels against their torch twins, fp32 and bf16, with a target in / out of / ignored in the tile.
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        z = (torch.randn(9, 1500, generator=g) * 30).to(dtype)
        lse0 = torch.randn(9, generator=g) * 30
        lse0[0] = float("-inf")
        lse_t, lse_k = lse0.clone(), lse0.clone()
        flce_module.update_lse_torch(z, lse_t)
        tce.update_lse(z, lse_k)
        torch.testing.assert_close(lse_k, lse_t, rtol=1e-6, atol=1e-5)
        targets = torch.tensor([5, 1999, -100, 1000, 1001, 2499, 2500, 3000, 1000])
        gs = torch.rand(9, generator=g)
        dz_t = flce_module.grad_logits_torch(z.clone(), lse_t, targets, gs, 1000)
        dz_k = tce.grad_logits(z.clone(), lse_t, targets, gs, 1000)
        assert dz_k.dtype == dtype
        # exp() may differ in the last fp32 bit, which can flip a bf16 rounding now and then (one bf16 ulp);
        # truncating instead of rounding to nearest would flip about half of them. (Denormals: exp() differs.)
        torch.testing.assert_close(dz_k.float(), dz_t.float(), rtol=1e-6 if dtype == torch.float32 else 8e-3,
                                   atol=1e-7)
        if dtype == torch.bfloat16:
            normal = dz_t.float().abs() > 1e-30
            assert (dz_k != dz_t)[normal].float().mean() < 0.01
    # Whole loss, several tiles, both reductions, odd shapes, both paths.
    knobs = ("TILE_ELEMENTS", "MAX_TOKEN_CHUNK", "MIN_VOCAB_BLOCK", "MAX_VOCAB_BLOCK", "THREE_MATMUL_BYTES",
             "three_matmul_chunk", "TRANSPOSED_DW_MIN_CHUNK")
    saved = {k: getattr(flce_module, k) for k in knobs}

    def restore():
        for k, v in saved.items():
            setattr(flce_module, k, v)

    assert_matches_reference("triton", 127, 67, 1031, "mean")  # 3-matmul path, one token chunk
    force_path(setattr, "three_chunked")
    assert_matches_reference("triton", 100, 16, 300, "sum")
    restore()
    force_path(setattr, "three_chunked_t")
    assert_matches_reference("triton", 100, 16, 300, "mean")
    restore()
    force_path(setattr, "four")
    assert_matches_reference("triton", 33, 16, 300, "sum")
    small_tiles(setattr)
    assert_matches_reference("triton", 100, 16, 300, "mean")
    restore()
    for path in ("three", "three_t", "four"):
        force_path(setattr, path)
        assert_low_precision_no_worse_than_torch("triton", 128, 64, 1031, torch.bfloat16)
        restore()
    # all ignored and large logits
    hidden, weight, _ = make_inputs(8, 8, 40)
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, torch.full((8,), -100), backend="triton")
    assert loss.item() == 0.0 and not dh.any() and not dw.any()
    hidden, weight, targets = make_inputs(16, 16, 200, logit_scale=100.0)
    loss, dh, dw = loss_and_grads(fused_linear_cross_entropy, hidden, weight, targets, backend="triton")
    ref_loss = reference(hidden, weight, targets)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-3)
    print("triton interpreter checks passed")


def test_triton_backend_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--triton-interpret"], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton interpreter checks passed" in proc.stdout


if __name__ == "__main__":
    if sys.argv[1:] != ["--triton-interpret"] or os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_fused_linear_cross_entropy.py --triton-interpret")
    run_triton_interpreter_checks()
