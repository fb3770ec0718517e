"""Hand-written perturbations on hand-made examples: what each type changes, and what it must refuse."""

import random
import re

from lynx.data.perturb import (
    PERTURBERS, TYPES, Context, Edit, Perturbation, PerturbStats, apply_edits, check, edit_document, invert,
    new_number_text, perturb,
)

PASSAGE = (
    "In 2008, more than 400,000 children were infected worldwide, mostly through MTCT. Revenue rose to $1.2 billion "
    "on March 3, 2019, while costs increased by 12.5%. The drug was not associated with higher mortality. "
    "Barack Obama met Angela Merkel in Berlin, and later flew to Delhi. The Oberoi Group is based in Delhi. "
    "Patients were treated for 21 days. The revenue figure was audited."
)


def ctx(question="What happened?", passage=PASSAGE, source="covidqa", others=()):
    return Context(question, passage, source=source, other_answers=tuple(others))


def accepted(kind, gold, context=None, seed=0):
    """The perturbation of one type that `perturb` accepts, with the stats it recorded."""
    stats = PerturbStats()
    p = perturb(gold, context or ctx(), random.Random(seed), types=(kind,), stats=stats)
    return p, stats.counts[kind]


def splice(gold, edits):
    """The gold answer with each edit's `before` (at its offset) replaced by its `after`, by plain slicing from the
    last edit back (independent of `apply_edits`)."""
    out = gold
    for e in sorted(edits, key=lambda e: -e.start):
        assert gold[e.start:e.start + len(e.before)] == e.before
        out = out[:e.start] + e.after + out[e.start + len(e.before):]
    return out


def assert_is_edit_of(gold, p, kind):
    assert p.kind == kind and p.answer != gold
    assert splice(gold, p.edits) == p.answer


def test_number_keeps_format_and_changes_value():
    rng = random.Random(0)
    for text in ["400,000", "$1577.00", "12.5%", "7", "2019", "1,234.56", "0"]:
        for _ in range(20):
            new = new_number_text(text.lstrip("$"), rng)
            assert new != text.lstrip("$")
            old = text.lstrip("$")
            assert ("," in new) == ("," in old) or float(new.replace(",", "").rstrip("%")) < 1000
            assert len(new.split(".")[-1]) == len(old.split(".")[-1]) if "." in old else "." not in new
            assert new.endswith("%") == old.endswith("%")
    # years move by a few years, small counts by a few units
    assert all(abs(int(new_number_text("2019", rng)) - 2019) <= 3 for _ in range(20))
    assert all(0 <= int(new_number_text("2", rng)) <= 5 for _ in range(20))
    gold = "more than 400,000 children were infected worldwide"
    p, counts = accepted("number", gold)
    assert_is_edit_of(gold, p, "number")
    assert p.before == "400,000" and re.fullmatch(r"\d{3},000", p.after)
    assert counts["accepted"] == 1


def test_number_ignores_codes_and_dates():
    # Digits inside names ("HIV-1", "COVID-19", "FY2022") and dates are not numbers to change.
    p, counts = accepted("number", "HIV-1 and COVID-19 in FY2022 on March 3, 2019")
    assert p is None and counts["tried"] == 0


def test_number_refuses_a_value_the_passage_supports():
    # "21 days" -> "22 days" would be a FAIL, but a candidate whose words around it are in the passage is refused.
    gold = "Patients were treated for 20 days."
    supported = Perturbation("Patients were treated for 21 days.", "number", (Edit(26, "20", "21"),))
    assert check(gold, supported, ctx()) == "supported"
    assert check(gold, Perturbation(gold, "number", (Edit(26, "20", "20"),)), ctx()) == "noop"


def test_unit_swaps_within_dimension():
    gold = "Revenue rose to $1.2 billion"
    p, _ = accepted("unit", gold)
    assert_is_edit_of(gold, p, "unit")
    assert p.before == "billion" and p.after in ("million", "trillion")
    p, _ = accepted("unit", "Patients were treated for 21 days")
    assert p.before == "days" and p.after in ("hours", "weeks")
    # a unit word not after a number is left alone
    assert accepted("unit", "It took days and cost millions")[0] is None


def test_date_changes_one_component():
    gold = "on March 3, 2019"
    for seed in range(6):
        p, _ = accepted("date", gold, seed=seed)
        assert_is_edit_of(gold, p, "date")
        assert (p.before, p.after) != ("March", "March")
        if p.before == "March":
            assert p.after in {"December", "January", "February", "April", "May", "June"}
        elif p.before == "2019":
            assert p.after in {"2016", "2017", "2018", "2020", "2021", "2022"}
        else:
            assert p.before == "3" and p.after.isdigit() and p.after != "3"
    assert accepted("date", "400,000 children")[0] is None


def test_entity_swaps_with_same_kind_name_from_passage():
    p, _ = accepted("entity", "Barack Obama")
    assert p.answer == "Angela Merkel"  # the only other two-word person name in the passage
    p, _ = accepted("entity", "Delhi", ctx(question="Where is the Oberoi Group based?"))
    assert p.answer == "Berlin"  # "Oberoi Group" is an organisation, "Revenue" only a capitalised common word
    # the other option of an "A or B" question
    q = "Which magazine was started first Arthur's Magazine or First for Women?"
    p, _ = accepted("entity", "Arthur's Magazine", ctx(question=q, passage="Arthur's Magazine (1844) ..."))
    assert p.answer == "First for Women"
    p, _ = accepted("entity", "soldiers", ctx(question="Did he command more warships or soldiers?", passage="x"))
    assert p.answer == "warships"
    # kinds: acronyms with acronyms (not a heading in capitals), nationalities with nationalities, and a
    # possessive is not part of the name
    text = "CONCLUSIONS: the WHO and the CDC agreed. The English fought the Germans near Lincoln. CHIKV's spread."
    assert accepted("entity", "the WHO", ctx(passage=text))[0].answer in ("the CDC", "the CHIKV")
    assert accepted("entity", "the English", ctx(passage=text))[0].answer == "the Germans"
    assert accepted("entity", "near Lincoln", ctx(passage=text))[0] is None
    assert accepted("entity", "CHIKV's spread", ctx(passage=text))[0].answer in ("CDC's spread", "WHO's spread")
    # refuses: a name the passage does not have, and a passage without another name of the same kind
    assert accepted("entity", "Jacinda Ardern")[0] is None
    assert accepted("entity", "Barack Obama", ctx(passage="Barack Obama spoke."))[0] is None


def test_polarity_flips_negation_and_decisions():
    gold = "The drug was not associated with higher mortality"
    p, _ = accepted("polarity", gold)
    assert_is_edit_of(gold, p, "polarity")
    assert p.answer == "The drug was associated with higher mortality"
    gold = "Yes. The treatment is effective."
    p, _ = accepted("polarity", gold, ctx(source="pubmedqa"))
    assert p.answer == "No. The treatment is not effective."
    assert [(e.before, e.after) for e in p.edits] == [("Yes", "No"), ("is", "is not")]
    p, _ = accepted("polarity", "Maybe. Unclear.", ctx(source="pubmedqa"))
    assert p.answer in ("Yes. Unclear.", "No. Unclear.")
    # refuses: a negation the passage states ("was not associated" is in the passage)
    gold = "The drug was associated with higher mortality"
    p, counts = accepted("polarity", gold)
    assert p is None and counts["supported"] >= 1


def test_antonym_swaps_direction_words():
    gold = "costs increased by 12.5%"
    p, _ = accepted("antonym", gold)
    assert_is_edit_of(gold, p, "antonym")
    assert (p.before, p.after) == ("increased", "decreased")
    p, _ = accepted("antonym", "Higher doses were used")
    assert p.answer == "Lower doses were used"  # capitalisation kept
    # refuses: a capitalised word inside a name ("Best Buy"), and a swap the passage supports
    assert accepted("antonym", "It was bought by Best Buy")[0] is None
    p, counts = accepted("antonym", "The drug was not associated with lower mortality")
    assert p is None and counts["supported"] == 1


def test_added_claim_appends_an_unsupported_sentence():
    gold = "Patients were treated for 21 days."
    p, _ = accepted("added_claim", gold)
    assert p.answer.startswith(gold + " ") and len(p.answer) > len(gold) + 10
    assert p.edits[0].before == "" and p.edits[0].start == len(gold)
    # refuses a claim the passage covers, or whose number/name the passage has
    covered = apply_edits(gold, [Edit(len(gold), "", " The Oberoi Group is based in Delhi.")], "added_claim")
    assert check(gold, covered, ctx()) == "supported"
    named = apply_edits(gold, [Edit(len(gold), "", " This happened in 2008.")], "added_claim")
    assert check(gold, named, ctx()) == "supported"


def test_other_answer_uses_another_question_on_the_passage():
    others = ["Angela Merkel", "Barack Obama met Angela Merkel", "21 days"]
    p, counts = accepted("other_answer", "Barack Obama", ctx(others=others), seed=1)
    assert p.kind == "other_answer" and p.answer in ("Angela Merkel", "21 days")
    # refuses an answer that contains this one (it may answer this question too) and an identical one
    p, counts = accepted("other_answer", "Barack Obama", ctx(others=["Barack Obama met Angela Merkel", "barack obama"]))
    assert p is None and counts["supported"] == 1 and counts["noop"] == 1
    assert accepted("other_answer", "Barack Obama", ctx(others=[]))[0] is None


def test_a_second_gold_answer_of_the_question_is_never_a_fail_answer():
    # The same question asked twice on one document with two gold answers: neither may be the other's FAIL answer.
    context = Context("Who met Angela Merkel?", PASSAGE, source="drop", other_answers=("Barack Obama",),
                      gold_answers=("barack  obama.",))
    assert check("Obama", Perturbation("Barack Obama", "other_answer", (Edit(0, "Obama", "Barack Obama"),)),
                 context) == "gold"
    p, counts = accepted("other_answer", "Obama", context)
    assert p is None and counts["gold"] == 1
    context.other_answers = ("Barack Obama", "Angela Merkel")
    assert accepted("other_answer", "Obama", context)[0].answer == "Angela Merkel"
    stats = PerturbStats()
    stats.add("other_answer", "tried", 2)
    stats.add("other_answer", "gold")
    assert stats.table()["other_answer"]["rejected_gold"] == 1


def test_perturb_is_deterministic_and_covers_all_types():
    gold = "Revenue rose to $1.2 billion on March 3, 2019, while costs increased by 12.5% and Barack Obama was not there"
    context = ctx(others=["21 days"])
    runs = [[perturb(gold, context, random.Random(seed)) for seed in range(40)] for _ in range(2)]
    assert runs[0] == runs[1]
    assert {p.kind for p in runs[0]} == set(TYPES)
    assert set(PERTURBERS) == set(TYPES)
    # Every accepted perturbation is one a reader would write by hand for this answer: per type, the spans that may
    # change (offset, text) and what each may become.
    at = gold.index
    allowed = {
        "number": {(at("1.2"), "1.2"): r"\d+\.\d", (at("12.5%"), "12.5%"): r"\d+\.\d%"},  # format kept
        # A number of the same kind that the passage gives for something else (its year, its other integers).
        "number_swap": {(at("2019"), "2019"): r"2008", (at("3,"), "3"): r"400,000|21"},
        "unit": {(at("billion"), "billion"): r"million|trillion"},
        "date": {(at("March"), "March"): r"December|January|February|April|May|June",
                 (at("3,"), "3"): r"[12]?\d|3[01]", (at("2019"), "2019"): r"201[6-8]|202[0-2]"},
        "entity": {(at("Barack Obama"), "Barack Obama"): r"Angela Merkel"},  # the passage's other person
        "polarity": {(at("was not"), "was not"): r"was"},
        "antonym": {(at("rose"), "rose"): r"fell", (at("increased"), "increased"): r"decreased"},
        "added_claim": {(len(gold), ""): r"\. [A-Z].*\."},  # one new sentence after the answer
        "other_answer": {(0, gold): r"21 days"},  # the other question's answer, whole
    }
    for p in runs[0]:
        (e,) = p.edits
        pattern = allowed[p.kind].get((e.start, e.before))
        assert pattern is not None and re.fullmatch(pattern, e.after) and e.after != e.before, p
        assert p.answer == splice(gold, p.edits)


def test_edit_document_says_what_the_perturbed_answer_says_in_the_sentence_that_states_it():
    passage = "The trial began on 21 May. Patients were treated for 21 days. Revenue rose by 2.5%, and 21 sites joined."
    gold = "They were treated for 21 days."
    p = apply_edits(gold, [Edit(gold.index("21"), "21", "37")], "number")
    edited = edit_document(passage, gold, p)
    # Only the sentence sharing the answer's words changes; "21 May", "21 sites" and "2.5%" stay.
    assert edited == "The trial began on 21 May. Patients were treated for 37 days. Revenue rose by 2.5%, and 21 sites joined."
    back = invert(gold, p)
    assert back.answer == gold and back.kind == "number"
    assert splice(p.answer, back.edits) == gold
    # A name of several words, and an answer with two edits.
    gold2 = "Barack Obama met Angela Merkel"
    p2 = apply_edits(gold2, [Edit(0, "Barack Obama", "Angela Merkel"), Edit(17, "Angela Merkel", "Barack Obama")],
                     "entity")
    assert "Angela Merkel met Barack Obama in Berlin" in edit_document(PASSAGE, gold2, p2)
    assert invert(gold2, p2).answer == gold2


def test_edit_document_refuses_what_is_not_a_replacement_stated_in_the_document():
    gold = "Patients were treated for 21 days."
    added = apply_edits(gold, [Edit(len(gold), "", " It was cheap.")], "added_claim")
    assert edit_document(PASSAGE, gold, added) is None  # not a replacement
    absent = apply_edits("It took 22 days", [Edit(8, "22", "30")], "number")
    assert edit_document(PASSAGE, "It took 22 days", absent) is None  # "22" is not in the passage
    piece = apply_edits("a 2 percent rise", [Edit(2, "2", "7")], "number")
    assert edit_document("Revenue rose by 2.5% this year.", "a 2 percent rise", piece) is None  # "2" of "2.5" is not "2"
