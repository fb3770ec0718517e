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
