"""Reasoning targets in the Lynx output format: `{"REASONING": [bullets], "SCORE": "PASS"|"FAIL"}`.

FAIL reasoning names the changed span and quotes the passage sentence it contradicts (or says the passage does not
contain the added claim); PASS reasoning quotes the sentence that supports the answer. Quotes come from the passage
shown to the judge, so a windowed passage (--max-passage-chars) is quoted from its window.
"""

from __future__ import annotations

import json
import re

from lynx.data.perturb import Context, Perturbation
from lynx.data.text import STOPWORDS, WORD_RUN, answer_words, normalize, passage_info, quote


def evidence_span(answer: str, question: str, passage: str) -> tuple[int, int]:
    """Character span of the passage that supports `answer`: where the answer occurs verbatim (extended to whole
    sentences, at most three), else the first sentence containing it after normalisation, else the sentence sharing
    the most content words with the answer (and, with half the weight, the question)."""
    info = passage_info(passage)
    if not info.sentences:
        return 0, len(passage)
    text = answer.strip()
    pos = passage.find(text) if len(text) >= 1 else -1
    if pos >= 0 and len(text) > 3:
        first = next((i for i, (s, e) in enumerate(info.sentences) if e > pos), 0)
        last = first
        while last + 1 < len(info.sentences) and info.sentences[last][1] < pos + len(text) and last - first < 2:
            last += 1
        return info.sentences[first][0], info.sentences[last][1]
    i = info.find_sentence(text) if len(normalize(text)) > 3 else None
    if i is None:
        i, _ = info.best_sentence(answer, question, weights=(1.0, 0.5))
    return info.sentences[i]


def evidence_for_edit(gold: str, p: Perturbation, ctx: Context) -> str:
    """The passage text that shows the first edit is wrong: the sentence containing the original words around the
    changed span (widest context first), quoted around them; else the sentence closest to those words."""
    info = ctx.info
    e = p.edits[0]
    words_left, words_right = gold[:e.start].split(), gold[e.start + len(e.before):].split()
    if e.before.strip():
        for n in (4, 3, 2, 1):
            window = " ".join(words_left[-n:] + [e.before] + words_right[:n])
            i = info.find_sentence(window)
            if i is not None:
                return _focus(info.sentence(i), e.before)
    local = " ".join(words_left[-8:] + [e.before] + words_right[:8])
    i, _ = info.best_sentence(local, ctx.question, weights=(1.0, 0.3))
    return _focus(info.sentence(i), e.before) if info.sentences else ctx.passage


def _focus(sentence: str, focus: str, max_chars: int = 300) -> str:
    """The sentence, or for a long one (a table row run, a long clause) the part of it around `focus`."""
    if len(sentence) <= max_chars:
        return sentence
    pos = sentence.find(focus) if focus.strip() else -1
    if pos < 0:
        return sentence
    start = max(0, pos - max_chars // 2)
    start = sentence.rfind(" ", 0, start) + 1 if start > 0 else 0
    return ("... " if start else "") + sentence[start:]


def pass_reasoning(question: str, answer: str, passage: str, parts=()) -> list[str]:
    """`parts`: the answer's pieces when it lists several (DROP multi-span answers); each gets its own evidence."""
    spans = [evidence_span(part, question, passage) for part in parts[:3]] if len(parts) > 1 else \
        [evidence_span(answer, question, passage)]
    spans = sorted(set(spans))
    return [
        f'The QUESTION asks: "{quote(question, 200)}".',
        *[f'The DOCUMENT states: "{quote(passage[s:e])}".' for s, e in spans],
        f'The ANSWER "{quote(answer, 200)}" agrees with this and adds nothing the DOCUMENT does not support.',
        "The ANSWER is faithful to the DOCUMENT.",
    ]


def fail_reasoning(gold: str, p: Perturbation, ctx: Context) -> list[str]:
    q = f'The QUESTION asks: "{quote(ctx.question, 200)}".'
    if p.kind == "added_claim":
        claim = p.edits[0].after.strip(" .")
        s, e = evidence_span(gold, ctx.question, ctx.passage)
        return [
            q,
            f'The DOCUMENT supports the first part of the ANSWER: "{quote(ctx.passage[s:e])}".',
            f'The ANSWER also claims "{quote(claim, 200)}", which the DOCUMENT does not mention: it is new '
            "information beyond the DOCUMENT.",
            "The ANSWER is not faithful to the DOCUMENT.",
        ]
    if p.kind in ("other_answer", "hallucinated", "model"):
        s, e = evidence_span(gold, ctx.question, ctx.passage)
        bullets = [q, f'The ANSWER says "{quote(p.answer, 200)}".']
        if p.kind == "model" and p.edits and p.edits[0].before:
            bullets.append(f'It changes "{quote(p.before, 120)}" to "{quote(p.after, 120)}".')
        return bullets + [
            f'The DOCUMENT states: "{quote(ctx.passage[s:e])}".',
            f'According to the DOCUMENT the answer is "{quote(gold, 200)}", so the ANSWER is not supported by the '
            "DOCUMENT" + (" and does not answer the QUESTION." if p.kind == "other_answer" else "."),
            "The ANSWER is not faithful to the DOCUMENT.",
        ]
    changes = "; ".join(f'"{quote(e.before, 120)}" became "{quote(e.after, 120)}"' for e in p.edits
                        if e.before.strip() and e.after.strip())
    removed = [e for e in p.edits if not e.after.strip()]
    if removed:
        changes = "; ".join(filter(None, [changes] + [f'"{quote(e.before.strip(), 60)}" was dropped' for e in removed]))
    evidence = evidence_for_edit(gold, p, ctx)
    shown = [e for e in p.edits if e.before.strip() and f" {normalize(e.before)} " in f" {normalize(evidence)} "]
    if shown:
        verdict = (f"The DOCUMENT contradicts the ANSWER: {changes}, and the DOCUMENT says "
                   f'"{quote(shown[0].before.strip(), 120)}".')
    else:
        verdict = (f"Nothing in the DOCUMENT supports the changed part of the ANSWER ({changes}); the DOCUMENT "
                   "supports the original wording instead.")
    return [
        q,
        f'The ANSWER says "{quote(_around(p), 200)}".',
        f'The DOCUMENT states: "{quote(evidence)}".',
        verdict,
        "The ANSWER is not faithful to the DOCUMENT.",
    ]


def word_checks(answer: str, passage: str, max_words: int = 20) -> list[str]:
    """Reasoning made of lookups: each distinct non-stopword word of the answer (first `max_words`, as first written)
    with "yes" if the passage has it (the lexical-overlap rule: case-insensitive, whole words) and "no" if not.

    A judge trained from scratch on a CPU does not learn to compare the answer with the document from a one-word
    verdict; generated one word at a time, the comparison becomes a chain of single supervised lookups. The verdict
    still comes from the label, so an answer may keep PASS with a word the passage lacks. Measured in README "The CPU
    demo": it does not help there."""
    in_passage = set(answer_words(passage))
    seen, checks = set(), []
    for word in WORD_RUN.findall(answer):
        key = word.lower()
        if key in STOPWORDS or key in seen:
            continue
        seen.add(key)
        checks.append(f"{word} {'yes' if key in in_passage else 'no'}")
        if len(checks) == max_words:
            break
    return [f"Answer words found in the DOCUMENT: {', '.join(checks) if checks else 'none to check'}."]


def _around(p: Perturbation, n_words: int = 8) -> str:
    """The changed part of the perturbed answer with up to `n_words` words either side, cut from the answer text."""
    e = p.edits[0]  # the first edit sits at the same offset in the new answer as in the gold one
    start, end = e.start, e.start + len(e.after)
    left = [m.start() for m in re.finditer(r"\S+", p.answer[:start])]
    right = [m.end() for m in re.finditer(r"\S+", p.answer[end:])]
    lo = left[-n_words] if len(left) >= n_words else 0
    hi = end + right[n_words - 1] if len(right) >= n_words else len(p.answer)
    return p.answer[lo:hi].strip()


def target(reasoning: list[str], score: str) -> str:
    """The assistant turn: the Lynx JSON, keys in the published order."""
    if score not in ("PASS", "FAIL"):
        raise ValueError(f"score must be PASS or FAIL, got {score!r}")
    return json.dumps({"REASONING": reasoning, "SCORE": score}, ensure_ascii=False)
