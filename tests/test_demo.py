"""The demo's own pieces: the small BPE tokenizer, the lexical-overlap and majority baselines, and the pipeline
chained end to end at the smallest size."""

import json
import subprocess
import sys

import pytest

from lynx.demo import (REPO, baseline_rows, fit_overlap_threshold, split_demo_config, train_bpe_tokenizer,
                       unsupported_fraction, verdict_only, write_training_rows)
from lynx.demo import main as demo_main
from lynx.evaluate import compute_metrics
from lynx.judge import FAST_PREFIX
from lynx.sft_data import load_rows
from lynx.trainer import load_config, validate
from lynx.tokenizer import Tokenizer


def test_bpe_tokenizer_keeps_llama3_specials_and_chat_format(tmp_path):
    texts = ["The DOCUMENT states: 1,234 patients were enrolled in 2019.", "Yes. The answer is faithful."] * 50
    tok = train_bpe_tokenizer(texts, vocab_size=600)
    tok.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert 256 + 256 < tok.vocab_size <= 600  # 256 specials + 256 bytes + merges
    ids = tok.apply_chat_template([{"role": "user", "content": " hi "}])
    assert ids[0] == tok.bos_id
    text = tok.decode(ids)
    assert text == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(tok.encode("1,234 patients in 2019 ü€")) == "1,234 patients in 2019 ü€"  # byte-level: lossless


def test_unsupported_fraction_counts_answer_words_missing_from_the_passage():
    passage = "The trial enrolled 120 patients in Boston."
    assert unsupported_fraction("120 patients", passage) == 0.0
    assert unsupported_fraction("140 patients", passage) == 0.5
    assert unsupported_fraction("Enrolled in BOSTON", passage) == 0.0  # case-insensitive
    assert unsupported_fraction("", passage) == 0.0


def rows(*items):
    return [{"id": str(i), "passage": p, "question": "q", "answer": a, "label": lab, "source_ds": "s"}
            for i, (p, a, lab) in enumerate(items)]


def test_overlap_threshold_is_fitted_on_validation_and_applied_to_test():
    val = rows(("a b c", "a b", "PASS"), ("a b c", "a x", "FAIL"), ("a b c", "x y", "FAIL"), ("a b c", "c", "PASS"))
    t = fit_overlap_threshold(val)
    assert 0.0 <= t < 0.5  # 0.5 missing must already be FAIL
    test = rows(("p q", "p", "PASS"), ("p q", "z", "FAIL"), ("p q", "p z", "PASS"))
    judged = baseline_rows(test, val)
    assert [r["score"] for r in judged["lexical"]] == ["PASS", "FAIL", "FAIL"]
    assert compute_metrics(judged["lexical"], n_bootstrap=0)["accuracy"]["pooled"] == pytest.approx(2 / 3)
    # Majority class of the validation split (a tie goes to PASS, the first listed).
    assert {r["score"] for r in judged["majority"]} == {"PASS"}


def test_demo_pipeline_runs_end_to_end_at_the_smallest_size(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lynx.demo", "--out", str(out), "--nproc", "1", "--max-per-source", "24",
           "--vocab-size", "600", "--train-target", "both", "max_steps=2", "global_batch_size=1", "data.max_seq_len=2048",
           "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
           "parallel.param_dtype=float32"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "demo_report.md").read_text()
    for name in ("lynx demo judge", "majority baseline", "lexical baseline"):
        assert name in report
    assert (out / "train" / "final" / "tokenizer.json").is_file()
    judged = [json.loads(line) for line in (out / "judged_test.jsonl").open()]
    assert judged and all(r["p_pass"] is not None for r in judged)


def chat_row(label):
    return {"messages": [{"role": "user", "content": "Q D A"},
                         {"role": "assistant", "content": f'{{"REASONING": ["r"], "SCORE": "{label}"}}'}],
            "id": f"x-{label}", "label": label}


def test_verdict_only_rows_are_the_completion_the_fast_judge_scores(tmp_path):
    row = chat_row("FAIL")
    v = verdict_only(row)
    assert v["messages"][0] == row["messages"][0] and v["id"] == row["id"]
    assert v["messages"][-1] == {"role": "assistant", "content": FAST_PREFIX + 'FAIL"}'}
    assert json.loads(v["messages"][-1]["content"]) == {"REASONING": [], "SCORE": "FAIL"}
    train = tmp_path / "chat_train.jsonl"
    train.write_text("".join(json.dumps(chat_row(lab)) + "\n" for lab in ("PASS", "FAIL")))
    assert write_training_rows(train, "reasoning", tmp_path / "r.jsonl") == train  # the builder's file, untouched
    verdict = load_rows(write_training_rows(train, "verdict", tmp_path / "v.jsonl"))
    assert [r["messages"][-1]["content"] for r in verdict] == [FAST_PREFIX + 'PASS"}', FAST_PREFIX + 'FAIL"}']
    both = load_rows(write_training_rows(train, "both", tmp_path / "b.jsonl"))
    assert [r["messages"][-1]["content"] for r in both] == [
        chat_row("PASS")["messages"][-1]["content"], chat_row("FAIL")["messages"][-1]["content"],
        FAST_PREFIX + 'PASS"}', FAST_PREFIX + 'FAIL"}']
    with pytest.raises(ValueError, match="train_target"):
        write_training_rows(train, "answers", tmp_path / "x.jsonl")


def test_word_check_rows_take_answer_and_passage_from_the_halubench_file(tmp_path):
    train, shown = tmp_path / "chat_train.jsonl", tmp_path / "halubench_train.jsonl"
    train.write_text("".join(json.dumps(chat_row(lab)) + "\n" for lab in ("PASS", "FAIL")))
    shown.write_text("".join(json.dumps({"id": f"x-{lab}", "answer": answer, "passage": "Paris is in France."}) + "\n"
                             for lab, answer in (("FAIL", "Lyon, France"), ("PASS", "Paris"))))  # other order
    rows = load_rows(write_training_rows(train, "reasoning", tmp_path / "w.jsonl", "word_checks"))
    assert [r["id"] for r in rows] == ["x-PASS", "x-FAIL"]
    assert rows[0]["messages"][0] == chat_row("PASS")["messages"][0]
    assert [json.loads(r["messages"][-1]["content"]) for r in rows] == [
        {"REASONING": ["Answer words found in the DOCUMENT: Paris yes."], "SCORE": "PASS"},
        {"REASONING": ["Answer words found in the DOCUMENT: Lyon no, France yes."], "SCORE": "FAIL"}]
    both = load_rows(write_training_rows(train, "both", tmp_path / "wb.jsonl", "word_checks"))
    assert both[:2] == rows and [r["messages"][-1]["content"] for r in both[2:]] == [
        FAST_PREFIX + 'PASS"}', FAST_PREFIX + 'FAIL"}']
    shown.write_text(json.dumps({"id": "x-PASS", "answer": "Paris", "passage": "Paris is in France."}) + "\n")
    with pytest.raises(ValueError, match="halubench_train.jsonl: no row for id 'x-FAIL'"):
        write_training_rows(train, "reasoning", tmp_path / "w.jsonl", "word_checks")
    with pytest.raises(ValueError, match="reasoning_style"):
        write_training_rows(train, "reasoning", tmp_path / "w.jsonl", "quotes")


def test_demo_section_of_the_config_is_split_off_and_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("demo:\n  vocab_size: 2048\n  train_target: both\nmax_steps: 3\nmodel:\n  init_std: 0.02\n")
    demo, rest = split_demo_config(config)
    assert demo == {"vocab_size": 2048, "train_target": "both"}
    assert rest == {"max_steps": 3, "model": {"init_std": 0.02}}
    config.write_text("demo:\n  vocab: 2048\nmax_steps: 3\n")
    with pytest.raises(SystemExit, match="unknown demo option.*vocab"):
        split_demo_config(config)
    for shipped in ("demo-cpu.yaml", "demo-cpu-long.yaml"):  # the shipped configs pass train.py's validation
        _, rest = split_demo_config(REPO / "configs" / shipped)
        (tmp_path / shipped).write_text(json.dumps(rest))
        validate(load_config(tmp_path / shipped, ["data.train=x.jsonl"]))


def test_bad_demo_option_values_stop_before_any_work(tmp_path):
    config = tmp_path / "c.yaml"
    for bad in ("train_fail_variants: 0", "train_fail_variants: two", "train_target: answers",
                "reasoning_style: quotes"):
        config.write_text(f"demo:\n  {bad}\nmax_steps: 3\n")
        key = bad.split(":")[0]
        with pytest.raises(SystemExit, match=key):
            demo_main(["--config", str(config), "--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()
