"""The old home of generation and the CPU fast paths, kept so that `lynx.generate.generate` and the other names
below still import; the code is in lynx.infer.generation and lynx.infer.cpu_fast."""

from __future__ import annotations

from lynx.infer.cpu_fast import (FUSED_ROPE_MIN_TOKENS, CompiledRMSNorm, FusedRope, PrepackedLinear, PrepackedMLP,
                                 can_prepack, compile_rms_norms, compile_ropes, compiled_rms_norm, compiled_rope,
                                 prepack_linear_weights)
from lynx.infer.generation import GenerationResult, generate, run_generation

__all__ = [
    "FUSED_ROPE_MIN_TOKENS", "CompiledRMSNorm", "FusedRope", "GenerationResult", "PrepackedLinear", "PrepackedMLP",
    "can_prepack", "compile_rms_norms", "compile_ropes", "compiled_rms_norm", "compiled_rope", "generate",
    "prepack_linear_weights", "run_generation",
]
