"""Batched text generation with a preallocated KV cache.

A prefill of the prompts, packed into one sequence (each attending only to itself and the prompts' shared prefix,
computed once), then one decode step per new token for the whole batch; with more prompts than `batch_size` rows, a
row whose sequence ends is refilled with the next prompt (continuous batching). Each row's cache holds its prompt
from slot 0 and the cache slots no row has written are masked out; positions count each sequence's own tokens
(0..L-1, then L, L+1, ... while decoding), as transformers' left-padded batches do, so greedy output is
token-identical to `transformers` `generate` on the same weights.

Returned tokens exclude the stop token: a sequence that printed `<|eot_id|>` returns what came before it (the
judge parses that text). `GenerationResult.stopped` says whether a stop id ended the sequence or `max_new_tokens` did.

`Decoder` holds one run's state (caches, slots, rows) with a method per stage, as gpt-fast's `prefill`,
`decode_one_token` and `decode_n_tokens`; `run_generation` and `generate` build one and run it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable

import torch

from lynx.model import InferenceOptions, Llama
from lynx.sft_data import IGNORE_INDEX, Example, shared_prefix


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    stopped: list[bool]  # True: a stop id ended the sequence; False: max_new_tokens did
    # With `watch_ids`: per prompt, fp32 logits [n_steps, len(watch_ids)] of those ids at every generated position
    # (row t = the logits that chose tokens[t]; the last row is the stop step when the sequence stopped).
    watched_logits: list[torch.Tensor] | None = None



MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth the extra forward pass
PREFILL_TOKENS = 2048  # prompt tokens per prefill pass (as many as judging packs into a pass)


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


class Decoder:
    """The decode state of one generation run (what run_generation builds and runs; see it for the arguments).

    Set up once: the shared prefix's one-row cache, the rows' caches [B, total], and per row the cache slots holding
    real tokens (key_valid), where its next token is written (slot), its next position and the token it feeds the
    next step. Then `decode_n_tokens` alternates two things until every prompt has finished:
    - rows joining (`fill_free_rows`): an idle row takes the next prefilled prompt (`prefill` packs the waiting ones
      into passes, `place` copies one into the row's cache) and chooses its first token from the prefill's logits;
    - one decode step for every row (`decode_one_token`); `choose_tokens` then records each row's token and retires
      the rows whose sequence ended (rows leaving), which join again at the next fill.
    """

    @torch.no_grad()
    def __init__(
        self,
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
        batch_size: int | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
        progress: Callable[[int], None] | None = None,
    ):
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"generate: batch_size must be >= 1, got {batch_size}")
        if prefill_tokens < 1:
            raise ValueError(f"generate: prefill_tokens must be >= 1, got {prefill_tokens}")

        self.model, self.prompts, self.max_new_tokens = model, prompts, max_new_tokens
        self.temperature, self.top_p, self.prefill_tokens, self.progress = temperature, top_p, prefill_tokens, progress
        self.device = device = model.embed_tokens.weight.device
        n, P = len(prompts), max(len(p) for p in prompts)
        self.B = B = min(batch_size or n, n)
        total = P + max_new_tokens  # cache slots per row: any prompt, then its completion
        limit = model.config.max_position_embeddings
        if total > limit:
            raise ValueError(
                f"generate: longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's max_position_embeddings ({limit}); shorten the prompt or generate fewer tokens"
            )

        # The prompts' common prefix (the judge's system turn and instruction) is computed once, not once per row;
        # every row keeps at least its last token to itself (its logits start the generation).
        C = len(shared_prefix([Example(p, [IGNORE_INDEX] * len(p)) for p in prompts])) if n > 1 and share_prefix else 0
        self.C = C = C if C >= MIN_SHARED_PREFIX else 0
        self.prefix_caches = None
        if C:  # the prefix once, in a one-row cache; its keys and values then fill every admitted row's first C slots
            self.prefix_caches = model.new_kv_caches(1, C, zeroed=False)  # the prefix fills it
            model(torch.tensor([prompts[0][:C]], device=device),
                  inference=InferenceOptions(kv_caches=self.prefix_caches, last_logits_only=True))

        self.caches = model.new_kv_caches(B, total)
        for cache, prefix in zip(self.caches, self.prefix_caches or ()):  # every row's slots 0..C-1, for good
            cache.k[:, :, :C] = prefix.k
            cache.v[:, :, :C] = prefix.v
        self.key_valid = torch.zeros(B, total, dtype=torch.bool, device=device)  # cache slots holding real tokens
        self.slot = torch.zeros(B, dtype=torch.long, device=device)  # where each row's next token is written
        self.positions = torch.zeros(B, dtype=torch.long, device=device)  # each row's next token's position

        self.waiting = deque(range(n))  # prompts not prefilled yet, in order
        self.ready = deque()  # prefilled prompts waiting for a row: (prompt index, fp32 logits [V], pass caches, span)

        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())

        self.stop = set(stop_ids)
        self.watch = torch.tensor(watch_ids, dtype=torch.long, device=device) if watch_ids is not None else None
        self.out_tokens: list[list[int]] = [[] for _ in prompts]  # stop token excluded
        self.out_watched: list[list[torch.Tensor]] = [[] for _ in prompts]
        self.stopped = [False] * n
        self.row_prompt: list[int | None] = [None] * B  # the prompt each row is generating for; None: idle
        self.last_token = torch.full((B,), pad_id, dtype=torch.long, device=device)  # what each row feeds next
        self.free = list(range(B))  # idle rows

    @torch.no_grad()
    def prefill(self, min_prompts: int) -> None:
        """Prefill the next waiting prompts, at least min_prompts and more while the pass stays within
        prefill_tokens, as one packed sequence: each prompt's own tokens (after the shared prefix) attend causally
        to themselves and to the prefix's cache (lynx.attention's cached prefix), so no padding is computed and the
        linear layers see long inputs, not a few prompts'. Their keys and values wait in the pass's caches until
        `place` copies them to a row."""
        prompts, C, device = self.prompts, self.C, self.device
        group, tokens = [], 0
        while self.waiting and (len(group) < min_prompts
                                or tokens + len(prompts[self.waiting[0]]) - C <= self.prefill_tokens):
            group.append(self.waiting.popleft())
            tokens += len(prompts[group[-1]]) - C
        own = [prompts[i][C:] for i in group]
        bounds = [0, *itertools.accumulate(map(len, own))]
        input_ids = torch.tensor([[t for o in own for t in o]], device=device)
        position_ids = torch.tensor([[C + i for o in own for i in range(len(o))]], device=device)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        packed_caches = self.model.new_kv_caches(1, bounds[-1], zeroed=False)  # every slot written (packed_kv_out)
        inference = InferenceOptions(prefix_caches=self.prefix_caches, packed_kv_out=packed_caches,
                                     read_positions=cu_seqlens[1:].long() - 1)
        logits = self.model(input_ids, position_ids=position_ids, attn_kwargs={"cu_seqlens": cu_seqlens},
                            inference=inference)[0].float()
        self.ready.extend((i, logits[j], packed_caches, bounds[j], bounds[j + 1]) for j, i in enumerate(group))

    def place(self, b: int, prompt_index: int, packed_caches: list, start: int, end: int) -> None:
        """Row b's cache takes a prefilled prompt after the shared prefix (replacing what it held)."""
        C = self.C
        for cache, packed in zip(self.caches, packed_caches):
            cache.k[b, :, C : C + end - start] = packed.k[0, :, start:end]
            cache.v[b, :, C : C + end - start] = packed.v[0, :, start:end]
        length = C + end - start
        self.key_valid[b] = False
        self.key_valid[b, :length] = True
        self.slot[b] = self.positions[b] = length
        self.row_prompt[b] = prompt_index

    def choose_tokens(self, rows: list[int], logits: torch.Tensor) -> list[int]:
        """Choose the next token of `rows` from their logits [len(rows), V]; return the rows that just finished
        (now idle)."""
        chosen = _sample(logits, self.temperature, self.top_p, self.generator)
        watched = logits[:, self.watch].cpu() if self.watch is not None else None
        self.last_token[rows] = chosen
        finished = []
        for j, (b, t) in enumerate(zip(rows, chosen.tolist())):  # one host sync per step
            i = self.row_prompt[b]
            if i is None:  # an idle row decodes along with the batch; its token is discarded
                continue
            if watched is not None:
                self.out_watched[i].append(watched[j])
            if t in self.stop:
                self.stopped[i] = True
            else:
                self.out_tokens[i].append(t)
            if self.stopped[i] or len(self.out_tokens[i]) == self.max_new_tokens:
                finished.append(b)
        for b in finished:
            self.row_prompt[b] = None
        if self.progress and finished:
            self.progress(len(finished))
        return finished

    def fill_free_rows(self) -> None:
        """Idle rows take the next prompts (prefilled as needed) and choose their first tokens. A prompt can finish
        at its first token and free its row again, so loop."""
        while self.free and (self.ready or self.waiting):
            if not self.ready:
                self.prefill(len(self.free))
            rows = self.free[: len(self.ready)]
            del self.free[: len(rows)]
            first_logits = []
            for b in rows:
                prompt_index, logits, *span = self.ready.popleft()
                self.place(b, prompt_index, *span)
                first_logits.append(logits)
            self.free += self.choose_tokens(rows, torch.stack(first_logits))

    @torch.no_grad()
    def decode_one_token(self) -> torch.Tensor:
        """One decode step for every row at its own slot: fp32 logits [B, V]. Idle rows (no prompt left to take)
        write at their last slot, which no live row reads, and their logits are discarded: cheaper than reshaping the
        batch."""
        live = torch.tensor([i is not None for i in self.row_prompt], device=self.device)
        self.key_valid[live, self.slot[live]] = True
        mask = self.key_valid[:, None, None, :]
        inference = InferenceOptions(kv_caches=self.caches, cache_positions=self.slot, last_logits_only=True)
        logits = self.model(self.last_token[:, None], position_ids=self.positions[:, None],
                            attn_kwargs={"attn_mask": mask}, inference=inference)[:, -1].float()
        self.slot += live
        self.positions += live
        return logits

    @torch.no_grad()
    def decode_n_tokens(self) -> GenerationResult:
        """Run every prompt to its end: a stop id or max_new_tokens (n) new tokens, rows joining and leaving between
        decode steps."""
        while True:
            self.fill_free_rows()
            if len(self.free) == self.B:
                break
            self.free += self.choose_tokens(list(range(self.B)), self.decode_one_token())
        result = GenerationResult(self.out_tokens, self.stopped)
        if self.watch is not None:  # per prompt, the steps up to and including the stop step
            result.watched_logits = [torch.stack(w) for w in self.out_watched]
        return result


def run_generation(model: Llama, prompts: list[list[int]], **options) -> GenerationResult:
    """Generate for token-id prompts (of any lengths). See the module docstring for the conventions. options:
    Decoder's keyword arguments (max_new_tokens, stop_ids, temperature, top_p, seed, pad_id, watch_ids,
    share_prefix, batch_size, prefill_tokens, progress), max_new_tokens required.

    batch_size: rows decoded together (default: every prompt at once). With more prompts than rows, batching is
    continuous: a row whose sequence ends takes the next waiting prompt at once (it joins the next decode step), so
    no row idles while the batch's longest completion runs on. Prompts are taken in order.
    prefill_tokens: prompts are prefilled ahead of need, packed into passes of about this many tokens (at least as
    many prompts as rows are waiting for one): a pass of a few hundred tokens uses the machine less well.
    share_prefix: the prompts' common prefix (at least MIN_SHARED_PREFIX tokens) is prefilled once and its keys and
    values copied to every row (the judge's prompts share ~170 tokens of ~370); the same computation, reordered.
    progress(n): called as n more prompts finish.

    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature), restricted to the
    top_p nucleus, from a torch.Generator seeded with `seed` (same seed, same prompts, same batch_size -> same output).
    watch_ids: token ids whose logits are recorded at every step (the judge reads PASS vs FAIL from them).
    """
    if not prompts:
        return GenerationResult([], [], [] if options.get("watch_ids") is not None else None)
    return Decoder(model, prompts, **options).decode_n_tokens()


def generate(model: Llama, prompts: list[list[int]], **options) -> list[list[int]]:
    """New token ids per prompt (stop token excluded); greedy when temperature == 0. options: run_generation's."""
    return run_generation(model, prompts, **options).tokens
