"""Generation: token parity with transformers, stop ids, sampling determinism, watched logits."""

from __future__ import annotations

import pytest
import torch

from lynx.generate import (CompiledRMSNorm, PrepackedLinear, PrepackedMLP, can_prepack, compile_rms_norms, generate,
                           prepack_linear_weights, run_generation)
from lynx.infer import cpu_fast
from lynx.model import InferenceOptions, Llama
from tests.conftest import make_tiny_checkpoint, make_tiny_hf_model

PROMPTS = [[5, 17, 33, 2, 250, 9, 41], [7, 8], [100, 101, 102, 103], [64]]


def hf_generate(hf_model, prompts, max_new_tokens, eos_token_id=None):
    """transformers greedy generate on left-padded prompts; returns new tokens per prompt, cut before the first eos."""
    P = max(len(p) for p in prompts)
    pad = 0
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = hf_model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad, eos_token_id=eos_token_id, min_new_tokens=0,
    )
    result = []
    for row in out[:, P:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        result.append(row)
    return result


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("gen") / "tiny", seed=3)
    hf = make_tiny_hf_model(seed=3)
    return Llama.from_pretrained(path).eval(), hf


def test_greedy_matches_transformers_on_mixed_lengths(models):
    ours, hf = models
    expected = hf_generate(hf, PROMPTS, max_new_tokens=20)
    got = generate(ours, PROMPTS, max_new_tokens=20, stop_ids=[])
    assert got == expected
    assert all(len(g) == 20 for g in got)
    # The same prompt alone and inside a padded batch gives the same tokens (padding is invisible).
    assert generate(ours, [PROMPTS[1]], max_new_tokens=20) == [got[1]]


def test_equal_length_batch_matches_transformers(models):
    """No padding takes the unmasked causal prefill path."""
    ours, hf = models
    prompts = [[5, 17, 33, 2], [7, 8, 9, 10], [300, 1, 2, 3]]
    assert generate(ours, prompts, max_new_tokens=15) == hf_generate(hf, prompts, max_new_tokens=15)


def test_stop_ids_end_each_sequence_separately(models):
    ours, hf = models
    free = generate(ours, PROMPTS, max_new_tokens=12)
    # Make a token generated mid-way by sequence 0 a stop id: sequence 0 must end just before it.
    stop = free[0][5]
    res = run_generation(ours, PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for b, toks in enumerate(free):
        cut = toks.index(stop) if stop in toks else len(toks)
        assert res.tokens[b] == toks[:cut]
        assert res.stopped[b] == (stop in toks)
    assert res.stopped[0] and len(res.tokens[0]) <= 5
    # transformers agrees when the stop id is its eos.
    assert res.tokens == hf_generate(hf, PROMPTS, max_new_tokens=12, eos_token_id=stop)


def test_sampling_is_seeded_and_top_p_restricts(models):
    ours, _ = models
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
    a = generate(ours, PROMPTS, seed=123, **kwargs)
    b = generate(ours, PROMPTS, seed=123, **kwargs)
    c = generate(ours, PROMPTS, seed=124, **kwargs)
    assert a == b
    assert a != c
    # A tiny nucleus keeps only the most likely token: sampling collapses to greedy.
    greedy = generate(ours, PROMPTS, max_new_tokens=10)
    assert generate(ours, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5) == greedy


SHARED = [(7 * i + 3) % 250 + 1 for i in range(40)]  # a 40-token prefix every prompt of the batch starts with


@pytest.mark.parametrize("prompts", [
    [SHARED + [5, 17, 33], SHARED + [9], SHARED + [100, 101, 102, 103, 104, 105]],  # padded after the prefix
    [SHARED + [5, 6], SHARED + [7, 8]],  # equal lengths: the shared path still masks (keys = prefix + own tokens)
    [SHARED, SHARED + [1, 2]],  # one prompt is the whole common prefix: it keeps its last token to itself
])
def test_shared_prefix_is_computed_once_and_changes_nothing(models, prompts, monkeypatch):
    ours, hf = models
    plain = run_generation(ours, prompts, max_new_tokens=12, watch_ids=[3, 70], share_prefix=False)
    rows = []  # the batch size of every forward pass
    monkeypatch.setattr(ours, "forward", lambda input_ids, *a, _f=ours.forward, **k: rows.append(input_ids.shape)
                        or _f(input_ids, *a, **k))
    shared = run_generation(ours, prompts, max_new_tokens=12, watch_ids=[3, 70])
    assert rows[0] == (1, min(map(len, prompts)) - 1 if prompts[0] == SHARED else 40)  # the prefix, one row
    assert shared.tokens == plain.tokens == hf_generate(hf, prompts, max_new_tokens=12)
    for a, b in zip(shared.watched_logits, plain.watched_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [[], SHARED])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_continuous_batching_refills_rows_and_changes_nothing(models, monkeypatch, prefix, batch_size):
    """More prompts than rows: each row takes the next prompt as its sequence ends (a stop id ends some early), and
    every prompt's tokens, stop flag and watched logits are those of the whole batch at once, and transformers'."""
    ours, hf = models
    prompts = [prefix + p for p in PROMPTS + [[3, 3, 9, 12, 80], [44, 45]]]
    free = generate(ours, prompts, max_new_tokens=10)
    stop = [free[0][1], free[3][2], free[5][0]]  # prompts 0, 3 and 5 end early (and any other that prints one)
    everything = run_generation(ours, prompts, max_new_tokens=10, stop_ids=stop, watch_ids=[3, 70])
    assert free == hf_generate(hf, prompts, max_new_tokens=10)
    cut = [next((j for j, t in enumerate(toks) if t in stop), len(toks)) for toks in free]
    assert everything.tokens == [toks[:j] for toks, j in zip(free, cut)]
    assert sum(everything.stopped) == 3
    rows, decode_steps, finished = [], [], []

    def counting_forward(input_ids, *a, _f=ours.forward, **k):
        rows.append(input_ids.shape[0])
        # one slot per row: a decode step
        decode_steps.append(isinstance(getattr(k.get("inference"), "cache_positions", None), torch.Tensor))
        return _f(input_ids, *a, **k)

    monkeypatch.setattr(ours, "forward", counting_forward)
    res = run_generation(ours, prompts, max_new_tokens=10, stop_ids=stop, watch_ids=[3, 70],
                         batch_size=batch_size, progress=finished.append)
    assert res.tokens == everything.tokens
    assert res.stopped == everything.stopped
    for a, b in zip(res.watched_logits, everything.watched_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert max(rows) == batch_size and sum(finished) == len(prompts)
    # Refilling beats running each static batch of the same size to its longest completion.
    steps = [len(t) + s for t, s in zip(everything.tokens, everything.stopped)]  # tokens chosen per prompt
    static_steps = sum(max(steps[i : i + batch_size]) - 1 for i in range(0, len(prompts), batch_size))
    assert sum(decode_steps) < static_steps if batch_size > 1 else sum(decode_steps) == static_steps


@pytest.mark.parametrize("prefix", [[], SHARED])
@pytest.mark.parametrize("prefill_tokens", [1, 12, 10_000])
def test_prompts_are_prefilled_ahead_in_packed_passes_and_change_nothing(models, monkeypatch, prefix, prefill_tokens):
    """Prefill passes pack the next waiting prompts: at least as many as rows are free, more while the pass stays
    within prefill_tokens; the output is what every prompt at once gives."""
    ours, _ = models
    prompts = [prefix + p for p in PROMPTS + [[3, 3, 9, 12, 80], [44, 45]]]
    expected = run_generation(ours, prompts, max_new_tokens=6, watch_ids=[3, 70], share_prefix=False)
    passes = []  # prompts and tokens per prefill pass

    def counting_forward(input_ids, *a, _f=ours.forward, **k):
        if getattr(k.get("inference"), "packed_kv_out", None) is not None:
            passes.append((len(k["attn_kwargs"]["cu_seqlens"]) - 1, input_ids.shape[1]))
        return _f(input_ids, *a, **k)

    monkeypatch.setattr(ours, "forward", counting_forward)
    res = run_generation(ours, prompts, max_new_tokens=6, watch_ids=[3, 70], batch_size=2,
                         prefill_tokens=prefill_tokens)
    assert res.tokens == expected.tokens
    for a, b in zip(res.watched_logits, expected.watched_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert sum(n for n, _ in passes) == len(prompts)
    if prefill_tokens == 10_000:
        assert passes == [(len(prompts), sum(map(len, PROMPTS)) + 7)]  # all at once, the shared prefix excluded
    else:
        assert passes[0][0] == 2 and all(n <= 2 or tokens <= prefill_tokens for n, tokens in passes)
        assert len(passes) < len(prompts) if prefill_tokens == 12 else all(n <= 2 for n, _ in passes)


def test_sampling_with_continuous_batching_is_seeded(models):
    ours, _ = models
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, batch_size=2)
    assert generate(ours, PROMPTS, seed=9, **kwargs) == generate(ours, PROMPTS, seed=9, **kwargs)


def test_watched_logits_match_a_plain_forward(models):
    ours, _ = models
    watch = [3, 70, 200]
    res = run_generation(ours, PROMPTS, max_new_tokens=6, watch_ids=watch)
    for prompt, toks, watched in zip(PROMPTS, res.tokens, res.watched_logits):
        full = torch.tensor([prompt + toks])
        logits = ours(full)[0, len(prompt) - 1 :, :][:, watch]  # the positions that predicted each new token
        torch.testing.assert_close(watched, logits[: len(toks)], rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise(models):
    ours, _ = models
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(ours, [[1, 2]], max_new_tokens=10_000)


def test_prepacked_bf16_model_generates_bit_identical_output(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tiny", seed=5)
    plain = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    packed = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    did = prepack_linear_weights(packed, fuse_mlp=False)
    assert did == can_prepack(plain)
    if not did:  # a CPU without native bf16 in oneDNN: the model must be left exactly as it was
        assert not any(isinstance(m, PrepackedLinear) for m in packed.modules())
        return
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert sum(isinstance(m, PrepackedLinear) for m in packed.modules()) == n_linear
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    watch = [3, 70, 200]
    expected = run_generation(plain, PROMPTS, max_new_tokens=12, watch_ids=watch)
    got = run_generation(packed, PROMPTS, max_new_tokens=12, watch_ids=watch)
    assert got.tokens == expected.tokens
    for a, b in zip(got.watched_logits, expected.watched_logits):
        assert torch.equal(a, b)
    ids = torch.tensor([PROMPTS[0]])
    vocab = InferenceOptions(vocab_ids=torch.tensor(watch))
    with torch.no_grad():
        assert torch.equal(packed(ids), plain(ids))
        # The head keeps its plain weight for the float32 rows judging reads; no other linear has one any more.
        assert torch.equal(packed(ids, inference=vocab), plain(ids, inference=vocab))
    assert torch.equal(packed.head.lm_head.weight, plain.head.lm_head.weight)
    with pytest.raises(RuntimeError, match="prepacked"):
        packed.layers[0].self_attn.q_proj.weight


def test_fused_mlp_is_nearer_fp32_than_the_plain_bf16_model(tmp_path):
    """PrepackedMLP rounds less than the plain bf16 MLP: its outputs differ from the plain model's by bf16 noise and
    are at least as near the fp32 model's."""
    path = make_tiny_checkpoint(tmp_path / "tiny", seed=6)
    exact = Llama.from_pretrained(path, dtype=torch.float32).eval()
    plain = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    fused = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    if not prepack_linear_weights(fused):  # no native bf16 in this CPU's oneDNN: the model must be left as it was
        assert not any(isinstance(m, (PrepackedLinear, PrepackedMLP)) for m in fused.modules())
        return
    assert sum(isinstance(m, PrepackedMLP) for m in fused.modules()) == len(fused.layers)
    ids = torch.randint(3, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = torch.randn(3, 17, exact.config.hidden_size, generator=torch.Generator().manual_seed(1))
        mlp_exact = exact.layers[0].mlp(x)
        mlp_plain, mlp_fused = plain.layers[0].mlp(x.bfloat16()).float(), fused.layers[0].mlp(x.bfloat16()).float()
        ref, a, b = exact(ids), plain(ids).float(), fused(ids).float()
    assert not torch.equal(mlp_fused, mlp_plain)  # the fused path ran
    mlp_err_plain, mlp_err_fused = (mlp_plain - mlp_exact).norm(), (mlp_fused - mlp_exact).norm()
    assert mlp_err_fused < mlp_err_plain
    assert (b - a).norm() < 0.02 * ref.norm()  # bf16 noise, not another function
    assert (b - ref).norm() <= 1.05 * (a - ref).norm()


def test_compiled_rms_norms_are_the_eager_norms_within_bf16_rounding(tmp_path):
    """compile_rms_norms fuses every norm of a bf16 CPU model into one compiled loop: outputs within bf16 noise of the
    eager norms' and as near fp32's; fp32 models are left eager."""
    path = make_tiny_checkpoint(tmp_path / "tiny", seed=7)
    exact = Llama.from_pretrained(path, dtype=torch.float32).eval()
    plain = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    compiled = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert not compile_rms_norms(exact)
    if not compile_rms_norms(compiled):  # no native bf16 here: nothing replaced
        assert not can_prepack(compiled) and not any(isinstance(m, CompiledRMSNorm) for m in compiled.modules())
        return
    assert sum(isinstance(m, CompiledRMSNorm) for m in compiled.modules()) == 2 * len(compiled.layers) + 1
    ids = torch.randint(3, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 17, exact.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        norm_exact = exact.layers[0].input_layernorm(x)
        norm_plain = plain.layers[0].input_layernorm(x.bfloat16()).float()
        norm_compiled = compiled.layers[0].input_layernorm(x.bfloat16()).float()
        ref, a, b = exact(ids), plain(ids).float(), compiled(ids).float()
    torch.testing.assert_close(norm_compiled, norm_plain, rtol=2 ** -7, atol=1e-6)  # one bf16 rounding apart at most
    assert (norm_compiled - norm_exact).norm() <= 1.05 * (norm_plain - norm_exact).norm()
    assert (b - a).norm() < 1.5 * (a - ref).norm()  # bf16 noise (~3% of the logits here), not another function
    assert (b - ref).norm() <= 1.05 * (a - ref).norm()


def test_a_failing_compile_leaves_the_norms_eager_with_a_warning(models, monkeypatch):
    ours, _ = models
    monkeypatch.setattr(cpu_fast, "can_prepack", lambda model: True)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_fast, "compiled_rms_norm", lambda: no_compiler)
    message = r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\); the RMSNorms stay eager"
    with pytest.warns(UserWarning, match=message):
        assert not compile_rms_norms(ours)
    assert not any(isinstance(m, CompiledRMSNorm) for m in ours.modules())


def test_fp32_model_is_not_prepacked(models):
    ours, _ = models
    assert not prepack_linear_weights(ours)
    assert not any(isinstance(m, PrepackedLinear) for m in ours.modules())


def test_fused_rope_is_the_eager_rotation_bit_for_bit(tmp_path):
    """compile_ropes gives a bf16 CPU model's attention layers a compiled rotation that rounds as eager does: the
    same bits for prefill-sized inputs (compiled) and decode steps (eager), and the same logits; fp32 models are left
    as they are."""
    from lynx.generate import FUSED_ROPE_MIN_TOKENS, FusedRope, compile_ropes
    from lynx.model import apply_rope, rope_cos_sin

    path = make_tiny_checkpoint(tmp_path / "tiny", seed=7)
    assert not compile_ropes(Llama.from_pretrained(path, dtype=torch.float32))
    plain = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    fused = Llama.from_pretrained(path, dtype=torch.bfloat16).eval()
    if not compile_ropes(fused):  # no native bf16 here: nothing replaced
        assert not can_prepack(fused) and all(layer.self_attn.rope is apply_rope for layer in fused.layers)
        return
    rope = fused.layers[0].self_attn.rope
    assert isinstance(rope, FusedRope) and all(layer.self_attn.rope is rope for layer in fused.layers)
    cfg = fused.config
    g = torch.Generator().manual_seed(0)
    for batch, length in ((1, 300), (3, 70), (8, 1)):
        assert (batch * length >= FUSED_ROPE_MIN_TOKENS) == (length > 1)
        x = (torch.randn(batch, length, cfg.num_attention_heads, cfg.head_dim, generator=g) * 4).bfloat16()
        cos, sin = rope_cos_sin(cfg, torch.arange(length).expand(batch, length) + 17, torch.bfloat16)
        assert torch.equal(rope(x, cos, sin), apply_rope(x, cos, sin))
    ids = torch.randint(3, 300, (2, 80), generator=g)
    with torch.no_grad():
        assert torch.equal(fused(ids), plain(ids))


def test_a_failing_compile_leaves_the_rotary_embeddings_eager_with_a_warning(models, monkeypatch):
    from lynx.generate import compile_ropes
    from lynx.model import apply_rope

    ours, _ = models
    monkeypatch.setattr(cpu_fast, "can_prepack", lambda model: True)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpu_fast, "compiled_rope", lambda: no_compiler)
    with pytest.warns(UserWarning, match=r"torch.compile failed .*; the rotary embeddings stay eager"):
        assert not compile_ropes(ours)
    assert all(layer.self_attn.rope is apply_rope for layer in ours.layers)
