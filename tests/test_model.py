"""Logits parity of lynx.model.Llama with transformers.LlamaForCausalLM on random tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_checkpoint, make_tiny_hf_model

from lynx.model import InferenceOptions, KVCache, Llama

# Llama-3.1 style scaling, shrunk: with head_dim 16 and rope_theta 1e4 the longest wavelengths exceed 128 positions,
# so the "llama3" rule changes several frequency bands and inputs longer than 128 tokens see the difference.
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,  # transformers 5 requires < max_position_embeddings (512)
}
SEQ_LEN = 300


def input_ids(vocab_size=320, batch=2, seq_len=SEQ_LEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def hf_kwargs(kv_heads: int, rope_scaling: bool, tied: bool) -> dict:
    kwargs = dict(num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    if rope_scaling:
        kwargs["rope_scaling"] = dict(LLAMA3_ROPE)
    return kwargs


@torch.no_grad()
def assert_logits_match(ours, hf, ids, record_property=None, atol=1e-5):
    expected = hf(ids).logits
    got = ours(ids)
    max_diff = (got.float() - expected.float()).abs().max().item()
    print(f"max abs logits diff: {max_diff:.3e}")
    if record_property is not None:
        record_property("max_abs_logits_diff", max_diff)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    return max_diff


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope_scaling", [False, True], ids=["rope-default", "rope-llama3"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
def test_fp32_logits_match_transformers(tmp_path, record_property, kv_heads, rope_scaling, tied):
    kwargs = hf_kwargs(kv_heads, rope_scaling, tied)
    hf = make_tiny_hf_model(seed=kv_heads, **kwargs)
    hf.save_pretrained(tmp_path / "ckpt")
    ours = Llama.from_pretrained(tmp_path / "ckpt")
    assert ours.config.num_key_value_heads == kv_heads
    assert ours.config.tie_word_embeddings == tied
    assert (ours.config.rope_scaling is not None) == rope_scaling
    if tied:
        assert ours.head.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    assert next(ours.parameters()).dtype == torch.float32
    assert_logits_match(ours, hf, input_ids(), record_property)


@torch.no_grad()
def test_rope_scaling_changes_the_logits(tmp_path):
    """The scaled-rope parity test can fail: ignoring the scaling gives clearly different logits."""
    hf = make_tiny_hf_model(seed=5, **hf_kwargs(2, True, False))
    hf.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    unscaled = Llama.from_pretrained(tmp_path / "ckpt")
    ids = input_ids()
    assert (unscaled(ids) - hf(ids).logits).abs().max() > 1e-2


def to_old_spelling(config: dict) -> dict:
    """A transformers-5 config.json rewritten the way published Llama-3/3.1 checkpoints spell it."""
    config = dict(config)
    rope = config.pop("rope_parameters")
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    config["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    config["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
    return config


@pytest.mark.parametrize("rope_scaling", [False, True], ids=["llama3.0", "llama3.1"])
def test_old_config_spelling_loads_identically(tmp_path, record_property, rope_scaling):
    hf = make_tiny_hf_model(seed=7, **hf_kwargs(2, rope_scaling, False))
    hf.save_pretrained(tmp_path / "new")
    hf.save_pretrained(tmp_path / "old")
    new_config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert "rope_parameters" in new_config
    old_config = to_old_spelling(new_config)
    assert "rope_parameters" not in old_config and "rope_theta" in old_config
    (tmp_path / "old" / "config.json").write_text(json.dumps(old_config, indent=2))

    from_old, from_new = Llama.from_pretrained(tmp_path / "old"), Llama.from_pretrained(tmp_path / "new")
    assert from_old.config == from_new.config
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(from_old(ids), from_new(ids), rtol=0, atol=0)
    assert_logits_match(from_old, hf, ids, record_property)


def test_rope_scaling_old_spelling_with_type_key(tmp_path):
    """transformers 4.x configs sometimes say "type" instead of "rope_type"."""
    make_tiny_checkpoint(tmp_path / "ckpt", **hf_kwargs(2, True, False))
    config = to_old_spelling(json.loads((tmp_path / "ckpt" / "config.json").read_text()))
    config["rope_scaling"]["type"] = config["rope_scaling"].pop("rope_type")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    model = Llama.from_pretrained(tmp_path / "ckpt")
    expected = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    assert model.config.rope_scaling == expected


@torch.no_grad()
def test_bf16_checkpoint_matches_transformers_in_bf16(tmp_path, record_property):
    """bf16 weights, bf16 compute on both sides. Operation order differs slightly, so instead of bit equality we
    require our error against an fp32 computation on the same (bf16-rounded) weights to be no worse than
    transformers' own bf16 error, plus a small margin. Both sides load with from_pretrained (calling .to(bf16) on
    a transformers model would also round its rotary inv_freq buffer, an error real checkpoints never see)."""
    from transformers import LlamaForCausalLM

    make_tiny_checkpoint(tmp_path / "bf16", seed=3, dtype=torch.bfloat16, **hf_kwargs(2, True, False))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    ours = Llama.from_pretrained(tmp_path / "bf16")  # dtype from config.json
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    hf_bf16 = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    hf_fp32 = LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()

    ids = input_ids()
    reference = hf_fp32(ids).logits
    ours_logits = ours(ids)
    assert ours_logits.dtype == torch.bfloat16
    ours_err = (ours_logits.float() - reference).abs().max().item()
    hf_logits = hf_bf16(ids).logits
    hf_err = (hf_logits.float() - reference).abs().max().item()
    ours_vs_hf = (ours_logits.float() - hf_logits.float()).abs().max().item()
    print(f"bf16 max abs error vs fp32 (logits std {reference.std():.2f}): ours {ours_err:.3e}, "
          f"transformers {hf_err:.3e}; ours vs transformers in bf16 {ours_vs_hf:.3e}")
    record_property("bf16_ours_vs_transformers_max_abs_diff", ours_vs_hf)
    record_property("bf16_ours_max_abs_err", ours_err)
    record_property("bf16_transformers_max_abs_err", hf_err)
    assert ours_err <= 1.25 * hf_err + 1e-2
    assert hf_err > 0  # bf16 is really in use: it is not fp32-exact
    # Our fp32 upcast of the same bf16 checkpoint is the fp32 reference itself.
    assert_logits_match(Llama.from_pretrained(tmp_path / "bf16", dtype=torch.float32), hf_fp32, ids, record_property)


@torch.no_grad()
def test_fp32_checkpoint_loaded_as_bf16(tmp_path):
    hf = make_tiny_hf_model(seed=4, **hf_kwargs(2, False, False))
    hf.save_pretrained(tmp_path / "fp32")
    ours_bf16 = Llama.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    hf_params = dict(hf.named_parameters())
    for name, p in ours_bf16.state_dict().items():
        assert p.dtype == torch.bfloat16
        hf_name = "lm_head.weight" if name == "head.lm_head.weight" else "model." + name.removeprefix("head.")
        assert torch.equal(p, hf_params[hf_name].to(torch.bfloat16)), name
    assert ours_bf16(input_ids(seq_len=8)).dtype == torch.bfloat16


def test_eval_mode_and_no_grad_state(tiny_checkpoint):
    model = Llama.from_pretrained(tiny_checkpoint)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # trainable after loading
    assert not any(p.is_meta for p in model.parameters())


@torch.no_grad()
def test_last_logits_only_matches_the_full_forward(tiny_checkpoint):
    """last_logits_only runs the last block for the final position alone; its logits must equal the full forward's
    last row, with and without a padding mask, and the KV cache must hold every position's keys all the same."""
    model = Llama.from_pretrained(tiny_checkpoint)
    ids = input_ids(seq_len=40)
    B, T = ids.shape
    full = model(ids)
    last_only = InferenceOptions(last_logits_only=True)
    torch.testing.assert_close(model(ids, inference=last_only), full[:, -1:], rtol=0, atol=1e-5)

    # Left padding as generation builds it: row 0 has 7 padding slots, each padding query sees only itself.
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :7] = False
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = ((causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)[None])[:, None]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(position_ids=positions, attn_kwargs={"attn_mask": mask})
    full_caches, last_caches = model.new_kv_caches(B, T + 4), model.new_kv_caches(B, T + 4)
    full = model(ids, inference=InferenceOptions(kv_caches=full_caches), **kwargs)
    last = model(ids, inference=InferenceOptions(kv_caches=last_caches, last_logits_only=True), **kwargs)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-5)
    for cache_full, cache_last in zip(full_caches, last_caches):
        torch.testing.assert_close(cache_last.k, cache_full.k, rtol=0, atol=0)
        torch.testing.assert_close(cache_last.v, cache_full.v, rtol=0, atol=0)

    with pytest.raises(ValueError, match="labels"):
        model(ids, ids, inference=last_only)


def test_kv_cache_update_writes_the_slots_and_returns_what_attention_reads():
    cache = KVCache(2, 6, 1, 2, dtype=torch.float32)
    k, v = torch.arange(12.0).view(2, 3, 1, 2), -torch.arange(12.0).view(2, 3, 1, 2)
    keys, values = cache.update(range(3), k, v)  # a prefill reads the three slots it wrote
    assert torch.equal(keys, k) and torch.equal(values, v)
    k1 = torch.full((2, 1, 1, 2), 7.0)
    keys, values = cache.update(range(3, 4), k1, -k1)  # a decode step reads the whole buffer, unwritten slots 0
    assert keys.shape == (2, 6, 1, 2)
    assert torch.equal(keys[:, :3], k) and torch.equal(keys[:, 3:4], k1) and not keys[:, 4:].any()
    assert torch.equal(values[:, 3:4], -k1) and torch.equal(cache.k[:, :, 3], k1[:, 0])  # cache layout [B, H, S, D]
    with pytest.raises(ValueError, match="consecutive slots"):
        cache.update(range(5, 7), k[:, :2], v[:, :2])  # past the end


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_ids_give_float32_logits_of_those_rows(tmp_path, dtype):
    """vocab_ids: the logits of a few vocabulary rows, as float32 products of the final hidden state and those rows
    of the output projection, so that in bf16 they keep the differences bf16 logits round away."""
    model = Llama.from_pretrained(make_tiny_checkpoint(tmp_path / "tiny", seed=3), dtype=dtype)
    ids = input_ids(seq_len=24)
    vocab_ids = torch.tensor([3, 70, 200, 5])
    normed = {}
    hook = model.head.norm.register_forward_hook(lambda module, args, out: normed.update(h=out))
    full = model(ids)
    got = model(ids, inference=InferenceOptions(vocab_ids=vocab_ids))
    assert got.dtype == torch.float32 and got.shape == (*ids.shape, len(vocab_ids))
    hook.remove()
    expected = normed["h"].float() @ model.head.lm_head.weight[vocab_ids].float().T
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(got, full[..., vocab_ids], rtol=0, atol=1e-5)
    else:  # the bf16 logits are these, rounded; these keep more than bf16 can hold
        torch.testing.assert_close(full[..., vocab_ids].float(), got, rtol=2 ** -8, atol=1e-6)
        assert not torch.equal(got, got.bfloat16().float())
    read = InferenceOptions(read_positions=torch.tensor([5, 30]), vocab_ids=vocab_ids)
    torch.testing.assert_close(model(ids, inference=read), got.reshape(1, -1, len(vocab_ids))[:, [5, 30]],
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="vocab_ids"):
        model(ids, ids, inference=InferenceOptions(vocab_ids=vocab_ids))
