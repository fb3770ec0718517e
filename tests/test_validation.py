"""Evaluation during training: the evaluator's p_pass equals the judge's fast mode, its chat loss equals the model's
own loss, and the trainer writes eval_* into metrics.jsonl at eval.every_steps and at the end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from lynx.evaluate import auroc
from lynx.judge import Judge
from lynx.model import Llama
from lynx.sft_data import tokenize_row
from lynx.tokenizer import Tokenizer
from lynx.validation import Evaluator
from tests.test_judge import EXAMPLES, make_tiny_judge_dir
from trainer_helpers import metrics, tiny_overrides
from lynx.train import load_config, train


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def halubench_rows(path, n=6):
    # Distinct rows: duplicates would tie exactly in one path and differ in the last bits in another (AUROC ties).
    rows = [{"id": str(i), "question": f"{q} ({i})", "passage": c, "answer": a, "label": "PASS" if i % 2 else "FAIL",
             "source_ds": "x"} for i, (q, c, a) in enumerate((EXAMPLES * n)[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_judge_rows_match_fast_mode(tmp_path, one_rank_group):
    model_dir = make_tiny_judge_dir(tmp_path / "tiny")
    rows = halubench_rows(tmp_path / "val.jsonl")
    model = Llama.from_pretrained(model_dir)
    evaluator = Evaluator(str(tmp_path / "val.jsonl"), Tokenizer.from_pretrained(model_dir), max_seq_len=512,
                          max_rows=None, rank=0, world=1)
    out = evaluator.run(model, torch.device("cpu"))
    verdicts = Judge(model_dir, device="cpu", max_new_tokens=8).judge_batch([(r["question"], r["passage"], r["answer"]) for r in rows],
                                                          fast=True)
    p_pass = torch.tensor([v.p_pass for v in verdicts], dtype=torch.float64)
    is_pass = torch.tensor([r["label"] == "PASS" for r in rows])
    nll = -torch.where(is_pass, p_pass.log(), (1 - p_pass).log()).mean()
    assert out["eval_rows"] == len(rows)
    assert out["eval_loss"] == pytest.approx(float(nll), rel=1e-4)
    assert out["eval_accuracy"] == pytest.approx(float(((p_pass >= 0.5) == is_pass).double().mean()))
    assert out["eval_auroc"] == pytest.approx(auroc(is_pass.numpy(), p_pass.numpy()))


def test_chat_rows_loss_is_the_models_mean_token_loss(tmp_path, one_rank_group):
    model_dir = make_tiny_judge_dir(tmp_path / "tiny")
    tok = Tokenizer.from_pretrained(model_dir)
    chat = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, _, a in EXAMPLES]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    model = Llama.from_pretrained(model_dir)
    out = Evaluator(str(tmp_path / "chat.jsonl"), tok, max_seq_len=512, max_rows=2, rank=0, world=1).run(
        model, torch.device("cpu"))
    total, count = 0.0, 0
    for row in chat[:2]:
        ex = tokenize_row(tok, row, max_seq_len=512)
        with torch.no_grad():
            logits = model(torch.tensor([ex.input_ids]))[0, :-1]
        targets = torch.tensor(ex.labels[1:])
        keep = targets != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
    assert out["eval_rows"] == 2
    assert out["eval_loss"] == pytest.approx(total / count, rel=1e-4)


def test_trainer_writes_eval_metrics(tmp_path):
    model_dir = make_tiny_judge_dir(tmp_path / "tiny")
    halubench_rows(tmp_path / "val.jsonl")
    train_rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                  for q, _, a in EXAMPLES * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run_dir, **{
        "model.init_from": str(model_dir), "data.train": str(tmp_path / "train.jsonl"), "data.max_seq_len": 512,
        "global_batch_size": 1, "max_steps": 3, "eval.data": str(tmp_path / "val.jsonl"), "eval.every_steps": 2,
        "checkpoint.export": "false"}))
    train(cfg)
    lines = metrics(run_dir)
    with_eval = [m["step"] for m in lines if "eval_accuracy" in m]
    assert with_eval == [2, 3]  # every 2 steps, and the last one
    assert all(0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_rows"] == 6 for m in lines if "eval_accuracy" in m)


def test_judge_rows_read_the_evidence_the_exported_judge_selects(tmp_path, one_rank_group):
    from tests.test_context import ANSWER, DOCUMENT, QUESTION

    model_dir = make_tiny_judge_dir(tmp_path / "tiny")
    rows = [{"id": str(i), "question": QUESTION, "passage": DOCUMENT, "answer": a, "label": label, "source_ds": "x"}
            for i, (a, label) in enumerate([(ANSWER, "PASS"), ("It opened in 1936.", "FAIL")])]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluator = Evaluator(str(tmp_path / "val.jsonl"), Tokenizer.from_pretrained(model_dir), max_seq_len=4096,
                          max_rows=None, rank=0, world=1, context_tokens=48)
    evaluator.run(Llama.from_pretrained(model_dir), torch.device("cpu"))
    judge = Judge(model_dir, device="cpu", max_new_tokens=8, context_tokens=48)
    verdicts = judge.judge_batch([(r["question"], r["passage"], r["answer"]) for r in rows], fast=True)
    assert all(v.selected for v in verdicts)
    assert [len(ids) for ids, _, _ in evaluator.examples] == [v.prompt_tokens for v in verdicts]
    assert evaluator.last_judged[1].tolist() == pytest.approx([v.p_pass for v in verdicts], rel=1e-4)


def test_the_exported_judge_carries_its_context_budget_and_fitted_threshold(tmp_path):
    model_dir = make_tiny_judge_dir(tmp_path / "tiny")
    halubench_rows(tmp_path / "val.jsonl", n=8)
    train_rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                  for q, _, a in EXAMPLES * 4]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    run_dir = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run_dir, **{
        "model.init_from": str(model_dir), "data.train": str(tmp_path / "train.jsonl"), "data.max_seq_len": 512,
        "global_batch_size": 1, "max_steps": 2, "eval.data": str(tmp_path / "val.jsonl"), "judge.context_tokens": 256}))
    train(cfg)
    card = json.loads((run_dir / "final" / "lynx.json").read_text())
    assert card["context_tokens"] == 256 and card["prompt_format"] == "lynx"
    assert card["training"]["steps"] == 2 and card["training"]["rows"] == len(train_rows)
    (last,) = [m for m in metrics(run_dir) if "eval_accuracy" in m]
    fit = card["p_pass_threshold_fit"]
    assert fit["rows"] == 8 and fit["accuracy_at_0.5"] == pytest.approx(last["eval_accuracy"])
    assert fit["accuracy_at_threshold"] >= fit["accuracy_at_0.5"]
    # The threshold is the best one: judged again with it, the exported judge scores as the fit says.
    judge = Judge(run_dir / "final", device="cpu", max_new_tokens=8)
    assert judge.settings["context_tokens"] == (256, "lynx.json")
    assert judge.p_pass_threshold == card["p_pass_threshold"]
    # Relaunching the finished run exports again and validates again: the threshold is not lost.
    train(cfg)
    again = json.loads((run_dir / "final" / "lynx.json").read_text())
    assert again["p_pass_threshold"] == card["p_pass_threshold"] is not None


def test_eval_data_reads_any_format_lynx_rows_reads_and_names_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lynx.validation import load_eval_rows

    rows = halubench_rows(tmp_path / "val.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "val.parquet")
    assert load_eval_rows(str(tmp_path / "val.parquet"), None) == load_eval_rows(str(tmp_path / "val.jsonl"), None)
    kind, got = load_eval_rows(str(tmp_path / "val.parquet"), 4)
    assert kind == "judge" and [r["id"] for r in got] == ["0", "1", "2", "3"]
    pq.write_table(pa.Table.from_pylist([rows[0], {**rows[1], "label": "maybe"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet:row 1: bad HaluBench row: label must be PASS or FAIL"):
        load_eval_rows(str(tmp_path / "bad.parquet"), None)
