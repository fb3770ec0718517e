"""The simple judges a trained one must beat: the majority class, and lexical overlap (FAIL when too many of the
answer's words are missing from the document, the threshold fitted on the validation split)."""

from __future__ import annotations

from lynx.data.text import answer_words


def unsupported_fraction(answer: str, passage: str) -> float:
    """Share of the answer's words that never occur in the passage (case-insensitive)."""
    words = answer_words(answer)
    if not words:
        return 0.0
    passage_words = set(answer_words(passage))
    return sum(w not in passage_words for w in words) / len(words)


def fit_overlap_threshold(rows: list[dict]) -> float:
    """The threshold t (FAIL when unsupported_fraction > t) with the best accuracy on `rows`."""
    fractions = [unsupported_fraction(r["answer"], r["passage"]) for r in rows]
    candidates = [-1.0] + sorted(set(fractions))
    return max(candidates, key=lambda t: sum((f > t) == (r["label"] == "FAIL") for f, r in zip(fractions, rows)))


def fit_p_pass_threshold(rows: list[dict]) -> float:
    """The threshold t (PASS when p_pass >= t) with the best accuracy on judged `rows` (p_pass, label)."""
    scored = [r for r in rows if r.get("p_pass") is not None]
    candidates = sorted({r["p_pass"] for r in scored}) + [float("inf")]
    return max(candidates, key=lambda t: sum((r["p_pass"] >= t) == (r["label"] == "PASS") for r in scored))


def baseline_rows(test: list[dict], val: list[dict]) -> dict[str, list[dict]]:
    """Judged rows (score, p_pass) of both baselines on `test`, in the schema judge.py writes; fitted on `val`."""
    majority = max(("PASS", "FAIL"), key=lambda lab: sum(r["label"] == lab for r in val))
    threshold = fit_overlap_threshold(val)
    out = {"majority": [], "lexical": []}
    for r in test:
        frac = unsupported_fraction(r["answer"], r["passage"])
        out["majority"].append({**r, "score": majority, "p_pass": 1.0 if majority == "PASS" else 0.0})
        out["lexical"].append({**r, "score": "FAIL" if frac > threshold else "PASS", "p_pass": 1.0 - frac})
    return out
