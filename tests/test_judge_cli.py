"""judge.py end to end on a tiny random checkpoint with its own tiny tokenizer (CPU).

Most runs call `main(argv)` in this process (a subprocess costs seconds just importing torch on a loaded machine);
the exit-code check and the torchrun run use real subprocesses.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_judge import make_tiny_judge_dir

GOOD_ROWS = [
    {"id": "r1", "passage": "The book was written by Ann Lee in 1990.", "question": "Who wrote it?",
     "answer": "Ann Lee", "label": "PASS", "source_ds": "covidQA"},
    {"id": "r2", "context": "It happened in 1990.", "question": "When?", "answer": "In 1991", "label": "FAIL",
     "source_ds": "covidQA"},
    {"id": "r3", "passage": "The sky is blue.", "question": "What colour is the sky?", "answer": "Blue",
     "label": "pass", "source_ds": "DROP"},
    {"id": "r4", "passage": "Water boils at 100 C at sea level.", "question": "Boiling point?", "answer": "90 C",
     "label": "FAIL", "source_ds": "DROP"},
]


def load_cli():
    spec = importlib.util.spec_from_file_location("judge_cli", REPO / "judge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = load_cli()


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """Run judge.py's main in-process; returns exit code, stdout, stderr like subprocess.run."""

    def run(*args):
        try:
            code = CLI.main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, torchrun: int | None = None, timeout=300):
    cmd = [sys.executable, str(REPO / "judge.py"), *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(free_port()), str(REPO / "judge.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_judge_dir(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def rows_file(tmp_path):
    lines = [json.dumps(GOOD_ROWS[0]), "{not json", json.dumps(GOOD_ROWS[1]), "",
             json.dumps({"passage": "p", "answer": "a", "label": "PASS"}),  # no question
             json.dumps(GOOD_ROWS[2]), json.dumps({**GOOD_ROWS[3], "label": "MAYBE"}), json.dumps(GOOD_ROWS[3]),
             json.dumps(["a", "list"])]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_single_example_prints_a_verdict(model_dir, cli):
    r = cli("--model", model_dir, "--question", "Who?", "--document", "Ann wrote it.", "--answer", "Ann",
            "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    verdict = json.loads(r.stdout)
    assert set(verdict) >= {"score", "reasoning", "p_pass", "raw"}
    assert verdict["score"] in ("PASS", "FAIL", None) and isinstance(verdict["reasoning"], list)
    fast = json.loads(cli("--model", model_dir, "--question", "Who?", "--context", "Ann wrote it.",
                          "--answer", "Ann", "--fast").stdout)
    assert fast["score"] in ("PASS", "FAIL") and 0.0 <= fast["p_pass"] <= 1.0


def test_batch_skips_bad_rows_with_line_numbers(model_dir, rows_file, tmp_path, cli):
    out = tmp_path / "out.jsonl"
    r = cli("--model", model_dir, "--input", rows_file, "--output", out, "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    for lineno, why in [(2, "invalid JSON"), (5, "missing 'question'"), (7, "PASS or FAIL"), (9, "JSON object")]:
        assert f"rows.jsonl:{lineno}: bad row: " in r.stderr and why in r.stderr
    assert "bad rows skipped: 4" in r.stderr and "ex/s" in r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["r1", "r2", "r3", "r4"]
    for row, original in zip(rows, GOOD_ROWS):
        assert {k: row[k] for k in original} == original  # input fields kept
        assert set(row) >= {"score", "p_pass", "reasoning", "raw"} and row["skipped"] is None

    strict = run_cli("--model", model_dir, "--input", rows_file, "--output", tmp_path / "strict.jsonl", "--strict")
    assert strict.returncode == 2 and "--strict" in strict.stderr
    assert not (tmp_path / "strict.jsonl").exists()


def test_eval_writes_reports_and_torchrun_gathers_the_same_rows(model_dir, tmp_path, cli):
    rows_file = tmp_path / "labelled.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS * 2))
    out = tmp_path / "judged.jsonl"
    r = cli("--model", model_dir, "--input", rows_file, "--output", out, "--eval", "--max-new-tokens", 6,
            "--bootstrap", 50, "--batch-size", 3)
    assert r.returncode == 0, r.stderr
    report_dir = tmp_path / "judged_report"
    report = json.loads((report_dir / "report.json").read_text())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report["n_judged"] == 8 and report["label_counts"] == {"PASS": 4, "FAIL": 4}
    correct = sum(row["score"] == row["label"].upper() for row in rows)
    assert report["accuracy"]["pooled"] == pytest.approx(correct / 8)
    assert report["per_source"]["covidQA"]["published_accuracy"]["Lynx 8B"] == 96.3
    assert report["fast_mode"]["n_compared"] == sum(row["score"] is not None for row in rows)
    assert all(row["score_fast"] in ("PASS", "FAIL") for row in rows)
    assert report["run"]["processes"] == 1
    assert "Lynx 70B" in (report_dir / "report.md").read_text()

    dist_out = tmp_path / "dist.jsonl"
    r2 = run_cli("--model", model_dir, "--input", rows_file, "--output", dist_out, "--eval", "--max-new-tokens", 6,
                 "--bootstrap", 50, "--batch-size", 3, "--report-dir", tmp_path / "dist_report", torchrun=2)
    assert r2.returncode == 0, r2.stderr
    dist_rows = [json.loads(line) for line in dist_out.read_text().splitlines()]
    assert [row["id"] for row in dist_rows] == [row["id"] for row in rows]
    for a, b in zip(rows, dist_rows):
        assert a["raw"] == b["raw"] and a["score_fast"] == b["score_fast"]
        assert a["p_pass_fast"] == pytest.approx(b["p_pass_fast"], abs=1e-5)
    dist_report = json.loads((tmp_path / "dist_report" / "report.json").read_text())
    assert dist_report["run"]["processes"] == 2 and dist_report["n_judged"] == 8
    assert dist_report["accuracy"] == report["accuracy"]


def test_eval_needs_labels_and_too_long_rows_are_skipped_not_fatal(model_dir, tmp_path, cli):
    rows_file = tmp_path / "rows.jsonl"
    long_row = {**GOOD_ROWS[0], "id": "long", "passage": "word " * 3000}
    no_label = {k: v for k, v in GOOD_ROWS[1].items() if k != "label"}
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in [long_row, no_label, GOOD_ROWS[2]]))
    r = cli("--model", model_dir, "--input", rows_file, "--output", tmp_path / "o.jsonl", "--eval", "--fast",
            "--long-inputs", "skip", "--bootstrap", 20)
    assert r.returncode == 0, r.stderr
    assert "rows.jsonl:2: bad row: missing 'label'" in r.stderr and "too long, skipped: 1" in r.stderr
    report = json.loads((tmp_path / "o_report" / "report.json").read_text())
    assert report["n_judged"] == 1 and report["n_skipped"] == 1

    r = cli("--model", model_dir, "--input", rows_file, "--output", tmp_path / "t.jsonl", "--fast")
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert r.returncode == 0 and rows[0]["truncated"] and rows[0]["score"] in ("PASS", "FAIL")


def test_context_tokens_selects_evidence_records_it_and_reports_by_length(model_dir, tmp_path, cli):
    from lynx.evaluate import whole_prompt_tokens
    from lynx.judge import fast_score_tokens
    from lynx.prompt import judge_messages
    from lynx.tokenizer import Tokenizer
    from tests.test_context import ANSWER, DOCUMENT, QUESTION

    rows = [{"id": "long", "passage": DOCUMENT, "question": QUESTION, "answer": ANSWER, "label": "PASS",
             "source_ds": "x"}, {**GOOD_ROWS[1], "source_ds": "x"}]
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("--model", model_dir, "--input", rows_file, "--output", tmp_path / "o.jsonl", "--eval", "--fast",
            "--context-tokens", 64, "--bootstrap", 10)
    assert r.returncode == 0, r.stderr
    assert "judge: context_tokens 64 (given), p_pass_threshold 0.5 (default)" in r.stderr
    assert "evidence selected: 1;" in r.stderr
    long, short = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert long["selected"] and long["context_tokens"] <= 64 < long["document_tokens"]
    assert short["selected"] is None and short["context_tokens"] == short["document_tokens"]
    report = json.loads((tmp_path / "o_report" / "report.json").read_text())
    assert report["n_selected"] == 1 and report["run"]["context_tokens"] == 64
    # Buckets by the prompt with the whole document (fast mode: with the forced prefix), however much was read.
    tokenizer = Tokenizer.from_pretrained(model_dir)
    whole = tokenizer.apply_chat_template(judge_messages(QUESTION, DOCUMENT, ANSWER), add_generation_prompt=True)
    assert whole_prompt_tokens(long) == len(whole) + len(fast_score_tokens(tokenizer)[0]) > 2048
    assert {k: v["n"] for k, v in report["per_length"].items()} == {"<512": 1, ">2k": 1}
    assert "By prompt length" in (tmp_path / "o_report" / "report.md").read_text()
    assert cli("--model", model_dir, "--question", "q", "--context", "c", "--answer", "a",
               "--context-tokens", -1).returncode == 2


def test_usage_errors(model_dir, tmp_path, cli):
    assert cli("--model", model_dir, "--question", "q").returncode == 2
    r = cli("--model", tmp_path / "missing", "--question", "q", "--context", "c", "--answer", "a")
    assert r.returncode == 2 and "not found" in r.stderr
    r = cli("--model", model_dir, "--input", tmp_path / "none.jsonl", "--output", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "input file not found" in r.stderr


def test_keep_freed_memory_sets_glibcs_thresholds_and_reports_where_it_cannot(monkeypatch):
    """judge.py keeps freed memory: mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 1 GiB) (the
    effect on a judging pass, 87,900 page faults -> 0, is in docs/experiments.md); False where libc is not glibc
    or refuses a value."""
    from lynx import judge_cli

    calls = []

    class FakeLibc:
        def __init__(self, accept):
            self.accept = accept

        def mallopt(self, param, value):
            calls.append((param, value))
            return int(self.accept)

    monkeypatch.setattr(judge_cli.ctypes, "CDLL", lambda name: FakeLibc(accept=True))
    assert judge_cli.keep_freed_memory()
    assert calls == [(judge_cli.M_MMAP_THRESHOLD, 32 << 20), (judge_cli.M_TRIM_THRESHOLD, 1 << 30)]
    assert (judge_cli.M_TRIM_THRESHOLD, judge_cli.M_MMAP_THRESHOLD) == (-1, -3)  # glibc's malloc.h
    monkeypatch.setattr(judge_cli.ctypes, "CDLL", lambda name: FakeLibc(accept=False))
    assert not judge_cli.keep_freed_memory()

    def not_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(judge_cli.ctypes, "CDLL", not_glibc)
    assert not judge_cli.keep_freed_memory()
