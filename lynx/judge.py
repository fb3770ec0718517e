"""The Lynx judge: question + document + answer -> PASS/FAIL verdict, reasoning, and P(PASS).

Prompt: `lynx.prompt.judge_messages` (the exact published text) through the Llama-3 chat template.

Two modes:
- full (default, as published): greedy generation of `{"REASONING": [...], "SCORE": "..."}` (max_new_tokens 600),
  parsed by `parse_output`. `p_pass` is read from the logits at the step where the score word is generated.
- fast: no reasoning. The completion is forced to start with `{"REASONING": [], "SCORE": "` and `p_pass` is read
  from the logits right after it; the score is PASS when p_pass >= the threshold (0.5, or the one the checkpoint's
  lynx.json fitted on validation). Prompts are packed several to a forward
  pass, their common prefix (the chat template's system turn and the judge instruction) computed once per pass
  (lynx.infer.scoring, on lynx.attention's shared-prefix packing; the same logits as one prompt at a time).

p_pass = P(PASS) / (P(PASS) + P(FAIL)) at that position, where P(PASS) sums the probabilities of the first tokens
of the spellings "PASS", "Pass", "pass" as they would be tokenized at that position, and P(FAIL) likewise. The first
token is the one that distinguishes the two words (they start with different letters), so p_pass is exact when
the word's remaining tokens follow deterministically. With Llama-3's tokenizer "PASS" and "FAIL" are single tokens.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from lynx.config import LlamaConfig, bf16_is_native
from lynx.context import Selection, select_evidence, token_counter
from lynx.infer.cpu_fast import compile_rms_norms, compile_ropes, prepack_linear_weights
from lynx.infer.generation import run_generation
from lynx.model import Llama
from lynx.infer.scoring import (FAST_PACK_TOKENS, FAST_PREFIX, ScoreTokens, fast_score_tokens, pack_prompts,
                                packed_p_pass, prefix_kv_caches)
from lynx.prompt import judge_messages, truncate_document
from lynx.tokenizer import Tokenizer
from lynx.weights.safetensors import checkpoint_dtype

LONG_INPUT_POLICIES = ("truncate", "skip")

# The published parsers' score patterns, then a relaxed one (any quotes or none, any case, `:` or `=`).
_SCORE_PATTERNS = [
    re.compile(r'"SCORE":\s*"(\w+)"'),
    re.compile(r'"SCORE":\s*(\w+)'),
    re.compile(r"""["']?\bscore\b["']?\s*[:=]\s*["']?([A-Za-z]+)""", re.IGNORECASE),
]
_REASONING_KEY = re.compile(r"""["']?\breasoning\b["']?\s*:\s*""", re.IGNORECASE)
_SCORE_KEY_AHEAD = re.compile(r"""[,\s]*["']?\bscore\b["']?\s*[:=]""", re.IGNORECASE)


# --- parsing --------------------------------------------------------------------------------------------------------


class ParsedOutput(tuple):
    """(score, reasoning); also available as attributes."""

    def __new__(cls, score, reasoning):
        return super().__new__(cls, (score, reasoning))

    score = property(lambda self: self[0])
    reasoning = property(lambda self: self[1])


def find_score(text: str) -> tuple[str | None, int | None]:
    """The first PASS/FAIL score in `text` (any case) and the character offset where the word starts."""
    for pattern in _SCORE_PATTERNS:
        for m in pattern.finditer(text):
            value = m.group(1).upper()
            if value in ("PASS", "FAIL"):
                return value, m.start(1)
    return None, None


def _json_reasoning(text: str):
    """REASONING from the first JSON object in the text that has it (None when there is none)."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if str(key).lower() == "reasoning":
                    items = value if isinstance(value, list) else [value]
                    return [str(x).strip() for x in items if str(x).strip()]
    return None


def _split_items(body: str) -> list[str]:
    """Bullets from the inside of a REASONING list: quoted strings ("..." or '...'), else lines."""
    s = body.strip().rstrip(",").strip()
    if s[:1] in ('"', "'"):
        q = s[0]
        # Split only on quote-comma-quote, so apostrophes inside single-quoted bullets survive.
        parts = re.split(rf"{q}\s*,\s*{q}", s[1:])
        parts[-1] = parts[-1][:-1] if parts[-1].endswith(q) else parts[-1]
        items = []
        for p in parts:
            try:
                items.append(json.loads(f'"{p}"') if q == '"' else p.replace("\\'", "'"))
            except json.JSONDecodeError:
                items.append(p.replace('\\"', '"').replace("\\n", "\n"))
    else:
        items = [line.strip().lstrip("-*\u2022").strip() for line in s.splitlines()]
    return [x.strip() for x in items if x.strip()]


def _regex_reasoning(text: str) -> list[str]:
    m = _REASONING_KEY.search(text)
    if not m:
        return []
    rest = text[m.end() :]
    score = _SCORE_KEY_AHEAD.search(rest)
    if rest.startswith("["):
        close = rest.find("]")
        # A missing `]` ends the list at the SCORE key or at the end of the text.
        body = rest[1:close] if close >= 0 else rest[1 : score.start() if score else len(rest)]
    else:
        # Not a list: one string (or bullet lines) up to the SCORE key or the closing brace.
        end = score.start() if score else (rest.find("}") if "}" in rest else len(rest))
        body = rest[:end]
    return _split_items(body)


def parse_output(text: str) -> ParsedOutput:
    """Score ("PASS", "FAIL" or None) and reasoning (list of str) from a judge's raw completion.

    Strict JSON first; then the published regexes (`"SCORE":\\s*"(\\w+)"`, `"SCORE":\\s*(\\w+)`,
    `"REASONING":\\s*\\[(.*?)\\]`), relaxed to survive text around the JSON, single quotes, missing brackets or
    quotes, and lower-case keys or scores. A score other than PASS/FAIL counts as not found (None).
    """
    score, _ = find_score(text)
    reasoning = _json_reasoning(text)
    if reasoning is None:
        reasoning = _regex_reasoning(text)
    return ParsedOutput(score, reasoning)


# --- p_pass ---------------------------------------------------------------------------------------------------------


def score_step(tokenizer: Tokenizer, tokens: list[int]) -> tuple[int, str] | None:
    """Where a completion generated its score word: (index of the token holding the word's first character, the
    text that token holds before the word). None when no PASS/FAIL score is found."""
    text = tokenizer.decode(tokens)
    _, offset = find_score(text)
    if offset is None:
        return None
    # Smallest i whose decoded prefix tokens[: i + 1] reaches past the offset: token i holds the first letter.
    lo, hi = 0, len(tokens) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[: mid + 1])) > offset:
            hi = mid
        else:
            lo = mid + 1
    start = len(tokenizer.decode(tokens[:lo]))
    return lo, text[start:offset]


# --- the judge ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    score: str | None  # "PASS", "FAIL", or None when the completion has no score (or the example was skipped)
    reasoning: list[str]
    p_pass: float | None
    raw: str  # the completion text (fast mode: the forced prefix, the chosen word and `"}`)
    prompt_tokens: int = 0
    truncated: bool = False  # the middle of the document was cut to fit the context
    skipped: str | None = None  # why the example was not judged (too long under the "skip" policy)
    context_tokens: int = 0  # tokens of the document the judge read (after selection)
    document_tokens: int = 0  # tokens of the whole document
    selected: list | None = None  # [start, end] character spans of the document kept; None: the whole document

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_model_dir(name: str | Path) -> Path:
    """A local directory, a GGUF file, or a Hugging Face hub id (`org/name`) already in the local hub cache."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists():
        raise NotADirectoryError(f"--model must be a checkpoint directory or a .gguf file, got: {path}")
    looks_like_hub_id = re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(name)) is not None
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and huggingface_hub is not installed to look it up in the hub "
            "cache; pass the checkpoint directory"
        ) from None
    try:
        return Path(snapshot_download(repo_id=str(name), local_files_only=True))
    except Exception as e:  # huggingface_hub raises several error types for "not cached"
        raise FileNotFoundError(
            f"{name!r} is neither a local directory nor in the local Hugging Face cache (nothing is downloaded "
            f"here; fetch it first, e.g. `huggingface-cli download {name}`): {type(e).__name__}: {e}"
        ) from None


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The checkpoint's own tokenizer (tokenizer.json / tokenizer.model / GGUF metadata), else the shipped Llama-3
    tokenizer."""
    if model_dir.suffix == ".gguf" or (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer.model").is_file():
        return Tokenizer.from_pretrained(model_dir)
    return Tokenizer.llama3()


def auto_dtype(model_dir: Path, device: torch.device) -> torch.dtype | None:
    """dtype=None's choice: bf16 on GPU; on CPU the checkpoint's own dtype (None), except that a bf16 checkpoint runs
    in fp32 (an exact upcast) where the CPU lacks native bf16 (lynx.config.bf16_is_native: emulated bf16 matmuls
    are ~90x slower there)."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and model_dir.is_dir() and not bf16_is_native(device):
        stored = checkpoint_dtype(LlamaConfig.from_json(model_dir / "config.json"))
        if stored in (torch.bfloat16, torch.float16):
            return torch.float32
    return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


CARD_FILE = "lynx.json"  # what a trained judge says about itself (lynx.train.checkpoint.write_judge_card)


def read_judge_card(model_dir: Path) -> dict:
    """The checkpoint's lynx.json ({} when it has none, as published Lynx and base models do)."""
    path = model_dir / CARD_FILE
    if not (model_dir.is_dir() and path.is_file()):
        return {}
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return card


class Judge:
    """Load a Lynx-compatible checkpoint and judge (question, context, answer) triples.

    Documents go through lynx.context.select_evidence first: with `context_tokens` > 0 a longer document is cut to
    its chunks most relevant to the question and answer, up to that many tokens (0: the whole document). The
    default, and fast mode's p_pass threshold for PASS (default 0.5), come from the checkpoint's lynx.json when it
    has one (`card`; `settings` says where each value came from).
    Inputs still longer than the context: with `long_inputs="truncate"` (default) the middle of the document is
    replaced by TRUNCATION_MARKER until the prompt fits `max_input_tokens` (default: the model's
    max_position_embeddings minus max_new_tokens); with "skip", or when even an empty document does not fit, the
    example is not judged (score None, `skipped` says why).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        max_new_tokens: int = 600,
        batch_size: int = 8,
        max_input_tokens: int | None = None,
        long_inputs: str = "truncate",
        tokenizer: Tokenizer | None = None,
        pack_tokens: int = FAST_PACK_TOKENS,
        context_tokens: int | None = None,
        p_pass_threshold: float | None = None,
    ):
        if long_inputs not in LONG_INPUT_POLICIES:
            raise ValueError(f"long_inputs must be one of {LONG_INPUT_POLICIES}, got {long_inputs!r}")
        self.model_dir = resolve_model_dir(model_dir)
        self.card = read_judge_card(self.model_dir)
        self.settings = {}  # setting -> (value, where it came from)
        for key, given, default in (("context_tokens", context_tokens, 0), ("p_pass_threshold", p_pass_threshold, 0.5)):
            value, origin = ((given, "given") if given is not None else
                             (self.card[key], CARD_FILE) if self.card.get(key) is not None else (default, "default"))
            self.settings[key] = (value, origin)
        self.context_tokens = int(self.settings["context_tokens"][0])
        self.p_pass_threshold = float(self.settings["p_pass_threshold"][0])
        if self.context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0 (0: the whole document), got {self.context_tokens}")
        self.device = torch.device(device or default_device())
        if dtype is None:
            dtype = auto_dtype(self.model_dir, self.device)
        self.model = Llama.from_pretrained(self.model_dir, dtype=dtype, device=self.device).eval()
        prepack_linear_weights(self.model)  # bf16 on CPU: faster decode steps, same outputs
        compile_rms_norms(self.model)  # bf16 on CPU: the norms fused into one loop each
        compile_ropes(self.model)  # bf16 on CPU: the rotary embeddings fused, same outputs
        self.tokenizer = tokenizer or load_tokenizer(self.model_dir)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens but the model {self.model_dir} only "
                f"{self.model.config.vocab_size}: wrong tokenizer for this checkpoint"
            )
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.pack_tokens = pack_tokens  # fast mode: tokens per packed forward pass
        self.long_inputs = long_inputs
        self.fast_prefix_ids, self.fast_score_ids = fast_score_tokens(self.tokenizer)
        context = self.model.config.max_position_embeddings
        limit = context - max(max_new_tokens, len(self.fast_prefix_ids) + 1)
        self.max_input_tokens = min(max_input_tokens, limit) if max_input_tokens else limit
        if self.max_input_tokens < 64:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves {self.max_input_tokens} prompt tokens of the model's "
                f"{context}-token context; lower max_new_tokens"
            )
        self.score_tokens = ScoreTokens(self.tokenizer)

    # --- prompts ----------------------------------------------------------------------------------------------------

    def _chat_ids(self, question: str, context: str, answer: str) -> list[int]:
        return self.tokenizer.apply_chat_template(judge_messages(question, context, answer), add_generation_prompt=True)

    def select(self, question: str, context: str, answer: str) -> Selection:
        """What of the document the judge reads (lynx.context.select_evidence at context_tokens)."""
        return select_evidence(context, question, answer, self.context_tokens, token_counter(self.tokenizer))

    def prompt_ids(self, question: str, context: str, answer: str) -> tuple[list[int] | None, bool]:
        """(prompt ids, truncated) for the document as given (select first) under the long-input policy; ids None
        when the example cannot be judged."""
        ids = self._chat_ids(question, context, answer)
        limit = self.max_input_tokens
        if len(ids) <= limit:
            return ids, False
        if self.long_inputs == "skip":
            return None, False
        # The same middle cut (and marker) the trainer applies to over-long training rows.
        messages = judge_messages(question, context, answer)
        header = len(ids) - len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        cut = truncate_document(self.tokenizer, messages, limit - header)
        if cut is None:
            return None, False
        return self.tokenizer.apply_chat_template(cut, add_generation_prompt=True), True

    # --- judging ----------------------------------------------------------------------------------------------------

    def judge(self, question: str, context: str, answer: str, *, fast: bool = False) -> Verdict:
        return self.judge_batch([(question, context, answer)], fast=fast)[0]

    def judge_batch(self, examples, *, fast: bool = False, batch_size: int | None = None, progress=None) -> list[Verdict]:
        """Verdicts for (question, context, answer) tuples, in order. Examples are taken longest prompt first (so
        running out of memory shows up at once). `progress(n)` is called as n examples finish."""
        batch_size = batch_size or self.batch_size
        verdicts: list[Verdict | None] = [None] * len(examples)
        prompts, selections = {}, []
        for i, (question, context, answer) in enumerate(examples):
            selection = self.select(question, context, answer)
            selections.append(selection)
            ids, truncated = self.prompt_ids(question, selection.text, answer)
            if ids is None:
                reason = f"prompt longer than max_input_tokens={self.max_input_tokens}"
                verdicts[i] = Verdict(None, [], None, "", truncated=False, skipped=reason)
            else:
                prompts[i] = (ids + self.fast_prefix_ids if fast else ids, truncated)
        if progress and len(prompts) < len(examples):
            progress(len(examples) - len(prompts))
        order = sorted(prompts, key=lambda i: -len(prompts[i][0]))
        ordered = [prompts[i][0] for i in order]
        results = self._judge_fast(ordered, progress) if fast else self._judge_full(ordered, batch_size, progress)
        for i, verdict in zip(order, results):
            verdict.prompt_tokens = len(prompts[i][0])
            verdict.truncated = prompts[i][1]
            verdicts[i] = verdict
        for verdict, selection in zip(verdicts, selections):
            verdict.context_tokens, verdict.document_tokens = selection.tokens, selection.document_tokens
            verdict.selected = [list(span) for span in selection.kept] if selection.selected else None
        return verdicts

    def _judge_full(self, prompts: list[list[int]], batch_size: int, progress=None) -> list[Verdict]:
        """Generated completions, batch_size rows at a time with continuous batching (a finished row takes the next
        prompt at once)."""
        result = run_generation(
            self.model, prompts, max_new_tokens=self.max_new_tokens, stop_ids=self.tokenizer.stop_ids,
            pad_id=self.tokenizer.pad_id, watch_ids=self.score_tokens.watch_ids, batch_size=batch_size,
            progress=progress,
        )
        verdicts = []
        for tokens, watched in zip(result.tokens, result.watched_logits):
            raw = self.tokenizer.decode(tokens)
            score, reasoning = parse_output(raw)
            p_pass = None
            where = score_step(self.tokenizer, tokens) if score else None
            if where is not None:
                step, joined = where
                p_pass = self.score_tokens.p_pass(watched[step], joined)
            verdicts.append(Verdict(score, reasoning, p_pass, raw))
        return verdicts

    def _judge_fast(self, prompts: list[list[int]], progress=None) -> list[Verdict]:
        """p_pass at the end of each prompt (which ends with the forced prefix), packed pack_tokens to a forward
        pass with their common prefix shared."""
        p_pass = [0.0] * len(prompts)
        sequences = pack_prompts(prompts, self.pack_tokens)
        caches = prefix_kv_caches(self.model, sequences[0], self.device)  # the prefix, once for every pass
        for seq in sequences:
            for i, p in packed_p_pass(self.model, seq, self.fast_score_ids, self.device, caches):
                p_pass[i] = p
            if progress:
                progress(len(seq.indices))
        verdicts = []
        for p in p_pass:
            score = "PASS" if p >= self.p_pass_threshold else "FAIL"
            verdicts.append(Verdict(score, [], p, f'{FAST_PREFIX}{score}"}}'))
        return verdicts
