"""lynx.rows: one reader for every format rows come in (JSONL, JSON, CSV/TSV, Parquet, `datasets` folders, the hub
cache), with the same checks and the same judged rows whatever the format, and a named error for each bad input."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lynx.rows import BadInput, parse_columns, read_dicts, read_rows, write_rows
from tests.test_judge_cli import GOOD_ROWS, cli, model_dir  # noqa: F401 (cli, model_dir: fixtures)

COLUMNS = ("id", "passage", "context", "question", "answer", "label", "source_ds")


def given(row: dict) -> dict:
    """The row without its missing values: a CSV or Parquet row has every column, a JSON object only its own keys."""
    return {k: v for k, v in row.items() if v is not None}


def write_jsonl(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(rows, path, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(rows, path):
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in COLUMNS} for r in rows]), path)
    return path


def save_datasets_folder(rows, path):
    import datasets

    datasets.Dataset.from_list([{k: r.get(k) for k in COLUMNS} for r in rows]).save_to_disk(str(path))
    return path


def test_every_format_reads_the_same_rows(tmp_path):
    files = {
        "jsonl": write_jsonl(GOOD_ROWS, tmp_path / "rows.jsonl"),
        "json": tmp_path / "rows.json",
        "csv": write_csv(GOOD_ROWS, tmp_path / "rows.csv"),
        "tsv": write_csv(GOOD_ROWS, tmp_path / "rows.tsv", delimiter="\t"),
        "parquet": write_parquet(GOOD_ROWS, tmp_path / "rows.parquet"),
        "datasets": save_datasets_folder(GOOD_ROWS, tmp_path / "rows_dataset"),
    }
    files["json"].write_text(json.dumps(GOOD_ROWS))
    for kind, path in files.items():
        rows, bad = read_rows(path, require_label=True)
        assert bad == [], kind
        assert [given(obj) for _, obj in rows] == GOOD_ROWS, kind
    assert [place for place, _ in read_rows(files["jsonl"])[0]] == ["1", "2", "3", "4"]  # line numbers
    assert [place for place, _ in read_rows(files["csv"])[0]] == ["2", "3", "4", "5"]  # after the header
    assert [place for place, _ in read_rows(files["parquet"])[0]] == ["row 0", "row 1", "row 2", "row 3"]


def test_parquet_csv_and_datasets_folder_are_judged_as_the_jsonl_is(model_dir, tmp_path, cli):  # noqa: F811
    inputs = [write_jsonl(GOOD_ROWS, tmp_path / "rows.jsonl"), write_parquet(GOOD_ROWS, tmp_path / "rows.parquet"),
              write_csv(GOOD_ROWS, tmp_path / "rows.csv"), save_datasets_folder(GOOD_ROWS, tmp_path / "rows_ds")]
    judged = []
    for i, path in enumerate(inputs):
        out = tmp_path / f"judged{i}.jsonl"
        r = cli("--model", model_dir, "--input", path, "--output", out, "--fast")
        assert r.returncode == 0, r.stderr
        judged.append([given(row) for row in read_dicts(out)])
    assert all(rows == judged[0] for rows in judged[1:])
    assert [row["id"] for row in judged[0]] == ["r1", "r2", "r3", "r4"]
    assert all(row["score"] in ("PASS", "FAIL") for row in judged[0])

    r = cli("--model", model_dir, "--input", inputs[1], "--output", tmp_path / "judged.parquet", "--fast")
    assert r.returncode == 0, r.stderr
    assert [given(row) for row in pq.read_table(tmp_path / "judged.parquet").to_pylist()] == judged[0]


def test_bad_rows_are_named_by_line_or_row_index_in_every_format(model_dir, tmp_path, cli):  # noqa: F811
    rows = [GOOD_ROWS[0], {**GOOD_ROWS[1], "question": None}, {**GOOD_ROWS[2], "passage": "   "},
            {**GOOD_ROWS[3], "label": "MAYBE"}]
    multiline = {**GOOD_ROWS[0], "id": "r0", "passage": "First line.\nSecond line."}  # one record, two lines
    reasons = ["missing 'question'", "empty document", "PASS or FAIL"]
    for path, places in [(write_parquet(rows, tmp_path / "bad.parquet"), ["row 1", "row 2", "row 3"]),
                         (write_csv([multiline, *rows], tmp_path / "bad.csv"), ["5", "6", "7"])]:
        r = cli("--model", model_dir, "--input", path, "--output", tmp_path / "o.jsonl", "--fast")
        assert r.returncode == 0, r.stderr
        for place, why in zip(places, reasons):
            assert f"{path}:{place}: bad row: " in r.stderr and why in r.stderr.split(f"{path}:{place}:")[1]
        assert "bad rows skipped: 3" in r.stderr
        strict = cli("--model", model_dir, "--input", path, "--output", tmp_path / "s.jsonl", "--strict")
        assert strict.returncode == 2 and "3 bad row(s)" in strict.stderr


def test_columns_maps_other_names_and_a_file_that_cannot_be_mapped_lists_its_columns(model_dir, tmp_path, cli):  # noqa: F811
    path = tmp_path / "mine.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["q", "doc", "reply", "verdict"])
        w.writerows([[r["question"], r.get("passage") or r.get("context"), r["answer"], r["label"]] for r in GOOD_ROWS])
    r = cli("--model", model_dir, "--input", path, "--output", tmp_path / "o.jsonl", "--fast")
    assert r.returncode == 2 and str(path) in r.stderr and "columns found: q, doc, reply, verdict" in r.stderr
    r = cli("--model", model_dir, "--input", path, "--output", tmp_path / "o.jsonl", "--eval", "--fast",
            "--columns", "question=q,passage=doc,answer=reply,label=verdict", "--bootstrap", 10)
    assert r.returncode == 0, r.stderr
    rows = read_dicts(tmp_path / "o.jsonl")
    assert [row["question"] for row in rows] == [g["question"] for g in GOOD_ROWS] and "q" not in rows[0]
    r = cli("--model", model_dir, "--input", path, "--output", tmp_path / "o.jsonl", "--columns", "question=quest")
    assert r.returncode == 2 and "'quest'" in r.stderr and "columns found: q, doc, reply, verdict" in r.stderr
    assert cli("--model", model_dir, "--input", path, "--eval", "--columns", "nonsense=q").returncode == 2
    assert parse_columns("question=q, passage=ctx") == {"question": "q", "passage": "ctx"}
    with pytest.raises(BadInput, match="OURS=THEIRS"):
        parse_columns("question")


def bad_input_files(folder) -> list[tuple[object, str]]:
    """Files no reader can take, each with what its error says: (path, message)."""
    unknown = folder / "qa.xlsx"
    unknown.write_bytes(b"PK\x03\x04")
    not_parquet = folder / "qa.parquet"
    not_parquet.write_text("passage,question,answer\n")
    unmapped = folder / "unmapped.csv"
    unmapped.write_text("doc,q,gold\nA doc.,Q?,A\n")
    extra_field = folder / "extra.csv"
    extra_field.write_text('passage,question,answer\n"A doc.",Q?,A\n"B doc.",Q?,A,surplus\n')
    bad_quote = folder / "quote.csv"
    bad_quote.write_text('passage,question,answer\n"A doc.",Q?,A\n"B doc."x,Q?,A\n')
    cut_json = folder / "cut.json"
    cut_json.write_text('[{"passage": "A doc.", "question": "Q?",\n')
    return [(unknown, "cannot read '.xlsx' files"), (not_parquet, "pyarrow cannot read it as Parquet"),
            (unmapped, "columns found: doc, q, gold"),
            (extra_field, "extra.csv:3: malformed CSV row: 4 fields, the header has 3"),
            (bad_quote, "quote.csv:3: malformed CSV row"), (cut_json, "cut.json: invalid JSON at line 2")]


def test_bad_files_are_named_errors_with_exit_code_2(model_dir, tmp_path, cli):  # noqa: F811
    for path, message in bad_input_files(tmp_path):
        r = cli("--model", model_dir, "--input", path, "--output", tmp_path / "o.jsonl")
        assert r.returncode == 2 and message in r.stderr and str(path) in r.stderr, r.stderr
        assert not (tmp_path / "o.jsonl").exists()
        with pytest.raises(BadInput, match=message.split(": ")[-1]):
            read_rows(path)


def test_datasets_folder_with_splits_and_the_hub_cache(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    rows = [{k: r.get(k) for k in COLUMNS} for r in GOOD_ROWS]
    folder = tmp_path / "dict"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:3]),
                          "validation": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(folder))
    with pytest.raises(BadInput, match="several splits.*test, validation"):
        read_rows(folder)
    assert [obj["id"] for _, obj in read_rows(folder / "validation")[0]] == ["r4"]

    # A dataset repository in the hub cache, laid out as `huggingface-cli download` leaves it; nothing is fetched.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    revision = "0" * 40
    repo = tmp_path / "hub" / "datasets--PatronusAI--HaluBench"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision / "data").mkdir(parents=True)
    write_parquet(GOOD_ROWS, repo / "snapshots" / revision / "data" / "test-00000-of-00001.parquet")
    for name in ("PatronusAI/HaluBench", "PatronusAI/HaluBench/test"):
        assert [given(obj) for _, obj in read_rows(name, require_label=True)[0]] == GOOD_ROWS
    with pytest.raises(BadInput, match="no split 'train'"):
        read_rows("PatronusAI/HaluBench/train")
    with pytest.raises(FileNotFoundError, match=f"not found: acme/qa .*hub cache {tmp_path / 'hub'}"):
        read_rows("acme/qa")
    with pytest.raises(FileNotFoundError, match="input file not found: data/missing.jsonl$"):
        read_rows("data/missing.jsonl")


def test_write_rows_round_trips_jsonl_and_parquet(tmp_path):
    rows = [{"id": "a", "score": "PASS", "p_pass": 0.75, "reasoning": ["x", "y"], "skipped": None},
            {"id": "b", "score": None, "p_pass": None, "reasoning": [], "extra": "é"}]
    for name in ("out.jsonl", "out.parquet"):
        back = read_dicts(write_rows(rows, tmp_path / "sub" / name))
        assert [given(r) for r in back] == [given(r) for r in rows], name
    assert "é" in (tmp_path / "sub" / "out.jsonl").read_text(encoding="utf-8")  # UTF-8, not \u escapes
