"""CPU fast paths for bf16 inference: modules swapped into a loaded model, in place, where the CPU's oneDNN runs bf16
natively (`can_prepack`); elsewhere the model is left as it is.

    prepack_linear_weights  linear weights laid out once for oneDNN (PrepackedLinear), MLPs fused (PrepackedMLP)
    compile_rms_norms       RMSNorms through torch.compile (CompiledRMSNorm)
    compile_ropes           the rotary embeddings through torch.compile, bit-identical (FusedRope)
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

from lynx.model import MLP, Llama, RMSNorm, apply_rope, rms_norm


class PrepackedLinear(nn.Module):
    """Inference-only stand-in for a bias-free bf16 `nn.Linear` on CPU, with its weight laid out once, up front, in
    oneDNN's blocked format. Given a plain weight, oneDNN's bf16 matmul lays it out again on every call; with the
    few rows of a decode step that costs more than the product (a 32000 x 512 output projection, 8 rows, weights
    not in cache: 4.4 ms plain, 2.8 ms prepacked). Same kernel, same results, bit for bit (tested)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        # The output head keeps its plain weight as well: judging reads a few of its rows in float32
        # (InferenceOptions.vocab_ids). A tied head shares it with the embedding, so that costs no memory there.
        self.kept_weight = linear.weight.detach() if keep_weight else None

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")

    @property
    def weight(self):
        if self.kept_weight is not None:
            return self.kept_weight
        raise RuntimeError(
            "this model's linear weights were prepacked for CPU inference "
            "(lynx.infer.cpu_fast.prepack_linear_weights); it cannot train or be saved: load the "
            "checkpoint again for that"
        )


def can_prepack(model: Llama) -> bool:
    """bf16 on a CPU whose oneDNN runs bf16 natively: where prepacking is exact and pays."""
    w = model.embed_tokens.weight
    if not (w.device.type == "cpu" and w.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()):
        return False
    # Private oneDNN ops (the ones torch.compile's CPU weight prepacking uses): fall back to plain weights wherever
    # a torch build lacks them.
    ops = ("_is_mkldnn_bf16_supported", "_reorder_linear_weight", "_linear_pointwise")
    return all(hasattr(torch.ops.mkldnn, op) for op in ops) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PrepackedMLP(nn.Module):
    """Inference-only stand-in for a bf16 `lynx.model.MLP` on CPU: its three weights prepacked (as PrepackedLinear's)
    and SwiGLU's elementwise work done inside the matmuls by oneDNN post-ops: silu applied to the gate projection's
    fp32 accumulators, and the up projection's accumulators multiplied by the gate before rounding. That saves two
    passes over the [tokens, intermediate] activations (silu alone cost 7% of fast judging) and two bf16 roundings,
    so outputs are not bit-identical to the plain model's, but nearer fp32's (tested)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (PrepackedLinear(m) for m in (mlp.gate_proj, mlp.up_proj,
                                                                                     mlp.down_proj))

    def forward(self, x):
        gate = torch.ops.mkldnn._linear_pointwise(x, self.gate_proj.packed_weight, None, "swish", [], "")
        hidden = torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.up_proj.packed_weight, None, "mul")
        return self.down_proj(hidden)


@torch.no_grad()
def prepack_linear_weights(model: Llama, fuse_mlp: bool = True) -> bool:
    """Replace every bias-free linear layer of a bf16 CPU model with a PrepackedLinear, in place, and return True;
    return False (model untouched) where that does not apply (see `can_prepack`). fuse_mlp: the MLPs become
    PrepackedMLP (SwiGLU fused into the matmuls: faster, not bit-identical); False keeps outputs bit-identical to the
    plain model's. One layer at a time, so memory peaks at one extra weight. The model is then for inference only."""
    if not can_prepack(model):
        return False
    fuse_mlp = fuse_mlp and "binary" in torch.ops.mkldnn._linear_pointwise.overloads()
    for parent in list(model.modules()):
        if fuse_mlp and isinstance(parent, MLP):  # replaced whole by its parent's turn
            continue
        for name, child in list(parent.named_children()):
            if fuse_mlp and isinstance(child, MLP):
                setattr(parent, name, PrepackedMLP(child))
            elif isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, PrepackedLinear(child, keep_weight=child is model.head.lm_head))
    return True


class CompiledRMSNorm(nn.Module):
    """Inference-only stand-in for `lynx.model.RMSNorm` on CPU: the same function (`lynx.model.rms_norm`) through
    torch.compile, which fuses its six passes over the activations (an fp32 copy, square, mean, scale, bf16 copy,
    gain) into one loop. Eager, the norms took 15-20% of a packed bf16 judging pass. The fused loop rounds
    differently, so bf16 outputs are not bit-identical to the eager norm's: within one bf16 rounding, and at least as
    near fp32 (tested)."""

    def __init__(self, norm: nn.Module, compiled_fn):
        super().__init__()
        self.weight, self.eps, self.compiled_fn = norm.weight, norm.eps, compiled_fn

    def forward(self, x):
        return self.compiled_fn(x, self.weight, self.eps)


@functools.cache  # one per process: every model's norms share its compiled code
def compiled_rms_norm():
    return torch.compile(rms_norm, dynamic=True)


@torch.no_grad()
def compile_rms_norms(model: Llama) -> bool:
    """Replace every RMSNorm of a bf16 CPU inference model (where `can_prepack`) with a CompiledRMSNorm, in place, and
    return True; False (model untouched) where that does not apply, or with a warning where torch.compile cannot
    build its kernel here (it needs a C++ compiler). One compiled function, dynamic shapes, serves every norm; the
    first build takes a few seconds per process (inductor caches the code on disk)."""
    if not can_prepack(model):
        return False
    compiled = compiled_rms_norm()
    try:  # build it now, on a small input, so that a missing compiler shows here and not mid-judging
        norm = model.head.norm
        compiled(torch.ones(1, 2, norm.weight.shape[0], dtype=norm.weight.dtype), norm.weight, norm.eps)
    except Exception as e:  # noqa: BLE001 (inductor raises many kinds; any of them means: stay eager)
        warnings.warn(f"lynx.infer.cpu_fast.compile_rms_norms: torch.compile failed ({type(e).__name__}: {e}); "
                      "the RMSNorms stay eager (slower, same results)", stacklevel=2)
        return False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                setattr(parent, name, CompiledRMSNorm(child, compiled))
    return True


FUSED_ROPE_MIN_TOKENS = 64  # fewer (a decode step's rows): the eager rotation, cheaper than a compiled call


class FusedRope:
    """Inference-only stand-in for `lynx.model.apply_rope` on CPU: the same function through torch.compile with
    inductor's emulate_precision_casts, so the fused loop rounds every intermediate to bf16 where eager does, and its
    outputs are bit-identical to the eager rotation's (tested). Eager, the rotation is six passes over q and k (a
    half negated, a concatenation, two products, a sum): ~10% of a 4,096-token judging pass. Inputs of fewer than
    FUSED_ROPE_MIN_TOKENS positions take the eager function (a compiled call's overhead is larger there)."""

    def __init__(self, compiled_fn):
        self.compiled_fn = compiled_fn

    def __call__(self, x, cos, sin):
        if x.shape[0] * x.shape[1] < FUSED_ROPE_MIN_TOKENS:
            return apply_rope(x, cos, sin)
        return self.compiled_fn(x, cos, sin)


@functools.cache  # one per process, as compiled_rms_norm
def compiled_rope():
    return torch.compile(apply_rope, dynamic=True, options={"emulate_precision_casts": True})


@torch.no_grad()
def compile_ropes(model: Llama) -> bool:
    """Give every attention layer of a bf16 CPU inference model (where `can_prepack`) a FusedRope, in place, and
    return True; False (model untouched) where that does not apply, or with a warning where torch.compile cannot
    build its kernel (as compile_rms_norms). Outputs stay bit-identical."""
    if not can_prepack(model):
        return False
    rope = FusedRope(compiled_rope())
    cfg = model.config
    try:  # build it now (one shape with more than a decode step's positions), as compile_rms_norms does
        x = torch.ones(1, FUSED_ROPE_MIN_TOKENS, cfg.num_key_value_heads, cfg.head_dim, dtype=torch.bfloat16)
        cos = torch.ones(1, FUSED_ROPE_MIN_TOKENS, cfg.head_dim, dtype=torch.bfloat16)
        rope(x, cos, cos)
    except Exception as e:  # noqa: BLE001 (inductor raises many kinds; any of them means: stay eager)
        warnings.warn(f"lynx.infer.cpu_fast.compile_ropes: torch.compile failed ({type(e).__name__}: {e}); the "
                      "rotary embeddings stay eager (slower, same results)", stacklevel=2)
        return False
    for layer in model.layers:
        layer.self_attn.rope = rope
    return True
