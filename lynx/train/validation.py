"""Evaluation during training (LLM Foundry's eval loop): validation loss, and for judge data fast-mode accuracy and
AUROC, every `eval.every_steps` optimizer steps, written into metrics.jsonl.

Two kinds of rows, told apart by their keys:
- chat rows (`messages`, or `prompt` + `response`; JSONL): `eval_loss`, the mean next-token loss on the assistant
  turns;
- HaluBench-schema rows (`passage` or `context`, `question`, `answer`, `label`; any format lynx.rows reads): the
  judge prompt (the document through the evidence selection the exported judge will use, `judge.context_tokens`)
  plus the forced fast-mode prefix `{"REASONING": [], "SCORE": "`, one forward pass each; `eval_accuracy`
  (p_pass >= 0.5), `eval_auroc`, and `eval_loss`, the loss of the verdict token itself: the cross-entropy of the
  label under p_pass (what the verdict-only fine-tuning minimises at the score token, renormalised over PASS and
  FAIL).

Rows are split across ranks; every rank runs the same number of forward passes (FSDP2's collectives pair them up),
padding its share with a repeat of its last row whose result is dropped. One example per forward pass (no padding,
plain causal attention) for chat rows; judge rows are packed 2,048 tokens to a pass with their common prefix shared,
as the judge's fast mode does (lynx.infer.scoring.packed_p_pass).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from lynx import sft_data
from lynx.context import select_evidence, token_counter
from lynx.evaluate import auroc
from lynx.prompt import judge_messages, truncate_document
from lynx.rows import check_rows, normalize_label, read_records, row_document

JUDGE_KEYS = ("question", "answer", "label")  # and `passage` or `context`


def load_eval_rows(path: str, max_rows: int | None) -> tuple[str, list[dict]]:
    """("judge", HaluBench rows) from any file lynx.rows reads, or ("chat", chat rows) from a JSONL file; the first
    max_rows of it."""
    from pathlib import Path

    if not Path(path).exists():
        raise FileNotFoundError(f"eval.data: file not found: {path}")
    records, unreadable = read_records(path)
    if not records and not unreadable:
        raise ValueError(f"eval.data: {path} has no rows")
    first = records[0][1] if records else None
    if isinstance(first, dict) and all(k in first for k in JUDGE_KEYS):
        checked, bad = check_rows(path, records, unreadable, require_label=True)
        if bad:
            place, reason = bad[0]
            raise ValueError(f"eval.data: {path}:{place}: bad HaluBench row: {reason}")
        rows = [{**row, "passage": row_document(row), "label": normalize_label(row["label"])} for _, row in checked]
        return "judge", rows[:max_rows] if max_rows else rows
    rows = sft_data.load_rows(path)
    return "chat", rows[:max_rows] if max_rows else rows


class Evaluator:
    """Prepared once (tokenized on every rank: the same rows, the same ids), run at every eval step."""

    def __init__(self, path: str, tokenizer, *, max_seq_len: int, max_rows: int | None, rank: int, world: int,
                 context_tokens: int = 0):
        from lynx.infer.scoring import fast_score_tokens

        self.kind, rows = load_eval_rows(path, max_rows)
        self.rank, self.world = rank, world
        self.examples = []  # (input_ids, labels or None, label "PASS"/"FAIL" or None)
        self.last_judged = None  # judge rows: (is_pass, p_pass) of the latest run, for the p_pass threshold
        if self.kind == "judge":
            prefix, (self.pass_ids, self.fail_ids) = fast_score_tokens(tokenizer)
            room = max_seq_len - len(prefix)
            count_tokens = token_counter(tokenizer)
            for row in rows:
                # What the exported judge will read of the document (judge.context_tokens).
                document = select_evidence(row["passage"], row["question"], row["answer"], context_tokens,
                                           count_tokens).text
                messages = judge_messages(row["question"], document, row["answer"])
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                if len(ids) > room:
                    header = len(ids) - len(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
                    cut = truncate_document(tokenizer, messages, room - header)
                    if cut is None:
                        continue
                    ids = tokenizer.apply_chat_template(cut, add_generation_prompt=True)
                self.examples.append((ids + prefix, None, row["label"]))
        else:
            for row in rows:
                ex = sft_data.tokenize_row(tokenizer, row, max_seq_len=max_seq_len)
                if ex is not None:
                    self.examples.append((ex.input_ids, ex.labels, None))
        if not self.examples:
            raise ValueError(f"eval.data: no row of {path} fits data.max_seq_len={max_seq_len}")
        self.rows = len(self.examples)

    @torch.no_grad()
    def run(self, model, device) -> dict:
        from lynx.infer.scoring import pack_prompts, packed_p_pass

        was_training = model.training
        model.eval()
        results = []  # (example index, loss sum, target tokens, p_pass)
        if self.kind == "judge":
            sequences = pack_prompts([ids for ids, _, _ in self.examples])
            mine = sequences[self.rank :: self.world]
            for j in range(math.ceil(len(sequences) / self.world)):
                seq = mine[min(j, len(mine) - 1)] if mine else sequences[0]
                out = packed_p_pass(model, seq, (self.pass_ids, self.fail_ids), device)
                if j < len(mine):
                    results += [(i, 0.0, 0, p) for i, p in out]
        else:
            mine = list(range(self.rank, len(self.examples), self.world))
            for j in range(math.ceil(len(self.examples) / self.world)):
                i = mine[min(j, len(mine) - 1)] if mine else 0
                ids, labels, _ = self.examples[i]
                loss = model(torch.tensor([ids], device=device), torch.tensor([labels], device=device),
                             reduction="sum")
                if j < len(mine):
                    results.append((i, float(loss), sum(1 for x in labels[1:] if x != sft_data.IGNORE_INDEX), None))
        gathered = [None] * self.world
        dist.all_gather_object(gathered, results)
        if was_training:
            model.train()
        results = sorted(r for part in gathered for r in part)
        if self.kind == "chat":
            loss_sum, tokens = sum(r[1] for r in results), sum(r[2] for r in results)
            return {"eval_loss": loss_sum / max(tokens, 1), "eval_rows": len(results)}
        is_pass = np.array([self.examples[r[0]][2] == "PASS" for r in results])
        p_pass = np.array([r[3] for r in results])
        self.last_judged = (is_pass, p_pass)
        eps = 1e-12
        nll = -np.where(is_pass, np.log(p_pass + eps), np.log(1 - p_pass + eps))
        return {"eval_loss": float(nll.mean()), "eval_accuracy": float(((p_pass >= 0.5) == is_pass).mean()),
                "eval_auroc": auroc(is_pass, p_pass), "eval_rows": len(results)}
