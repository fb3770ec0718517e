"""Loaders: the shipped raw sources load into common rows; malformed rows are reported with file and row."""

import gzip
import json

import pytest

from lynx.data.sources import DEFAULT_RAW_DIR, SOURCES, load_source, render_drop_answer

EXPECTED_ROWS = {"halueval": 499, "pubmedqa": 984, "covidqa": 1342, "drop": 947, "financebench": 150}


@pytest.mark.parametrize("source", SOURCES)
def test_shipped_sources_load_cleanly(source):
    rows, skipped = load_source(source)
    assert len(rows) == EXPECTED_ROWS[source] and skipped == []
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert r.source == source and r.question and r.passage and r.gold_answer and r.group
    assert (DEFAULT_RAW_DIR / source).is_dir() and list((DEFAULT_RAW_DIR / source).glob("LICENSE*"))


def test_source_specific_fields():
    pubmed = {r.id: r for r in load_source("pubmedqa")[0]}
    r = pubmed["pubmedqa-16418930"]
    assert r.gold_answer.startswith("No. Using the charts described")
    assert r.gold_answer == r.extra["final_decision"].capitalize() + ". " + r.extra["long_answer"]
    covid = load_source("covidqa")[0]
    assert all(r.passage[r.extra["answer_start"]:].startswith(r.gold_answer) for r in covid)
    assert max(len(r.passage) for r in covid) > 60_000  # long papers are kept whole
    assert len({r.group for r in covid}) == 98
    halu = load_source("halueval")[0]
    assert all(1 <= len(r.extra["hallucinated_answers"]) <= 2 for r in halu)
    assert halu[0].gold_answer == "Arthur's Magazine" and "First for Women" in halu[0].extra["hallucinated_answers"][0]
    fin = {r.id: r for r in load_source("financebench")[0]}
    r = fin["financebench-financebench_id_03029"]
    assert r.gold_answer == "$1577.00" and "(1,577)" in r.passage and "\n \n" not in r.passage
    assert len({r.extra["doc_name"] for r in fin.values()}) == 84
    assert len({r.group for r in fin.values()}) == 32  # grouped by company: a filing repeats earlier years' figures


def test_render_drop_answer():
    empty = {"day": "", "month": "", "year": ""}
    assert render_drop_answer({"number": "2", "date": empty, "spans": []}) == ("2", "number")
    assert render_drop_answer({"number": "", "date": {"day": "1", "month": "March", "year": "1565"}, "spans": []}) \
        == ("March 1, 1565", "date")
    assert render_drop_answer({"number": "", "date": {"day": "", "month": "", "year": "1615"}, "spans": []}) \
        == ("1615", "date")
    assert render_drop_answer({"number": "", "date": empty, "spans": ["a", "b"]}) == ("a, b", "spans")
    with pytest.raises(ValueError):
        render_drop_answer({"number": "", "date": empty, "spans": []})


def test_malformed_rows_are_reported_and_skipped(tmp_path):
    (tmp_path / "halueval").mkdir()
    good = {"knowledge": "K.", "question": "Q?", "right_answer": "A", "hallucinated_answer": "B"}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "question": ""}), json.dumps({**good, "question": "Q2?"})]
    (tmp_path / "halueval" / "qa_one-turn_data.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "halueval" / "qa_multi-turn_data.jsonl.gz", "wt") as f:
        f.write(json.dumps({**good, "hallucinated_answer": "C"}) + "\n")
    rows, skipped = load_source("halueval", tmp_path)
    assert [r.question for r in rows] == ["Q?", "Q2?"]
    assert rows[0].extra["hallucinated_answers"] == ["B", "C"]
    assert len(skipped) == 2
    assert skipped[0].startswith("qa_one-turn_data.jsonl:2: invalid JSON")
    assert skipped[1].startswith("qa_one-turn_data.jsonl:3: missing or empty 'question'")

    (tmp_path / "drop").mkdir()
    drop = {"p1": {"passage": "P.", "qa_pairs": [
        {"question": "Q?", "answer": {"number": "3", "date": {}, "spans": []}, "query_id": "x"},
        {"question": "Q?", "answer": {"number": "", "date": {}, "spans": []}, "query_id": "y"}]}}
    (tmp_path / "drop" / "drop_contrast_sets_test.json").write_text(json.dumps(drop))
    rows, skipped = load_source("drop", tmp_path)
    assert [r.id for r in rows] == ["drop-x"]
    assert skipped == ["drop_contrast_sets_test.json:p1.qa_pairs[1]: answer has no number, date or spans"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pubmedqa/ori_pqal.json"):
        load_source("pubmedqa", tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        load_source("ragtruth")


# --- --source-file: a team's own QA records ---------------------------------------------------------------------

# Ten documents of a made-up company's handbook, four questions each, with the numbers and names that perturbation
# changes. Varied sentences: documents written from one template would be merged as near-duplicates.
OWN_DOCUMENTS = [
    ("The Rotterdam warehouse opened in March 2009 under site manager Elena Vos. It has 14 loading docks and stores "
     "up to 38,000 pallets. About 260 people work there in three shifts.",
     [("When did the Rotterdam warehouse open?", "In March 2009"),
      ("Who was the site manager when the Rotterdam warehouse opened?", "Elena Vos"),
      ("How many loading docks does the Rotterdam warehouse have?", "14 loading docks"),
      ("How many pallets can the Rotterdam warehouse store?", "Up to 38,000 pallets")]),
    ("Our travel policy allows economy class on flights shorter than 6 hours. Hotel costs are refunded up to 180 euros "
     "a night in Europe. Claims go to Marcus Heller in finance within 30 days of the trip.",
     [("Which class may employees fly on flights shorter than 6 hours?", "Economy class"),
      ("How much is refunded for a hotel night in Europe?", "Up to 180 euros a night"),
      ("Who handles travel claims?", "Marcus Heller in finance"),
      ("Within how many days must a travel claim be made?", "Within 30 days of the trip")]),
    ("Priya Raman founded the analytics team in 2016 with four engineers. By 2023 the team had grown to 42 people, "
     "and it now runs 1,200 dashboards for the sales department in Lisbon and Madrid.",
     [("Who founded the analytics team?", "Priya Raman"),
      ("In which year was the analytics team founded?", "2016"),
      ("How many people were on the analytics team by 2023?", "42 people"),
      ("How many dashboards does the analytics team run?", "1,200 dashboards")]),
    ("New employees receive 25 days of paid leave a year, rising to 28 days after five years of service. Parental "
     "leave is 16 weeks at full pay. Questions go to Hannah Birk in human resources.",
     [("How many days of paid leave do new employees receive?", "25 days a year"),
      ("How much paid leave do employees get after five years of service?", "28 days a year"),
      ("How long is parental leave?", "16 weeks at full pay"),
      ("Who answers questions about leave?", "Hannah Birk in human resources")]),
    ("The Kestrel delivery van was introduced in 2019. It carries 1,150 kilograms, has a range of 310 kilometres on "
     "one charge, and charges fully in 7 hours. Fleet manager Jonas Berg ordered 85 of them.",
     [("When was the Kestrel delivery van introduced?", "In 2019"),
      ("How much can the Kestrel van carry?", "1,150 kilograms"),
      ("What is the range of the Kestrel van on one charge?", "310 kilometres"),
      ("Who ordered the Kestrel vans?", "Fleet manager Jonas Berg")]),
    ("In the 2022 staff survey, 71 percent of the 3,400 respondents said they would recommend the company as an "
     "employer. The survey was run by Clara Duarte, and the next one is planned for October 2024.",
     [("What share of respondents would recommend the company as an employer?", "71 percent"),
      ("How many people responded to the 2022 staff survey?", "3,400 respondents"),
      ("Who ran the 2022 staff survey?", "Clara Duarte"),
      ("When is the next staff survey planned?", "In October 2024")]),
    ("The customer support centre in Dublin answers calls from 8 am to 8 pm on weekdays. It handled 96,000 calls last "
     "year with an average waiting time of 3 minutes. Its head is Owen Gallagher.",
     [("Where is the customer support centre?", "In Dublin"),
      ("How many calls did the support centre handle last year?", "96,000 calls"),
      ("What was the average waiting time at the support centre?", "3 minutes"),
      ("Who heads the customer support centre?", "Owen Gallagher")]),
    ("Laptops are replaced every 4 years, phones every 3 years. The IT desk, led by Sofia Lindgren since 2020, keeps "
     "a stock of 120 spare laptops at the Utrecht office.",
     [("How often are laptops replaced?", "Every 4 years"),
      ("How often are phones replaced?", "Every 3 years"),
      ("Who leads the IT desk?", "Sofia Lindgren"),
      ("How many spare laptops are kept at the Utrecht office?", "120 spare laptops")]),
    ("The solar roof on the Antwerp depot was installed in 2021 by Voltera. Its 2,800 panels produce about 1.3 "
     "gigawatt hours a year, which covers 60 percent of the depot's electricity.",
     [("When was the solar roof on the Antwerp depot installed?", "In 2021"),
      ("Which company installed the solar roof?", "Voltera"),
      ("How many panels does the solar roof have?", "2,800 panels"),
      ("What share of the depot's electricity does the solar roof cover?", "60 percent")]),
    ("Apprentices join in September and train for 3 years. Each year the company takes on 35 apprentices, mentored "
     "by Lukas Meier. Since 2015, 88 percent of them have been offered a permanent job.",
     [("When do apprentices join?", "In September"),
      ("How long do apprentices train?", "3 years"),
      ("How many apprentices does the company take on each year?", "35 apprentices"),
      ("Who mentors the apprentices?", "Lukas Meier")]),
]


def own_domain_records() -> list[dict]:
    """40 question / document / gold answer records in HaluBench's column names; the first document's questions
    carry a hallucinated answer of their own."""
    records = []
    for d, (document, qas) in enumerate(OWN_DOCUMENTS):
        for q, (question, answer) in enumerate(qas):
            record = {"id": f"doc{d}-q{q}", "passage": document, "question": question, "answer": answer}
            if d == 0:
                record["hallucinated_answer"] = f"Not stated, but probably {answer.lower()} plus two"
            records.append(record)
    return records


def test_a_source_file_loads_into_the_rows_the_shipped_loaders_make(tmp_path):
    from lynx.data.source_file import SourceFile

    path = tmp_path / "handbook.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in own_domain_records()))
    rows, skipped = SourceFile.parse(str(path)).load()
    assert skipped == [] and len(rows) == 40 and {r.source for r in rows} == {"handbook"}
    assert rows[0].id == "handbook-doc0-q0" and rows[0].gold_answer == "In March 2009"
    assert len({r.group for r in rows}) == 10  # one group per document
    assert rows[0].extra == {"hallucinated_answers": ["Not stated, but probably in march 2009 plus two"]}
    assert rows[4].extra == {}

    # HaluBench's own layout: a FAIL row for the same question and document is that question's hallucinated answer.
    labelled = [{**r, "label": "PASS"} for r in own_domain_records()[4:8]]
    labelled.insert(1, {**labelled[0], "answer": "Economy plus", "label": "FAIL"})
    labelled.append({**labelled[-1], "question": "An orphan?", "answer": "x", "label": "FAIL"})
    labelled.append({**labelled[-2], "passage": "", "label": "PASS"})
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "hallucinated_answer"}) + "\n"
                            for r in labelled))
    source = SourceFile.parse(f"{path}:policies")
    rows, skipped = source.load()
    assert source.name == "policies" and [r.id for r in rows] == [f"policies-doc1-q{i}" for i in range(4)]
    assert rows[0].extra == {"hallucinated_answers": ["Economy plus"]} and rows[1].extra == {}
    assert skipped == ["labelled.jsonl:7: empty document ('passage' or 'context')",
                       "labelled.jsonl:6: a FAIL answer with no PASS answer for its question and document"]
