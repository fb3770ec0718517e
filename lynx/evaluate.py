"""HaluBench-style evaluation of judge verdicts: metrics, bootstrap intervals, and reports (JSON, Markdown, PNG).

Conventions:
- Labels and predictions are "PASS", "FAIL" or None (None = the judge printed no parsable score: "unparsed").
  An unparsed prediction counts as wrong for accuracy and as "not FAIL" for FAIL detection.
- FAIL detection (hallucination = positive class): precision, recall, F1 of predicting FAIL.
- AUROC from p_pass for the label PASS (equivalently from 1 - p_pass for FAIL), over rows that have a p_pass.
- Accuracy overall is given two ways: the mean of per-source accuracies (what the Lynx paper reports) and pooled.
- 95% intervals: percentile bootstrap, resampling rows within each source (so every resample keeps the source
  sizes, which the mean of sources needs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lynx.rows import LABELS, normalize_label  # the row schema lives in lynx.rows; both names stay importable here

# Published HaluBench accuracy (%), Lynx paper (arXiv 2407.08488) Table, as printed. The printed means of GPT-4-Turbo
# (85.0) and RAGAS (66.9) differ from the means of their printed rows (85.35, 68.03); we keep both as published.
PUBLISHED_SOURCES = ("HaluEval", "RAGTruth", "FinanceBench", "DROP", "CovidQA", "PubMedQA")
PUBLISHED_ACCURACY = {
    "GPT-4o": (87.9, 84.3, 85.3, 84.3, 95.0, 82.1),
    "GPT-4-Turbo": (86.0, 85.0, 82.2, 84.8, 90.6, 83.5),
    "Llama-3-70B-Instruct": (87.0, 83.8, 72.7, 69.4, 85.0, 82.6),
    "Llama-3-8B-Instruct": (83.1, 80.0, 55.0, 58.2, 75.2, 70.7),
    "RAGAS faithfulness": (70.6, 75.8, 59.5, 59.6, 75.0, 67.7),
    "Lynx 8B": (85.7, 80.0, 72.5, 77.8, 96.3, 85.2),
    "Lynx 70B": (88.4, 80.2, 81.4, 86.4, 97.5, 90.4),
}
PUBLISHED_MEAN = {"GPT-4o": 86.5, "GPT-4-Turbo": 85.0, "Llama-3-70B-Instruct": 80.1, "Llama-3-8B-Instruct": 70.4,
                  "RAGAS faithfulness": 66.9, "Lynx 8B": 82.9, "Lynx 70B": 87.4}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


_PUBLISHED_BY_KEY = {_key(s): s for s in PUBLISHED_SOURCES}


def published_source(source_ds: str) -> str | None:
    """The published column for a `source_ds` value ("covidQA", "covidqa", "Covid-QA" -> "CovidQA"), or None."""
    return _PUBLISHED_BY_KEY.get(_key(source_ds))


def published_accuracy(model: str, source: str) -> float:
    return PUBLISHED_ACCURACY[model][PUBLISHED_SOURCES.index(source)]


# --- metrics --------------------------------------------------------------------------------------------------------


def auroc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting 1/2
    (Mann-Whitney U with mid-ranks). None when one class is absent."""
    is_positive = np.asarray(is_positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # Mid-ranks: every member of a tie group gets the mean of the group's 1-based ranks.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    group_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(group_rank, counts)
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _safe_div(a, b):
    return float(a / b) if b else None


def fail_detection(labels: np.ndarray, preds: np.ndarray) -> dict:
    """Counts and precision / recall / F1 with FAIL (hallucination) as the positive class."""
    tp = int(np.sum((labels == "FAIL") & (preds == "FAIL")))
    fp = int(np.sum((labels == "PASS") & (preds == "FAIL")))
    fn = int(np.sum((labels == "FAIL") & (preds != "FAIL")))
    tn = int(np.sum((labels == "PASS") & (preds != "FAIL")))
    precision, recall = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> dict:
    columns = ["PASS", "FAIL", "unparsed"]
    matrix = [[int(np.sum((labels == true) & (preds == (p if p != "unparsed" else None)))) for p in columns]
              for true in LABELS]
    return {"rows_are_labels": list(LABELS), "columns_are_predictions": columns, "matrix": matrix}


def _point_metrics(labels, preds, p_pass, sources, source_names) -> dict:
    """The bootstrapped statistics for one (re)sample."""
    correct = labels == preds
    per_source = [correct[sources == s].mean() for s in source_names]
    has_p = ~np.isnan(p_pass)
    return {
        "accuracy_pooled": float(correct.mean()),
        "accuracy_mean_of_sources": float(np.mean(per_source)),
        "f1_fail": fail_detection(labels, preds)["f1"],
        "auroc": auroc(labels[has_p] == "PASS", p_pass[has_p]) if has_p.any() else None,
        **{f"accuracy/{s}": float(a) for s, a in zip(source_names, per_source)},
    }


def bootstrap_intervals(labels, preds, p_pass, sources, source_names, n_bootstrap: int, seed: int) -> dict:
    """95% percentile intervals of `_point_metrics`, resampling rows with replacement within each source."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(sources == s) for s in source_names]
    samples: dict[str, list[float]] = {}
    for _ in range(n_bootstrap):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        for name, value in _point_metrics(labels[idx], preds[idx], p_pass[idx], sources[idx], source_names).items():
            if value is not None:
                samples.setdefault(name, []).append(value)
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in samples.items()}


def compute_metrics(rows: list[dict], *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Metrics from judged rows: each has `label`, `score` (prediction), `p_pass`, `source_ds` (optional), and
    optionally `skipped` (not judged: excluded and counted), `truncated`, and fast-mode `score_fast` / `p_pass_fast`.
    """
    skipped = [r for r in rows if r.get("skipped")]
    rows = [r for r in rows if not r.get("skipped")]
    if not rows:
        raise ValueError("no judged rows to evaluate")
    labels = np.array([normalize_label(r["label"]) for r in rows], dtype=object)
    preds = np.array([r.get("score") for r in rows], dtype=object)
    p_pass = np.array([np.nan if r.get("p_pass") is None else r["p_pass"] for r in rows], dtype=np.float64)
    sources = np.array([str(r.get("source_ds") or "all") for r in rows], dtype=object)
    source_names = sorted(set(sources))

    point = _point_metrics(labels, preds, p_pass, sources, source_names)
    ci = bootstrap_intervals(labels, preds, p_pass, sources, source_names, n_bootstrap, seed) if n_bootstrap else {}
    has_p = ~np.isnan(p_pass)

    per_source = {}
    for s in source_names:
        m = sources == s
        mp = m & has_p
        published = published_source(s)
        per_source[s] = {
            "n": int(m.sum()),
            "accuracy": point[f"accuracy/{s}"],
            "accuracy_ci95": ci.get(f"accuracy/{s}"),
            "auroc": auroc(labels[mp] == "PASS", p_pass[mp]) if mp.any() else None,
            "unparsed": int(np.sum(preds[m] == None)),  # noqa: E711 (elementwise on an object array)
            "published_source": published,
            "published_accuracy": ({model: published_accuracy(model, published) for model in PUBLISHED_ACCURACY}
                                   if published else None),
        }

    report = {
        "n_judged": len(rows),
        "n_skipped": len(skipped),
        "n_selected": sum(1 for r in rows if r.get("selected")),
        "n_truncated": sum(1 for r in rows if r.get("truncated")),
        "n_unparsed": int(np.sum(preds == None)),  # noqa: E711
        "label_counts": {lab: int(np.sum(labels == lab)) for lab in LABELS},
        "accuracy": {
            "mean_of_sources": point["accuracy_mean_of_sources"],
            "mean_of_sources_ci95": ci.get("accuracy_mean_of_sources"),
            "pooled": point["accuracy_pooled"],
            "pooled_ci95": ci.get("accuracy_pooled"),
        },
        "per_source": per_source,
        "fail_detection": {**fail_detection(labels, preds), "f1_ci95": ci.get("f1_fail")},
        "confusion": confusion_matrix(labels, preds),
        "auroc": {"value": point["auroc"], "ci95": ci.get("auroc"), "n": int(has_p.sum())},
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "scheme": "rows resampled within each source"},
    }
    if all(whole_prompt_tokens(r) is not None for r in rows):
        report["per_length"] = per_length(rows, labels, preds, p_pass)
    if any("score_fast" in r for r in rows):
        report["fast_mode"] = fast_mode_agreement(rows, labels)
    report["published_comparison"] = published_comparison(report)
    return report


LENGTH_BUCKETS = ((0, 512, "<512"), (512, 2048, "512-2k"), (2048, float("inf"), ">2k"))


def whole_prompt_tokens(row: dict) -> int | None:
    """Tokens of the row's prompt with the whole document, however much of it the judge read (judge.py records
    prompt_tokens, context_tokens and document_tokens); None when the row lacks them."""
    if any(row.get(k) is None for k in ("prompt_tokens", "context_tokens", "document_tokens")):
        return None
    return row["prompt_tokens"] - row["context_tokens"] + row["document_tokens"]


def per_length(rows: list[dict], labels, preds, p_pass) -> dict:
    """Accuracy and AUROC by the whole-document prompt length (LENGTH_BUCKETS), as users' documents come."""
    lengths = np.array([whole_prompt_tokens(r) for r in rows])
    out = {}
    for lo, hi, name in LENGTH_BUCKETS:
        m = (lengths >= lo) & (lengths < hi)
        if not m.any():
            continue
        mp = m & ~np.isnan(p_pass)
        out[name] = {"n": int(m.sum()), "accuracy": float(np.mean(preds[m] == labels[m])),
                     "auroc": auroc(labels[mp] == "PASS", p_pass[mp]) if mp.any() else None}
    return out


def fast_mode_agreement(rows: list[dict], labels: np.ndarray) -> dict:
    """How the fast mode (forced prefix, no reasoning) compares with the full mode on the same rows."""
    full = np.array([r.get("score") for r in rows], dtype=object)
    fast = np.array([r.get("score_fast") for r in rows], dtype=object)
    p_fast = np.array([np.nan if r.get("p_pass_fast") is None else r["p_pass_fast"] for r in rows])
    both = (full != None) & (fast != None)  # noqa: E711
    has_p = ~np.isnan(p_fast)
    return {
        "agreement_with_full": _safe_div(int(np.sum(full[both] == fast[both])), int(both.sum())),
        "n_compared": int(both.sum()),
        "accuracy_pooled": float(np.mean(fast == labels)),
        "auroc": auroc(labels[has_p] == "PASS", p_fast[has_p]) if has_p.any() else None,
    }


def published_comparison(report: dict) -> dict | None:
    """Our accuracy beside the published numbers, on the published sources present in our data. With all six
    sources the published mean is the paper's; with fewer it is recomputed over the shared sources."""
    ours = {info["published_source"]: info["accuracy"] * 100 for info in report["per_source"].values()
            if info["published_source"]}
    if not ours:
        return None
    sources = [s for s in PUBLISHED_SOURCES if s in ours]
    table = {"this run": {**{s: ours[s] for s in sources}, "mean": float(np.mean([ours[s] for s in sources]))}}
    for model in PUBLISHED_ACCURACY:
        values = {s: published_accuracy(model, s) for s in sources}
        mean = PUBLISHED_MEAN[model] if len(sources) == len(PUBLISHED_SOURCES) else float(np.mean(list(values.values())))
        table[model] = {**values, "mean": mean}
    return {"sources": sources, "all_six": len(sources) == len(PUBLISHED_SOURCES), "accuracy_percent": table}


# --- reports --------------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render_markdown(report: dict, run: dict | None = None) -> str:
    acc, fd, au = report["accuracy"], report["fail_detection"], report["auroc"]
    lines = ["# Judge evaluation", ""]
    if run:
        lines += [f"- {k}: {v}" for k, v in run.items()] + [""]
    lines += [
        f"Judged {report['n_judged']} rows ({report['label_counts']['PASS']} PASS, "
        f"{report['label_counts']['FAIL']} FAIL); skipped (too long) {report['n_skipped']}; "
        f"evidence selected from the document {report.get('n_selected', 0)}; document truncated "
        f"{report['n_truncated']}; unparsed verdicts {report['n_unparsed']} (counted as wrong).",
        "",
        "## Overall (95% bootstrap intervals)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy, mean of sources (as the Lynx paper) | {_pct(acc['mean_of_sources'])}{_ci(acc['mean_of_sources_ci95'])} |",
        f"| accuracy, pooled | {_pct(acc['pooled'])}{_ci(acc['pooled_ci95'])} |",
        f"| FAIL precision | {_pct(fd['precision'])} |",
        f"| FAIL recall | {_pct(fd['recall'])} |",
        f"| FAIL F1 | {_pct(fd['f1'])}{_ci(fd['f1_ci95'])} |",
        f"| AUROC from p_pass (n={au['n']}) | {_num(au['value'])}"
        + (f" [{au['ci95'][0]:.3f}, {au['ci95'][1]:.3f}]" if au["ci95"] else "") + " |",
        "",
        "## Per source",
        "",
        "| source | n | accuracy | AUROC | unparsed |",
        "|---|---|---|---|---|",
    ]
    for s, info in report["per_source"].items():
        lines.append(f"| {s} | {info['n']} | {_pct(info['accuracy'])}{_ci(info['accuracy_ci95'])} | "
                     f"{_num(info['auroc'])} | {info['unparsed']} |")
    if report.get("per_length"):
        lines += ["", "## By prompt length (tokens, with the whole document)", "", "| length | n | accuracy | AUROC |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {b['n']} | {_pct(b['accuracy'])} | {_num(b['auroc'])} |"
                  for name, b in report["per_length"].items()]
    c = report["confusion"]
    lines += ["", "## Confusion matrix (rows: label, columns: prediction)", "",
              "| | " + " | ".join(c["columns_are_predictions"]) + " |", "|---|---|---|---|"]
    for label, counts in zip(c["rows_are_labels"], c["matrix"]):
        lines.append(f"| {label} | " + " | ".join(map(str, counts)) + " |")
    if "fast_mode" in report:
        f = report["fast_mode"]
        agreement = (f"{_pct(f['agreement_with_full'])}% of the {f['n_compared']} rows scored by both modes"
                     if f["n_compared"] else "n/a (no row has a full-mode score)")
        lines += ["", "## Fast mode (forced `{\"REASONING\": [], \"SCORE\": \"`, no reasoning)", "",
                  f"Agreement with the full mode: {agreement}; fast accuracy (pooled) {_pct(f['accuracy_pooled'])}%; "
                  f"fast AUROC {_num(f['auroc'])}."]
    comp = report.get("published_comparison")
    if comp:
        cols = comp["sources"] + ["mean"]
        lines += ["", "## Beside the published HaluBench accuracy (%)", "",
                  "Published numbers: Lynx paper (arXiv 2407.08488). The mean is over the sources shown"
                  + ("." if comp["all_six"] else " (a subset of the paper's six, so it differs from its mean)."),
                  "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for model, values in comp["accuracy_percent"].items():
            lines.append(f"| {model} | " + " | ".join(f"{values[k]:.1f}" for k in cols) + " |")
    return "\n".join(lines) + "\n"


def write_chart(report: dict, path: Path) -> bool:
    """Per-source accuracy bars, ours beside Lynx 8B / 70B where published. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sources = list(report["per_source"])
    ours = [100 * report["per_source"][s]["accuracy"] for s in sources]
    series = [("this run", ours)]
    for model in ("Lynx 8B", "Lynx 70B"):
        published = [report["per_source"][s]["published_accuracy"] for s in sources]
        if any(published):
            series.append((model, [p[model] if p else np.nan for p in published]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(sources)), 4))
    x = np.arange(len(sources))
    for i, (name, values) in enumerate(series):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, sources, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("HaluBench-style accuracy per source")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(report: dict, out_dir: str | Path, run: dict | None = None) -> list[Path]:
    """report.json, report.md and (with matplotlib) report.png in out_dir; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    (out_dir / "report.json").write_text(json.dumps({"run": run or {}, **report}, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report, run))
    if write_chart(report, out_dir / "report.png"):
        written.append(out_dir / "report.png")
    return written
