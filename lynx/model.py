"""Llama-3 / 3.1 / 3.2 decoder in plain PyTorch.

Module and parameter names follow Hugging Face's LlamaForCausalLM (without its `model.` prefix), and rotary
embeddings use Hugging Face's rotate-half layout, so published checkpoints load without permutation.
The model knows nothing of parallelism: FSDP2, activation checkpointing and compile are applied from outside.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lynx.kernels import fused_linear_cross_entropy
from lynx.attention import attention
from lynx.config import LlamaConfig
from lynx.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x, weight, eps: float):
    # Normalise in fp32, cast back before the gain: the order Hugging Face uses, for bit-level parity.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class KVCache:
    """One attention layer's keys and values during generation, preallocated [B, H_kv, max_len, D] (as gpt-fast's).

    `update(positions, k, v)` writes k, v [B, T, H_kv, D] at the cache slots `positions` (a range of T slots, the
    same for every row, or a tensor [B] of one slot per row when T = 1: rows admitted at different times by
    continuous batching) and returns the keys and values attention reads, [B, S, H_kv, D]:
    - a write of a range starting at slot 0 (a prefill): the slots just written, so attention runs as it would
      without a cache (plain causal, or the caller's [B, 1, T, T] mask);
    - any other write (a decode step): the whole buffer, S = max_len, and the caller's mask [B, 1, T, max_len] must
      hide the slots not written yet. Decode reads the buffer in place: a slice of the written part runs other
      kernels (other last bits in the logits; slower in bf16).
    Packed sequences (`cu_seqlens`) do not write: they read whole caches as a prefix every document attends to
    (lynx.attention's cached prefix; `InferenceOptions.prefix_caches`).
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, *, dtype, device=None,
                 zeroed: bool = True):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        make = torch.zeros if zeroed else torch.empty  # empty: for a cache every slot of which is written first
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)

    def update(self, positions: range | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if isinstance(positions, torch.Tensor):
            if k.shape[1] != 1 or positions.shape != (k.shape[0],):
                raise ValueError(f"KVCache.update: per-row slots take one new key per row, got slots of shape "
                                 f"{tuple(positions.shape)} for keys {tuple(k.shape)}")
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, positions] = k[:, 0]
            self.v[rows, :, positions] = v[:, 0]
            return self.k.transpose(1, 2), self.v.transpose(1, 2)
        if positions.step != 1 or len(positions) != k.shape[1] or positions.stop > self.k.shape[2]:
            raise ValueError(f"KVCache.update: {k.shape[1]} new keys need {k.shape[1]} consecutive slots below "
                             f"{self.k.shape[2]}, got {positions}")
        self.k[:, :, positions.start : positions.stop] = k.transpose(1, 2)
        self.v[:, :, positions.start : positions.stop] = v.transpose(1, 2)
        end = positions.stop if positions.start == 0 else self.k.shape[2]
        return self.k[:, :, :end].transpose(1, 2), self.v[:, :, :end].transpose(1, 2)


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
    """What an inference pass reads and writes besides its tokens: `Llama.forward(..., inference=...)`. Training
    passes none. The lists hold one KVCache per layer (`Llama.new_kv_caches`); every block reads the same object,
    under the same names, and takes its own layer's cache from each list.

    kv_caches: written at the slots cache_positions (default 0..T-1; a tensor [B]: one slot per row, which then needs
    explicit position_ids); what attention then reads, and so the mask it needs, is KVCache.update's rule. Unpacked
    passes only.
    prefix_caches: packed sequences (cu_seqlens) only: read, not written; each whole cache is a prefix every document
    attends to (judging and generation fill them once with the prompts' shared prefix; position_ids then start after
    it).
    packed_kv_out: packed sequences only: caches ([1, H_kv, >= B * T, D]) that receive every token's keys and values
    at slots 0..B*T-1, flat (generation prefills packed prompts and copies each one's into its row).
    last_logits_only: logits of the last position only, [B, 1, V] (generation: a prefill needs no more). The last
    block then runs its query, attention output and MLP for that position alone (every position's keys and values
    are still computed and cached): nothing else reads the other positions' final hidden states, and projecting
    them onto a 128k vocabulary would be most of a prefill's work. Unpacked passes only.
    read_positions: logits [1, N, V] of these N flat positions of the B * T tokens only (packed judging and
    generation's packed prefill read one position per document). With packed sequences the last block, too, runs its
    query, attention output and MLP at those positions only (lynx.attention.attention takes them under this name).
    vocab_ids: logits of these vocabulary ids only, [..., len(vocab_ids)], in float32 whatever the model's dtype
    (judging reads the PASS and FAIL tokens: bf16 logits near 20 are 0.125 apart, so a faithful answer and the same
    answer with one fact changed would often get the very same p_pass).
    """

    kv_caches: list[KVCache] | None = None
    cache_positions: range | torch.Tensor | None = None
    prefix_caches: list[KVCache] | None = None
    packed_kv_out: list[KVCache] | None = None
    last_logits_only: bool = False
    read_positions: torch.Tensor | None = None
    vocab_ids: torch.Tensor | None = None

    def check(self, packed: bool, loss: bool) -> None:
        """Refuse options that do not apply to this pass (packed: cu_seqlens in attn_kwargs; loss: labels given)."""
        if self.last_logits_only and loss:
            raise ValueError("last_logits_only returns logits; it cannot be combined with labels (a loss)")
        if self.read_positions is not None and loss:
            raise ValueError("read_positions returns logits; it cannot be combined with labels (a loss)")
        if self.vocab_ids is not None and loss:
            raise ValueError("vocab_ids returns logits; it cannot be combined with labels (a loss)")
        if self.last_logits_only and packed:
            raise ValueError("last_logits_only does not apply to packed sequences (cu_seqlens)")
        if self.packed_kv_out is not None and not packed:
            raise ValueError("packed_kv_out applies to packed sequences (cu_seqlens) only; use kv_caches otherwise")
        if self.prefix_caches is not None and not packed:
            raise ValueError("prefix_caches apply to packed sequences (cu_seqlens) only; use kv_caches otherwise")
        if self.kv_caches is not None and packed:
            raise ValueError("packed sequences read a cached prefix (prefix_caches); kv_caches are written by unpacked "
                             "passes only")

    def select(self, t: torch.Tensor, packed: bool) -> torch.Tensor:
        """t [B, T, C] at the positions the last block outputs: the last ([B, 1, C]), with packed sequences the read
        ones ([1, N, C], lynx.attention takes them too), or all (unpacked read positions are picked after the last
        block). Blocks before the last output every position: the next block's keys and values need them."""
        if self.last_logits_only:
            return t[:, -1:]
        if self.read_positions is not None and packed:
            return t.reshape(1, -1, t.shape[-1])[:, self.read_positions]
        return t


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.rope = apply_rope  # (x, cos, sin) -> rotated x; lynx.infer.cpu_fast.compile_ropes puts in a fused one

    def forward(self, x, cos, sin, attn_kwargs: dict, inference: InferenceOptions | None = None, layer: int = 0,
                last: bool = False):
        """inference: this pass's options, of whose cache lists this attention uses entry `layer`; `last`: the model's
        last block, whose queries are only the positions it outputs (InferenceOptions.select)."""
        B, T, _ = x.shape
        packed = "cu_seqlens" in attn_kwargs
        k = self.rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if inference is not None:
            if inference.packed_kv_out is not None:  # every token's keys and values, flat, for generation to place
                inference.packed_kv_out[layer].update(range(B * T), k.reshape(1, B * T, *k.shape[2:]),
                                                      v.reshape(1, B * T, *v.shape[2:]))
            if last:  # the queries of the positions output only; every position's keys and values (caches need them)
                x, cos, sin = (inference.select(t, packed) for t in (x, cos, sin))
        q = self.rope(self.q_proj(x).view(*x.shape[:2], self.n_heads, self.head_dim), cos, sin)
        if inference is not None:
            if inference.prefix_caches is not None:  # every segment also reads the cached prefix's keys
                prefix = inference.prefix_caches[layer]
                attn_kwargs = {**attn_kwargs, "prefix_kv": (prefix.k.transpose(1, 2), prefix.v.transpose(1, 2))}
            elif inference.kv_caches is not None:
                positions = range(T) if inference.cache_positions is None else inference.cache_positions
                k, v = inference.kv_caches[layer].update(positions, k, v)
            if last and inference.last_logits_only:
                # The last query sees every key (causal), or its row of the mask.
                mask = attn_kwargs.get("attn_mask")
                mask = (torch.ones(B, 1, 1, k.shape[1], dtype=torch.bool, device=k.device) if mask is None
                        else mask[:, :, -1:])
                attn_kwargs = {"attn_mask": mask}
            elif last and packed and inference.read_positions is not None:
                attn_kwargs = {**attn_kwargs, "read_positions": inference.read_positions}
        out = attention(q, k, v, **attn_kwargs)
        return self.o_proj(out.reshape(*q.shape[:2], -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_kwargs: dict, inference: InferenceOptions | None = None, layer: int = 0,
                last: bool = False):
        """Output [B, T, hidden], or in the last block of an inference pass at the positions it selects
        (InferenceOptions.select); the keys and values still cover every position."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, attn_kwargs, inference, layer, last)
        if inference is not None and last:
            x = inference.select(x, "cu_seqlens" in attn_kwargs)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class OutputHead(nn.Module):
    """Final norm, output projection and loss in one module.

    The fused loss reads `lm_head.weight` directly; under FSDP2 that weight is only unsharded inside this module's
    forward, so the loss must be computed here and not in the caller.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, h, labels=None, reduction: str = "mean", vocab_ids=None):
        h = self.norm(h)
        if vocab_ids is not None:  # float32 products of the few rows read (InferenceOptions.vocab_ids)
            return h.float() @ self.lm_head.weight[vocab_ids].float().T
        if labels is None:
            return self.lm_head(h)
        # Hugging Face convention: labels are aligned with the inputs; position t predicts labels[t + 1].
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        return fused_linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1), reduction=reduction
        )


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = OutputHead(cfg)
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding with the output projection (Llama-3.2 1B/3B). `to_empty` unties, so call again."""
        if self.config.tie_word_embeddings:
            self.head.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attn_kwargs: dict | None = None,
        reduction: str = "mean",
        inference: InferenceOptions | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V], or with `labels` the next-token loss (never materialising the logits).

        position_ids: [B, T] (default: the inference's cache_positions, else 0..T-1); packed sequences restart them
        per document.
        attn_kwargs: passed to `lynx.attention.attention` (a mask for generation, segment info for packing).
        reduction: the loss's, "mean" or "sum" (training sums over micro-batches).
        inference: KV caches, and which positions' logits to return (InferenceOptions); None in training.
        """
        B, T = input_ids.shape
        attn_kwargs = attn_kwargs or {}
        packed = "cu_seqlens" in attn_kwargs
        cache_positions = range(T)
        if inference is not None:
            inference.check(packed, loss=labels is not None)
            if inference.cache_positions is not None:
                cache_positions = inference.cache_positions
        if position_ids is None:
            if isinstance(cache_positions, torch.Tensor):
                raise ValueError("per-row cache_positions need explicit position_ids")
            start = cache_positions.start
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        h = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, position_ids, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attn_kwargs, inference, i, i == len(self.layers) - 1)
        if inference is not None and inference.read_positions is not None and not packed:
            h = h.reshape(1, B * T, -1)[:, inference.read_positions]
        return self.head(h, labels, reduction, inference.vocab_ids if inference is not None else None)

    def new_kv_caches(self, batch_size: int, max_len: int, dtype=None, device=None,
                      zeroed: bool = True) -> list[KVCache]:
        """One empty KVCache per layer, in the model's dtype and device unless given. zeroed=False leaves the memory
        as allocated (faster), for caches whose every slot is written before it is read (masked slots of a decode
        cache are read: their values must be finite)."""
        cfg = self.config
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        return [KVCache(batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, device=device,
                        zeroed=zeroed) for _ in range(cfg.num_hidden_layers)]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random init for training from scratch (after building on the meta device and `to_empty`)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None, device="cpu") -> "Llama":
        """A Hugging Face checkpoint directory or a llama.cpp GGUF file (float32 unless `dtype` is given), read by
        lynx.weights, which takes this class as an argument and never imports this module."""
        from lynx import weights

        return weights.load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, *, max_shard_size: int | str = "5GB", dtype=None) -> None:
        """A Hugging Face checkpoint directory. A GGUF file carries its tokenizer too: lynx.weights.save_pretrained
        with `tokenizer=` writes one."""
        from lynx import weights

        weights.save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)
