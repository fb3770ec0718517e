"""Build HaluBench-style PASS/FAIL data from the raw QA sources.

For every question kept, the builder writes two examples on the same passage: the gold answer (PASS) and one
perturbed answer (FAIL), so every source and split is balanced by construction. HaluEval's FAIL answers are its own
hallucinated answers (hand-written perturbation is the fallback); the other sources are perturbed by
lynx.data.perturb (or by a model, lynx.data.model_perturb, when --perturb-model is given).

--train-fail-variants K (default 1) gives each training question K different FAIL answers, each next to a copy of
its PASS example so the training labels stay balanced; validation and test keep one pair per question (the same
files as with K = 1), so evaluations stay comparable.

Splits are made per source over connected groups of questions: two questions about the same passage or about
near-duplicate passages (lynx.data.text.near_duplicate_clusters: DROP's contrast set edits a sentence or two of an
original passage), or two rows with the same question, always land in the same split, so no passage, no
near-duplicate of it and no question appears in two splits. With --max-passage-chars the windows shown are grouped
the same way (two passages can share the sentences a window keeps).

A question can have several gold answers in a source (asked twice on one COVID-QA paper; DROP's contrast set asks
it again on an identical or edited passage). Every one of them is PASS, and a FAIL answer equal to any of them
(after lynx.data.text.normalize) is rejected, so no (question, passage, answer) carries both labels. A row repeating
an earlier row's question, passage and answer is dropped.

Outputs in --out:
  chat_{train,val,test}.jsonl       {"messages": [user: Lynx prompt, assistant: Lynx JSON], "id", "label", ...}
  halubench_{train,val,test}.jsonl  {"id", "passage", "question", "answer", "label", "source_ds"}
  stats.json                        counts per split/source/label and type, perturbation validity, lengths, and
                                    what the grouping merged and dropped
Same seed and options -> byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections import Counter, defaultdict
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from lynx.data.perturb import (DOCUMENT_EDIT_TYPES, Context, Edit, Perturbation, PerturbStats, edit_document, invert,
                               perturb)
from lynx.data.reasoning import evidence_span, fail_reasoning, pass_reasoning, target
from lynx.data.sources import SOURCES, Row, load_source
from lynx.data.staging import write_through_staging
from lynx.data.text import near_duplicate_clusters, normalize, passage_info
from lynx.prompt import training_messages

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
TOKEN_SAMPLE_PER_SOURCE = 32


def _hash(*parts) -> str:
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()


def window_passage(passage: str, span: tuple[int, int], max_chars: int) -> str:
    """At most `max_chars` characters of the passage: the evidence span's sentences, then whole neighbouring
    sentences added alternately after and before it while they fit. An evidence span longer than the cap is cut at a
    word boundary. The window is a contiguous slice of the passage."""
    if len(passage) <= max_chars:
        return passage
    info = passage_info(passage)
    sentences = info.sentences
    first = next((i for i, (s, e) in enumerate(sentences) if e > span[0]), len(sentences) - 1)
    last = first
    while last + 1 < len(sentences) and sentences[last][1] < span[1]:
        last += 1
    start, end = sentences[first][0], sentences[last][1]
    if end - start > max_chars:
        cut = passage[start:start + max_chars]
        return cut.rsplit(" ", 1)[0] if " " in cut else cut
    lo, hi, grow_right = first, last, True
    while True:
        grew = False
        for _ in range(2):
            if grow_right and hi + 1 < len(sentences) and sentences[hi + 1][1] - start <= max_chars:
                hi, end, grew = hi + 1, sentences[hi + 1][1], True
            elif not grow_right and lo > 0 and end - sentences[lo - 1][0] <= max_chars:
                lo, start, grew = lo - 1, sentences[lo - 1][0], True
            grow_right = not grow_right
            if grew:
                break
        if not grew:
            return passage[start:end]


CONTEXT_KINDS = ("window", "select", "whole")


def parse_train_contexts(spec: str) -> tuple[tuple[str, int], ...]:
    """"window:300,select:256,whole" -> (("window", 300), ("select", 256), ("whole", 0)): the context forms training
    rows are drawn from (see build's train_contexts)."""
    forms = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, size = part.partition(":")
        if kind not in CONTEXT_KINDS or (kind == "whole") != (size == "") or (size and not size.isdigit()):
            raise ValueError(f"train contexts: bad form {part!r}; expected window:CHARS, select:TOKENS or whole")
        if kind == "window" and int(size) < 200:
            raise ValueError(f"train contexts: {part!r}: windows below 200 characters would cut most evidence")
        if kind == "select" and int(size) < 32:
            raise ValueError(f"train contexts: {part!r}: a selection budget needs at least 32 tokens")
        forms.append((kind, int(size or 0)))
    if not forms:
        raise ValueError("train contexts: no form given")
    return tuple(forms)


def format_train_context(form: tuple[str, int]) -> str:
    return form[0] if form[0] == "whole" else f"{form[0]}:{form[1]}"


def _passage_keys(passages: list[str], prefix: str) -> dict[str, str]:
    """Passage -> key of its near-duplicate cluster (identical passages share one key)."""
    unique = sorted(set(passages))  # sorted: the keys do not depend on row order
    first = near_duplicate_clusters(unique)
    return {text: f"{prefix}{first[i]}" for i, text in enumerate(unique)}


def _components(rows: list[Row], links: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Row id -> component key: rows connected by a shared passage group, a shared (normalised) question, or a shared
    key in `links` (row id -> more keys, e.g. near-duplicate clusters). The key is the component's smallest passage
    group ("g:..."), so a component that gains no new link keeps its key (and its split)."""
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for row in rows:
        for key in ["q:" + normalize(row.question), *(links or {}).get(row.id, ())]:
            a, b = find("g:" + row.group), find(key)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {row.id: find("g:" + row.group) for row in rows}


def _in_shared_clusters(key_of: dict[str, str]) -> int:
    """How many distinct passages share their near-duplicate cluster with another passage."""
    sizes = Counter(key_of.values())
    return sum(sizes[key] > 1 for key in key_of.values())


def _drop_duplicate_rows(rows: list[Row]) -> tuple[list[Row], int]:
    """The rows without those repeating an earlier row's question, passage and answer (normalised): the same PASS
    example twice (DROP's contrast set repeats some), with two FAIL answers, would only weigh that question double."""
    seen, out = set(), []
    collapsed = {p: " ".join(p.split()) for p in {row.passage for row in rows}}  # COVID-QA papers: once each
    for row in rows:
        key = (normalize(row.question), collapsed[row.passage], normalize(row.gold_answer))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out, len(rows) - len(out)


def assign_splits(component_sizes: dict[str, int], fractions, seed: int) -> dict[str, str]:
    """Component -> split. Components go in a seeded order to the split furthest below its target share of rows."""
    counts = dict.fromkeys(SPLITS, 0)
    out = {}
    for comp in sorted(component_sizes, key=lambda c: _hash(seed, "split", c)):
        total = sum(counts.values()) + component_sizes[comp]
        split = max(SPLITS, key=lambda s: (fractions[SPLITS.index(s)] * total - counts[s], -SPLITS.index(s)))
        out[comp] = split
        counts[split] += component_sizes[comp]
    return out


def _given_fail(row: Row, ctx: Context, rng: random.Random, stats: PerturbStats) -> Perturbation | None:
    """One of the source's own hallucinated answers (HaluEval's, or a --source-file's; seeded pick), None when it
    gives none; no-ops and other gold answers of the question are rejected like any perturbation."""
    answers = list(row.extra.get("hallucinated_answers", []))
    rng.shuffle(answers)
    golds = {normalize(g) for g in ctx.gold_answers}
    for answer in answers:
        p = Perturbation(answer, "hallucinated", (Edit(0, row.gold_answer, answer),))
        stats.add("hallucinated", "tried")
        if normalize(answer) == normalize(row.gold_answer):
            stats.add("hallucinated", "noop")
            continue
        if normalize(answer) in golds:
            stats.add("hallucinated", "gold")
            continue
        stats.add("hallucinated", "accepted")
        return p
    return None


def training_context(row: Row, answer: str, form: tuple[str, int]) -> str:
    """The document a training row shows for `answer` in context form `form` (see build's train_contexts)."""
    kind, size = form
    if kind == "whole":
        return row.passage
    span = evidence_span(row.gold_answer, row.question, row.passage)
    if kind == "window":
        return window_passage(row.passage, span, size)
    from lynx.context import select_evidence, token_counter

    count = token_counter(_llama3_tokenizer())
    return select_evidence(row.passage, row.question, answer, size, count, must_keep=span).text


@lru_cache(maxsize=1)
def _llama3_tokenizer():
    from lynx.tokenizer import Tokenizer

    return Tokenizer.llama3()


def _example(row: Row, split: str, passage: str, answer: str, label: str, reasoning: list[str],
             p: Perturbation | None, component: str, variant: int = 1) -> dict:
    ex_id = f"{row.id}-{label.lower()}" + (f"{variant}" if variant > 1 else "")
    meta = {
        "id": ex_id, "source": row.source, "split": split, "label": label, "group": component,
        "perturbation": None if p is None else {
            "type": p.kind, "edits": [{"start": e.start, "before": e.before, "after": e.after} for e in p.edits]},
    }
    chat = {"messages": training_messages(row.question, passage, answer, target(reasoning, label)), **meta}
    halubench = {"id": ex_id, "passage": passage, "question": row.question, "answer": answer, "label": label,
                 "source_ds": row.source}
    return {"chat": chat, "halubench": halubench}


def extra_fail_answers(row: Row, ctx: Context, first: Perturbation, n: int, seed: int, perturber) -> list[Perturbation]:
    """Up to n more FAIL answers for a question, each different from the first and from each other (seeded draws of
    the same perturber; the source's unused hallucinated answers first). Fewer when the answer offers fewer."""
    seen, out = {normalize(first.answer)}, []
    golds = {normalize(g) for g in (row.gold_answer, *ctx.gold_answers)}
    candidates = [Perturbation(a, "hallucinated", (Edit(0, row.gold_answer, a),))
                  for a in row.extra.get("hallucinated_answers", []) if normalize(a) not in golds]
    for attempt in range(4 * n):  # a few draws per wanted variant: some repeat an earlier answer
        if len(out) == n:
            break
        rng = random.Random(f"{seed}:{row.id}:{attempt + 2}")
        p = candidates.pop(0) if candidates else perturber(row.gold_answer, ctx, rng)
        if p is not None and normalize(p.answer) not in seen:
            seen.add(normalize(p.answer))
            out.append(p)
    return out


def _length_summary(values: list[int]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    return {"n": len(values), "min": values[0], "median": int(statistics.median(values)),
            "p95": values[min(len(values) - 1, int(0.95 * len(values)))], "max": values[-1]}


def _token_stats(examples: list[dict]) -> tuple[dict | None, str]:
    """Llama-3 token lengths of whole training conversations, on a fixed sample per source (tokenising every
    COVID-QA paper twice would dominate the build time)."""
    try:
        from lynx.tokenizer import Tokenizer

        tokenizer = Tokenizer.llama3()
    except Exception as e:  # the tokenizer module is optional for building data
        return None, f"token lengths skipped: lynx.tokenizer.Tokenizer.llama3() unavailable ({type(e).__name__}: {e})"
    by_source = defaultdict(list)
    for ex in examples:
        by_source[ex["chat"]["source"]].append(ex["chat"])
    out = {}
    for source, chats in sorted(by_source.items()):
        chats = sorted(chats, key=lambda c: c["id"])
        step = max(1, len(chats) // TOKEN_SAMPLE_PER_SOURCE)
        sample = chats[::step][:TOKEN_SAMPLE_PER_SOURCE]
        lengths = [len(tokenizer.apply_chat_template(c["messages"], add_generation_prompt=False)) for c in sample]
        summary = _length_summary(lengths)
        summary["over_4000"] = sum(n > 4000 for n in lengths)
        summary["over_8000"] = sum(n > 8000 for n in lengths)
        out[source] = summary
    return out, f"token lengths: Llama-3 tokenizer, conversations, sample of <= {TOKEN_SAMPLE_PER_SOURCE} per source"


@write_through_staging
def build(out_dir, *, seed: int = 17, sources=SOURCES, source_files=(), max_per_source: int | None = None,
          max_passage_chars: int | None = None, fractions=DEFAULT_FRACTIONS, raw_dir=None, token_stats: bool = True,
          perturber: Callable | None = None, train_fail_variants: int = 1, train_contexts=None,
          train_document_edits: bool = False, log=print) -> dict:
    """Build the dataset into `out_dir`; returns the statistics (also saved as stats.json). The files are written
    into a temporary folder next to out_dir and moved into it at the end: a build that fails leaves out_dir as it was.

    source_files: lynx.data.source_file.SourceFile objects, more sources alongside (or, with sources=(), instead of)
    the shipped ones.

    max_per_source: at most this many examples (PASS + FAIL) per source, taken from the seeded row order.
    max_passage_chars: window passages longer than this around the answer evidence (for small CPU models).
    perturber: `(gold, ctx, rng, stats=...) -> Perturbation | None`, default the hand-written lynx.data.perturb.
    train_fail_variants: FAIL answers per training question (each with a copy of its PASS example); val/test keep 1.
    train_contexts: the documents training rows show, one form per question drawn from these (a spec string or
    parse_train_contexts' tuples): ("window", C) the passage windowed to C characters around the gold evidence;
    ("select", T) lynx.context.select_evidence at a T-token budget (Llama-3 tokens) for each answer, the gold
    evidence always kept, the other chunks ranked as the judge ranks them; ("whole", 0) the passage itself. A
    question's PASS and FAIL rows share the form. Validation and test rows keep whole passages (windowed when
    max_passage_chars is given): the judge selects from them as it does from a user's documents.
    train_document_edits: each training question whose answer has a replacement perturbation (its FAIL answer's, or
    one drawn of DOCUMENT_EDIT_TYPES) also comes with the document edited the same way (lynx.data.perturb
    .edit_document): (edited, gold) FAIL and (edited, perturbed) PASS, rows only a comparison of answer and document
    can separate. Validation and test rows are not edited.
    """
    if isinstance(train_contexts, str):
        train_contexts = parse_train_contexts(train_contexts)
    if train_fail_variants < 1:
        raise ValueError(f"train_fail_variants must be at least 1, got {train_fail_variants}")
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if max_per_source is not None and max_per_source < 2:
        raise ValueError("max_per_source must be at least 2 (one PASS and one FAIL example)")
    if max_passage_chars is not None and max_passage_chars < 200:
        raise ValueError("max_passage_chars below 200 would cut most answers' evidence")
    perturber = perturber or perturb
    loaders = {name: partial(load_source, name, raw_dir) for name in sources}
    for f in source_files:
        if f.name in loaders:
            raise ValueError(f"--source-file {f.path}: the source name {f.name!r} is taken; name it {f.path}:OTHER")
        loaders[f.name] = f.load
    if not loaders:
        raise ValueError("no source: give shipped --sources, --source-file, or both")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"seed": seed, "sources": list(loaders), "max_per_source": max_per_source,
             "max_passage_chars": max_passage_chars, "split_fractions": list(fractions),
             **({"train_fail_variants": train_fail_variants} if train_fail_variants > 1 else {}),
             **({"train_contexts": ",".join(map(format_train_context, train_contexts))} if train_contexts else {}),
             **({"train_document_edits": 0} if train_document_edits else {}),
             "loader_skipped": {}, "questions": {}, "grouping": {}, "perturbation": {}}
    perturb_stats = PerturbStats()
    examples = []
    context_forms = Counter()
    for source, load in loaders.items():
        rows, skipped = load()
        stats["loader_skipped"][source] = {"count": len(skipped), "rows": skipped[:20]}
        for message in skipped[:20]:
            log(f"skipped malformed row: {message}")
        if len(skipped) > 20:
            log(f"... and {len(skipped) - 20} more malformed rows in {source}")
        rows, duplicates = _drop_duplicate_rows(rows)
        gold_answers = defaultdict(list)  # normalised question -> every gold answer the source gives for it
        for row in rows:
            if row.gold_answer not in gold_answers[normalize(row.question)]:
                gold_answers[normalize(row.question)].append(row.gold_answer)
        answers_by_group = defaultdict(list)
        for row in rows:
            answers_by_group[row.group].append((row.id, row.gold_answer))
        source_stats = PerturbStats()
        kept, no_fail = [], 0
        want = None if max_per_source is None else max_per_source // 2
        ordered = sorted(rows, key=lambda r: _hash(seed, r.id))
        for row in tqdm(ordered, desc=f"perturb {source}", unit="q", leave=False):
            if want is not None and len(kept) >= want:
                break
            rng = random.Random(f"{seed}:{row.id}")
            passage = row.passage
            if max_passage_chars:
                passage = window_passage(passage, evidence_span(row.gold_answer, row.question, passage),
                                         max_passage_chars)
            others = tuple(a for rid, a in answers_by_group[row.group] if rid != row.id)
            golds = tuple(a for a in gold_answers[normalize(row.question)] if a != row.gold_answer)
            ctx = Context(row.question, passage, source=source, other_answers=others, gold_answers=golds)
            p = _given_fail(row, ctx, rng, source_stats)
            if p is None:
                p = perturber(row.gold_answer, ctx, rng, stats=source_stats)
            if p is None:
                no_fail += 1
                continue
            kept.append((row, passage, p, ctx))
        perturb_stats.merge(source_stats)
        stats["perturbation"][source] = source_stats.table()
        stats["questions"][source] = {"loaded": len(rows) + duplicates, "duplicates_dropped": duplicates,
                                      "kept": len(kept), "no_valid_perturbation": no_fail}
        # Split groups: passage groups joined by shared questions and by near-duplicate passages (and windows).
        links = defaultdict(list)
        raw_key = _passage_keys([row.passage for row in rows], "n:")
        for row in rows:
            links[row.id].append(raw_key[row.passage])
        if max_passage_chars:
            window_key = _passage_keys([passage for _, passage, *_ in kept], "w:")
            for row, passage, *_ in kept:
                links[row.id].append(window_key[passage])
        component = _components(rows, links)
        kept_ids = [row.id for row, *_ in kept]
        without_links = _components(rows)
        stats["grouping"][source] = {
            "passages": len(set(raw_key)), "near_duplicate_passages": _in_shared_clusters(raw_key),
            "split_groups": len({component[i] for i in kept_ids}),
            "split_groups_merged_by_near_duplicates":
                len({without_links[i] for i in kept_ids}) - len({component[i] for i in kept_ids}),
            "questions_with_several_golds": sum(len({normalize(a) for a in g}) > 1 for g in gold_answers.values()),
        }
        sizes = Counter(component[row.id] for row, *_ in kept)
        split_of = assign_splits(sizes, fractions, seed)
        for row, passage, p, ctx in kept:
            split, comp = split_of[component[row.id]], component[row.id]
            fails = [p]
            if split == "train" and train_fail_variants > 1:
                fails += extra_fail_answers(row, ctx, p, train_fail_variants - 1, seed, perturber)
            form = None
            if split == "train" and train_contexts:
                form = random.Random(f"{seed}:{row.id}:context").choice(train_contexts)
                context_forms[format_train_context(form)] += 1
            pass_passage = passage if form is None else training_context(row, row.gold_answer, form)
            reasoning = pass_reasoning(row.question, row.gold_answer, pass_passage, row.extra.get("spans", ()))
            for variant, q in enumerate(fails, 1):  # variant > 1: a copy of the PASS example keeps labels balanced
                examples.append(_example(row, split, pass_passage, row.gold_answer, "PASS", reasoning, None, comp,
                                         variant))
                fail_passage = passage if form is None else training_context(row, q.answer, form)
                examples.append(_example(row, split, fail_passage, q.answer, "FAIL",
                                         fail_reasoning(row.gold_answer, q, ctx), q, comp, variant))
            if split == "train" and train_document_edits:
                q, edited = p, edit_document(pass_passage, row.gold_answer, p)
                if edited is None:  # the FAIL answer is no replacement in the document: draw one that is
                    q = perturb(row.gold_answer, ctx, random.Random(f"{seed}:{row.id}:document"),
                                types=DOCUMENT_EDIT_TYPES)
                    edited = edit_document(pass_passage, row.gold_answer, q) if q else None
                if edited:
                    stats["train_document_edits"] += 1
                    back = invert(row.gold_answer, q)  # how the gold answer is wrong about the edited document
                    shown = Perturbation(row.gold_answer, "document_edit", q.edits)
                    examples.append(_example(row, split, edited, row.gold_answer, "FAIL",
                                             fail_reasoning(q.answer, back, Context(row.question, edited)), shown,
                                             comp, len(fails) + 1))
                    examples.append(_example(row, split, edited, q.answer, "PASS",
                                             pass_reasoning(row.question, q.answer, edited), None, comp, len(fails) + 1))
    stats["perturbation"]["all"] = perturb_stats.table()
    if train_contexts:
        stats["train_context_questions"] = dict(sorted(context_forms.items()))

    # Files: one line per example, in a seeded order (PASS and FAIL of a question are not adjacent).
    examples.sort(key=lambda ex: _hash(seed, "order", ex["chat"]["id"]))
    counts = {s: defaultdict(Counter) for s in SPLITS}
    types = defaultdict(Counter)
    chars = defaultdict(list)
    for split in SPLITS:
        rows_in_split = [ex for ex in examples if ex["chat"]["split"] == split]
        with open(out_dir / f"chat_{split}.jsonl", "w", encoding="utf-8", newline="\n") as fc, \
                open(out_dir / f"halubench_{split}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for ex in rows_in_split:
                fc.write(json.dumps(ex["chat"], ensure_ascii=False) + "\n")
                fh.write(json.dumps(ex["halubench"], ensure_ascii=False) + "\n")
                chat = ex["chat"]
                counts[split][chat["source"]][chat["label"]] += 1
                if chat["perturbation"]:
                    types[chat["source"]][chat["perturbation"]["type"]] += 1
                chars[chat["source"]].append(len(ex["halubench"]["passage"]))
    stats["examples"] = {s: {src: dict(sorted(c.items())) for src, c in sorted(counts[s].items())} for s in SPLITS}
    stats["fail_types"] = {src: dict(sorted(c.items())) for src, c in sorted(types.items())}
    stats["passage_chars"] = {src: _length_summary(v) for src, v in sorted(chars.items())}
    stats["token_lengths"], note = _token_stats(examples) if token_stats else (None, "token lengths skipped (off)")
    stats["token_lengths_note"] = note
    with open(out_dir / "stats.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(format_stats(stats))
    return stats


def format_stats(stats: dict) -> str:
    lines = ["examples per split / source (PASS, FAIL):"]
    for split in SPLITS:
        per = stats["examples"][split]
        total = sum(sum(c.values()) for c in per.values())
        body = ", ".join(f"{src} {c.get('PASS', 0)}/{c.get('FAIL', 0)}" for src, c in per.items())
        lines.append(f"  {split:5s} {total:6d}: {body}")
    lines.append("questions loaded / duplicates dropped / kept / no valid perturbation; malformed rows skipped:")
    for src, q in stats["questions"].items():
        lines.append(f"  {src:12s} {q['loaded']:5d} / {q['duplicates_dropped']:3d} / {q['kept']:5d} /"
                     f" {q['no_valid_perturbation']:4d}; {stats['loader_skipped'][src]['count']}")
    lines.append("FAIL types per source: " + "; ".join(
        f"{src}: " + ", ".join(f"{k} {v}" for k, v in c.items()) for src, c in stats["fail_types"].items()))
    lines.append("split groups per source (of them merged by near-duplicate passages; questions with several gold"
                 " answers): " + "; ".join(
                     f"{src} {g['split_groups']} ({g['split_groups_merged_by_near_duplicates']};"
                     f" {g['questions_with_several_golds']})" for src, g in stats["grouping"].items()))
    lines.append("perturbation candidates (all sources): type tried accepted noop gold supported validity")
    for kind, t in stats["perturbation"]["all"].items():
        lines.append(f"  {kind:13s} {t['tried']:5d} {t['accepted']:5d} {t['rejected_noop']:4d} "
                     f"{t['rejected_gold']:4d} {t['rejected_supported']:4d}  {t['validity_rate']}")
    lines.append("passage characters per source (median / max): " + ", ".join(
        f"{src} {v['median']}/{v['max']}" for src, v in stats["passage_chars"].items()))
    lines.append(stats["token_lengths_note"])
    for src, t in (stats["token_lengths"] or {}).items():
        lines.append(f"  {src:12s} n={t['n']} min {t['min']} median {t['median']} p95 {t['p95']} max {t['max']}"
                     f" (>4000: {t['over_4000']}, >8000: {t['over_8000']})")
    return "\n".join(lines)
