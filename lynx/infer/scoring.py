"""Scoring the judge's verdict from logits: P(PASS) / (P(PASS) + P(FAIL)), see lynx.judge for the definition.

- `ScoreTokens`: the first tokens of the PASS / FAIL spellings, to read p_pass from generated logits (full mode);
- `fast_score_tokens`: fast mode's forced prefix ids and the PASS / FAIL ids read right after it;
- `pack_prompts`, `prefix_kv_caches`, `packed_p_pass`: prompts packed several to a forward pass behind their shared
  prefix (computed once), and p_pass at each prompt's end; the judge's fast mode and the trainer's validation.
"""

from __future__ import annotations

import torch

from lynx.model import InferenceOptions
from lynx.tokenizer import Tokenizer

FAST_PREFIX = '{"REASONING": [], "SCORE": "'

# Fast mode's tokens per packed forward pass. 2,048 rather than 4,096 for CPUs: at 4,096 glibc hands the freed
# per-layer activations (SmolLM2: up to 12.6 MB each) back to the kernel, every layer's tensors are fresh pages, and
# 8% of judging went to page faults (1.4M per 96 rows; none with MALLOC_TRIM_THRESHOLD_ raised); at 2,048 there are
# none and fast mode ran 7-10% faster, the prefix's extra copy (once per pack) included. Either keeps a GPU busy.
FAST_PACK_TOKENS = 2048

# What may share a token with the first letters of the score word (e.g. " PASS" when the model writes SCORE: PASS).
_JOINED_PREFIXES = ("", " ", '"', ' "', "'", " '")
_SPELLINGS = (("PASS", "FAIL"), ("Pass", "Fail"), ("pass", "fail"))


class ScoreTokens:
    """For each text that can share a token with the start of the score word, the ids of the first tokens of the
    PASS and FAIL spellings; `watch_ids` is their union (generation records these logits)."""

    def __init__(self, tokenizer: Tokenizer):
        self.candidates: dict[str, tuple[list[int], list[int]]] = {}
        for prefix in _JOINED_PREFIXES:
            pass_ids, fail_ids = set(), set()
            for p_word, f_word in _SPELLINGS:
                p_first = tokenizer.encode(prefix + p_word, allow_special=False)[0]
                f_first = tokenizer.encode(prefix + f_word, allow_special=False)[0]
                if p_first != f_first:  # the prefix tokenized on its own: not a joined form
                    pass_ids.add(p_first)
                    fail_ids.add(f_first)
            if pass_ids:
                self.candidates[prefix] = (sorted(pass_ids), sorted(fail_ids))
        if "" not in self.candidates:
            raise ValueError("tokenizer: the first tokens of 'PASS' and 'FAIL' coincide; cannot compute p_pass")
        self.watch_ids = sorted({i for p, f in self.candidates.values() for i in p + f})
        self._column = {tok: j for j, tok in enumerate(self.watch_ids)}

    def p_pass(self, watched_logits: torch.Tensor, prefix: str = "") -> float | None:
        """P(PASS) / (P(PASS) + P(FAIL)) from the logits of `watch_ids` at one position."""
        if prefix not in self.candidates:
            return None
        pass_ids, fail_ids = self.candidates[prefix]
        lp = torch.logsumexp(watched_logits[[self._column[i] for i in pass_ids]].double(), 0)
        lf = torch.logsumexp(watched_logits[[self._column[i] for i in fail_ids]].double(), 0)
        return float(torch.sigmoid(lp - lf))


def fast_score_tokens(tokenizer: Tokenizer) -> tuple[list[int], tuple[list[int], list[int]]]:
    """Fast mode's forced prefix ids and the PASS / FAIL token ids read right after it.

    The completion `{"REASONING": [], "SCORE": "PASS"}` is tokenized whole in training, so the prefix is the longest
    run of tokens the PASS and FAIL completions share (a tokenizer may merge the quote into the word), and the score
    is read at the first token where they differ, whatever the tokenizer splits the words into (SmolLM2: P|ASS and
    FAIL). Other spellings (Pass, pass, ...) count when they share that prefix."""
    encoded = {(word, pass_word): tokenizer.encode(FAST_PREFIX + word + '"}', allow_special=False)
               for p_word, f_word in _SPELLINGS for word, pass_word in ((p_word, True), (f_word, False))}
    first_pass, first_fail = encoded[("PASS", True)], encoded[("FAIL", False)]
    n = 0
    while n < min(len(first_pass), len(first_fail)) and first_pass[n] == first_fail[n]:
        n += 1
    prefix = first_pass[:n]
    pass_ids, fail_ids = set(), set()
    for (word, is_pass), ids in encoded.items():
        if ids[:n] == prefix and len(ids) > n:
            (pass_ids if is_pass else fail_ids).add(ids[n])
    if pass_ids & fail_ids:
        raise ValueError("tokenizer: PASS and FAIL spellings share their first distinguishing token")
    return prefix, (sorted(pass_ids), sorted(fail_ids))


def pack_prompts(prompts: list[list[int]], pack_tokens: int = FAST_PACK_TOKENS) -> list:
    """Prompts packed pack_tokens (or the longest prompt's) to a sequence after their common prefix, which each
    sequence starts with (lynx.sft_data.PackedSequence; `indices` says which prompts each holds)."""
    from lynx.sft_data import IGNORE_INDEX, Example, pack, shared_prefix

    examples = [Example(ids, [IGNORE_INDEX] * len(ids)) for ids in prompts]
    prefix = shared_prefix(examples)
    return pack(examples, max(pack_tokens, max(map(len, prompts)) - len(prefix)) + len(prefix), prefix)


@torch.no_grad()
def prefix_kv_caches(model, seq, device) -> list | None:
    """The shared prefix that packed sequence `seq` starts with, run once through the model: its keys and values,
    one KV cache per layer, for `packed_p_pass` to read in every pass (None when there is no prefix)."""
    P = seq.prefix_len
    if not P:
        return None
    caches = model.new_kv_caches(1, P, device=device, zeroed=False)  # the prefix fills it
    model(torch.tensor([seq.input_ids[:P]], device=device),
          inference=InferenceOptions(kv_caches=caches, read_positions=torch.tensor([P - 1], device=device)))
    return caches


@torch.no_grad()
def packed_p_pass(model, seq, score_ids: tuple[list[int], list[int]], device,
                  prefix_caches: list | None = None) -> list[tuple[int, float]]:
    """(prompt index, p_pass) for each prompt of one packed sequence: one forward pass, logits read at each
    prompt's last position only. score_ids: the PASS and FAIL token ids (`fast_score_tokens`). prefix_caches: the
    sequence's shared prefix already computed (`prefix_kv_caches`): the pass then runs the prompts' own tokens only,
    where otherwise it computes the prefix again (about 8% more work at 2,048 tokens a pass)."""
    from lynx.sft_data import collate

    batch = collate([seq], len(seq))
    P = seq.prefix_len
    ends = torch.tensor(seq.lengths).cumsum(0) - 1
    input_ids, position_ids, cu_seqlens = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
    if prefix_caches is not None and P:
        input_ids, position_ids, cu_seqlens = input_ids[:, P:], position_ids[:, P:], cu_seqlens[1:] - P
        attn_kwargs = {"cu_seqlens": cu_seqlens.to(device)}
    else:
        prefix_caches, ends = None, ends + P
        attn_kwargs = {"cu_seqlens": cu_seqlens.to(device), "prefix_len": P}
    pass_ids, fail_ids = score_ids
    vocab_ids = torch.tensor([*pass_ids, *fail_ids], device=device)  # their logits only, in float32
    logits = model(
        input_ids.to(device), position_ids=position_ids.to(device), attn_kwargs=attn_kwargs,
        inference=InferenceOptions(prefix_caches=prefix_caches, read_positions=ends.to(device), vocab_ids=vocab_ids),
    )[0].double()
    n = len(pass_ids)
    p = torch.sigmoid(torch.logsumexp(logits[:, :n], -1) - torch.logsumexp(logits[:, n:], -1))
    return list(zip(seq.indices, p.tolist()))
