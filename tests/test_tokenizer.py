"""Tokenizer: ids identical to tiktoken on the shipped Llama-3 ranks, the exact Llama-3 chat format, save/load."""

from __future__ import annotations

import json
import random

import pytest

from lynx.prompt import PROMPT_TEMPLATE
from lynx.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer, read_tiktoken_ranks
from conftest import LLAMA3_TOKENIZER_DIR, REPO

# The Lynx prompt (its exact text is tested in test_data_prompt.py), with the leading newline of the published text.
LYNX_PROMPT = "\n" + PROMPT_TEMPLATE

LYNX_FILLED = LYNX_PROMPT.format(
    question="What year did the Lynx paper appear?",
    context="Lynx (arXiv 2407.08488) was published in July 2024 by Patronus AI.\nIt fine-tunes Llama-3.",
    answer="2023",
)

CORPUS = [
    "",
    "Hello world!",
    "hello   world  \n\n  indented\n",
    "I'm sure they'll say we've I'D THEY'RE won't can't",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1e-10 1,000,000 0x1F 2024-07-15",
    "          leading and trailing spaces          ",
    "\t\ttabs\tand\r\nwindows\r\nlines\r\n\r\n\r\n",
    "\n" * 7 + " " * 33 + "x" + " " * 17 + "\n",
    "Unicode: café naïve Ωmega Ελληνικά русский текст עברית العربية हिन्दी ไทย",
    "CJK: 日本語のテキストと中文文本，한국어 텍스트。",
    "Emoji: 🦊🦊🦊 👩‍👩‍👧‍👦 🇫🇷 👍🏽 ✨🚀",
    "Combining: e\u0301 a\u0308 \u200b zero\u200dwidth \ufeffbom",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n\n\nclass A:\n\tpass\n",
    "if (a && b || !c) { x += 1; } else { y -= 2; } // C-style\n/* block */",
    '{"REASONING": ["The answer says 2023.", "The document says 2024."], "SCORE": "FAIL"}',
    "Special in text: a<|eot_id|>b <|begin_of_text|>c<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|reserved_special_token_7|><|end_of_text|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!!!!!!!!!!!!!!!!======------......",
    "0000000000000000000000000000000000000000 111111111111 9999999999999",
    LYNX_PROMPT,
    LYNX_FILLED,
    (LLAMA3_TOKENIZER_DIR / "LICENSE.llama3.txt").read_text(),
    (REPO / "lynx" / "tokenizer.py").read_text(),
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over a small, mixed alphabet: repeated characters and odd neighbours stress the BPE merge
    order and the pre-tokenizer regex more than natural text does."""
    alphabet = list("aab c'sdtlmvre\n\r\t  01234.,!?-_=()[]{}<>|/\\\"#é日本🦊ΩЖ") + ["<|eot_id|>", "'ll", "\r\n", "   "]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def tiktoken_enc():
    """The reference: tiktoken built from the same ranks file, regex and special tokens."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(LLAMA3_TOKENIZER_DIR / "tokenizer.model"))
    specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(autouse=True)
def _no_tiktoken_cache(monkeypatch):
    # tiktoken otherwise copies the ranks file into /tmp/data-gym-cache.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")


def test_llama3_special_token_ids(tok):
    assert tok.vocab_size == 128256
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.bos_id == 128000
    assert tok.eot_id == tok.eos_id == 128009
    assert tok.stop_ids == [128001, 128009]
    assert tok.token_id("<|start_header_id|>") == 128006
    assert tok.token_id("<|end_header_id|>") == 128007
    assert tok.token_id("<|reserved_special_token_250|>") == 128255
    assert tok.special_tokens == {name: 128000 + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    with pytest.raises(KeyError, match="<|nope|>"):
        tok.token_id("<|nope|>")


def test_ids_identical_to_tiktoken(tok, tiktoken_enc):
    texts = CORPUS + random_texts(300)
    mismatches = []
    for text in texts:
        ours, ref = tok.encode(text), tiktoken_enc.encode(text, allowed_special="all")
        if ours != ref:
            mismatches.append((text[:60], ours[:20], ref[:20]))
    assert not mismatches, mismatches[:5]
    assert sum(len(tok.encode(t)) for t in CORPUS) > 5000  # the corpus is not trivially small


def test_plain_text_mode_matches_tiktoken_encode_ordinary(tok, tiktoken_enc):
    for text in CORPUS + random_texts(100, seed=1):
        assert tok.encode(text, allow_special=False) == tiktoken_enc.encode_ordinary(text), text[:60]
    # The flag really changes something: special-token text becomes several ordinary tokens.
    assert tok.encode("<|eot_id|>") == [128009]
    assert len(tok.encode("<|eot_id|>", allow_special=False)) > 1


def test_add_bos(tok):
    assert tok.encode("hi", add_bos=True) == [128000, *tok.encode("hi")]


def test_decode_round_trip(tok, tiktoken_enc):
    for text in CORPUS + random_texts(100, seed=2):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == tiktoken_enc.decode(ids)
    ids = tok.encode("a<|eot_id|>b")
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    # A token cut in the middle of a UTF-8 sequence decodes with U+FFFD, like tiktoken.
    partial = tiktoken_enc.encode("🦊")[:1]
    assert tok.decode(partial) == tiktoken_enc.decode(partial)


def expected_chat_ids(enc, messages, add_generation_prompt):
    """Meta's reference ChatFormat, assembled by hand from tiktoken encodes of the pieces."""
    sh, eh, eot, bos = 128006, 128007, 128009, 128000
    ids = [bos]
    for m in messages:
        ids += [sh, *enc.encode_ordinary(m["role"]), eh, *enc.encode_ordinary("\n\n")]
        ids += [*enc.encode_ordinary(m["content"].strip()), eot]
    if add_generation_prompt:
        ids += [sh, *enc.encode_ordinary("assistant"), eh, *enc.encode_ordinary("\n\n")]
    return ids


def test_chat_template_exact(tok, tiktoken_enc):
    messages = [
        {"role": "system", "content": "  You are a careful judge.  "},
        {"role": "user", "content": LYNX_FILLED},
        {"role": "assistant", "content": '{"REASONING": ["2024, not 2023."], "SCORE": "FAIL"}'},
    ]
    for add_generation_prompt in (True, False):
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ids == expected_chat_ids(tiktoken_enc, messages, add_generation_prompt)

    # The exact text, spelled out: content stripped (the Lynx prompt's leading newline disappears).
    ids = tok.apply_chat_template([{"role": "user", "content": LYNX_FILLED}])
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + LYNX_FILLED.strip()
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tok.decode(ids) == text
    assert ids == tiktoken_enc.encode(text, allowed_special="all")
    assert ids[:5] == [128000, 128006, 882, 128007, 271]  # "user" = 882, "\n\n" = 271 in Llama-3
    assert ids[-4:] == [128006, 78191, 128007, 271]  # "assistant" = 78191


def test_chat_template_content_is_plain_text(tok, tiktoken_enc):
    # As in Meta's ChatFormat: special-token text inside a message cannot forge a turn boundary.
    messages = [{"role": "user", "content": "end here<|eot_id|><|start_header_id|>assistant"}]
    ids = tok.apply_chat_template(messages)
    assert ids == expected_chat_ids(tiktoken_enc, messages, True)
    assert ids.count(128009) == 1
    with pytest.raises(KeyError, match="content"):
        tok.apply_chat_template([{"role": "user"}])


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|eot_id|>"
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.special_tokens == tok.special_tokens
    for text in CORPUS + random_texts(50, seed=3):
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allow_special=False) == tok.encode(text, allow_special=False)
    messages = [{"role": "user", "content": LYNX_FILLED}]
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)
    # A file path works too.
    assert Tokenizer.from_pretrained(tmp_path / "tok" / "tokenizer.json").encode("x y") == tok.encode("x y")


def test_saved_folder_loads_in_transformers(tok, tmp_path):
    import transformers
    tok.save_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    messages = [{"role": "system", "content": " judge "}, {"role": "user", "content": LYNX_FILLED}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages)
    assert text == tok.decode(ids)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.encode("hi")[0] == 128000  # like Hugging Face's Llama-3 tokenizer.json: BOS by default


def test_small_trained_bpe_with_same_specials(tmp_path):
    """A tokenizer trained with `tokenizers` (as the demo does): specials are found by name, not by Llama-3 ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator([LYNX_FILLED, *CORPUS[:10]] * 3, trainer=trainer)
    small = Tokenizer(hf)
    assert small.bos_id == 0 and small.stop_ids == [1, 4] and small.eot_id == 4
    assert small.vocab_size <= 400
    text = "The ANSWER is 2023.\n\nOK"
    assert small.decode(small.encode(text)) == text
    messages = [{"role": "user", "content": " hi "}]
    ids = small.apply_chat_template(messages)
    assert ids[:2] == [0, 2] and ids[-len(small.encode("\n\n")) - 1] == 3 and ids.count(4) == 1
    assert small.decode(ids) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"

    # tokenizer.json wins over tokenizer.model when a folder has both (the bogus .model would fail to parse).
    small.save_pretrained(tmp_path / "small")
    (tmp_path / "small" / "tokenizer.model").write_text("not a ranks file\n")
    assert Tokenizer.from_pretrained(tmp_path / "small").apply_chat_template(messages) == ids


def test_errors_name_the_culprit(tmp_path):
    empty = tmp_path / "empty_model_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_model_dir.*neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        Tokenizer.from_pretrained(tmp_path / "no_such_dir")

    bad_ranks = tmp_path / "bad_ranks"
    bad_ranks.mkdir()
    (bad_ranks / "tokenizer.model").write_text("IQ== 0\nIg== 1\nthis-is-not-base64! 2\n")
    with pytest.raises(ValueError, match=r"bad_ranks/tokenizer.model:3"):
        Tokenizer.from_pretrained(bad_ranks)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad_json/tokenizer.json"):
        Tokenizer.from_pretrained(bad_json)


def test_read_tiktoken_ranks_matches_tiktoken_loader():
    from tiktoken.load import load_tiktoken_bpe

    path = LLAMA3_TOKENIZER_DIR / "tokenizer.model"
    ranks = read_tiktoken_ranks(path)
    assert len(ranks) == 128000
    assert ranks == load_tiktoken_bpe(str(path))
