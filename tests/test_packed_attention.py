"""Packed-sequence attention: several documents per row must behave exactly like each document alone, on every path
(per-segment SDPA, the dense block-causal mask that torch.compile takes, flash-attn's varlen call), and match a
dense softmax(QK^T / sqrt(D) + M) V reference whose mask M is written out from the document lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lynx import attention as attention_module
from lynx.attention import attention, block_causal_mask
from lynx.model import Llama
from conftest import make_tiny_checkpoint

# Two rows of T = 24: row 0 holds documents of 5, 9 and 7 tokens then 3 padding tokens; row 1 holds 12 + 12.
T = 24
ROWS = [[5, 9, 7], [12, 12]]


def packed_batch(seed=0, vocab=320):
    """input_ids [2, T], position_ids restarting per segment, cu_seqlens over the flattened tokens, the documents."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(ROWS), T, dtype=torch.long)
    position_ids = torch.zeros(len(ROWS), T, dtype=torch.long)
    cu_seqlens, docs = [0], []
    for b, lengths in enumerate(ROWS):
        start = 0
        segments = lengths + ([T - sum(lengths)] if sum(lengths) < T else [])  # padding is its own segment
        for i, n in enumerate(segments):
            ids = torch.randint(2, vocab, (n,), generator=g)
            input_ids[b, start : start + n] = ids
            position_ids[b, start : start + n] = torch.arange(n)
            if i < len(lengths):
                docs.append((b, start, ids))
            start += n
            cu_seqlens.append(b * T + start)
    return input_ids, position_ids, torch.tensor(cu_seqlens, dtype=torch.int32), docs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("packed") / "tiny")
    return Llama.from_pretrained(path, dtype=torch.float32).eval()


def fake_flash_attn_varlen_func(calls):
    """SDPA per segment with flash-attn's varlen signature; records what it was given."""

    def fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **kwargs):
        calls.append(dict(q=q.shape, k=k.shape, v=v.shape, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
                          max_q=max_seqlen_q, max_k=max_seqlen_k, causal=causal, kwargs=kwargs))
        out = torch.empty_like(q)
        bounds = cu_seqlens_q.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=qs.shape[1] != ks.shape[1])
            out[s:e] = o[0].transpose(0, 1)
        return out

    return fake


def test_packed_logits_match_each_document_alone(model):
    input_ids, position_ids, cu_seqlens, docs = packed_batch()
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids,
                       attn_kwargs={"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen})
        unpacked_plain = model(input_ids)  # sanity: without segment info the logits must differ
        for b, start, ids in docs:
            alone = model(ids[None])[0]
            torch.testing.assert_close(packed[b, start : start + len(ids)], alone, rtol=1e-5, atol=1e-5)
    # Documents after the first of a row see different context when not packed: the test can tell them apart.
    b, start, ids = docs[1]
    assert not torch.allclose(unpacked_plain[b, start : start + len(ids)], packed[b, start : start + len(ids)], atol=1e-3)


def test_packed_loss_sums_per_document_losses(model):
    input_ids, position_ids, cu_seqlens, docs = packed_batch(seed=1)
    labels = input_ids.clone()
    labels[0, sum(ROWS[0]):] = -100  # padding
    for b, start, ids in docs:
        labels[b, start] = -100  # a document's first token is never a target: no loss across documents
    kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": 12}
    with torch.no_grad():
        packed = model(input_ids, labels, position_ids=position_ids, attn_kwargs=kwargs, reduction="sum")
        alone = sum(model(ids[None], ids[None], reduction="sum") for _, _, ids in docs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)


def test_flash_varlen_path_passes_int32_offsets_and_flat_shapes(model, monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", fake_flash_attn_varlen_func(calls))
    monkeypatch.setattr(attention_module, "use_flash_varlen", lambda q: True)  # bypass the CUDA/dtype condition
    input_ids, position_ids, cu_seqlens, docs = packed_batch(seed=2)
    kwargs = {"cu_seqlens": cu_seqlens.to(torch.int64), "max_seqlen": 12}  # int64 in: the path must convert
    with torch.no_grad():
        via_flash = model(input_ids, position_ids=position_ids, attn_kwargs=kwargs)
    cfg = model.config
    assert len(calls) == cfg.num_hidden_layers
    for c in calls:
        assert c["q"] == (len(ROWS) * T, cfg.num_attention_heads, cfg.head_dim)
        assert c["k"] == c["v"] == (len(ROWS) * T, cfg.num_key_value_heads, cfg.head_dim)
        assert c["cu_q"].dtype == c["cu_k"].dtype == torch.int32
        assert c["cu_q"].tolist() == c["cu_k"].tolist() == cu_seqlens.tolist()
        assert c["max_q"] == c["max_k"] == 12 and isinstance(c["max_q"], int)
        assert c["causal"] is True
    monkeypatch.setattr(attention_module, "use_flash_varlen", lambda q: False)
    masks = spy_on(monkeypatch, "block_causal_mask")
    monkeypatch.setattr(attention_module, "CPU_PACKED_IMPL", "mask")
    with torch.no_grad():
        via_mask = model(input_ids, position_ids=position_ids, attn_kwargs=kwargs)
    assert len(calls) == cfg.num_hidden_layers  # the mask path did not call flash
    assert len(masks) == cfg.num_hidden_layers  # ... and did build the dense mask (the path torch.compile takes)
    torch.testing.assert_close(via_flash, via_mask, rtol=1e-5, atol=1e-5)


def test_flash_path_computes_max_seqlen_when_omitted(monkeypatch):
    calls = []
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", fake_flash_attn_varlen_func(calls))
    monkeypatch.setattr(attention_module, "use_flash_varlen", lambda q: True)
    q, k, v = torch.randn(1, 10, 4, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32))
    assert calls[0]["max_q"] == 7


def test_block_causal_mask_is_causal_within_segments_only():
    mask = block_causal_mask(torch.tensor([0, 2, 5, 6, 10], dtype=torch.int32), 2, 5)
    expected_row0 = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    expected_row1 = torch.tensor([
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask[0, 0], expected_row0) and torch.equal(mask[1, 0], expected_row1)


def spy_on(monkeypatch, name: str) -> list:
    """Record every call of lynx.attention's function `name` (the calls still run)."""
    calls, original = [], getattr(attention_module, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, name, recorded)
    return calls


def dense_reference(q, k, v, rows: list[list[int]], prefix_len: int = 0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(D) + M) V in fp32, q [B, T, Hq, D], k/v [B, T, Hkv, D]. M is 0 where query i may see
    key j and -inf elsewhere: j <= i in the same document, or (prefix_len > 0) j among the row's first prefix_len
    tokens. rows: each row's segment lengths, in order (the first is the prefix when prefix_len > 0)."""
    B, T, Hq, D = q.shape
    mask = torch.full((B, 1, T, T), float("-inf"))
    for b, lengths in enumerate(rows):
        segment = [i for i, n in enumerate(lengths) for _ in range(n)]
        for i in range(T):
            for j in range(i + 1):
                if segment[i] == segment[j] or j < prefix_len:
                    mask[b, 0, i, j] = 0.0
    group = Hq // k.shape[2]  # GQA: query head h reads KV head h // group
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    probs = torch.softmax(q @ k.transpose(-1, -2) / D**0.5 + mask, dim=-1)
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("impl", ["segments", "mask"])
@pytest.mark.parametrize("rows, prefix_len", [([[4, 7, 5], [9, 4, 3]], 0), ([[4, 7, 5], [4, 12]], 4)],
                         ids=["packed", "shared_prefix"])
def test_packed_attention_matches_a_dense_reference_with_gqa_and_gradients(monkeypatch, impl, rows, prefix_len):
    monkeypatch.setattr(attention_module, "CPU_PACKED_IMPL", impl)
    segments, masks = spy_on(monkeypatch, "segment_attention"), spy_on(monkeypatch, "block_causal_mask")
    torch.manual_seed(0)
    B, T = len(rows), 16
    ends = torch.tensor([n for lengths in rows for n in lengths]).cumsum(0)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), ends]).to(torch.int32)
    q = torch.randn(B, T, 4, 8, requires_grad=True)
    k = torch.randn(B, T, 2, 8, requires_grad=True)
    v = torch.randn(B, T, 2, 8, requires_grad=True)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=12, prefix_len=prefix_len)
    ref = dense_reference(q, k, v, rows, prefix_len)
    assert (len(segments), len(masks)) == ((1, 0) if impl == "segments" else (0, 1))  # the path asked for ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_compiled_blocks_match_eager_on_packed_batches(tmp_path):
    """parallel.compile=true compiles every block (lynx.parallel.parallelize); under compile packed attention takes
    the dense-mask path. One tiny packed batch: the compiled model's loss and gradients equal eager's, and the
    compiled graph has no break (the per-segment loop, which reads cu_seqlens on the host, would break it)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    path = make_tiny_checkpoint(tmp_path / "tiny", num_hidden_layers=1)
    eager = Llama.from_pretrained(path, dtype=torch.float32)
    compiled = Llama.from_pretrained(path, dtype=torch.float32)
    for block in compiled.layers:
        block.compile()  # what parallelize does for cfg.compile
    input_ids, position_ids, cu_seqlens, _ = packed_batch(seed=4)
    kwargs = dict(position_ids=position_ids, attn_kwargs={"cu_seqlens": cu_seqlens, "max_seqlen": 12})
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids, input_ids, **kwargs)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


def test_segment_spanning_two_rows_is_refused():
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="row"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 3, 6, 8], dtype=torch.int32))  # segment 3..6 spans rows
    with pytest.raises(ValueError, match="either"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32),
                  attn_mask=torch.ones(2, 1, 4, 4, dtype=torch.bool))


def test_loader_batches_through_the_model_equal_examples_alone(model):
    """End to end: PackedLoader's micro-batch (labels, position_ids, cu_seqlens) gives the summed loss of its
    examples run one by one, and num_target_tokens counts exactly the positions that carry loss."""
    from lynx.sft_data import Example, PackedLoader

    g = torch.Generator().manual_seed(3)
    examples = []
    for n in (7, 13, 4, 9, 11, 6):
        ids = torch.randint(2, 320, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2 :]  # loss on the second half ("the assistant turn")
        examples.append(Example(ids, labels))
    loader = PackedLoader(examples, seq_len=16, micro_batch_size=2, seed=0, drop_last=False)
    total, total_targets = torch.zeros(()), 0
    with torch.no_grad():
        for b in loader:
            total += model(b["input_ids"], b["labels"], position_ids=b["position_ids"], reduction="sum",
                           attn_kwargs={"cu_seqlens": b["cu_seqlens"], "max_seqlen": b["max_seqlen"]})
            total_targets += b["num_target_tokens"]
        alone = sum(model(torch.tensor([e.input_ids]), torch.tensor([e.labels]), reduction="sum") for e in examples)
    seen = len(loader) * 2  # drop_last=False may repeat a sequence to fill the last batch; make sure it did not
    assert seen == len(loader.sequences)
    torch.testing.assert_close(total, alone, rtol=1e-5, atol=1e-4)
    assert total_targets == sum(sum(lbl != -100 for lbl in e.labels[1:]) for e in examples)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prefix, length, kv_heads, group", [(170, 700, 3, 3), (40, 800, 2, 1), (300, 1000, 1, 4)])
def test_causal_call_after_a_prefix_is_the_masked_call_bit_for_bit(dtype, prefix, length, kv_heads, group):
    """Long segments after a prefix (inference) take the unmasked causal kernel behind zero query rows; it must give the
    masked call's bits, as the threshold PREFIX_CAUSAL_MIN_QUERIES promises, and match fp32 attention."""
    from lynx.attention import PREFIX_CAUSAL_MIN_QUERIES, prefix_causal_attention, prefix_masked_attention

    assert min(prefix + length, group * length) >= PREFIX_CAUSAL_MIN_QUERIES
    g = torch.Generator().manual_seed(prefix + length)
    q = (torch.randn(length, kv_heads * group, 64, generator=g) * 3).to(dtype)
    k, v = (torch.randn(1, kv_heads, prefix + length, 64, generator=g).to(dtype) for _ in range(2))
    masked, causal = prefix_masked_attention(q, k, v), prefix_causal_attention(q, k, v)
    assert torch.equal(causal, masked)
    visible = torch.ones(length, prefix + length, dtype=torch.bool).tril(prefix)
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().repeat_interleave(group, 1),
                                         v.float().repeat_interleave(group, 1), attn_mask=visible)[0].transpose(0, 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(causal.float(), ref, rtol=tol, atol=tol)


def test_long_segments_take_the_causal_call_in_inference_only(monkeypatch):
    """segment_attention with a cached prefix and a shared in-row prefix: long segments go through
    prefix_causal_attention under no_grad (same bits as with gradients, which keep the masked call), short ones not."""
    causal = spy_on(monkeypatch, "prefix_causal_attention")
    g = torch.Generator().manual_seed(0)
    T, P = 1200, 100
    bounds = [0, P, P + 900, P + 1000, T]  # the in-row prefix, a long segment, two short ones
    cu = torch.tensor(bounds, dtype=torch.int32)
    q = torch.randn(1, T, 6, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, T, 2, 64, generator=g).bfloat16() for _ in range(2))
    cached = tuple(torch.randn(1, 50, 2, 64, generator=g).bfloat16() for _ in range(2))
    for kwargs in ({"prefix_len": P}, {"prefix_kv": cached}):
        causal.clear()
        with torch.no_grad():
            fast = attention(q, k, v, cu_seqlens=cu, **kwargs)
        assert len(causal) == 1 and causal[0][0].shape[0] == 900  # the long segment only
        causal.clear()
        masked = attention(*(t.clone().requires_grad_() for t in (q, k, v)), cu_seqlens=cu, **kwargs)
        assert not causal and torch.equal(fast, masked.detach())
