"""SFT data: row validation, assistant-only labels, over-length policy, packing, and the sharded resumable loader."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lynx.prompt import TRUNCATION_MARKER, training_messages
from lynx.sft_data import (
    IGNORE_INDEX,
    Example,
    PackedLoader,
    PackedSequence,
    chat_ids_and_labels,
    collate,
    load_rows,
    pack,
    tokenize_row,
    tokenize_rows,
)

TARGET = '{"REASONING": ["The document says 1912.", "The answer says 1912."], "SCORE": "PASS"}'


@pytest.fixture(scope="module")
def tok():
    from lynx.tokenizer import Tokenizer

    return Tokenizer.llama3()


def lynx_row(document: str, question="When did it sink?", answer="In 1912.", target=TARGET) -> dict:
    return {"messages": training_messages(question, document, answer, target)}


def long_document(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["ship", "iceberg", "Atlantic", "1912", "passengers", "lifeboats", "captain", "night", "über", "東京"]
    return "START-OF-DOC " + " ".join(rng.choice(words) for _ in range(n_words)) + " END-OF-DOC"


# --- rows ---------------------------------------------------------------------------------------------------------


def test_load_rows_accepts_chat_and_prompt_response(tmp_path):
    path = tmp_path / "train.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "id": 7}
    path.write_text(json.dumps(chat) + "\n\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    rows = load_rows(path)
    assert rows[0] == chat
    assert rows[1]["messages"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]


def test_load_rows_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "p", "response": "r"}),  # 1 ok
        '{"messages": [',  # 2 bad JSON
        json.dumps({"text": "no keys"}),  # 3 missing keys
        "",  # 4 blank: ignored
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),  # 5 role
        json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # 6 no assistant turn at the end
        json.dumps({"prompt": "p"}),  # 7 response missing
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        load_rows(path)
    msg = str(e.value)
    assert "5 bad training row(s)" in msg
    assert f"{path}:2: invalid JSON" in msg
    assert f"{path}:3: a row needs 'messages' or 'prompt' and 'response'" in msg
    assert f"{path}:5: messages[1] has role 'bot'" in msg
    assert f"{path}:6: the last message must be the assistant turn" in msg
    assert f"{path}:7: missing 'response'" in msg
    assert f"{path}:1:" not in msg and f"{path}:4:" not in msg


# --- labels -------------------------------------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_turns(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  2+2?  "},
        {"role": "assistant", "content": " 4 \n"},
        {"role": "user", "content": "And <|eot_id|> 3+3?"},  # special-token text in content is plain text
        {"role": "assistant", "content": "6, of course."},
    ]
    ids, labels = chat_ids_and_labels(tok, messages)
    # Independent expectation from the chat format: header tokens never carry loss; assistant content + <|eot_id|> do.
    expected_ids, expected_labels = [tok.bos_id], [IGNORE_INDEX]
    for m in messages:
        header = tok.encode_header(m["role"])
        body = tok.encode(m["content"].strip(), allow_special=False) + [tok.eot_id]
        expected_ids += header + body
        expected_labels += [IGNORE_INDEX] * len(header) + (body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body))
    assert ids == expected_ids
    assert labels == expected_labels
    # The spans decode to exactly the assistant texts, each closed by <|eot_id|>.
    spans, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(tok.decode(current))
            current = []
        else:
            assert label == i
            current.append(i)
    spans.append(tok.decode(current))
    assert spans == ["4<|eot_id|>", "6, of course.<|eot_id|>"]
    # Each span starts right after an assistant header.
    starts = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX and labels[t - 1] == IGNORE_INDEX]
    assert [tok.decode(ids[t - 3 : t]) for t in starts] == ["assistant<|end_header_id|>\n\n"] * 2


def test_tokenize_row_short_row_is_untouched(tok):
    row = lynx_row("The Titanic sank in 1912.")
    example = tokenize_row(tok, row, max_seq_len=8000)
    ids, labels = chat_ids_and_labels(tok, row["messages"])
    assert example.input_ids == ids and example.labels == labels and not example.truncated
    assert tok.decode([i for i, lbl in zip(ids, labels) if lbl != IGNORE_INDEX]) == TARGET + "<|eot_id|>"


def test_train_on_inputs_labels_every_token_also_after_truncation(tok):
    row = lynx_row("The Titanic sank in 1912.")
    example = tokenize_row(tok, row, max_seq_len=8000, train_on_inputs=True)
    assert example.labels == example.input_ids  # the prompt carries loss too
    assert tokenize_row(tok, row, max_seq_len=8000).input_ids == example.input_ids
    long_row = lynx_row(long_document(3000))
    truncated = tokenize_row(tok, long_row, max_seq_len=600, train_on_inputs=True)
    assert truncated.truncated and truncated.labels == truncated.input_ids
    assert truncated.input_ids == tokenize_row(tok, long_row, max_seq_len=600).input_ids
    examples, _ = tokenize_rows(tok, [row, long_row], max_seq_len=600, train_on_inputs=True)
    assert all(e.labels == e.input_ids for e in examples)


def test_answer_loss_labels_the_faithful_answer_only(tok):
    answer = "In 1912, about 1,500 people died."
    row = {**lynx_row("The Titanic sank in 1912; about 1,500 people died.", answer=answer), "label": "PASS"}
    plain = tokenize_row(tok, row, max_seq_len=8000)
    example = tokenize_row(tok, row, max_seq_len=8000, answer_loss=True)
    assert example.input_ids == plain.input_ids
    added = [i for i, (a, b) in enumerate(zip(example.labels, plain.labels)) if a != b]
    assert added == list(range(added[0], added[-1] + 1))  # one run of tokens
    assert tok.decode([example.input_ids[i] for i in added]).rstrip("\n") == answer  # Llama-3: ".\n\n" is one token
    assert all(example.labels[i] == plain.labels[i] for i in range(len(plain)) if i not in added)
    # A hallucinated answer teaches nothing to predict; a truncated long row keeps its answer labels.
    assert tokenize_row(tok, {**row, "label": "FAIL"}, max_seq_len=8000, answer_loss=True).labels == plain.labels
    long_row = {**lynx_row(long_document(3000), answer=answer), "label": "PASS"}
    cut = tokenize_row(tok, long_row, max_seq_len=600, answer_loss=True)
    assert cut.truncated
    assert tok.decode([i for i, lbl in zip(cut.input_ids, cut.labels) if lbl != IGNORE_INDEX]) == (
        answer + "\n\n" + TARGET + "<|eot_id|>")


# --- over-long rows -----------------------------------------------------------------------------------------------


def test_truncate_document_shortens_only_the_document(tok):
    row = lynx_row(long_document(3000))
    full = len(tok.apply_chat_template(row["messages"], add_generation_prompt=False))
    max_seq_len = 600
    assert full > 3 * max_seq_len
    example = tokenize_row(tok, row, max_seq_len=max_seq_len, overflow="truncate_document")
    assert example is not None and example.truncated
    assert max_seq_len - 40 <= len(example) <= max_seq_len  # fits, without cutting far more than needed
    text = tok.decode(example.input_ids)
    assert TRUNCATION_MARKER in text
    assert "START-OF-DOC" in text and "END-OF-DOC" in text  # keeps the start and the end, cuts the middle
    assert "QUESTION (THIS DOES NOT COUNT AS BACKGROUND INFORMATION):\nWhen did it sink?" in text
    assert "--\nANSWER:\nIn 1912.\n\n--" in text
    assert tok.decode([i for i, lbl in zip(example.input_ids, example.labels) if lbl != IGNORE_INDEX]) == TARGET + "<|eot_id|>"
    # Labels are exactly those of the shortened conversation.
    assert text.startswith("<|begin_of_text|>")
    assert tokenize_row(tok, row, max_seq_len=max_seq_len, overflow="drop") is None


def test_overflow_policies_and_counts(tok):
    rows = [
        lynx_row("Short document."),  # fits
        lynx_row(long_document(2000, seed=1)),  # too long, has a document: truncated
        {"messages": [{"role": "user", "content": "blah " * 1000}, {"role": "assistant", "content": "ok"}]},  # no document
        lynx_row("Short.", target="x " * 1000),  # too long even with an empty document
        lynx_row(long_document(1500, seed=2)),  # truncated
    ]
    examples, stats = tokenize_rows(tok, rows, max_seq_len=500, overflow="truncate_document")
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped) == (5, 3, 2, 2)
    assert [e.truncated for e in examples] == [False, True, True]
    assert all(len(e) <= 500 for e in examples)
    examples, stats = tokenize_rows(tok, rows, max_seq_len=500, overflow="drop")
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 0, 4)
    with pytest.raises(ValueError, match="overflow"):
        tokenize_row(tok, rows[0], max_seq_len=500, overflow="cut")
    # A policy is any function (tokenizer, messages, max_seq_len) -> messages that fit, or None to drop the row.
    keep_last_turns = lambda tok, messages, n: [{"role": "user", "content": "Short."}, messages[-1]]  # noqa: E731
    example = tokenize_row(tok, rows[1], max_seq_len=500, overflow=keep_last_turns)
    assert example.truncated and tok.decode(example.input_ids).count("Short.") == 1
    with pytest.raises(ValueError, match="overflow policy"):
        tokenize_row(tok, rows[1], max_seq_len=500, overflow=lambda tok, messages, n: messages)


# --- packing ------------------------------------------------------------------------------------------------------


def random_examples(n: int, max_len: int, seed: int = 0) -> list[Example]:
    """Examples whose second token is their index, labels on their second half."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, max_len)
        ids = [0, 10_000 + i] + [rng.randint(2, 999) for _ in range(length - 2)]
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        out.append(Example(ids, labels))
    return out


def split_sequence(seq: PackedSequence):
    start = 0
    for n in seq.lengths:
        yield seq.input_ids[start : start + n], seq.labels[start : start + n]
        start += n


def test_pack_fits_loses_nothing_and_is_deterministic():
    examples = random_examples(300, 120)
    seq_len = 256
    sequences = pack(examples, seq_len)
    assert all(len(s) <= seq_len and len(s) == sum(s.lengths) == len(s.labels) for s in sequences)
    recovered = sorted((ids, labels) for s in sequences for ids, labels in split_sequence(s))
    expected = sorted((e.input_ids, [IGNORE_INDEX] + e.labels[1:]) for e in examples)
    assert recovered == expected  # every example exactly once, first label masked
    total = sum(len(e) for e in examples)
    assert len(sequences) <= total / seq_len * 1.05 + 1  # best-fit packs densely
    assert pack(examples, seq_len) == sequences
    with pytest.raises(ValueError, match="more than seq_len"):
        pack(examples, 100)


def test_collate_positions_segments_and_target_count():
    examples = [Example([0, 5, 6], [IGNORE_INDEX, 5, 6]), Example([0, 7], [IGNORE_INDEX, 7]),
                Example([0, 8, 9, 4], [0, 8, 9, 4])]
    seqs = [PackedSequence(examples[0].input_ids + examples[1].input_ids,
                           examples[0].labels + [IGNORE_INDEX, 7], [3, 2]),
            PackedSequence(examples[2].input_ids, [IGNORE_INDEX, 8, 9, 4], [4])]
    batch = collate(seqs, seq_len=6, pad_id=3)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 0, 7, 3], [0, 8, 9, 4, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7, -100], [-100, 8, 9, 4, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 6, 10, 12]
    assert batch["max_seqlen"] == 4
    assert batch["num_target_tokens"] == 6 == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert batch["num_tokens"] == 9


# --- loader -------------------------------------------------------------------------------------------------------


def indexed_sequences(n: int, seq_len: int = 16) -> list[PackedSequence]:
    """Sequence i starts with token 1000 + i so batches can be traced back to sequences."""
    rng = random.Random(n)
    out = []
    for i in range(n):
        length = rng.randint(2, seq_len)
        ids = [1000 + i] + [rng.randint(2, 999) for _ in range(length - 1)]
        out.append(PackedSequence(ids, [IGNORE_INDEX] + ids[1:], [length]))
    return out


def batch_ids(batch) -> list[int]:
    return [int(x) - 1000 for x in batch["input_ids"][:, 0]]


def test_loader_is_deterministic_from_the_seed():
    seqs = indexed_sequences(40)
    run = lambda seed: [batch_ids(b) for b in PackedLoader(seqs, seq_len=16, micro_batch_size=4, seed=seed)]
    assert run(3) == run(3)
    assert run(3) != run(4)
    loader = PackedLoader(seqs, seq_len=16, micro_batch_size=4, seed=3)
    epoch0, epoch1 = [batch_ids(b) for b in loader], [batch_ids(b) for b in loader]
    assert loader.epoch == 1 and epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(40))


@pytest.mark.parametrize("n, drop_last", [(48, True), (53, True), (53, False)])
def test_ranks_get_disjoint_equal_shares_covering_the_epoch(n, drop_last):
    seqs = indexed_sequences(n)
    world, B, accum = 3, 2, 2
    per_rank = []
    for rank in range(world):
        loader = PackedLoader(seqs, seq_len=16, micro_batch_size=B, rank=rank, world_size=world, seed=0,
                              drop_last=drop_last, grad_accum=accum)
        per_rank.append([i for batch in loader for i in batch_ids(batch)])
        assert len(loader) == len(per_rank[-1]) // B and len(loader) % accum == 0
    assert len({len(r) for r in per_rank}) == 1  # same number of micro-batches on every rank
    seen = sum(per_rank, [])
    if drop_last:
        assert len(seen) == len(set(seen)) == (n // (world * B * accum)) * world * B * accum  # disjoint
        if n % (world * B * accum) == 0:
            assert sorted(seen) == list(range(n))
    else:
        assert set(seen) == set(range(n))  # everything seen; the wrap-around repeats a few
        assert len(seen) == -(-n // (world * B * accum)) * world * B * accum


def test_global_step_does_not_depend_on_the_split():
    seqs = indexed_sequences(64)

    def steps(world, accum, B):
        loaders = [PackedLoader(seqs, seq_len=16, micro_batch_size=B, rank=r, world_size=world, seed=5, grad_accum=accum)
                   for r in range(world)]
        assert len({ld.steps_per_epoch for ld in loaders}) == 1
        return [sorted(i for ld in loaders for mb in ld.next_step() for i in batch_ids(mb))
                for _ in range(loaders[0].steps_per_epoch * 2)]

    reference = steps(1, 4, 2)
    assert len(reference) == 16 and all(len(s) == 8 for s in reference)
    assert steps(2, 2, 2) == reference
    assert steps(4, 1, 2) == reference
    assert steps(2, 1, 4) == reference


def test_resume_mid_epoch_gives_the_same_batches():
    seqs = indexed_sequences(30)
    kwargs = dict(seq_len=16, micro_batch_size=2, rank=1, world_size=2, seed=9, grad_accum=1)
    reference = PackedLoader(seqs, **kwargs)
    stream = [reference._take() for _ in range(20)]  # 7 micro-batches per epoch: crosses two epoch boundaries
    for stop in (3, 7, 10):
        first = PackedLoader(seqs, **kwargs)
        for _ in range(stop):
            first.next_step()
        state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
        resumed = PackedLoader(seqs, **kwargs)
        resumed.load_state_dict(state)
        for expected in stream[stop:]:
            got = resumed.next_step()[0]
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(got[key], expected[key])
    # iter() after an exact epoch end continues with the next epoch.
    loader = PackedLoader(seqs, **kwargs)
    first_epoch = list(loader)
    resumed = PackedLoader(seqs, **kwargs)
    resumed.load_state_dict(loader.state_dict())
    assert [batch_ids(b) for b in resumed] == [batch_ids(b) for b in stream[7:14]]
    assert [batch_ids(b) for b in first_epoch] == [batch_ids(b) for b in stream[:7]]
    with pytest.raises(ValueError, match="world_size"):
        PackedLoader(seqs, **{**kwargs, "world_size": 3}).load_state_dict(state)


def test_loader_packs_examples_and_counts_targets():
    examples = random_examples(50, 40, seed=1)
    loader = PackedLoader(examples, seq_len=64, micro_batch_size=3, seed=0, drop_last=False)
    total_targets, seen = 0, set()
    for batch in loader:
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (3, 64)
        assert batch["cu_seqlens"][-1] == 3 * 64
        labels = batch["labels"]
        assert batch["num_target_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())
        # No target at a position whose input starts an example: position_ids == 0 means a new segment.
        assert bool((labels[batch["position_ids"] == 0] == IGNORE_INDEX).all())
        total_targets += batch["num_target_tokens"]
        for row in batch["input_ids"]:
            seen.update(int(t) - 10_000 for t in row if t >= 10_000)
    assert seen == set(range(50))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(examples, seq_len=64, micro_batch_size=64, seed=0)


def test_grouped_examples_share_a_sequence():
    from lynx.sft_data import Example, pack

    def ex(n, group=None):
        return Example(list(range(1, n + 1)), [IGNORE_INDEX] * n, group=group)

    # Best-fit decreasing alone puts the 6 with a 4 and the 3 with the other 4; grouped, a's 6 and 3 stay together.
    examples = [ex(6, "a"), ex(3, "a"), ex(4, "b"), ex(4, "b"), ex(2)]
    assert sorted(sorted(s.indices) for s in pack(examples, 10)) == [[0, 1], [2, 3, 4]]
    assert sorted(sorted(s.indices) for s in pack([ex(6), ex(3), ex(4), ex(4), ex(2)], 10)) == [[0, 2], [1, 3, 4]]
    # A group longer than a sequence is split into its members rather than refused.
    assert sorted(sorted(s.indices) for s in pack([ex(7, "x"), ex(7, "x")], 10)) == [[0], [1]]
