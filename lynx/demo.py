"""The whole Lynx recipe at toy scale, offline on a CPU: perturb -> train -> judge.

    python -m lynx.demo [--out runs/demo] [--config configs/demo-cpu.yaml] [--nproc 2]
    python -m lynx.demo --config configs/demo-cpu-long.yaml --out runs/demo-long     # the longer run (README)

1. builds PASS/FAIL data from the shipped real QA samples with our perturbations (`python -m lynx.data build`);
2. trains a small byte-level BPE tokenizer on the training split, keeping the Llama-3 special tokens and chat format
   (a 128k vocabulary is too slow to train from scratch on a CPU);
3. trains a small Llama-3-architecture judge from scratch with `torchrun --nproc_per_node 2 train.py` (FSDP2 over
   gloo, packed sequences, fused loss);
4. evaluates it with `judge.py --eval` on the held-out test split, next to a majority-class baseline and a
   lexical-overlap baseline whose threshold is chosen on the validation split;
5. prints the accuracy table and writes report.md, report.json and a loss-curve plot.

Every step is the real command-line tool a user would run on GPUs; the demo only chains them.

The config may have a `demo:` section with defaults for the demo's own options (max_passage_chars, vocab_size,
train_target, reasoning_style, judge_mode, train_fail_variants; the command-line flags override it); train.py gets
the config without that section.
train_target "verdict" replaces each training row's reasoning with the empty one that the fast judge mode forces
(`{"REASONING": [], "SCORE": "PASS"}`); "both" trains on every row twice, with its reasoning and without.
reasoning_style "word_checks" replaces the builder's reasoning with one yes/no lookup per answer word
(lynx.data.reasoning.word_checks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lynx.data import reasoning
from lynx.data.text import answer_words
from lynx.judge import FAST_PREFIX
from lynx.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[1]


# --- tokenizer ------------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the Llama-3 pre-tokenizer regex and the 256 Llama-3 special tokens (by name: the chat
    format and stop tokens work unchanged; only the ids differ from Llama-3's)."""
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def chat_texts(path: Path):
    with open(path) as f:
        for line in f:
            for message in json.loads(line)["messages"]:
                yield message["content"]


# --- training rows --------------------------------------------------------------------------------------------------

TRAIN_TARGETS = ("reasoning", "verdict", "both")
REASONING_STYLES = ("explain", "word_checks")


def with_reply(row: dict, content: str) -> dict:
    """The row with its last (assistant) turn replaced by `content`."""
    return {**row, "messages": row["messages"][:-1] + [{"role": "assistant", "content": content}]}


def verdict_only(row: dict) -> dict:
    """The row with its assistant turn replaced by the verdict after an empty reasoning: exactly the completion the
    fast judge mode scores (judge.FAST_PREFIX, then the label)."""
    return with_reply(row, f'{FAST_PREFIX}{row["label"]}"}}')


def with_word_checks(row: dict, answer: str, passage: str) -> dict:
    """The row with its reasoning replaced by lynx.data.reasoning.word_checks: one lookup per answer word."""
    return with_reply(row, reasoning.target(reasoning.word_checks(answer, passage), row["label"]))


def rows_with_word_checks(chat_train: Path) -> list[dict]:
    """The builder's training rows with word-check reasoning; answer and passage come from the builder's halubench
    file beside `chat_train` (same ids)."""
    rows = read_jsonl(chat_train)
    halubench = chat_train.with_name(chat_train.name.replace("chat_", "halubench_", 1))
    shown = {r["id"]: r for r in read_jsonl(halubench)}
    missing = [r["id"] for r in rows if r["id"] not in shown]
    if missing:
        raise ValueError(f"{halubench}: no row for id {missing[0]!r} of {chat_train} ({len(missing)} missing)")
    return [with_word_checks(row, shown[row["id"]]["answer"], shown[row["id"]]["passage"]) for row in rows]


def write_training_rows(chat_train: Path, target: str, out: Path, reasoning_style: str = "explain") -> Path:
    """The training file for `target`: the rows with their reasoning, their verdict-only form, or both (each row
    with its reasoning, then the same rows verdict-only; the trainer packs and shuffles them). The reasoning is the
    builder's ("explain": it quotes the evidence and names the change) or "word_checks"."""
    if target not in TRAIN_TARGETS:
        raise ValueError(f"train_target must be one of {TRAIN_TARGETS}, got {target!r}")
    if reasoning_style not in REASONING_STYLES:
        raise ValueError(f"reasoning_style must be one of {REASONING_STYLES}, got {reasoning_style!r}")
    if target == "reasoning" and reasoning_style == "explain":
        return chat_train
    rows = read_jsonl(chat_train) if reasoning_style == "explain" else rows_with_word_checks(chat_train)
    with open(out, "w") as f:
        for row in (rows if target in ("reasoning", "both") else []):
            f.write(json.dumps(row) + "\n")
        for row in (rows if target in ("verdict", "both") else []):
            f.write(json.dumps(verdict_only(row)) + "\n")
    return out


# --- the demo's options in the config -------------------------------------------------------------------------------

DEMO_DEFAULTS = {"max_passage_chars": 600, "vocab_size": 4096, "train_target": "reasoning", "judge_mode": "fast",
                 "train_fail_variants": 1, "reasoning_style": "explain"}


def split_demo_config(path: Path) -> tuple[dict, dict]:
    """(demo options from the config's `demo:` section, the rest of the config for train.py)."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    demo = config.pop("demo", None) or {}
    if not isinstance(demo, dict):
        raise SystemExit(f"demo: {path}: 'demo' must be a mapping of demo options")
    unknown = sorted(set(demo) - set(DEMO_DEFAULTS))
    if unknown:
        raise SystemExit(f"demo: {path}: unknown demo option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(DEMO_DEFAULTS)}")
    return demo, config


# --- lexical-overlap and majority baselines -------------------------------------------------------------------------

def unsupported_fraction(answer: str, passage: str) -> float:
    """Share of the answer's words that never occur in the passage (case-insensitive)."""
    words = answer_words(answer)
    if not words:
        return 0.0
    passage_words = set(answer_words(passage))
    return sum(w not in passage_words for w in words) / len(words)


def fit_overlap_threshold(rows: list[dict]) -> float:
    """The threshold t (FAIL when unsupported_fraction > t) with the best accuracy on `rows`."""
    scores = sorted({unsupported_fraction(r["answer"], r["passage"]) for r in rows})
    candidates = [-1.0] + scores
    best = max(candidates, key=lambda t: sum(
        (unsupported_fraction(r["answer"], r["passage"]) > t) == (r["label"] == "FAIL") for r in rows))
    return best


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def baseline_rows(test: list[dict], val: list[dict]) -> dict[str, list[dict]]:
    """Judged rows (score, p_pass) for both baselines, in the schema judge.py writes."""
    majority = max(("PASS", "FAIL"), key=lambda lab: sum(r["label"] == lab for r in val))
    threshold = fit_overlap_threshold(val)
    out = {"majority": [], "lexical": []}
    for r in test:
        frac = unsupported_fraction(r["answer"], r["passage"])
        out["majority"].append({**r, "score": majority, "p_pass": 1.0 if majority == "PASS" else 0.0})
        out["lexical"].append({**r, "score": "FAIL" if frac > threshold else "PASS", "p_pass": 1.0 - frac})
    return out


# --- the pipeline ---------------------------------------------------------------------------------------------------


def run(cmd: list[str], what: str) -> None:
    """Run one real command-line step, streaming its output; stop the demo with its exit code on failure."""
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"demo: step '{what}' failed with exit code {done.returncode}")
    print(f"--- {what}: {time.perf_counter() - start:.0f}s", flush=True)


def plot_loss(metrics_path: Path, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title("lynx demo: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def comparison_table(reports: dict[str, dict]) -> str:
    """Markdown accuracy table: one row per judge, one column per source, then mean of sources and pooled."""
    sources = sorted({s for r in reports.values() for s in r["per_source"]})
    head = "| judge | " + " | ".join(sources) + " | mean of sources | pooled | AUROC |"
    lines = [head, "|" + "---|" * (len(sources) + 4)]
    for name, r in reports.items():
        cells = [f"{100 * r['per_source'][s]['accuracy']:.1f}" for s in sources]
        auroc = r["auroc"]["value"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['accuracy']['mean_of_sources']:.1f} | "
                     f"{100 * r['accuracy']['pooled']:.1f} | {'-' if auroc is None else f'{auroc:.3f}'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lynx.demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output folder (default runs/demo)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo-cpu.yaml", help="training config")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    p.add_argument("--max-passage-chars", type=int,
                   help="passages are windowed to this many characters around the answer's evidence (default 600)")
    p.add_argument("--max-per-source", type=int, help="at most N examples per source (default: all)")
    p.add_argument("--train-fail-variants", type=int,
                   help="FAIL answers per training question, each with a copy of its PASS example (default 1)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size of the demo tokenizer (default 4096)")
    p.add_argument("--train-target", choices=TRAIN_TARGETS,
                   help="assistant turns to train on: the reasoning and verdict (default), the verdict after an "
                        "empty reasoning, or both")
    p.add_argument("--reasoning-style", choices=REASONING_STYLES,
                   help="reasoning to train on: the builder's (explain, default) or one yes/no lookup per answer word "
                        "(word_checks)")
    p.add_argument("--judge-mode", choices=["fast", "full"],
                   help="fast (default): p_pass after a forced score prefix; full: generate the reasoning (slower)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides, as for train.py")
    args = p.parse_args(argv)
    out = args.out.resolve()
    data, tok_dir, train_dir = out / "data", out / "tokenizer", out / "train"
    start = time.perf_counter()
    demo, train_config = split_demo_config(args.config)
    for key, default in DEMO_DEFAULTS.items():  # command line > the config's demo section > default
        if getattr(args, key) is None:
            setattr(args, key, demo.get(key, default))
    if args.train_target not in TRAIN_TARGETS or args.judge_mode not in ("fast", "full") or \
            args.reasoning_style not in REASONING_STYLES:
        raise SystemExit(f"demo: {args.config}: train_target must be one of {TRAIN_TARGETS}, reasoning_style one of "
                         f"{REASONING_STYLES}, judge_mode fast or full")
    if not isinstance(args.train_fail_variants, int) or args.train_fail_variants < 1:
        raise SystemExit(f"demo: {args.config}: train_fail_variants must be an integer >= 1")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.yaml"
    config_path.write_text(yaml.safe_dump(train_config, sort_keys=False))

    run([sys.executable, "-m", "lynx.data", "build", "--out", str(data), "--seed", "17",
         "--max-passage-chars", str(args.max_passage_chars), "--no-token-stats",
         "--train-fail-variants", str(args.train_fail_variants),
         *(["--max-per-source", str(args.max_per_source)] if args.max_per_source else [])], "build PASS/FAIL data")

    print(f"\n=== train a {args.vocab_size}-token BPE tokenizer on {data / 'chat_train.jsonl'}", flush=True)
    tokenizer = train_bpe_tokenizer(chat_texts(data / "chat_train.jsonl"), args.vocab_size)
    tokenizer.save_pretrained(tok_dir)

    train_rows = out / f"train_{args.train_target}_{args.reasoning_style}.jsonl"
    train_rows = write_training_rows(data / "chat_train.jsonl", args.train_target, train_rows, args.reasoning_style)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
         "train.py", "--config", str(config_path), f"run_dir={train_dir}",
         f"data.train={train_rows}", f"model.tokenizer={tok_dir}",
         f"model.config.vocab_size={tokenizer.vocab_size}", *args.overrides], "train the judge (FSDP2, gloo)")

    judged = out / "judged_test.jsonl"
    run([sys.executable, "judge.py", "--model", str(train_dir / "final"), "--input", str(data / "halubench_test.jsonl"),
         "--output", str(judged), "--eval", "--report-dir", str(out / "report"), "--batch-size", "16",
         *(["--fast"] if args.judge_mode == "fast" else ["--no-fast-compare"])], "judge the held-out test split")

    from lynx.evaluate import compute_metrics

    test, val = read_jsonl(data / "halubench_test.jsonl"), read_jsonl(data / "halubench_val.jsonl")
    reports = {"lynx demo judge": json.loads((out / "report" / "report.json").read_text())}
    for name, rows in baseline_rows(test, val).items():
        reports[f"{name} baseline"] = compute_metrics(rows, n_bootstrap=0)
    table = comparison_table(reports)
    plotted = plot_loss(train_dir / "metrics.jsonl", out / "loss.png")
    summary = (f"# lynx demo\n\nHeld-out test split ({len(test)} rows, half PASS), accuracy %:\n\n{table}\n\n"
               f"Lexical baseline: FAIL when the share of answer words absent from the document exceeds a threshold "
               f"fitted on the validation split. Judge details: {out / 'report' / 'report.md'}.\n")
    (out / "demo_report.md").write_text(summary)
    print("\n" + summary)
    print(f"loss curve: {out / 'loss.png'}" if plotted else "loss curve: matplotlib not installed, skipped")
    print(f"try it: python judge.py --model {train_dir / 'final'} --question ... --document ... --answer ...")
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
