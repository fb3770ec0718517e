"""Llama model configuration, read from and written to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A config we cannot run faithfully (config.json, a training config, an override); the message names the file
    and key."""


# The dtype names configs, config.json and the command lines use.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_is_native(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products run at hardware speed on `device`: GPUs with bf16 (any CUDA device when none is
    visible: lynx.plan plans for GPUs on a CPU machine), CPUs whose oneDNN has bf16 instructions (AVX512-BF16, AMX).
    On AVX2-only CPUs (AMD Zen 3, most laptops) oneDNN emulates bf16: a 2-core EPYC multiplies bf16 at 0.8 GFLOP/s
    against 73 in fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return torch.backends.mkldnn.is_available() and supported is not None and bool(supported())
    return True


def fast_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """What `auto` compute dtypes resolve to: bfloat16 where it is native (bf16_is_native), else float32."""
    return torch.bfloat16 if bf16_is_native(device) else torch.float32


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # None, or the Llama-3.1 "llama3" scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        def bad(key, why):
            return ConfigError(f"{source}: unsupported {key!r}: {why}")

        if d.get("model_type", "llama") != "llama":
            raise bad("model_type", f"{d['model_type']!r} (only 'llama' is supported)")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise bad(key, "biases in attention/MLP projections are not part of Llama-3")
        if d.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"{d['hidden_act']!r} (only 'silu')")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")

        # Two spellings: rope_theta + rope_scaling (published Llama-3 checkpoints, transformers 4.x) and
        # rope_parameters (transformers 5.x).
        rope = dict(d.get("rope_parameters") or {})
        rope_key = "rope_parameters"
        if not rope:
            rope = dict(d.get("rope_scaling") or {})
            rope_key = "rope_scaling"
            rope.setdefault("rope_theta", d.get("rope_theta", 500000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            absent = [f for f in fields if f not in rope]
            if absent:
                raise bad(rope_key, f"rope_type 'llama3' lacks {absent}")
            scaling = {f: rope[f] for f in fields}
        else:
            raise bad(f"{rope_key}.rope_type", f"{rope_type!r} (supported: 'default', 'llama3')")

        try:
            return cls._from_checked_dict(d, rope, scaling)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def _from_checked_dict(cls, d: dict, rope: dict, scaling: dict | None) -> "LlamaConfig":
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 500000.0))),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing model config: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self, dtype: str | None = None) -> dict:
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = {"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling}
        dtype = dtype or self.torch_dtype
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            # transformers 5.x reads rope_parameters; 4.x reads rope_theta and rope_scaling. Write both.
            "rope_parameters": rope_parameters,
            "rope_theta": self.rope_theta,
            "rope_scaling": ({"rope_type": "llama3", **self.rope_scaling} if self.rope_scaling else None),
            "torch_dtype": dtype,
            "dtype": dtype,
        }
