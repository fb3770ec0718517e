"""Llama-3 tokenizer: a `tokenizers` byte-level BPE, loaded from tokenizer.json or built from Meta's tiktoken file.

Meta ships Llama-3's BPE as a tiktoken ranks file (`tokenizer.model`: `<base64 token> <rank>` per line). tiktoken
merges, inside each regex pre-token, the adjacent pair whose concatenation has the lowest rank. A `tokenizers` BPE
does the same when every pair (a, b) whose concatenation is a token gets the priority rank(a + b); with
`ignore_merges=True` a pre-token that is itself a token is emitted whole, as tiktoken does. So we rebuild the exact
tokenizer in code (tests check ids against tiktoken) and need no second copy of the vocabulary in the repo.

Special tokens are looked up by name, never by hard-coded id, so a small BPE trained with `tokenizers` that uses
the same special-token names and chat format works unchanged.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"

# Llama-3 pre-tokenizer regex (meta-llama/llama3 llama/tokenizer.py `pat_str`; see assets/llama3/SOURCES.md).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"

# The 256 Llama-3 special tokens, in id order after the 128,000 BPE ranks (Llama 3.0 names, as in the tokenizer of
# Meta-Llama-3-8B/70B-Instruct, the Lynx base models; Llama 3.1 renames some reserved slots, same ids for chat).
LLAMA3_SPECIAL_TOKENS = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    START_HEADER,
    END_HEADER,
    "<|reserved_special_token_4|>",
    EOT,
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]

# Hugging Face chat template producing the same text as `apply_chat_template` (written into tokenizer_config.json
# so transformers' AutoTokenizer renders the same prompt from a folder we saved).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies (tokenizer.json spells every
    token with these characters). Printable Latin-1 bytes map to themselves, the rest to chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, n = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file (`<base64 token> <rank>` per line) -> {token bytes: rank}."""
    path = Path(path)
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken '<base64 token> <rank>' line: {line[:80]!r}") from e
    return ranks


def bpe_from_tiktoken_ranks(ranks: dict[bytes, int], pattern: str, special_tokens: list[str]) -> HFTokenizer:
    """Build a byte-level `tokenizers` BPE that tokenizes exactly like tiktoken with these ranks and specials.

    Merges: for every multi-byte token, each split into two tokens is a merge, and merges are ordered by the rank of
    the token they produce (splits of one token ordered by the ranks of their pieces). Special tokens get ids
    len(ranks), len(ranks) + 1, ... in list order, as tiktoken's Llama-3 loader assigns them."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks must be exactly 0..N-1")
    # bytes -> byte-level spelling; latin-1 maps byte b to chr(b), translate then maps chr(b) to its printable char.
    table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
    spelling = {token: token.decode("latin-1").translate(table) for token in ranks}
    vocab = {spelling[token]: rank for token, rank in ranks.items()}
    merges = []  # (rank of the merged token, rank of left piece, rank of right piece, left, right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left = token[:cut]
            left_rank = ranks.get(left)
            if left_rank is not None:
                right = token[cut:]
                right_rank = ranks.get(right)
                if right_rank is not None:
                    merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    first_special = len(ranks)
    for i, name in enumerate(special_tokens):
        vocab[name] = first_special + i

    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(spelling[left], spelling[right]) for _, _, _, left, right in merges],
            ignore_merges=True,  # a pre-token that is a whole token is emitted as is, like tiktoken
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # The specials are already in the vocabulary at their ids; registering them makes encode split them out of text.
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens])
    if BEGIN_OF_TEXT in special_tokens:
        # Like Hugging Face's Llama-3 tokenizer.json: AutoTokenizer(text) starts with <|begin_of_text|>.
        # Our own encode never uses the post-processor (BOS is explicit: add_bos).
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BEGIN_OF_TEXT} $A", pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
            special_tokens=[(BEGIN_OF_TEXT, vocab[BEGIN_OF_TEXT])],
        )
    return tok


class Tokenizer:
    """Token ids <-> text, and the Llama-3 chat format.

    Special tokens in text: `encode(text)` turns the text of a special token (e.g. "<|eot_id|>") into that token,
    like tiktoken's `encode(text, allowed_special="all")`; `encode(text, allow_special=False)` encodes it as plain
    text, like tiktoken's `encode_ordinary`. `apply_chat_template` encodes roles and message contents as plain text,
    as Meta's reference ChatFormat does, so a document containing "<|eot_id|>" cannot end a turn early.
    """

    def __init__(self, hf_tokenizer: HFTokenizer):
        self.hf = hf_tokenizer
        self._hf_plain = None  # a copy that encodes special-token text as plain text; built on first use
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in sorted(hf_tokenizer.get_added_tokens_decoder().items()) if t.special
        }

    # --- loading and saving -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load `tokenizer.json` from a directory, or build the BPE from Meta's `tokenizer.model` when the directory
        has only that (Llama-3 regex and special tokens). `path` may also name either file directly."""
        path = Path(path)
        if path.is_file():
            json_file = path if path.suffix == ".json" else None
            model_file = None if json_file else path
        elif path.is_dir():
            json_file = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None
            model_file = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
        else:
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if json_file is not None:
            try:
                return cls(HFTokenizer.from_file(str(json_file)))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ValueError(f"{json_file}: cannot load tokenizer.json ({e})") from e
        if model_file is not None:
            ranks = read_tiktoken_ranks(model_file)
            return cls(bpe_from_tiktoken_ranks(ranks, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS))
        raise FileNotFoundError(f"no tokenizer in {path}: neither tokenizer.json nor tokenizer.model")

    @classmethod
    def llama3(cls) -> "Tokenizer":
        """The Llama-3 tokenizer shipped in lynx/assets/llama3 (Meta's tiktoken ranks, with its license)."""
        return cls.from_pretrained(ASSETS / "llama3")

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json (special tokens, chat template) so a model folder carries
        its tokenizer; both this class and transformers' AutoTokenizer load the folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if BEGIN_OF_TEXT in self.special_tokens:
            config["bos_token"] = BEGIN_OF_TEXT
        if EOT in self.special_tokens:
            config["eos_token"] = EOT
        if all(t in self.special_tokens for t in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)):
            config["chat_template"] = CHAT_TEMPLATE
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # --- special tokens -----------------------------------------------------------------------------------------

    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|eot_id|>"."""
        if name not in self.special_tokens:
            known = ", ".join(list(self.special_tokens)[:12])
            raise KeyError(f"special token {name!r} not in this tokenizer (it has: {known}{', ...' if len(self.special_tokens) > 12 else ''})")
        return self.special_tokens[name]

    @property
    def bos_id(self) -> int:
        return self.token_id(BEGIN_OF_TEXT)

    @property
    def eot_id(self) -> int:
        """End of a chat turn: what an instruct model emits when its answer is done."""
        return self.token_id(EOT)

    eos_id = eot_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: <|end_of_text|> and <|eot_id|>."""
        return [self.token_id(END_OF_TEXT), self.token_id(EOT)]

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    # --- text <-> ids -------------------------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = True) -> list[int]:
        """Text -> ids. `allow_special`: special-token text becomes the special token (tiktoken
        `allowed_special="all"`) or, when False, is encoded as plain text (tiktoken `encode_ordinary`)."""
        if allow_special:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        else:
            if self._hf_plain is None:
                self._hf_plain = HFTokenizer.from_str(self.hf.to_str())
                self._hf_plain.encode_special_tokens = True
            ids = self._hf_plain.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Ids -> text (invalid UTF-8 from partial tokens becomes U+FFFD, as in tiktoken)."""
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # --- chat format (Meta's reference ChatFormat) ----------------------------------------------------------------

    def encode_header(self, role: str) -> list[int]:
        """<|start_header_id|>{role}<|end_header_id|>\\n\\n"""
        return [
            self.token_id(START_HEADER),
            *self.encode(role, allow_special=False),
            self.token_id(END_HEADER),
            *self.encode("\n\n", allow_special=False),
        ]

    def encode_message(self, message: dict) -> list[int]:
        """Header, then the stripped content, then <|eot_id|>."""
        for key in ("role", "content"):
            if key not in message:
                raise KeyError(f"chat message lacks {key!r}: {message!r}")
        content = self.encode(message["content"].strip(), allow_special=False)
        return [*self.encode_header(message["role"]), *content, self.eot_id]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Llama-3 chat ids: <|begin_of_text|>, each message, then (optionally) the assistant header that the model
        continues from."""
        ids = [self.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids
