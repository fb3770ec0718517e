"""Batched text generation with a preallocated KV cache.

One prefill of the whole (left-padded) batch, then one decode step per new token. Left padding follows
transformers: each sequence's positions count only its real tokens (0..L-1, then L, L+1, ... while decoding), and
padding keys are masked out, so greedy output is token-identical to `transformers` `generate` on the same weights.

Returned tokens exclude the stop token: a sequence that printed `<|eot_id|>` returns what came before it (the
judge parses that text). `GenerationResult.stopped` says whether a stop id ended the sequence or `max_new_tokens` did.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from lynx.model import Llama
from lynx.sft_data import IGNORE_INDEX, Example, shared_prefix


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    stopped: list[bool]  # True: a stop id ended the sequence; False: max_new_tokens did
    # With `watch_ids`: per prompt, fp32 logits [n_steps, len(watch_ids)] of those ids at every generated position
    # (row t = the logits that chose tokens[t]; the last row is the stop step when the sequence stopped).
    watched_logits: list[torch.Tensor] | None = None


class PrepackedLinear(nn.Module):
    """Inference-only stand-in for a bias-free bf16 `nn.Linear` on CPU, with its weight laid out once, up front, in
    oneDNN's blocked format. Given a plain weight, oneDNN's bf16 matmul lays it out again on every call; with the
    few rows of a decode step that costs more than the product (a 32000 x 512 output projection, 8 rows, weights
    not in cache: 4.4 ms plain, 2.8 ms prepacked). Same kernel, same results, bit for bit (tested)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")

    @property
    def weight(self):
        raise RuntimeError(
            "this model's linear weights were prepacked for CPU inference (lynx.generate.prepack_linear_weights); "
            "it cannot compute a loss, train or be saved: load the checkpoint again for that"
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


@torch.no_grad()
def prepack_linear_weights(model: Llama) -> bool:
    """Replace every bias-free linear layer of a bf16 CPU model with a PrepackedLinear, in place, and return True;
    return False (model untouched) where that does not apply (see `can_prepack`). One layer at a time, so memory
    peaks at one extra weight. The model is then for inference only."""
    if not can_prepack(model):
        return False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, PrepackedLinear(child))
    return True


MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth the extra forward pass


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token [B] from fp32 logits [B, V]: argmax when temperature == 0, else temperature + nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def run_generation(
    model: Llama,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids=(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    pad_id: int = 0,
    watch_ids: list[int] | None = None,
    share_prefix: bool = True,
) -> GenerationResult:
    """Generate for a batch of token-id prompts (of any lengths). See the module docstring for the conventions.

    share_prefix: the prompts' common prefix (at least MIN_SHARED_PREFIX tokens) is prefilled once and its keys and
    values copied to every row (the judge's prompts share ~170 tokens of ~370); the same computation, reordered.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature), restricted to the
    top_p nucleus, from a torch.Generator seeded with `seed` (same seed, same prompts -> same output).
    watch_ids: token ids whose logits are recorded at every step (the judge reads PASS vs FAIL from them).
    """
    if not prompts:
        return GenerationResult([], [], [] if watch_ids is not None else None)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")

    device = model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise ValueError(
            f"generate: longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
            f"model's max_position_embeddings ({limit}); shorten the prompt or generate fewer tokens"
        )

    # The prompts' common prefix (the judge's system turn and instruction) is computed once, not once per row; every
    # row keeps at least its last token to itself (its logits start the generation).
    C = len(shared_prefix([Example(p, [IGNORE_INDEX] * len(p)) for p in prompts])) if B > 1 and share_prefix else 0
    C = C if C >= MIN_SHARED_PREFIX else 0

    # Padding sits between the shared prefix and each row's own tokens (left padding when C = 0): every sequence
    # ends at column P - 1, so one decode step serves the whole batch.
    input_ids = torch.full((B, P), pad_id, dtype=torch.long)
    key_valid = torch.zeros(B, total, dtype=torch.bool)  # cache slots holding real tokens so far
    for b, p in enumerate(prompts):
        input_ids[b, :C] = torch.tensor(p[:C], dtype=torch.long)
        input_ids[b, P - len(p) + C :] = torch.tensor(p[C:], dtype=torch.long)
        key_valid[b, :C] = True
        key_valid[b, P - len(p) + C : P] = True
    input_ids, key_valid = input_ids.to(device), key_valid.to(device)
    lengths = key_valid[:, :P].sum(-1)
    # Positions count real tokens only (as transformers); padding slots get 0 and are never attended to.
    position_ids = (key_valid[:, :P].long().cumsum(-1) - 1).clamp(min=0)

    # Prefill mask of the queries at slots C..P-1: causal and padding-free. A padding query sees only itself, so its
    # row is never all-masked (an all-masked softmax is NaN, and NaN values in the cache would poison real rows
    # through 0 * NaN). Its keys are the P slots the prefill writes (C = 0), or with a shared prefix the whole cache
    # (a write after slot 0 reads it all, see KVCache.update; the slots not written yet are not valid keys). Without
    # padding or a shared prefix, plain causal attention (no mask) lets SDPA use its fastest kernel.
    prefill_mask = None
    if C or not bool(key_valid[:, :P].all()):
        width = total if C else P
        q_idx, k_idx = torch.arange(C, P, device=device), torch.arange(width, device=device)
        causal = k_idx[None, :] <= q_idx[:, None]
        itself = k_idx[None, :] == q_idx[:, None]
        prefill_mask = ((causal[None] & key_valid[:, None, :width]) | itself[None])[:, None]  # [B, 1, P - C, width]

    caches = model.new_kv_caches(B, total)
    if C:
        # The prefix once, in a one-row cache; its keys and values then fill every row's first C slots.
        prefix_caches = model.new_kv_caches(1, C)
        model(input_ids[:1, :C], position_ids=position_ids[:1, :C], kv_caches=prefix_caches, last_logits_only=True)
        for cache, prefix in zip(caches, prefix_caches):
            cache.k[:, :, :C] = prefix.k
            cache.v[:, :, :C] = prefix.v

    def next_logits(tokens, positions, attn_kwargs, slots: range):
        # Only the last position's logits: a prefill needs no more (fp32 for sampling and the judge's p_pass).
        logits = model(tokens, position_ids=positions, attn_kwargs=attn_kwargs, kv_caches=caches,
                       cache_positions=slots, last_logits_only=True)
        return logits[:, -1].float()

    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    watch = torch.tensor(watch_ids, dtype=torch.long, device=device) if watch_ids is not None else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.zeros(B, dtype=torch.long, device=device)  # tokens kept per sequence (stop token excluded)
    out_tokens, out_watched = [], []

    prefill_kwargs = {} if prefill_mask is None else {"attn_mask": prefill_mask}
    logits = next_logits(input_ids[:, C:], position_ids[:, C:], prefill_kwargs, range(C, P))
    positions = lengths.clone()  # position of the next token per sequence
    for step in range(max_new_tokens):
        next_token = _sample(logits, temperature, top_p, generator)
        out_tokens.append(next_token)
        if watch is not None:
            out_watched.append(logits[:, watch])
        is_stop = torch.isin(next_token, stop) & ~done
        stopped |= is_stop
        n_new += (~done & ~is_stop).long()
        done |= is_stop
        # One host sync per step; it saves every remaining step once all sequences are finished.
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        # Finished sequences keep decoding (cheaper than reshaping the batch); their tokens are discarded.
        slot = P + step
        key_valid[:, slot] = True
        decode_mask = key_valid[:, None, None, :]  # a decode step reads the whole cache (see KVCache.update)
        logits = next_logits(next_token[:, None], positions[:, None], {"attn_mask": decode_mask}, range(slot, slot + 1))
        positions += 1

    tokens = torch.stack(out_tokens, dim=1).cpu()  # [B, steps]
    n_new, stopped = n_new.cpu().tolist(), stopped.cpu().tolist()
    result = GenerationResult([tokens[b, : n_new[b]].tolist() for b in range(B)], stopped)
    if watch is not None:
        watched = torch.stack(out_watched, dim=1).cpu()  # [B, steps, W]
        # Keep the rows up to and including the stop step.
        result.watched_logits = [watched[b, : n_new[b] + int(stopped[b])] for b in range(B)]
    return result


def generate(
    model: Llama,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids=(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded); greedy when temperature == 0."""
    return run_generation(
        model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, temperature=temperature, top_p=top_p,
        seed=seed, pad_id=pad_id,
    ).tokens
