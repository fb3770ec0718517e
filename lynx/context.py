"""Evidence selection: what of a long document the judge reads.

A judge that reads whole documents pays for every token and, at small scale, gets lost in them: the
Quickstart judge was at chance on whole passages. `select_evidence` keeps the chunks of the document most relevant
to the question and the answer, up to a token budget, in document order, with ELISION where text was left out. The
data builder (training contexts) and the judge (judge.py --context-tokens) call the same function, so the judge
is trained on what it reads.

Chunks are runs of whole sentences (lynx.data.text.sentence_spans) of up to `chunk_tokens` tokens; they are ranked
by TF-IDF cosine similarity to the question and the answer (scikit-learn, fitted on the document's own chunks, so
a word is weighed by how rare it is in this document).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

ELISION = "\n[...]\n"  # stands where the selection skipped text, so the judge sees that the document goes on
DEFAULT_CHUNK_TOKENS = 32  # about one sentence: finer than 64, and it kept the gold evidence as often or more at 96-192 tokens


@dataclass(frozen=True)
class Selection:
    text: str  # what the judge reads: the whole document, or the kept chunks joined by ELISION
    kept: tuple[tuple[int, int], ...]  # character spans of the document kept, in order
    tokens: int  # tokens of `text` (as `count_tokens` counts them)
    document_tokens: int  # tokens of the whole document
    selected: bool  # text was left out


def chunk_spans(document: str, token_counts: list[int], sentences: list[tuple[int, int]],
                chunk_tokens: int) -> list[tuple[int, int]]:
    """Runs of consecutive sentences of at most chunk_tokens tokens (a longer sentence is a chunk of its own)."""
    chunks, start, end, used = [], None, None, 0
    for (s, e), n in zip(sentences, token_counts):
        if start is not None and used + n > chunk_tokens:
            chunks.append((start, end))
            start = None
        if start is None:
            start, used = s, 0
        end, used = e, used + n
    if start is not None:
        chunks.append((start, end))
    return chunks


def chunk_ranker(chunks: list[str]) -> Callable[[str], list[float]]:
    """query -> TF-IDF cosine similarity of each chunk to it, idf fitted on the chunks themselves."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english", token_pattern=r"(?u)\b\w+\b")
    try:
        matrix = vectorizer.fit_transform(chunks)
    except ValueError:  # no word left after stop words (e.g. a table of numbers only)
        return lambda query: [0.0] * len(chunks)
    # Rows are L2-normalised: the dot product is the cosine.
    return lambda query: (matrix @ vectorizer.transform([query]).T).toarray().ravel().tolist()


@lru_cache(maxsize=256)
def _chunked(document: str, count_tokens: Callable[[str], int], chunk_tokens: int):
    """(document tokens, chunk spans, chunk tokens, ranker), once per document: a COVID-QA paper is judged with
    dozens of questions, and the data builder selects for a PASS and a FAIL answer of each."""
    from lynx.data.text import sentence_spans

    document_tokens = count_tokens(document)
    sentences = sentence_spans(document) or [(0, len(document))]
    chunks = chunk_spans(document, [count_tokens(document[s:e]) for s, e in sentences], sentences, chunk_tokens)
    texts = [document[s:e] for s, e in chunks]
    return document_tokens, chunks, [count_tokens(t) for t in texts], chunk_ranker(texts)


def select_evidence(document: str, question: str, answer: str, budget_tokens: int,
                    count_tokens: Callable[[str], int], *, must_keep: tuple[int, int] | None = None,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Selection:
    """The document itself when it fits budget_tokens (or budget_tokens is 0: no selection); else its chunks most
    relevant to the question and the answer, best first while they fit, put back in document order with ELISION
    between chunks that are not adjacent and where the document goes on before or after them.

    must_keep: a character span whose chunks go in first (the data builder keeps an answer's gold evidence).
    count_tokens: text -> its number of tokens, e.g. `lambda s: len(tokenizer.encode(s))`. A chunk longer than the
    whole budget is cut at a word boundary when nothing else fits.
    """
    document_tokens, chunks, sizes, rank = _chunked(document, count_tokens, chunk_tokens)
    if budget_tokens <= 0 or document_tokens <= budget_tokens:
        return Selection(document, ((0, len(document)),), document_tokens, document_tokens, False)
    scores = rank(f"{question} {answer}")
    forced = set()
    if must_keep is not None:
        forced = {i for i, (s, e) in enumerate(chunks) if s < must_keep[1] and e > must_keep[0]}
    order = sorted(range(len(chunks)), key=lambda i: (i not in forced, -scores[i], i))
    marker = count_tokens(ELISION)
    kept, used = [], 0
    for i in order:
        # Each kept chunk can bring one elision marker with it: a safe bound on what the joined text costs.
        if used + sizes[i] + marker <= budget_tokens - marker:
            kept.append(i)
            used += sizes[i] + marker
    if not kept:  # the best chunk alone is over the budget: its head, cut at a word boundary
        s, e = chunks[order[0]]
        e = s + _word_cut(document[s:e], int((e - s) * (budget_tokens - 2 * marker) / max(sizes[order[0]], 1)))
        spans = [(s, e)]
    else:
        spans = [chunks[i] for i in kept]  # best first
    # Chunk sizes only estimate what the joined text costs (tokens merge across a join): drop the worst-ranked chunk,
    # or cut the lone one shorter, until the text fits.
    while True:
        merged, text = _assemble(document, sorted(spans))
        tokens = count_tokens(text)
        if tokens <= budget_tokens:
            break
        if len(spans) > 1:
            spans.pop()
        else:
            s, e = spans[0]
            cut = _word_cut(document[s:e], int((e - s) * 0.9))
            if cut in (0, e - s):
                break  # one word: nothing shorter to keep
            spans = [(s, s + cut)]
    return Selection(text, tuple(merged), tokens, document_tokens, True)


def _word_cut(text: str, keep: int) -> int:
    """Length of text's head of at most `keep` characters (at least 1), ending at a word boundary when one exists."""
    head = text[:max(1, keep)]
    return len(head.rsplit(" ", 1)[0]) if " " in head.strip() else len(head)


def _assemble(document: str, spans: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], str]:
    """Spans in document order -> (merged spans, text joined with ELISION where text was left out)."""
    merged = [spans[0]]
    for s, e in spans[1:]:  # adjacent chunks merge: only the text between them was left out, and there was none
        if document[merged[-1][1]:s].strip():
            merged.append((s, e))
        else:
            merged[-1] = (merged[-1][0], e)
    text = ELISION.join(document[s:e] for s, e in merged)
    if document[:merged[0][0]].strip():
        text = ELISION.lstrip("\n") + text
    if document[merged[-1][1]:].strip():
        text = text + ELISION.rstrip("\n")
    return merged, text


@lru_cache(maxsize=8)
def token_counter(tokenizer) -> Callable[[str], int]:
    """count_tokens for a lynx.tokenizer.Tokenizer: document text as plain text (special-token text not special).
    One function per tokenizer, so the per-document cache above is shared by every caller."""
    return lambda text: len(tokenizer.encode(text, allow_special=False))
