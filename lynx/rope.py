"""Rotary position embeddings, Hugging Face's rotate-half layout, with Llama-3.1's "llama3" frequency scaling.

Apart from the model so that the GGUF reader and writer (which store Llama-3.1's scaling as a `rope_freqs` tensor)
compute the same frequencies without importing the model.
"""

from __future__ import annotations

import math

import torch

from lynx.config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2], with Llama-3.1 "llama3" scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if not cfg.rope_scaling:
        return inv_freq
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T]."""
    inv_freq = rope_inv_freq(cfg, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, H, D]; rotate-half layout (pairs are (i, i + D/2))."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
