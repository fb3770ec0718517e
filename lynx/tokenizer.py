"""Tokenizers for every checkpoint lynx reads: tokenizer.json, Meta's tiktoken file, or a GGUF file's metadata; and
each checkpoint's own chat template.

Meta ships Llama-3's BPE as a tiktoken ranks file (`tokenizer.model`: `<base64 token> <rank>` per line). tiktoken
merges, inside each regex pre-token, the adjacent pair whose concatenation has the lowest rank. A `tokenizers` BPE
does the same when every pair (a, b) whose concatenation is a token gets the priority rank(a + b); with
`ignore_merges=True` a pre-token that is itself a token is emitted whole, as tiktoken does. So we rebuild the exact
tokenizer in code (tests check ids against tiktoken) and need no second copy of the vocabulary in the repo.

GGUF files carry a byte-level BPE as metadata (`tokenizer.ggml.tokens`, `merges`, `token_type`, `pre`); we rebuild it
with `tokenizers`, with the pre-tokenizer llama.cpp uses for that `pre` name.

Chat templates are rendered with jinja2 the way transformers renders them (sandboxed, `trim_blocks`,
`lstrip_blocks`, `raise_exception`, `bos_token`/`eos_token`, `add_generation_prompt`), then tokenized with special
tokens recognised. Only Meta's bare tiktoken file, which has no template, gets the built-in Llama-3 format (Meta's
reference ChatFormat, which encodes message contents as plain text).
"""

from __future__ import annotations

import base64
import functools
import json
from datetime import datetime
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



# llama.cpp's pre-tokenizers (its llama-vocab.cpp) for the GGUF `tokenizer.ggml.pre` names we support, as `tokenizers`
# pre-tokenizers. "smollm" splits every digit on its own, then applies GPT-2's byte-level regex (SmolLM2's own
# tokenizer.json has the same Digits(individual_digits) + ByteLevel pair).
def _gguf_pre_tokenizer(pre: str):
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    return None


GGUF_PRE_TOKENIZERS = ("llama-bpe", "smollm")
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED = 1, 3, 4, 5  # llama.cpp's types


def gguf_tokenizer_parts(path: str | Path) -> dict:
    """The tokenizer stored in a GGUF file's metadata: {hf, chat_template, bos_token, eos_token, pad_token}
    (see tokenizer_parts_from_gguf)."""
    from gguf import GGUFReader

    from lynx.weights.gguf_read import read_field  # the gguf library only for GGUF files

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct.error/... on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return tokenizer_parts_from_gguf(functools.partial(read_field, reader), str(path))


def tokenizer_parts_from_gguf(field, source: str) -> dict:
    """The tokenizer in GGUF metadata, `field(key, default)` giving each value (a file's reader, or the dict the
    GGUF writer is about to write): {hf, chat_template, bos_token, eos_token, pad_token}.

    Only byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2") with a pre-tokenizer of GGUF_PRE_TOKENIZERS;
    anything else is a ValueError naming the source and the value."""
    path = source
    model = field("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is absent)")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; lynx reads byte-level BPE ('gpt2') only")
    pre = field("tokenizer.ggml.pre", "default")
    pre_tokenizer = _gguf_pre_tokenizer(pre)
    if pre_tokenizer is None:
        raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges")
    if tokens is None or merges is None:
        missing = [k for k, v in (("tokens", tokens), ("merges", merges)) if v is None]
        raise ValueError(f"{path}: GGUF tokenizer lacks tokenizer.ggml.{'/'.join(missing)}")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)

    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                merges=[tuple(m.split(" ", 1)) for m in merges],
                                ignore_merges=pre == "llama-bpe"))  # Llama-3 (tiktoken) emits whole-token pre-tokens
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED])

    def token(key):
        i = field(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return {"hf": hf, "chat_template": field("tokenizer.chat_template"), "bos_token": token("bos"),
            "eos_token": token("eos"), "pad_token": token("padding")}


# Text on which llama.cpp's pre-tokenizers differ (digit runs, contractions, spaces, newlines, non-Latin letters):
# a checkpoint's pre-tokenizer that splits it as one of ours is that one.
PRE_TOKENIZER_PROBE = ("Hello world! It's 2024: 1234567 apples, I'LL pay $3.50... don't  stop\n\n\t  Ünïcödé "
                       "中文字符 🙂🙂 x=y+1;  \r\n end")


def gguf_pre_name(hf: HFTokenizer) -> str | None:
    """The GGUF `tokenizer.ggml.pre` name whose pre-tokenizer (as this module rebuilds it) splits
    PRE_TOKENIZER_PROBE exactly as `hf`'s does; None when none does."""
    if hf.pre_tokenizer is None:
        return None
    pieces = [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str(PRE_TOKENIZER_PROBE)]
    for name in GGUF_PRE_TOKENIZERS:
        if [piece for piece, _ in _gguf_pre_tokenizer(name).pre_tokenize_str(PRE_TOKENIZER_PROBE)] == pieces:
            return name
    return None


def gguf_tokenizer_metadata(tokenizer: "Tokenizer", vocab_size: int) -> dict:
    """The GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`) of `tokenizer` for a model of
    `vocab_size` embedding rows, as llama.cpp's convert_hf_to_gguf.py writes a byte-level BPE: tokens in id order
    (ids the tokenizer lacks become "[PAD<id>]" of type UNUSED), special added tokens CONTROL, other added tokens
    USER_DEFINED, merges as "left right". The inverse of tokenizer_parts_from_gguf; a ValueError names what a GGUF
    file cannot express (another model type, a normalizer, a pre-tokenizer llama.cpp has no name for, more tokens
    than the model has rows)."""
    hf, source = tokenizer.hf, tokenizer.source
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{source}: only byte-level BPE tokenizers can be written to GGUF (model "
                         f"{model.get('type')!r}, decoder {(spec.get('decoder') or {}).get('type')!r})")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{source}: the tokenizer has a normalizer ({spec['normalizer'].get('type')}), which "
                         "llama.cpp's byte-level BPE does not apply")
    pre = gguf_pre_name(hf)
    if pre is None:
        raise ValueError(f"{source}: the tokenizer's pre-tokenizer splits text like none of llama.cpp's "
                         f"{', '.join(GGUF_PRE_TOKENIZERS)}")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}")
    by_id = {i: t for t, i in hf.get_vocab(with_added_tokens=True).items()}
    added = hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPE_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_TYPE_NORMAL if i not in added else
                         TOKEN_TYPE_CONTROL if added[i].special else TOKEN_TYPE_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, name in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("padding", tokenizer.pad_token)):
        if name:
            metadata[f"tokenizer.ggml.{key}_token_id"] = hf.token_to_id(name)
    if tokenizer.bos_token:
        # llama.cpp adds BOS to a prompt when this is true: when the tokenizer's own post-processor does (Llama-3).
        metadata["tokenizer.ggml.add_bos_token"] = hf.encode("a").ids[:1] == [hf.token_to_id(tokenizer.bos_token)]
    if tokenizer.exported_chat_template:
        metadata["tokenizer.chat_template"] = tokenizer.exported_chat_template
    return metadata


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def compile_chat_template(template: str):
    """A jinja2 template compiled as transformers compiles chat templates."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Token ids <-> text, and the checkpoint's chat format.

    Special tokens in text: `encode(text)` turns the text of a special token (e.g. "<|eot_id|>") into that token,
    like tiktoken's `encode(text, allowed_special="all")`; `encode(text, allow_special=False)` encodes it as plain
    text, like tiktoken's `encode_ordinary`.

    chat_template: the checkpoint's jinja template, rendered as transformers does; None with the Llama-3 special
    tokens: the Llama-3 template (CHAT_TEMPLATE). meta_chat_format: the built-in Llama-3 format instead (Meta's
    ChatFormat: roles and contents encoded as plain text), for Meta's bare tiktoken file, which has no template.
    bos_token / eos_token / pad_token: special-token texts; for a tokenizer with the Llama-3 specials they default to
    <|begin_of_text|> / <|eot_id|> / the end-of-turn token. extra_stop_ids: more ids that end generation (a
    checkpoint's generation_config.json eos_token_id).
    """

    def __init__(self, hf_tokenizer: HFTokenizer, *, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, extra_stop_ids=(), source: str = "",
                 meta_chat_format: bool = False):
        self.hf = hf_tokenizer
        self._hf_plain = None  # a copy that encodes special-token text as plain text; built on first use
        self.special_tokens: dict[str, int] = {
            t.content: i for i, t in sorted(hf_tokenizer.get_added_tokens_decoder().items()) if t.special
        }
        self.source = source or "tokenizer"
        llama3 = all(t in self.special_tokens for t in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT))
        if meta_chat_format and not llama3:
            raise ValueError(f"{source}: the built-in Llama-3 chat format needs the Llama-3 special tokens")
        self.chat_template = None if meta_chat_format else chat_template or (CHAT_TEMPLATE if llama3 else None)
        self.bos_token = bos_token or (BEGIN_OF_TEXT if llama3 else None)
        self.eos_token = eos_token or (EOT if llama3 else None)
        self.pad_token = pad_token
        self.extra_stop_ids = [int(i) for i in extra_stop_ids]
        if self.chat_template is None and not meta_chat_format:
            self._no_template = f"{self.source}: no chat template (tokenizer_config.json chat_template, " \
                "chat_template.jinja or the GGUF key), and not the Llama-3 special tokens for the built-in format"
        else:
            self._no_template = None

    # --- loading and saving -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load a checkpoint's tokenizer: a directory with tokenizer.json (plus tokenizer_config.json,
        chat_template.jinja and generation_config.json when present), or with only Meta's `tokenizer.model`
        (Llama-3 regex, special tokens and chat format), or a GGUF file. `path` may also name tokenizer.json or
        tokenizer.model directly."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            parts = gguf_tokenizer_parts(path)
            return cls(parts.pop("hf"), source=str(path), **parts)
        if path.is_file():
            json_file = path if path.suffix == ".json" else None
            model_file = None if json_file else path
            folder = path.parent
        elif path.is_dir():
            json_file = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None
            model_file = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
            folder = path
        else:
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        if json_file is not None:
            try:
                hf = HFTokenizer.from_file(str(json_file))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ValueError(f"{json_file}: cannot load tokenizer.json ({e})") from e
            return cls(hf, source=str(folder), **_folder_settings(folder))
        if model_file is not None:
            ranks = read_tiktoken_ranks(model_file)
            hf = bpe_from_tiktoken_ranks(ranks, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS)
            return cls(hf, source=str(model_file), meta_chat_format=True)
        raise FileNotFoundError(f"no tokenizer in {path}: neither tokenizer.json nor tokenizer.model")

    @classmethod
    def llama3(cls) -> "Tokenizer":
        """The Llama-3 tokenizer shipped in lynx/assets/llama3 (Meta's tiktoken ranks, with its license)."""
        return cls.from_pretrained(ASSETS / "llama3")

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json and a tokenizer_config.json (special tokens, chat template) so a model folder carries
        its tokenizer; both this class and transformers' AutoTokenizer load the folder and render the same chat."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key in ("bos_token", "eos_token", "pad_token"):
            if getattr(self, key):
                config[key] = getattr(self, key)
        if self.exported_chat_template:
            config["chat_template"] = self.exported_chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @property
    def exported_chat_template(self) -> str | None:
        """The template a saved checkpoint carries: the checkpoint's own, or the Llama-3 template for Meta's
        built-in format (the same text for messages without special-token text in them)."""
        return self.chat_template or (None if self._no_template else CHAT_TEMPLATE)

    # --- special tokens -----------------------------------------------------------------------------------------

    def token_id(self, name: str) -> int:
        """Id of a special token by name, e.g. "<|eot_id|>"."""
        if name not in self.special_tokens:
            known = ", ".join(list(self.special_tokens)[:12])
            raise KeyError(f"special token {name!r} not in this tokenizer (it has: {known}{', ...' if len(self.special_tokens) > 12 else ''})")
        return self.special_tokens[name]

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token) if self.bos_token else None

    @functools.cached_property
    def eot_id(self) -> int:
        """End of a chat turn, what an instruct model emits when its answer is done: the first special token after
        an assistant message's content in the rendered template (<|eot_id|> for Llama-3, <|im_end|> for ChatML), or
        the eos token when the template puts none there."""
        if self._no_template is None:
            messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
            head = self.apply_chat_template(messages[:1], add_generation_prompt=True)
            turn = self.apply_chat_template(messages, add_generation_prompt=False)[len(head):]
            specials = set(self.special_tokens.values())
            for i in turn:
                if i in specials:
                    return i
        if self.eos_token:
            return self.token_id(self.eos_token)
        raise ValueError(f"{self.source}: cannot tell the end-of-turn token (no chat template, no eos token)")

    @property
    def eos_id(self) -> int:
        return self.eot_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: the end-of-turn token, the eos token, the checkpoint's generation eos ids, and
        <|end_of_text|> for Llama-3."""
        ids = {self.eot_id, *self.extra_stop_ids}
        for name in (self.eos_token, END_OF_TEXT if END_OF_TEXT in self.special_tokens else None):
            if name:
                ids.add(self.token_id(name))
        return sorted(ids)

    @property
    def pad_id(self) -> int:
        """Padding: the checkpoint's pad token, else the end-of-turn token (padding is masked out anyway)."""
        return self.token_id(self.pad_token) if self.pad_token else self.eot_id

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
        if add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.source}: add_bos=True but this tokenizer has no bos token")
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Ids -> text (invalid UTF-8 from partial tokens becomes U+FFFD, as in tiktoken)."""
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # --- chat format --------------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text for these messages (transformers' `apply_chat_template(tokenize=False)`)."""
        for message in messages:
            for key in ("role", "content"):
                if key not in message:
                    raise KeyError(f"chat message lacks {key!r}: {message!r}")
        if self._no_template:
            raise ValueError(self._no_template)
        if self.chat_template is None:
            return self.decode(self.apply_chat_template(messages, add_generation_prompt))
        from jinja2.exceptions import TemplateError

        try:
            return compile_chat_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", pad_token=self.pad_token or "",
            )
        except TemplateError as e:
            raise ValueError(f"{self.source}: chat template failed: {e}") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat ids: the checkpoint's template rendered and tokenized (special tokens recognised, no BOS added
        beyond what the template writes), as transformers' `apply_chat_template`; or the built-in Llama-3 format."""
        if self.chat_template is not None or self._no_template:
            return self.encode(self.render_chat(messages, add_generation_prompt))
        ids = [self.bos_id]
        for message in messages:
            ids += self.encode_message(message)
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids

    # The built-in Llama-3 format (Meta's reference ChatFormat).

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
        return [*self.encode_header(message["role"]), *content, self.token_id(EOT)]


def _folder_settings(folder: Path) -> dict:
    """Chat template, special tokens and generation stop ids of a checkpoint folder, as transformers reads them."""
    settings = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from e
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if template:
            settings["chat_template"] = template
        for key in ("bos_token", "eos_token", "pad_token"):
            if _token_text(config.get(key)):
                settings[key] = _token_text(config.get(key))
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():  # transformers 5 writes the template here, and prefers it
        settings["chat_template"] = jinja_file.read_text()
    generation_file = folder / "generation_config.json"
    if generation_file.is_file():
        try:
            eos = json.loads(generation_file.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ValueError(f"{generation_file}: not valid JSON ({e})") from e
        settings["extra_stop_ids"] = [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]
    return settings
