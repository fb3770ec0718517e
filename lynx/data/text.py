"""Small text helpers shared by perturbation, reasoning and the builder: normalisation for containment checks,
sentence spans, content words, a per-passage cache, and near-duplicate passage clusters."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from functools import lru_cache
from itertools import chain

STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being this that these those
    it its it's he she they we you i his her their our your them him us there here which who whom whose what when
    where why how than then so such not no nor do does did done has have had having can could will would shall should
    may might must also into onto over under about after before during while within without between among per via
    each all any both either neither some most more less many much few other another same own only very just up down
    out off again further once""".split()
)


def normalize(text: str) -> str:
    """Lowercase, unify quotes and dashes, drop thousands separators and punctuation (keeping decimal points, % and
    $), collapse whitespace. Two texts that normalise equal say the same thing for our checks."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r"[\u2010-\u2015]", "-", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = re.sub(r"\.(?!\d)", " ", text)
    text = re.sub(r"[^\w%$.' -]+|(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return re.findall(r"[\w%$.'-]+", normalize(text))


WORD_RUN = re.compile(r"\w+")


def answer_words(text: str) -> list[str]:
    """The words the lexical-overlap check compares: runs of word characters, lowercased (stopwords included)."""
    return [w.lower() for w in WORD_RUN.findall(text)]


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 1 or any(c.isdigit() for c in w)}


# A sentence ends at . ! ? followed by whitespace, or at a blank line; HaluEval glues sentences ("century.First").
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[a-z][.!?])(?=[A-Z][a-z])|\n\s*\n")


def sentence_spans(passage: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the passage's sentences, whitespace trimmed, in order."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(passage):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(passage)))
    out = []
    for s, e in _split_long_lines(passage, spans):
        while s < e and passage[s].isspace():
            s += 1
        while e > s and passage[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


def _split_long_lines(passage: str, spans, max_chars: int = 300):
    """Tables extracted from PDFs (FinanceBench) have no sentence ends: cut a long multi-line span at line breaks
    into pieces of about max_chars, so evidence quotes are table rows, not a whole page."""
    for s, e in spans:
        if e - s <= max_chars or "\n" not in passage[s:e]:
            yield s, e
            continue
        start = s
        for m in re.finditer(r"\n", passage[s:e]):
            cut = s + m.end()
            if cut - start >= max_chars:
                yield start, cut
                start = cut
        yield start, e


class PassageInfo:
    """What the checks need to know about one passage, computed once (COVID-QA papers are ~20k characters and are
    shared by dozens of questions)."""

    def __init__(self, passage: str):
        self.text = passage
        self.normalized = " " + normalize(passage) + " "
        self.sentences = sentence_spans(passage)
        self.sentence_norms = [normalize(passage[s:e]) for s, e in self.sentences]
        self.sentence_words = [content_words(passage[s:e]) for s, e in self.sentences]

    def contains(self, text: str) -> bool:
        """True when the normalised text occurs in the normalised passage on word boundaries."""
        norm = normalize(text)
        return bool(norm) and f" {norm} " in self.normalized

    def sentence(self, i: int) -> str:
        s, e = self.sentences[i]
        return self.text[s:e]

    def find_sentence(self, text: str) -> int | None:
        """Index of the first sentence containing `text` (normalised), else None."""
        norm = normalize(text)
        if not norm:
            return None
        for i, sn in enumerate(self.sentence_norms):
            if f" {norm} " in f" {sn} ":
                return i
        return None

    def best_sentence(self, *texts: str, weights: tuple[float, ...] = ()) -> tuple[int, float]:
        """Index of the sentence sharing the most content words with the texts (weighted), and the share of the
        first text's content words it covers."""
        targets = [content_words(t) for t in texts]
        weights = weights or (1.0,) * len(texts)
        best, best_score = 0, -1.0
        for i, sw in enumerate(self.sentence_words):
            score = sum(w * len(t & sw) / (len(t) or 1) for w, t in zip(weights, targets))
            if score > best_score:
                best, best_score = i, score
        first = targets[0] if targets else set()
        coverage = len(first & self.sentence_words[best]) / len(first) if first and self.sentences else 0.0
        return best, coverage


@lru_cache(maxsize=512)
def passage_info(passage: str) -> PassageInfo:
    return PassageInfo(passage)


def quote(text: str, max_chars: int = 300) -> str:
    """Text fit to quote inside a reasoning bullet: one line, no double quotes or square brackets (the public Lynx
    parser reads the reasoning with `"REASONING":\\s*\\[(.*?)\\]`, so a "]" inside a bullet would cut it short)."""
    text = " ".join(text.split()).replace('"', "'").replace("[", "(").replace("]", ")")
    if len(text) > max_chars:
        cut = text[:max_chars].rsplit(" ", 1)[0]
        text = cut + " ..."
    return text


def word_shingles(text: str, n: int = 5) -> frozenset[str]:
    """The text's runs of n consecutive words, lowercased (the whole text when it has fewer words). Words are runs of
    word characters, so punctuation, quotes and line breaks do not matter."""
    tokens = WORD_RUN.findall(text.lower())
    return frozenset(" ".join(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1)))


def near_duplicate_clusters(texts: list[str], min_overlap: float = 0.5, n: int = 5) -> list[int]:
    """For each text, the index of the first text of its near-duplicate cluster.

    Two texts are near-duplicates when at least `min_overlap` of the smaller one's word 5-grams are also in the
    other (the overlap coefficient of their `word_shingles`); clusters are the transitive closure. Editing a word
    breaks only the n-grams through it, so a passage with a sentence or two rewritten (DROP's contrast set) still
    shares most of them, while unrelated passages share almost none (measured on data/raw: contrast-set edits
    0.84-0.99, other pairs of different passage groups at most 0.6). Measuring against the smaller text also
    catches a passage that mostly repeats a shorter one (a window, or a shared Wikipedia paragraph).
    Exact: every pair sharing an n-gram is counted through an inverted index, so the cost follows the shared
    n-grams, not the number of pairs.
    """
    shingles = [word_shingles(t, n) for t in texts]
    repeated = {g for g, count in Counter(chain.from_iterable(shingles)).items() if count > 1}
    texts_with = defaultdict(list)  # only n-grams of two texts or more can make a pair
    for i, s in enumerate(shingles):
        for g in s & repeated:
            texts_with[g].append(i)
    shared = Counter()
    for ids in texts_with.values():
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                shared[ids[a], ids[b]] += 1
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), count in shared.items():
        if count >= min_overlap * min(len(shingles[a]), len(shingles[b])):
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)  # the smaller index stays the root: the cluster's first text
    return [root(i) for i in range(len(texts))]
