"""Supervised fine-tuning data: JSONL chat rows -> token ids with assistant-only labels -> packed sequences ->
deterministic, rank-sharded, resumable micro-batches.

    rows = load_rows("data/train.jsonl")
    examples, stats = tokenize_rows(tokenizer, rows, max_seq_len=8000, overflow="truncate_document")
    loader = PackedLoader(examples, seq_len=8000, micro_batch_size=1, rank=rank, world_size=world, seed=17,
                          grad_accum=4)
    for step in range(loader.steps_per_epoch * epochs):
        micro_batches = loader.next_step()   # grad_accum dicts, see `collate`

Labels follow Hugging Face's convention (aligned with input_ids; the model shifts them inside) and are -100 except
on the assistant turns: their content tokens and the closing <|eot_id|>, so the model learns to stop.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lynx.prompt import ANSWER_END, DOCUMENT_END, truncate_document
from lynx.rows import iter_json_lines

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


def drop(tokenizer, messages: list[dict], max_seq_len: int) -> None:
    """Overflow policy: an over-long row is dropped."""
    return None


# What happens to a row longer than max_seq_len, by the names `data.overflow` takes in a config. A policy maps
# (tokenizer, messages, max_seq_len) to shorter messages that fit, or None to drop the row.
OVERFLOW_POLICIES = {"truncate_document": truncate_document, "drop": drop}


# --- rows ---------------------------------------------------------------------------------------------------------


def load_rows(path: str | Path) -> list[dict]:
    """Read training rows from a JSONL file; each row becomes {"messages": [{"role", "content"}, ...]}.

    A row is either {"messages": [...]} in chat form (roles system/user/assistant, string contents, at least one
    user turn, ending with an assistant turn) or {"prompt": str, "response": str} (one user turn, one assistant
    turn). Other keys are kept. Blank lines are ignored. Every bad row is an error: the ValueError lists all of
    them as `file:line: problem` (a training set with broken rows is a bug in whatever built it; we never skip).
    """
    path = Path(path)
    rows, errors = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, row, unreadable in iter_json_lines(f):
            problem = unreadable or _row_problem(row)
            if problem:
                errors.append(f"{path}:{lineno}: {problem}")
                continue
            if "messages" not in row:
                row = {**row, "messages": row_messages(row)}
            rows.append(row)
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{len(errors)} bad training row(s) in {path}:\n  {shown}{more}")
    if not rows:
        raise ValueError(f"{path}: no training rows")
    return rows


def _row_problem(row) -> str | None:
    """Why a parsed JSON row is not a training row, or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list of {role, content} objects"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"messages[{i}] must be an object with 'role' and 'content'"
            if m["role"] not in ROLES:
                return f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}"
            if not isinstance(m["content"], str):
                return f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
        if not any(m["role"] == "user" for m in messages):
            return "'messages' has no user turn"
        if messages[-1]["role"] != "assistant":
            return f"the last message must be the assistant turn (the loss target), got {messages[-1]['role']!r}"
        return None
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                return f"{key!r} must be a string" if key in row else f"missing {key!r} (a prompt/response row needs both)"
        return None
    return f"a row needs 'messages' or 'prompt' and 'response'; got keys {sorted(row)}"


# --- tokenization -------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One tokenized row. labels are aligned with input_ids, IGNORE_INDEX outside the assistant turns."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # the document was shortened to fit max_seq_len
    group: str | None = None  # examples of one group are packed into the same sequence (see `pack`)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # kept after shortening the document (counted in kept)
    dropped: int = 0

    def __str__(self) -> str:
        return f"{self.rows} rows: {self.kept} kept ({self.truncated} with a truncated document), {self.dropped} dropped"


def chat_ids_and_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Chat-template ids and labels that are the ids on every assistant turn's content and closing <|eot_id|>.

    The boundaries come from tokenizing prefixes of the conversation: an assistant turn starts where the template
    of the messages before it plus the assistant header ends, and ends where the template including it ends. We
    check that each prefix really is a prefix of the full ids, so a template that merged tokens across turns
    would be an error rather than misplaced labels."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)  # ... + assistant header
        last = i == len(messages) - 1
        through = ids if last else tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError(f"chat template is not prefix-stable at message {i}: cannot place the assistant labels")
        labels[len(before) : len(through)] = ids[len(before) : len(through)]
    return ids, labels


def tokenize_row(tokenizer, row: dict, *, max_seq_len: int, overflow="truncate_document",
                 train_on_inputs: bool = False, answer_loss: bool = False) -> Example | None:
    """A row (from `load_rows`) -> Example, or None when it is longer than max_seq_len and cannot be kept.

    train_on_inputs: labels on every token (prompt and template included), not only the assistant turns: plain
    language-model loss over the whole conversation (axolotl's option of the same name).
    answer_loss: also labels on the ANSWER of a Lynx prompt whose row is faithful (`label` PASS): the model learns
    to predict a faithful answer from the document, a signal on every answer token where the verdict gives one bit.

    overflow: the policy for over-long rows, a name in OVERFLOW_POLICIES or a function of the same form. "drop":
    the row is dropped. "truncate_document" (`lynx.prompt.truncate_document`): the DOCUMENT section of the Lynx
    prompt loses its middle until the row fits; rows without a document section, or that do not fit even with the
    document removed entirely, are dropped. A row the policy shortened has Example.truncated True.
    """
    policy = OVERFLOW_POLICIES.get(overflow) if isinstance(overflow, str) else overflow
    if not callable(policy):
        raise ValueError(f"overflow must be one of {sorted(OVERFLOW_POLICIES)} or a function, got {overflow!r}")
    messages = row_messages(row)
    ids, labels = chat_ids_and_labels(tokenizer, messages)
    truncated = False
    if len(ids) > max_seq_len:
        messages = policy(tokenizer, messages, max_seq_len)
        if messages is None:
            return None
        ids, labels = chat_ids_and_labels(tokenizer, messages)
        if len(ids) > max_seq_len:
            raise ValueError(f"overflow policy {overflow!r} left a row of {len(ids)} tokens > max_seq_len={max_seq_len}")
        truncated = True
    if train_on_inputs:
        labels = list(ids)
    elif answer_loss and row.get("label") == "PASS":
        span = answer_token_span(tokenizer, messages, ids)
        if span is not None:
            labels[span[0]:span[1]] = ids[span[0]:span[1]]
    return Example(ids, labels, truncated=truncated)


def answer_token_span(tokenizer, messages: list[dict], ids: list[int]) -> tuple[int, int] | None:
    """Token positions [start, end) of the ANSWER section's text in a Lynx prompt's chat ids: the tokens that start
    inside it (Llama-3's last one may carry the newlines after it). None when the user turn has no ANSWER section or
    the rendered conversation does not encode to `ids`."""
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    start = user.rfind(DOCUMENT_END + "\n")
    end = user.find(ANSWER_END, start)
    text = tokenizer.render_chat(messages, add_generation_prompt=False)
    at = text.find(user)
    if start < 0 or end < 0 or at < 0:
        return None
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    if encoding.ids != ids:  # not the ids being trained on: label nothing rather than the wrong tokens
        return None
    first, last = at + start + len(DOCUMENT_END) + 1, at + end
    inside = [i for i, (s, _) in enumerate(encoding.offsets) if first <= s < last]
    return (inside[0], inside[-1] + 1) if inside else None


def row_messages(row: dict) -> list[dict]:
    """The chat messages of a row: its `messages`, or one user and one assistant turn from `prompt`/`response`."""
    if "messages" in row:
        return row["messages"]
    if "prompt" in row and "response" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise ValueError(f"a row needs 'messages' or 'prompt' and 'response'; got keys {sorted(row)}")


def tokenize_rows(tokenizer, rows: list[dict], *, max_seq_len: int, overflow="truncate_document",
                  train_on_inputs: bool = False, answer_loss: bool = False, progress: bool = False,
                  keep_dropped: bool = False, group_key: str | None = None) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every row; returns the kept examples (in row order) and how many were truncated or dropped.
    keep_dropped: put None in place of each dropped row (one entry per row: the trainer merges ranks' shares).
    group_key: a row key whose value becomes Example.group (rows without it are their own group)."""
    from tqdm import tqdm

    stats = TokenizeStats(rows=len(rows))
    examples = []
    for row in tqdm(rows, desc="tokenize", unit="row", disable=not progress):
        example = tokenize_row(tokenizer, row, max_seq_len=max_seq_len, overflow=overflow,
                               train_on_inputs=train_on_inputs, answer_loss=answer_loss)
        if example is None:
            stats.dropped += 1
            if keep_dropped:
                examples.append(None)
            continue
        stats.kept += 1
        stats.truncated += example.truncated
        if group_key is not None and row.get(group_key) is not None:
            example.group = str(row[group_key])
        examples.append(example)
    return examples, stats


# --- packing ------------------------------------------------------------------------------------------------------


@dataclass
class PackedSequence:
    """Several examples laid end to end (at most seq_len tokens). lengths: each example's length, in order. With a
    shared prefix (prefix_len > 0) the sequence starts with it and each example follows without its own copy."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    prefix_len: int = 0
    indices: list[int] = field(default_factory=list)  # which of the packed examples, in order

    def __len__(self) -> int:
        return len(self.input_ids)


def shared_prefix(examples: list[Example]) -> list[int]:
    """The longest run of ids every example starts with (e.g. the judge instruction and the chat template's system
    turn), stopping before any labelled position: the prefix is computed once per packed row, and the position
    right after it predicts nothing, so no target token is lost."""
    if not examples:
        return []
    first = examples[0].input_ids
    n = min(len(e) for e in examples) - 1
    for e in examples:
        labelled = next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e))
        n = min(n, labelled - 1)
        while n > 0 and e.input_ids[:n] != first[:n]:
            n -= 1
    return list(first[: max(n, 0)])


def pack(examples: list[Example], seq_len: int, prefix: list[int] | None = None) -> list[PackedSequence]:
    """Pack examples into sequences of at most seq_len tokens, deterministically (best-fit decreasing: longest
    example first, each into the fullest sequence it still fits in, ties to the earliest sequence). Inside a
    sequence, examples keep their input order. Each example's first label is set to IGNORE_INDEX so no loss is
    computed across an example boundary (the previous example's last token never predicts this one's first).

    prefix: ids every example starts with (`shared_prefix`): each sequence starts with one copy of them, and the
    examples follow without theirs (lynx.attention's shared-prefix packing: each one still attends to it).
    Examples with the same `group` (e.g. a question's PASS and FAIL rows) are placed as one unit, so they land in
    the same sequence and hence the same optimizer step."""
    prefix = list(prefix or [])
    P = len(prefix)
    if P:
        for i, ex in enumerate(examples):
            if ex.input_ids[:P] != prefix or any(label != IGNORE_INDEX for label in ex.labels[: P + 1]):
                raise ValueError(f"example {i} does not start with the shared prefix (or has labels inside it)")
        examples = [Example(ex.input_ids[P:], ex.labels[P:], ex.truncated, ex.group) for ex in examples]
    capacity = seq_len - P
    for i, ex in enumerate(examples):
        if len(ex) > capacity:
            raise ValueError(f"example {i} has {len(ex) + P} tokens, more than seq_len={seq_len}")
        if len(ex) == 0:
            raise ValueError(f"example {i} is empty")
    units: dict = {}  # group -> example indices (an ungrouped example is a unit of its own)
    for i, ex in enumerate(examples):
        units.setdefault(("group", ex.group) if ex.group is not None else ("one", i), []).append(i)
    sizes = {key: sum(len(examples[i]) for i in members) for key, members in units.items()}
    for key, members in list(units.items()):
        if sizes[key] > capacity:  # a group too long for one sequence: its members go separately
            del units[key], sizes[key]
            for i in members:
                units[("one", i)], sizes[("one", i)] = [i], len(examples[i])
    order = sorted(units, key=lambda key: (-sizes[key], units[key][0]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for key in order:
        n = sizes[key]
        at = bisect.bisect_left(free, (n, -1))  # the smallest free space that holds n
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b] += units[key]
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    sequences = []
    for members in bins:
        seq = PackedSequence(input_ids=list(prefix), labels=[IGNORE_INDEX] * P, prefix_len=P)
        for i in sorted(members):
            ex = examples[i]
            seq.input_ids += ex.input_ids
            seq.labels += [IGNORE_INDEX, *ex.labels[1:]]
            seq.lengths.append(len(ex))
            seq.indices.append(i)
        sequences.append(seq)
    return sequences


def collate(sequences: list[PackedSequence], seq_len: int, pad_id: int = 0) -> dict:
    """One micro-batch of packed sequences, padded to seq_len:

    input_ids    LongTensor [B, seq_len] (padding = pad_id)
    labels       LongTensor [B, seq_len], aligned with input_ids (the model shifts); IGNORE_INDEX on padding and on
                 each example's first token
    position_ids LongTensor [B, seq_len], restarting at 0 for every example (and for the padding run); after a
                 shared prefix of P tokens, each example's positions start at P, as if it carried its own copy
    cu_seqlens   IntTensor (int32) [num_segments + 1]: cumulative segment lengths over the flattened B * seq_len
                 tokens (the shared prefix is each row's first segment); each row's padding is a segment of its
                 own, so no segment spans two rows
    max_seqlen   int, the longest segment
    prefix_len   int, the shared prefix of every row (0: none; see lynx.attention)
    num_target_tokens  int, number of labels[:, 1:] != IGNORE_INDEX (the positions that carry loss)
    num_tokens   int, non-padding tokens
    num_examples int, examples in the micro-batch
    """
    B = len(sequences)
    prefix_lens = {seq.prefix_len for seq in sequences}
    if len(prefix_lens) > 1:
        raise ValueError(f"sequences of one micro-batch have different shared prefixes ({sorted(prefix_lens)})")
    P = prefix_lens.pop() if prefix_lens else 0
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    cu_seqlens, max_seqlen, num_tokens = [0], 0, 0
    for b, seq in enumerate(sequences):
        n = len(seq)
        if n > seq_len:
            raise ValueError(f"packed sequence of {n} tokens does not fit seq_len={seq_len}")
        input_ids[b, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(seq.labels, dtype=torch.long)
        segments = ([P] if P else []) + seq.lengths + ([seq_len - n] if n < seq_len else [])
        offset = 0
        for i, length in enumerate(segments):
            start = P if P and 0 < i <= len(seq.lengths) else 0  # examples continue after the shared prefix
            position_ids[b, offset : offset + length] = torch.arange(start, start + length)
            offset += length
            cu_seqlens.append(b * seq_len + offset)
            max_seqlen = max(max_seqlen, length)
        num_tokens += n
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        "max_seqlen": max_seqlen,
        "prefix_len": P,
        "num_target_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "num_tokens": num_tokens,
        "num_examples": sum(len(seq.lengths) for seq in sequences),
    }


# --- loader -------------------------------------------------------------------------------------------------------


class PackedLoader:
    """Deterministic, rank-sharded, resumable micro-batches of packed sequences.

    Every epoch the sequences are shuffled by a permutation drawn from (seed, epoch). Optimizer step s of an epoch
    uses the contiguous slice [s * G, (s + 1) * G) of that permutation, G = micro_batch_size * world_size *
    grad_accum (the global batch); its micro-batch j (0 <= j < grad_accum) on rank r is the slice's part
    (j * world_size + r). So the sequences in each global step do not depend on how the batch is split across
    ranks and accumulation steps, ranks see disjoint data, and all ranks get the same number of micro-batches.

    drop_last=True drops the last incomplete global batch of each epoch; drop_last=False completes it by wrapping
    around to the start of the permutation (a few sequences then appear twice in that epoch).

    Iteration: `next_step()` returns the grad_accum micro-batches of the next step, moving to the next epoch when
    one ends (an endless stream, the simplest thing to resume); `iter(loader)` yields the remaining micro-batches of
    the current epoch (starting the next epoch if the current one is finished). `state_dict()` is (epoch,
    position = micro-batches already consumed this epoch on this rank); `load_state_dict` restores it, so a
    restarted run continues with exactly the same batches.
    """

    def __init__(self, sequences_or_examples, *, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = True, grad_accum: int = 1, pad_id: int = 0,
                 prefix: list[int] | None = None):
        items = list(sequences_or_examples)
        if items and all(isinstance(x, Example) for x in items):
            items = pack(items, seq_len, prefix)
        elif not all(isinstance(x, PackedSequence) for x in items):
            raise TypeError("PackedLoader takes a list of Example or a list of PackedSequence")
        for i, seq in enumerate(items):
            if len(seq) > seq_len:
                raise ValueError(f"sequence {i} has {len(seq)} tokens, more than seq_len={seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError("micro_batch_size and grad_accum must be >= 1")
        self.sequences = items
        self.seq_len, self.micro_batch_size, self.grad_accum = seq_len, micro_batch_size, grad_accum
        self.rank, self.world_size, self.seed, self.drop_last, self.pad_id = rank, world_size, seed, drop_last, pad_id
        self.global_batch_size = micro_batch_size * world_size * grad_accum  # sequences per optimizer step
        n = len(items)
        self.steps_per_epoch = n // self.global_batch_size if drop_last else math.ceil(n / self.global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{n} packed sequences are fewer than one global batch ({micro_batch_size} per micro-batch x "
                f"{world_size} ranks x {grad_accum} accumulation steps = {self.global_batch_size}); use drop_last=False "
                "or a smaller batch"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, []

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (a multiple of grad_accum)."""
        return self.steps_per_epoch * self.grad_accum

    def epoch_order(self, epoch: int) -> list[int]:
        """Sequence indices in the order the whole epoch consumes them (all ranks), length steps * global batch."""
        n = len(self.sequences)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n).tolist()
        total = self.steps_per_epoch * self.global_batch_size
        while len(perm) < total:  # drop_last=False: wrap around
            perm += perm[: total - len(perm)]
        return perm[:total]

    def micro_batch_indices(self, epoch: int, position: int) -> list[int]:
        """Sequence indices of this rank's micro-batch number `position` in `epoch`."""
        if self._order_epoch != epoch:  # the permutation is recomputed once per epoch
            self._order_epoch, self._order = epoch, self.epoch_order(epoch)
        order = self._order
        part = position * self.world_size + self.rank
        B = self.micro_batch_size
        return order[part * B : (part + 1) * B]

    def _take(self) -> dict:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        indices = self.micro_batch_indices(self.epoch, self.position)
        self.position += 1
        return collate([self.sequences[i] for i in indices], self.seq_len, self.pad_id)

    def __iter__(self):
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < len(self):
            yield self._take()

    def next_step(self) -> list[dict]:
        """The grad_accum micro-batches of the next optimizer step (never spanning two epochs)."""
        return [self._take() for _ in range(self.grad_accum)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_sequences": len(self.sequences), "micro_batch_size": self.micro_batch_size,
                "world_size": self.world_size, "grad_accum": self.grad_accum}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_sequences", "micro_batch_size", "world_size", "grad_accum"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the data order: checkpoint has {key}={state[key]}, this run has {mine[key]} "
                    "(the batches would differ)"
                )
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"data position {state['position']} is outside this epoch's {len(self)} micro-batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
