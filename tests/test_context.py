"""Evidence selection (lynx.context): what of a long document the judge reads, the same in data building, judging
and validation; and the judge's lynx.json defaults."""

from __future__ import annotations

import json

import pytest

from lynx.context import ELISION, select_evidence, token_counter
from lynx.judge import Judge
from lynx.tokenizer import Tokenizer
from tests.test_judge import make_tiny_judge_dir

FILLER = [f"Paragraph {i} describes the weather in the northern valley during season {i}, with rain and wind." for i in
          range(40)]
EVIDENCE = "The Harbor Bridge opened to traffic in 1932 after eight years of construction."
DOCUMENT = " ".join(FILLER[:25] + [EVIDENCE] + FILLER[25:])
QUESTION, ANSWER = "When did the Harbor Bridge open?", "It opened in 1932."


@pytest.fixture(scope="module")
def count():
    return token_counter(Tokenizer.llama3())


def test_a_document_that_fits_is_read_whole(count):
    short = " ".join(FILLER[:3])
    for budget in (0, 10_000, count(short)):
        sel = select_evidence(short, QUESTION, ANSWER, budget, count)
        assert (sel.text, sel.selected, sel.kept) == (short, False, ((0, len(short)),))
        assert sel.tokens == sel.document_tokens == count(short)
    assert select_evidence(DOCUMENT, QUESTION, ANSWER, 0, count).text == DOCUMENT  # 0: no selection


@pytest.mark.parametrize("budget", [40, 96, 200])
def test_selection_keeps_the_relevant_chunks_in_order_within_the_budget(count, budget):
    sel = select_evidence(DOCUMENT, QUESTION, ANSWER, budget, count, chunk_tokens=32)
    assert sel.selected and sel.document_tokens == count(DOCUMENT) > budget
    assert sel.tokens == count(sel.text) <= budget
    assert EVIDENCE in sel.text  # the one sentence that shares the question's rare words
    starts = [s for s, _ in sel.kept]
    assert starts == sorted(starts) and all(a[1] < b[0] for a, b in zip(sel.kept, sel.kept[1:]))
    # The text is the kept spans, in order, with a marker wherever the document was left out.
    pieces = [p.strip() for p in sel.text.split("[...]") if p.strip()]
    assert pieces == [DOCUMENT[s:e].strip() for s, e in sel.kept]
    assert select_evidence(DOCUMENT, QUESTION, ANSWER, budget, count, chunk_tokens=32) == sel  # deterministic


def test_a_changed_answer_selects_by_its_own_words_and_must_keep_wins(count):
    other = select_evidence(DOCUMENT, "What was the weather in season 7?", "Rain and wind in season 7.", 40, count,
                            chunk_tokens=32)
    assert EVIDENCE not in other.text and "season 7," in other.text
    start = DOCUMENT.index(EVIDENCE)
    kept = select_evidence(DOCUMENT, "What was the weather in season 7?", "Rain and wind in season 7.", 64, count,
                           chunk_tokens=32, must_keep=(start, start + len(EVIDENCE)))
    assert EVIDENCE in kept.text and kept.tokens <= 64


def test_a_chunk_longer_than_the_budget_is_cut_at_a_word(count):
    sentence = "Harbor Bridge " + " ".join(f"word{i}" for i in range(300))  # one sentence, no sentence end
    sel = select_evidence(sentence, QUESTION, ANSWER, 50, count)
    assert sel.selected and sel.tokens <= 50 and sel.text.startswith("Harbor Bridge word0")
    assert sel.text.endswith(ELISION.rstrip("\n")) and not sel.text.rstrip("[.]\n ").endswith("wor")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return make_tiny_judge_dir(tmp_path_factory.mktemp("context") / "tiny")


def test_judge_selects_records_what_it_read_and_takes_defaults_from_lynx_json(judge_dir):
    plain = Judge(judge_dir, max_new_tokens=8, device="cpu")
    assert plain.settings == {"context_tokens": (0, "default"), "p_pass_threshold": (0.5, "default")}
    whole = plain.judge(QUESTION, DOCUMENT, ANSWER, fast=True)
    assert whole.selected is None and whole.context_tokens == whole.document_tokens > 0

    (judge_dir / "lynx.json").write_text(json.dumps({"context_tokens": 60, "p_pass_threshold": 0.0}))
    try:
        carded = Judge(judge_dir, max_new_tokens=8, device="cpu")
        assert carded.settings == {"context_tokens": (60, "lynx.json"), "p_pass_threshold": (0.0, "lynx.json")}
        v = carded.judge(QUESTION, DOCUMENT, ANSWER, fast=True)
        sel = carded.select(QUESTION, DOCUMENT, ANSWER)
        assert v.selected == [list(span) for span in sel.kept] and v.context_tokens == sel.tokens <= 60
        assert v.document_tokens == whole.document_tokens and v.prompt_tokens < whole.prompt_tokens
        assert v.score == "PASS"  # threshold 0: every p_pass passes
        # The prompt holds exactly the selected text.
        ids = carded.prompt_ids(QUESTION, sel.text, ANSWER)[0]
        assert v.prompt_tokens == len(ids) + len(carded.fast_prefix_ids)
        given = Judge(judge_dir, max_new_tokens=8, device="cpu", context_tokens=0, p_pass_threshold=1.0)
        assert given.settings == {"context_tokens": (0, "given"), "p_pass_threshold": (1.0, "given")}
        assert given.judge(QUESTION, DOCUMENT, ANSWER, fast=True).score == "FAIL"
    finally:
        (judge_dir / "lynx.json").unlink()


def test_a_broken_lynx_json_is_named(judge_dir):
    (judge_dir / "lynx.json").write_text("{context_tokens: 3")
    try:
        with pytest.raises(ValueError, match="lynx.json: not valid JSON"):
            Judge(judge_dir, device="cpu")
    finally:
        (judge_dir / "lynx.json").unlink()


def test_the_joined_text_never_exceeds_the_budget(count):
    """Chunk token counts only estimate the joined text's (tokens merge across a join, a cut chunk is cut by its
    characters): a HaluEval passage whose single kept chunk, cut in proportion, came out 2 tokens over 24."""
    passage = ("Maria Brontë ( , \"commonly\" ; 23 April 1814 – 6 May 1825) was the eldest daughter of Patrick Brontë "
               "and Maria Brontë, née Maria Branwell.Patrick Brontë ( , \"commonly\" ; 17 March 1777 – 7 June 1861) "
               "was an Irish priest and author who spent most of his adult life in England.")
    question = "Where did the father of Maria Brontë spend most of his adult life?"
    answer = "Patrick Brontë spent most of his adult life in London, England."
    for budget in range(12, count(passage)):
        sel = select_evidence(passage, question, answer, budget, count)
        assert sel.selected and sel.tokens == count(sel.text) <= budget, budget
        assert all(passage[s:e] in sel.text for s, e in sel.kept)
    for budget in range(20, count(DOCUMENT), 7):
        sel = select_evidence(DOCUMENT, QUESTION, ANSWER, budget, count, chunk_tokens=32)
        assert sel.tokens == count(sel.text) <= budget, budget
