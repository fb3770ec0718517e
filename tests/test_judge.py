"""The judge: output parsing, p_pass against direct forward passes, long-input policy, model/tokenizer loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lynx.judge as judge_mod
from lynx.generate import GenerationResult
from lynx.judge import FAST_PREFIX, Judge, parse_output, resolve_model_dir, score_step
from lynx.prompt import TRUNCATION_MARKER, format_prompt
from lynx.tokenizer import Tokenizer
from tests.conftest import make_tiny_checkpoint

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TINY_VOCAB = 400


def train_tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE with Llama-3's special-token names, trained on the judge prompt (seconds, no download)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [format_prompt("What is the capital of France?", "Paris is the capital of France.", "Paris"),
              '{"REASONING": ["The document says so."], "SCORE": "PASS"}', '"SCORE": "FAIL"'] * 5
    hf.train_from_iterator(corpus, trainer=trainer)
    return Tokenizer(hf)


def make_tiny_judge_dir(path: Path, seed: int = 0) -> Path:
    """A random tiny Llama checkpoint that carries its own tiny tokenizer: what `judge.py --model` expects."""
    make_tiny_checkpoint(path, seed=seed, vocab_size=TINY_VOCAB)
    train_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    return make_tiny_judge_dir(tmp_path_factory.mktemp("judge") / "tiny")


@pytest.fixture(scope="module")
def judge(judge_dir) -> Judge:
    return Judge(judge_dir, max_new_tokens=8, device="cpu")


EXAMPLES = [
    ("Who wrote it?", "The book was written by Ann Lee in 1990. " * 3, "Ann Lee"),
    ("When?", "It happened in 1990.", "In 1991"),
    ("What colour is the sky?", "The sky is blue on clear days, grey when cloudy.", "Blue"),
]


# --- parse_output ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, score, reasoning",
    [
        ('{"REASONING": ["a", "b"], "SCORE": "PASS"}', "PASS", ["a", "b"]),
        ('Sure, here it is:\n```json\n{"REASONING": ["The doc says 1990."], "SCORE": "FAIL"}\n```\nDone.',
         "FAIL", ["The doc says 1990."]),
        ("{'REASONING': ['It's in the text', 'ok'], 'SCORE': 'PASS'}", "PASS", ["It's in the text", "ok"]),
        ('{"REASONING": ["x", "y", "SCORE": "PASS"}', "PASS", ["x", "y"]),  # missing ]
        ('{"REASONING": ["x"], "SCORE": "PASS"', "PASS", ["x"]),  # missing }
        ('{"reasoning": ["fine"], "score": "pass"}', "PASS", ["fine"]),
        ('{"REASONING": ["bad"], "SCORE": fail}', "FAIL", ["bad"]),
        ('{"REASONING": "one string", "SCORE": "Fail"}', "FAIL", ["one string"]),
        ('{"REASONING": ["say \\"no\\" twice"], "SCORE": "FAIL"}', "FAIL", ['say "no" twice']),
        ("REASONING:\n- first point\n- second point\nSCORE: PASS", "PASS", ["first point", "second point"]),
        ('{"REASONING": ["The document says', None, ["The document says"]),  # cut by max_new_tokens
        ('{"REASONING": ["unsure"], "SCORE": "MAYBE"}', None, ["unsure"]),
        ("I cannot tell.", None, []),
        ("", None, []),
    ],
)
def test_parse_output_messy_strings(text, score, reasoning):
    parsed = parse_output(text)
    assert parsed.score == score
    assert parsed.reasoning == reasoning
    assert tuple(parsed) == (score, reasoning)


def test_parse_output_agrees_with_published_regex_on_clean_output():
    text = 'x {"REASONING": ["a [b]"], "SCORE": "FAIL"} {"SCORE": "PASS"}'
    published = re.search(r'"SCORE":\s*"(\w+)"', text).group(1)
    assert parse_output(text).score == published == "FAIL"
    assert parse_output(text).reasoning == ["a [b]"]


# --- p_pass ---------------------------------------------------------------------------------------------------------


def first_token_sets(tok: Tokenizer):
    """Independent of ScoreTokens: first tokens of the PASS and FAIL spellings when the word starts a token."""
    pass_ids = {tok.encode(w)[0] for w in ("PASS", "Pass", "pass")}
    fail_ids = {tok.encode(w)[0] for w in ("FAIL", "Fail", "fail")}
    return sorted(pass_ids), sorted(fail_ids)


def reference_p_pass(logits: torch.Tensor, pass_ids, fail_ids) -> float:
    probs = torch.softmax(logits.double(), dim=-1)
    p, f = probs[pass_ids].sum(), probs[fail_ids].sum()
    return float(p / (p + f))


def test_fast_mode_p_pass_matches_direct_forward(judge):
    tok = judge.tokenizer
    pass_ids, fail_ids = first_token_sets(tok)
    verdicts = judge.judge_batch(EXAMPLES, fast=True, batch_size=3)
    for (q, c, a), v in zip(EXAMPLES, verdicts):
        ids = tok.apply_chat_template([{"role": "user", "content": format_prompt(q, c, a)}])
        ids += tok.encode(FAST_PREFIX)
        with torch.no_grad():
            logits = judge.model(torch.tensor([ids]))[0, -1]
        expected = reference_p_pass(logits, pass_ids, fail_ids)
        assert v.p_pass == pytest.approx(expected, abs=1e-5)
        word = "PASS" if expected >= 0.5 else "FAIL"
        assert v.score == word and v.reasoning == []
        assert v.raw == '{"REASONING": [], "SCORE": "' + word + '"}'  # the forced prefix, the word, the close
        assert v.prompt_tokens == len(ids)
    # Batched (left padded) equals one at a time.
    single = judge.judge(*EXAMPLES[1], fast=True)
    assert single.p_pass == pytest.approx(verdicts[1].p_pass, abs=1e-5)


def test_fast_mode_p_pass_in_bf16_reads_the_score_logits_in_float32(judge_dir):
    """In bf16, logits near 20 are 0.125 apart, so two answers a fact apart would often tie; fast mode computes the
    PASS and FAIL logits as float32 products of the final hidden state (captured here) and those rows of the head."""
    bf16 = Judge(judge_dir, dtype=torch.bfloat16, max_new_tokens=8, device="cpu")
    pass_ids, fail_ids = bf16.fast_score_ids
    hidden = []
    hook = bf16.model.head.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    verdicts = bf16.judge_batch(EXAMPLES, fast=True, batch_size=3)
    hook.remove()
    assert len(hidden) == 2  # the shared prefix's pass (prefix_kv_caches), then one packed pass of the three
    h = hidden[1].reshape(-1, hidden[1].shape[-1]).float()  # the read positions, in packing order
    assert h.shape[0] == len(EXAMPLES)
    expected = [reference_p_pass(row, pass_ids, fail_ids) for row in h @ bf16.model.head.lm_head.weight.float().T]
    assert sorted(v.p_pass for v in verdicts) == pytest.approx(sorted(expected), abs=1e-6)


@pytest.mark.parametrize("word", ["FAIL", "pass"])
def test_full_mode_p_pass_reads_the_score_step(judge, monkeypatch, word):
    """Feed a known completion through the judge's full mode (generation replaced by teacher forcing with the real
    model's logits) and compare p_pass with the softmax at the position that produced the score word."""
    tok = judge.tokenizer
    completion = tok.encode('{"REASONING": ["The year differs."], "SCORE": "' + word + '"}')
    q, c, a = EXAMPLES[1]
    prompt, _ = judge.prompt_ids(q, c, a)
    with torch.no_grad():  # row t chose completion[t]
        logits = judge.model(torch.tensor([prompt + completion]))[0, len(prompt) - 1 : -1]
    watch = judge.score_tokens.watch_ids

    def fake_generation(model, prompts, **kwargs):
        assert prompts == [prompt] and kwargs["watch_ids"] == watch
        return GenerationResult([completion], [True], [logits[:, watch]])

    monkeypatch.setattr(judge_mod, "run_generation", fake_generation)
    v = judge.judge(q, c, a)
    step, joined = score_step(tok, completion)
    assert joined == "" and tok.decode(completion[step:]).startswith(word[0])
    pass_ids, fail_ids = first_token_sets(tok)
    assert v.score == word.upper() and v.reasoning == ["The year differs."]
    assert v.p_pass == pytest.approx(reference_p_pass(logits[step], pass_ids, fail_ids), abs=1e-6)


def test_score_step_handles_a_word_joined_to_a_space():
    tok = Tokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "lynx" / "assets" / "llama3")
    tokens = tok.encode('{"REASONING": [], "SCORE": PASS}')
    step, joined = score_step(tok, tokens)
    assert tok.decode([tokens[step]]) == " PASS" and joined == " "
    tokens = tok.encode('{"REASONING": [], "SCORE": "FAIL"}')
    step, joined = score_step(tok, tokens)
    assert tok.decode([tokens[step]]) == "FAIL" and joined == ""
    assert score_step(tok, tok.encode("no verdict here")) is None


def reference_greedy(model, prompt: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy decoding the slow way: a full forward pass over the whole sequence per new token, no cache, no
    padding. Returns the new tokens, stop token excluded."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token in stop_ids:
            break
        ids.append(token)
    return ids[len(prompt):]


def test_full_mode_end_to_end_matches_plain_greedy_decoding(judge):
    """The raw completion of each example (batched with left padding and the KV cache, two to a batch) is the
    decoding of a cache-free greedy loop run on that example alone."""
    verdicts = judge.judge_batch(EXAMPLES, batch_size=2)
    for v, (q, c, a) in zip(verdicts, EXAMPLES):
        prompt, _ = judge.prompt_ids(q, c, a)
        tokens = reference_greedy(judge.model, prompt, judge.max_new_tokens, judge.tokenizer.stop_ids)
        assert v.raw == judge.tokenizer.decode(tokens)
        assert v.prompt_tokens == len(prompt) and v.skipped is None and not v.truncated
        if v.score is None:  # no score word generated: nothing to read p_pass from
            assert v.p_pass is None


# --- long inputs, loading -------------------------------------------------------------------------------------------


def test_long_document_is_truncated_in_the_middle(judge_dir):
    q, a = "Which city?", "Paris"
    limit = len(Judge(judge_dir, max_new_tokens=8, device="cpu").prompt_ids(q, "short", a)[0]) + 100
    j = Judge(judge_dir, max_new_tokens=8, max_input_tokens=limit, device="cpu")
    document = "START " + " ".join(f"filler{i}" for i in range(400)) + " END"
    ids, truncated = j.prompt_ids(q, document, a)
    assert truncated and limit - 10 <= len(ids) <= limit
    text = j.tokenizer.decode(ids)
    assert TRUNCATION_MARKER.strip() in text and "START" in text and "END" in text
    v = j.judge(q, document, a, fast=True)
    assert v.truncated and v.prompt_tokens <= limit + len(j.fast_prefix_ids) and v.score in ("PASS", "FAIL")

    skipper = Judge(judge_dir, max_new_tokens=8, max_input_tokens=limit, long_inputs="skip", device="cpu")
    v = skipper.judge(q, document, a)
    assert v.score is None and v.p_pass is None and f"max_input_tokens={limit}" in v.skipped
    # A question that alone exceeds the budget cannot be truncated: skipped, never a crash.
    v = j.judge(" ".join(["why"] * limit), "short", a)
    assert v.skipped and v.score is None
    assert j.judge(q, "short", a).skipped is None


def test_loading_errors_are_clear(judge_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        resolve_model_dir("PatronusAI/Llama-3-Patronus-Lynx-8B-Instruct")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_dir(tmp_path / "nope" / "deeper" / "x")
    with pytest.raises(ValueError, match="long_inputs"):
        Judge(judge_dir, long_inputs="drop")


def test_hub_id_resolves_from_local_cache(judge_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-lynx"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(judge_dir, target_is_directory=True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("someorg/tiny-lynx").resolve() == judge_dir.resolve()


def test_tokenizer_fallback_is_llama3_and_checked_against_the_model(tmp_path):
    bare = make_tiny_checkpoint(tmp_path / "bare", vocab_size=TINY_VOCAB)  # no tokenizer files
    with pytest.raises(ValueError, match="wrong tokenizer"):
        Judge(bare, max_new_tokens=8)


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_upcasts_bf16_checkpoints_only_on_cpus_without_native_bf16(judge_dir, tmp_path, monkeypatch,
                                                                              stored, native):
    import json

    config = json.loads((judge_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": stored, "torch_dtype": stored}))
    monkeypatch.setattr(judge_mod, "bf16_is_native", lambda device: native)
    expected = torch.float32 if stored == "bfloat16" and not native else None  # None: the checkpoint's own dtype
    assert judge_mod.auto_dtype(tmp_path, torch.device("cpu")) is expected
    assert judge_mod.auto_dtype(tmp_path, torch.device("cuda")) is torch.bfloat16

