"""A map of a built dataset: every row as a point of a 2-D projection of its text, with the counts beside it.

`python -m lynx.data map DIR` reads DIR/halubench_*.jsonl (every split; the perturbation type of a FAIL row comes
from the matching chat_*.jsonl when it is there) and writes

  DIR/map.html  one self-contained page (data and script inline; no server, no network): a scatter coloured by
                source, label, perturbation type or split (a selector), the row's question, answer and label on
                hover; counts per source, split, label and perturbation type; passage and prompt length histograms
  DIR/map.png   the same in matplotlib: three scatter panels (source, label, perturbation type), the counts and
                the histograms

The projection is TF-IDF of each row's question, answer and passage start, reduced to two dimensions by truncated
SVD (scikit-learn): rows about similar text land close together, so a source, a split or a perturbation type that
forms its own island stands out. Same data -> same files.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter
from pathlib import Path

from lynx.prompt import format_prompt
from lynx.rows import normalize_label, read_dicts, read_rows, row_document

# Only the start of a long passage enters the projection: whole COVID-QA papers (~25k characters, shared by dozens
# of rows) would dominate both the time and the vocabulary.
PROJECTION_PASSAGE_CHARS = 1500
TOOLTIP_CHARS = 300
# Histogram bin edges in characters, 1-2-5 steps: passages run from ~100 (HaluEval) to ~70k (COVID-QA) characters.
LENGTH_EDGES = (0, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000)
# matplotlib's tab10, then two more; the HTML and the PNG give a category the same colour.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939")
COLOUR_FIELDS = {"source": "source", "label": "label", "type": "perturbation type", "split": "split"}
NO_PERTURBATION = "none (PASS)"
SPLIT_ORDER = ("train", "val", "test")


def _split_rank(split: str) -> tuple[int, str]:
    """train, val, test first, any other split name after them."""
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def load_rows(folder) -> list[dict]:
    """Every row of the built dataset in `folder`: id, split, source, label, type (the perturbation type of a FAIL
    row; NO_PERTURBATION for PASS, "unknown" without a chat file), question, answer, passage."""
    folder = Path(folder)
    files = sorted(folder.glob("halubench_*.jsonl")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{folder} holds no built data (no halubench_*.jsonl files); build it with "
                                f"`python -m lynx.data build --out {folder}`")

    rows = []
    for path in sorted(files, key=lambda p: _split_rank(p.stem.removeprefix("halubench_"))):
        split = path.stem.removeprefix("halubench_")
        types = {}
        chat = folder / f"chat_{split}.jsonl"
        if chat.exists():
            for c in read_dicts(chat):
                types[c["id"]] = c["perturbation"]["type"] if c.get("perturbation") else NO_PERTURBATION
        checked, bad = read_rows(path, require_label=True)
        # Built rows also carry the id and source the map shows (the judge's checks do not need them).
        bad += [(place, f"missing {key!r}") for place, r in checked for key in ("id", "source_ds")
                if r.get(key) is None]
        if bad:
            place, reason = bad[0]
            raise ValueError(f"{path}:{place}: not a HaluBench row ({reason})")
        for _, r in checked:
            label = normalize_label(r["label"])
            rows.append({"id": r["id"], "split": split, "source": r["source_ds"], "label": label,
                         "type": types.get(r["id"], NO_PERTURBATION if label == "PASS" else "unknown"),
                         "question": r["question"], "answer": r["answer"], "passage": row_document(r)})
    if not rows:
        raise FileNotFoundError(f"{folder} holds no built data (its halubench_*.jsonl files are empty)")
    return rows


def project(rows: list[dict]):
    """[N, 2] coordinates in [0, 1]: TF-IDF of question + answer + passage start, truncated SVD to two dimensions."""
    import numpy as np
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [f"{r['question']} {r['answer']} {r['passage'][:PROJECTION_PASSAGE_CHARS]}" for r in rows]
    tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english", max_features=20_000).fit_transform(texts)
    if min(tfidf.shape) > 2:
        xy = TruncatedSVD(n_components=2, random_state=0).fit_transform(tfidf)
    else:  # two rows or two words: nothing to reduce; keep what there is
        xy = np.zeros((len(rows), 2))
        xy[:, :tfidf.shape[1]] = tfidf.toarray()[:, :2]
    low, span = xy.min(axis=0), np.ptp(xy, axis=0)
    return (xy - low) / np.where(span > 0, span, 1.0)


def length_histogram(values: list[int]) -> list[tuple[str, int]]:
    """(bin label, count) over LENGTH_EDGES, empty bins at either end left out."""
    bins = []
    for lo, hi in zip(LENGTH_EDGES, LENGTH_EDGES[1:]):
        bins.append((f"{lo:,}-{hi:,}", sum(lo <= v < hi for v in values)))
    bins.append((f">={LENGTH_EDGES[-1]:,}", sum(v >= LENGTH_EDGES[-1] for v in values)))
    filled = [i for i, (_, n) in enumerate(bins) if n]
    return bins[filled[0]:filled[-1] + 1] if filled else []


def summary(rows: list[dict]) -> dict:
    """Counts per source, split, label and perturbation type, and the length histograms."""
    def counts(field):
        c = Counter(r[field] for r in rows)
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))

    return {
        "source": counts("source"),
        "split": sorted(Counter(r["split"] for r in rows).items(), key=lambda kv: _split_rank(kv[0])),
        "label": counts("label"),
        "perturbation type": counts("type"),
        "passage characters": length_histogram([len(r["passage"]) for r in rows]),
        "prompt characters": length_histogram(
            [len(format_prompt(r["question"], r["passage"], r["answer"])) for r in rows]),
    }


def colours(values) -> dict[str, str]:
    """Category -> colour, in sorted order of the categories."""
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(sorted(set(values)))}


def _clip(text: str, n: int = TOOLTIP_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def _panel_title(name: str) -> str:
    return f"{name} (rows per bin)" if "characters" in name else f"rows per {name}"


def _bar_table(title: str, items: list[tuple[str, int]]) -> str:
    top = max((n for _, n in items), default=1) or 1
    body = "".join(
        f'<tr><td>{html.escape(str(name))}</td><td class="n">{n:,}</td>'
        f'<td class="bar"><div style="width:{100 * n / top:.1f}%"></div></td></tr>' for name, n in items)
    return f'<div class="panel"><h3>{html.escape(title)}</h3><table>{body}</table></div>'


def drawing_order(rows: list[dict]) -> list[int]:
    """Row indices in a fixed pseudo-random order, so no label, split or source is always drawn on top (a question's
    PASS and FAIL rows share their passage and land almost on one spot)."""
    return sorted(range(len(rows)), key=lambda i: hashlib.sha1(rows[i]["id"].encode()).hexdigest())


def render_html(folder: Path, rows: list[dict], xy, stats: dict) -> str:
    order = drawing_order(rows)
    points = [{"id": rows[i]["id"], "split": rows[i]["split"], "source": rows[i]["source"],
               "label": rows[i]["label"], "type": rows[i]["type"], "question": _clip(rows[i]["question"]),
               "answer": _clip(rows[i]["answer"]), "x": round(float(xy[i][0]), 4), "y": round(float(xy[i][1]), 4)}
              for i in order]
    palettes = {field: colours(r[field] for r in rows) for field in COLOUR_FIELDS}
    # "</" cannot end the script element early when written as "<\/" (still the same JSON).
    data = json.dumps({"rows": points, "colours": palettes, "names": COLOUR_FIELDS},
                      ensure_ascii=False).replace("</", "<\\/")
    options = "".join(f'<option value="{f}">{html.escape(name)}</option>' for f, name in COLOUR_FIELDS.items())
    tables = "".join(_bar_table(_panel_title(name), items) for name, items in stats.items())
    return (_PAGE.replace("__TITLE__", html.escape(f"Data map of {folder}"))
            .replace("__N__", f"{len(rows):,}").replace("__OPTIONS__", options).replace("__TABLES__", tables)
            .replace("__DATA__", data))


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
h3 { font-size: 13px; margin: 0 0 4px; }
.layout { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
#scatter { border: 1px solid #ccc; background: #fff; }
#legend span { display: inline-block; margin-right: 12px; }
#legend i { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }
#tip { position: fixed; display: none; max-width: 420px; background: #fffff0; border: 1px solid #999;
       padding: 6px 8px; pointer-events: none; box-shadow: 2px 2px 6px rgba(0,0,0,.2); }
#tip b { display: inline-block; min-width: 70px; }
.tables { display: flex; flex-wrap: wrap; gap: 16px; max-width: 720px; }
.panel table { border-collapse: collapse; }
.panel td { padding: 1px 6px 1px 0; white-space: nowrap; }
td.n { text-align: right; }
td.bar { width: 160px; }
td.bar div { height: 10px; background: #4c78a8; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<p>__N__ rows. Each point is one row, placed by a 2-D projection (TF-IDF, truncated SVD) of its question, answer and
passage start: rows about similar text lie close together. Hover a point for its row.
Colour by <select id="colour">__OPTIONS__</select></p>
<div class="layout">
<div><svg id="scatter" width="640" height="600" viewBox="0 0 640 600"></svg><div id="legend"></div></div>
<div class="tables">__TABLES__</div>
</div>
<div id="tip"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const svg = document.getElementById("scatter"), tip = document.getElementById("tip");
const legend = document.getElementById("legend"), select = document.getElementById("colour");
const SIZE = 600, PAD = 12, NS = "http://www.w3.org/2000/svg";
const circles = DATA.rows.map((r, i) => {
  const c = document.createElementNS(NS, "circle");
  c.setAttribute("cx", PAD + r.x * (640 - 2 * PAD));
  c.setAttribute("cy", PAD + (1 - r.y) * (SIZE - 2 * PAD));
  c.setAttribute("r", 3);
  c.setAttribute("fill-opacity", 0.7);
  c.dataset.i = i;
  svg.appendChild(c);
  return c;
});
function colour(field) {
  const palette = DATA.colours[field], counts = {};
  DATA.rows.forEach((r, i) => {
    circles[i].setAttribute("fill", palette[r[field]]);
    counts[r[field]] = (counts[r[field]] || 0) + 1;
  });
  legend.replaceChildren(...Object.keys(palette).map(value => {
    const item = document.createElement("span"), dot = document.createElement("i");
    dot.style.background = palette[value];
    item.append(dot, `${value} (${counts[value]})`);
    return item;
  }));
}
svg.addEventListener("mousemove", event => {
  const i = event.target.dataset.i;
  if (i === undefined) { tip.style.display = "none"; return; }
  const r = DATA.rows[i];
  tip.replaceChildren();
  for (const [name, value] of [["id", r.id], ["label", r.label], ["source", r.source], ["split", r.split],
                               ["type", r.type], ["question", r.question], ["answer", r.answer]]) {
    const line = document.createElement("div"), key = document.createElement("b");
    key.textContent = name;
    line.append(key, value);
    tip.appendChild(line);
  }
  tip.style.left = Math.min(event.clientX + 14, window.innerWidth - 440) + "px";
  tip.style.top = (event.clientY + 14) + "px";
  tip.style.display = "block";
});
svg.addEventListener("mouseleave", () => { tip.style.display = "none"; });
select.addEventListener("change", () => colour(select.value));
colour(select.value);
</script>
</body>
</html>
"""


def render_png(path: Path, rows: list[dict], xy, stats: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(18, 16))
    order = drawing_order(rows)
    for ax, field in zip(axes[0], ("source", "label", "type")):
        palette = colours(r[field] for r in rows)
        ax.scatter(xy[order, 0], xy[order, 1], s=4, alpha=0.6, c=[palette[rows[i][field]] for i in order])
        counts = Counter(r[field] for r in rows)
        for value, colour in palette.items():  # legend entries only
            ax.scatter([], [], s=12, color=colour, label=f"{value} ({counts[value]})")
        ax.set_title(f"rows by {COLOUR_FIELDS[field]}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=3, loc="best")
    panels = [axes[1][0], axes[1][1], axes[1][2], axes[2][0], axes[2][1], axes[2][2]]
    for ax, (name, items) in zip(panels, stats.items()):
        labels, counts = [str(k) for k, _ in items], [n for _, n in items]
        ax.barh(range(len(items)), counts, color="#4c78a8")
        ax.set_yticks(range(len(items)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(_panel_title(name))
        for y, n in enumerate(counts):
            ax.text(n, y, f" {n}", va="center", fontsize=7)
        ax.set_xlim(0, 1.15 * max(counts, default=1))  # room for the numbers
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_map(folder, log=print) -> tuple[Path, Path]:
    """Write folder/map.html and folder/map.png for the built dataset in `folder`; returns their paths."""
    folder = Path(folder)
    log(f"reading {folder}/halubench_*.jsonl ...")
    rows = load_rows(folder)
    log(f"projecting {len(rows):,} rows (TF-IDF + truncated SVD) ...")
    xy = project(rows)
    stats = summary(rows)
    html_path, png_path = folder / "map.html", folder / "map.png"
    log(f"writing {html_path} ...")
    html_path.write_text(render_html(folder, rows, xy, stats), encoding="utf-8", newline="\n")
    log(f"writing {png_path} ...")
    render_png(png_path, rows, xy, stats, f"{folder}: {len(rows):,} rows")
    return html_path, png_path
