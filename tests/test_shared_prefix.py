"""Shared-prefix packing: one copy of the common prompt prefix per packed row must give every document exactly what
it gets with its own copy in front (logits, loss, gradients), on every attention path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lynx import attention as attention_module
from lynx.attention import attention
from lynx.model import InferenceOptions, Llama
from lynx.sft_data import IGNORE_INDEX, Example, collate, pack, shared_prefix
from conftest import make_tiny_checkpoint
from test_packed_attention import dense_reference

P = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("prefix") / "tiny")
    return Llama.from_pretrained(path, dtype=torch.float32).eval()


def examples(n=5, seed=0, vocab=320):
    """Documents that all start with the same P-token prefix; the second half of each is the target."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, vocab, (P,), generator=g).tolist()
    out = []
    for _ in range(n):
        rest = torch.randint(2, vocab, (int(torch.randint(4, 15, (1,), generator=g)),), generator=g).tolist()
        ids = prefix + rest
        labels = [IGNORE_INDEX] * (P + len(rest) // 2) + ids[P + len(rest) // 2:]
        out.append(Example(ids, labels))
    return prefix, out


def test_shared_prefix_stops_before_the_first_label():
    prefix, exs = examples()
    assert shared_prefix(exs) == prefix
    # A label right after the common ids: the prefix must stop one earlier (that position predicts the label).
    early = Example(prefix + [5, 6], [IGNORE_INDEX] * P + [5, 6])
    assert shared_prefix(exs + [early]) == prefix[: P - 1]
    assert shared_prefix(exs + [Example([1, 2, 3], [IGNORE_INDEX] * 3)]) == []


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, **kwargs):
    """flash-attn's varlen semantics on CPU: per segment, causal aligned to the bottom right (flash-attn >= 2.1)."""
    out = torch.empty_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for (s, e), (ks_, ke) in zip(zip(bq[:-1], bq[1:]), zip(bk[:-1], bk[1:])):
        Lq, Lk = e - s, ke - ks_
        mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[ks_:ke].transpose(0, 1)[None],
                                           v[ks_:ke].transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


def use_path(monkeypatch, path):
    if path == "mask":
        monkeypatch.setattr(attention_module, "CPU_PACKED_IMPL", "mask")
    if path == "flash":
        monkeypatch.setattr(attention_module, "flash_attn_varlen_func", fake_flash_varlen)
        monkeypatch.setattr(attention_module, "use_flash_varlen", lambda q: True)


def without_prefix(cu_seqlens: torch.Tensor, seq_len: int, prefix_len: int) -> torch.Tensor:
    """cu_seqlens of the same rows with each row's first prefix_len tokens (its prefix segment) cut off."""
    cut = seq_len - prefix_len
    bounds = {c // seq_len * cut + max(c % seq_len - prefix_len, 0) for c in cu_seqlens.tolist()}
    return torch.tensor(sorted(bounds), dtype=torch.int32)


@pytest.mark.parametrize("path", ["segments", "mask", "flash"])
def test_cached_prefix_attention_equals_the_prefix_in_every_row(monkeypatch, path):
    """Rows of documents only, attending to a prefix's keys and values computed beforehand (prefix_kv), give what
    the same rows give with the prefix as their first segment: the dense reference, GQA and gradients included."""
    use_path(monkeypatch, path)
    torch.manual_seed(0)
    rows, T = [[4, 7, 5], [9, 3]], 16  # row 1 ends in 4 padding tokens (a segment of their own)
    Pc = 5
    ends = torch.tensor([n for lengths in rows for n in lengths + ([T - sum(lengths)] if sum(lengths) < T else [])])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), ends.cumsum(0)]).to(torch.int32)
    q = torch.randn(2, T, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, T, 2, 8, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(1, Pc, 2, 8, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, cu_seqlens=cu, prefix_kv=(pk, pv))
    # Reference: the prefix in front of every row (its queries are discarded).
    prefix_q = torch.zeros(1, Pc, 4, 8)
    full = [torch.cat([pt.expand(2, -1, -1, -1), t], dim=1) for pt, t in ((prefix_q, q), (pk, k), (pv, v))]
    padded_rows = [[Pc] + lengths + ([T - sum(lengths)] if sum(lengths) < T else []) for lengths in rows]
    ref = dense_reference(*full, padded_rows, Pc)[:, Pc:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, pk, pv))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, pk, pv))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["segments", "mask", "flash"])
@pytest.mark.parametrize("prefix_source", ["in_row", "kv_cache"])
def test_each_document_sees_the_prefix_as_its_own(model, monkeypatch, path, prefix_source):
    use_path(monkeypatch, path)
    prefix, exs = examples()
    seq_len = 48
    sequences = pack(exs, seq_len, prefix)
    assert len(sequences) > 1 and all(s.input_ids[:P] == prefix for s in sequences)
    batch = collate(sequences, seq_len)
    with torch.no_grad():
        if prefix_source == "in_row":
            logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                           attn_kwargs={"cu_seqlens": batch["cu_seqlens"], "prefix_len": P})
        else:  # the prefix run once into KV caches; the rows then hold the documents only
            caches = model.new_kv_caches(1, P)
            model(torch.tensor([prefix]), inference=InferenceOptions(kv_caches=caches))
            before = [c.k.clone() for c in caches]
            logits = model(batch["input_ids"][:, P:], position_ids=batch["position_ids"][:, P:],
                           inference=InferenceOptions(prefix_caches=caches),
                           attn_kwargs={"cu_seqlens": without_prefix(batch["cu_seqlens"], seq_len, P)})
            assert all(torch.equal(c.k, k) for c, k in zip(caches, before))  # read, not written
            logits = torch.cat([torch.zeros(len(sequences), P, logits.shape[-1]), logits], dim=1)  # same indexing
        checked = 0
        for b, seq in enumerate(sequences):
            start = P
            for length in seq.lengths:
                doc = torch.tensor([prefix + seq.input_ids[start : start + length]])
                alone = model(doc)[0, P:]
                torch.testing.assert_close(logits[b, start : start + length], alone, rtol=1e-5, atol=1e-5)
                start += length
                checked += 1
    assert checked == len(exs)


def test_loss_and_gradients_equal_unshared_packing(model):
    prefix, exs = examples(n=6, seed=1)

    def loss_and_grads(sequences, seq_len):
        model.zero_grad()
        batch = collate(sequences, seq_len)
        loss = model(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"], reduction="sum",
                     attn_kwargs={"cu_seqlens": batch["cu_seqlens"], "prefix_len": batch["prefix_len"]})
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, batch["num_target_tokens"]

    shared_loss, shared_grads, shared_n = loss_and_grads(pack(exs, 64, prefix), 64)
    plain_loss, plain_grads, plain_n = loss_and_grads(pack(exs, 64), 64)
    assert shared_n == plain_n
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bad_prefix_layouts_are_errors():
    prefix, exs = examples()
    with pytest.raises(ValueError, match="does not start with the shared prefix"):
        pack(exs + [Example([9] * 12, [IGNORE_INDEX] * 12)], 48, prefix)
    q = torch.randn(1, 16, 4, 8)
    with pytest.raises(ValueError, match="prefix_len=3: every row's first segment must be the prefix"):
        attention(q, q, q, cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32), prefix_len=3)
    with pytest.raises(ValueError, match="packed sequences"):
        attention(q, q, q, prefix_len=3)
    cu = torch.tensor([0, 3, 5, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="replaces the in-row one"):
        attention(q, q, q, cu_seqlens=cu, prefix_len=3, prefix_kv=(q[:, :3], q[:, :3]))
    with pytest.raises(ValueError, match=r"prefix_kv must be \[1 or B=1, P, 4, 8\]"):
        attention(q, q, q, cu_seqlens=cu, prefix_kv=(q[:, :3, :2], q[:, :3, :2]))


@pytest.mark.parametrize("prefix", ["none", "in_row", "cached", "cached_per_row"])
def test_attention_at_some_positions_equals_packed_attention_there(prefix):
    """read_positions (the last block of packed judging): the queries of a few flat positions give what the whole
    packed call gives at those positions, whatever the prefix."""
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 8)
    k, v = (torch.randn(2, 16, 2, 8) for _ in range(2))
    prefix_kv = tuple(torch.randn(2 if prefix == "cached_per_row" else 1, 5, 2, 8) for _ in range(2))
    cu = torch.tensor([0, 4, 11, 16, 25, 28, 32], dtype=torch.int32)  # row 1 ends in 4 padding tokens
    kwargs = {"cu_seqlens": cu}
    if prefix == "in_row":  # other segments: each row starts with a 4-token prefix (positions 3 and 16 in it)
        cu = torch.tensor([0, 4, 11, 16, 20, 25, 28, 32], dtype=torch.int32)
        kwargs = {"cu_seqlens": cu, "prefix_len": 4}
    elif prefix != "none":
        kwargs["prefix_kv"] = prefix_kv
    positions = torch.tensor([3, 10, 15, 16, 19, 27, 31, 5])
    with torch.no_grad():
        whole = attention(q, k, v, **kwargs).reshape(1, 32, 4, 8)[:, positions]
        some = attention(q.reshape(1, 32, 4, 8)[:, positions], k, v, read_positions=positions, **kwargs)
    torch.testing.assert_close(some, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"read_positions must lie in 0..31"):
        attention(q.reshape(1, 32, 4, 8)[:, :1], k, v, read_positions=torch.tensor([32]), **kwargs)
    with pytest.raises(ValueError, match=r"need queries \[1, N, H, D\]"):
        attention(q, k, v, read_positions=positions, **kwargs)


@pytest.mark.parametrize("prefix_source", ["in_row", "kv_cache"])
def test_read_positions_of_packed_rows_equal_the_whole_pass_there(model, prefix_source):
    """With read_positions the last block runs at those positions only; the logits there are the whole pass's."""
    prefix, exs = examples(n=6, seed=2)
    seq_len = 48
    batch = collate(pack(exs, seq_len, prefix), seq_len)
    input_ids, position_ids, cu = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
    kwargs, caches = {"attn_kwargs": {"cu_seqlens": cu, "prefix_len": P}}, None
    with torch.no_grad():
        if prefix_source == "kv_cache":
            caches = model.new_kv_caches(1, P)
            model(torch.tensor([prefix]), inference=InferenceOptions(kv_caches=caches))
            input_ids, position_ids = input_ids[:, P:], position_ids[:, P:]
            kwargs = {"attn_kwargs": {"cu_seqlens": without_prefix(cu, seq_len, P)}}
        n = input_ids.numel()
        positions = torch.tensor([n - 1, 0, n // 2, 7, n // 3])
        whole = model(input_ids, position_ids=position_ids, inference=InferenceOptions(prefix_caches=caches),
                      **kwargs).reshape(1, n, -1)[:, positions]
        some = model(input_ids, position_ids=position_ids,
                     inference=InferenceOptions(prefix_caches=caches, read_positions=positions), **kwargs)
    torch.testing.assert_close(some, whole, rtol=1e-5, atol=1e-5)


def test_packed_kv_out_holds_each_documents_keys_and_values_as_alone(model):
    """packed_kv_out (generation's packed prefill): every layer's keys and values of each packed document are those
    the document writes into a cache when it runs alone after the prefix."""
    prefix, exs = examples(n=4, seed=3)
    docs = [ex.input_ids[P:] for ex in exs]
    bounds = torch.tensor([0] + [len(d) for d in docs]).cumsum(0)
    caches = model.new_kv_caches(1, P)
    out = model.new_kv_caches(1, int(bounds[-1]))
    with torch.no_grad():
        model(torch.tensor([prefix]), inference=InferenceOptions(kv_caches=caches))
        model(torch.tensor([[t for d in docs for t in d]]),
              inference=InferenceOptions(prefix_caches=caches, packed_kv_out=out),
              position_ids=torch.tensor([[P + i for d in docs for i in range(len(d))]]),
              attn_kwargs={"cu_seqlens": bounds.to(torch.int32)})
        for d, s, e in zip(docs, bounds[:-1], bounds[1:]):
            alone = model.new_kv_caches(1, P + len(d))
            model(torch.tensor([prefix + d]), inference=InferenceOptions(kv_caches=alone))
            for a, o in zip(alone, out):
                torch.testing.assert_close(o.k[:, :, s:e], a.k[:, :, P:], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(o.v[:, :, s:e], a.v[:, :, P:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed_kv_out applies to packed sequences"):
        model(torch.tensor([prefix]), inference=InferenceOptions(packed_kv_out=out))


def test_caches_under_the_other_passs_name_are_refused(model):
    """Unpacked passes write kv_caches, packed ones read prefix_caches: a cache list under the other name is an error
    (not a silent write into a prefix, or a read of a cache meant to be filled)."""
    caches = model.new_kv_caches(1, P)
    ids, packed = torch.tensor([[5] * 8]), {"cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32)}
    with pytest.raises(ValueError, match="prefix_caches apply to packed sequences"):
        model(ids, inference=InferenceOptions(prefix_caches=caches))
    with pytest.raises(ValueError, match="kv_caches are written by unpacked passes"):
        model(ids, attn_kwargs=packed, inference=InferenceOptions(kv_caches=caches))
    with pytest.raises(ValueError, match="last_logits_only does not apply to packed sequences"):
        model(ids, attn_kwargs=packed, inference=InferenceOptions(last_logits_only=True))
