"""Loaders for the raw QA sources in data/raw/ (see data/raw/SOURCES.md), each into a common row.

Every loader returns `(rows, skipped)`: the good rows, and one message per malformed row naming the file and the row
(line number for JSON-lines files, key or index for JSON files). Malformed rows are skipped, never guessed at.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lynx.rows import iter_json_lines

# The repo copy; a fresh clone has it (nothing is read from outside the repository at run time).
DEFAULT_RAW_DIR = Path(__file__).resolve().parents[2] / "data" / "raw"

SOURCES = ("halueval", "pubmedqa", "covidqa", "drop", "financebench")


@dataclass
class Row:
    """One question with its gold answer. `group` names the passage the question is asked about: rows sharing a
    group (or a question) always land in the same split. `extra` holds source-specific fields."""

    id: str
    source: str
    question: str
    passage: str
    gold_answer: str
    group: str
    extra: dict = field(default_factory=dict)


class Malformed(ValueError):
    pass


def _open_text(path: Path):
    """Open `path`, or `path.gz` when only the compressed copy exists."""
    if path.exists():
        return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rt", encoding="utf-8")
    raise FileNotFoundError(f"missing raw data file {path} (or {gz.name}); see data/raw/SOURCES.md")


def _read_jsonl(path: Path, skipped: list[str]):
    """Yield (line number, object) for every parsable line; unparsable lines are reported in `skipped`."""
    with _open_text(path) as f:
        for lineno, obj, unreadable in iter_json_lines(f):
            if unreadable:
                skipped.append(f"{path.name}:{lineno}: {unreadable}")
            else:
                yield lineno, obj


def _read_json(path: Path):
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise Malformed(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _text(obj: dict, key: str) -> str:
    """A required non-empty string field, stripped."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise Malformed(f"missing or empty {key!r}")
    return value.strip()


def load_halueval(raw_dir: Path = DEFAULT_RAW_DIR):
    """HaluEval QA (HotpotQA questions). Both generation files hold the same questions with different hallucinated
    answers; we keep one row per question and both hallucinated answers in extra["hallucinated_answers"]."""
    rows: dict[tuple[str, str], Row] = {}
    skipped: list[str] = []
    for name in ("qa_one-turn_data.jsonl", "qa_multi-turn_data.jsonl"):
        path = Path(raw_dir) / "halueval" / name
        for lineno, obj in _read_jsonl(path, skipped):
            try:
                knowledge, question = _text(obj, "knowledge"), _text(obj, "question")
                gold, hallucinated = _text(obj, "right_answer"), _text(obj, "hallucinated_answer")
            except Malformed as e:
                skipped.append(f"{path.name}:{lineno}: {e}")
                continue
            key = (question, knowledge)
            if key not in rows:
                rows[key] = Row(f"halueval-{len(rows)}", "halueval", question, knowledge, gold, _group(knowledge),
                                {"hallucinated_answers": []})
            elif rows[key].gold_answer != gold:
                skipped.append(f"{path.name}:{lineno}: right_answer differs from the other file's for this question")
                continue
            if hallucinated not in rows[key].extra["hallucinated_answers"]:
                rows[key].extra["hallucinated_answers"].append(hallucinated)
    return list(rows.values()), skipped


def load_pubmedqa(raw_dir: Path = DEFAULT_RAW_DIR):
    """PubMedQA PQA-L. Gold answer = final_decision.capitalize() + ". " + LONG_ANSWER, as HaluBench did."""
    path = Path(raw_dir) / "pubmedqa" / "ori_pqal.json"
    data = _read_json(path)
    if not isinstance(data, dict):
        raise Malformed(f"{path}: expected a JSON object mapping pubid -> example")
    rows, skipped = [], []
    for pubid, obj in data.items():
        try:
            question, long_answer = _text(obj, "QUESTION"), _text(obj, "LONG_ANSWER")
            decision = _text(obj, "final_decision").lower()
            contexts = obj.get("CONTEXTS")
            if decision not in ("yes", "no", "maybe"):
                raise Malformed(f"final_decision {decision!r} is not yes/no/maybe")
            if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
                raise Malformed("CONTEXTS is not a non-empty list of strings")
        except Malformed as e:
            skipped.append(f"{path.name}:{pubid}: {e}")
            continue
        passage = "\n\n".join(c.strip() for c in contexts if c.strip())
        gold = decision.capitalize() + ". " + long_answer
        rows.append(Row(f"pubmedqa-{pubid}", "pubmedqa", question, passage, gold, _group(passage),
                        {"final_decision": decision, "long_answer": long_answer}))
    return rows, skipped


def load_covidqa(raw_dir: Path = DEFAULT_RAW_DIR):
    """COVID-QA (SQuAD format). The passage is the whole paper, kept whole; the gold answer is the annotated span.
    About 230 answer_start offsets of this draft release are stale, so the span is located by its text when the
    offset does not match; an answer whose text is not in the paper at all is malformed."""
    path = Path(raw_dir) / "covidqa" / "200423_covidQA.json"
    data = _read_json(path)
    rows, skipped = [], []
    for di, doc in enumerate(data.get("data", []) if isinstance(data, dict) else []):
        for pi, para in enumerate(doc.get("paragraphs", [])):
            where = f"{path.name}:data[{di}].paragraphs[{pi}]"
            context = para.get("context")
            if not isinstance(context, str) or not context.strip():
                skipped.append(f"{where}: missing context ({len(para.get('qas', []))} questions skipped)")
                continue
            for qi, qa in enumerate(para.get("qas", [])):
                try:
                    question = _text(qa, "question")
                    answers = qa.get("answers") or []
                    if qa.get("is_impossible") or not answers:
                        raise Malformed("no answer")
                    answer = answers[0]
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not text.strip():
                        raise Malformed("empty answer text")
                    if not (isinstance(start, int) and context[start:start + len(text)] == text):
                        start = context.find(text)
                    if start < 0:
                        raise Malformed("answer text not found in the context")
                except Malformed as e:
                    skipped.append(f"{where}.qas[{qi}] (id {qa.get('id')}): {e}")
                    continue
                rows.append(Row(f"covidqa-{qa.get('id', f'{di}-{pi}-{qi}')}", "covidqa", question, context,
                                text.strip(), f"covidqa-doc-{para.get('document_id', di)}",
                                {"answer_start": start + (len(text) - len(text.lstrip()))}))
    return rows, skipped


def render_drop_answer(answer: dict) -> tuple[str, str]:
    """A DROP answer as text, with its kind: a number, a date ("March 1, 1565", "November 15", "1615") or spans
    (joined with ", ")."""
    if not isinstance(answer, dict):
        raise Malformed("answer is not an object")
    number = str(answer.get("number") or "").strip()
    if number:
        return number, "number"
    date = answer.get("date") or {}
    day, month, year = (str(date.get(k) or "").strip() for k in ("day", "month", "year"))
    if day or month or year:
        if month and day:
            text = f"{month} {day}, {year}" if year else f"{month} {day}"
        else:
            text = " ".join(p for p in (day, month, year) if p)
        return text, "date"
    spans = [s.strip() for s in answer.get("spans") or [] if isinstance(s, str) and s.strip()]
    if spans:
        return ", ".join(spans), "spans"
    raise Malformed("answer has no number, date or spans")


def load_drop(raw_dir: Path = DEFAULT_RAW_DIR):
    """The DROP contrast set: passages with many questions each."""
    path = Path(raw_dir) / "drop" / "drop_contrast_sets_test.json"
    data = _read_json(path)
    rows, skipped = [], []
    for passage_id, obj in (data.items() if isinstance(data, dict) else []):
        try:
            passage = _text(obj, "passage")
        except Malformed as e:
            skipped.append(f"{path.name}:{passage_id}: {e}")
            continue
        for qi, qa in enumerate(obj.get("qa_pairs", [])):
            try:
                question = _text(qa, "question")
                gold, kind = render_drop_answer(qa.get("answer"))
                spans = [s.strip() for s in qa["answer"].get("spans") or [] if isinstance(s, str) and s.strip()]
            except Malformed as e:
                skipped.append(f"{path.name}:{passage_id}.qa_pairs[{qi}]: {e}")
                continue
            qid = qa.get("query_id") or f"{passage_id}-{qi}"
            rows.append(Row(f"drop-{qid}", "drop", question, passage, gold, f"drop-{passage_id}",
                            {"answer_kind": kind, "spans": spans}))
    return rows, skipped


def _clean_evidence(text: str) -> str:
    # Text extracted from PDF tables has a whitespace-only line between cells; drop those lines, keep the others.
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def load_financebench(raw_dir: Path = DEFAULT_RAW_DIR):
    """FinanceBench open sample. The passage is the evidence texts (not the full pages). Questions about the same
    company share a group: evidence pages of one filing overlap, and a filing repeats the figures of the years before
    it (PepsiCo's FY2022 10-K shows FY2021's cash flows, the subject of a question on the FY2021 10-K)."""
    path = Path(raw_dir) / "financebench" / "financebench_open_source.jsonl"
    rows, skipped = [], []
    for lineno, obj in _read_jsonl(path, skipped):
        try:
            question, gold = _text(obj, "question"), _text(obj, "answer")
            fid, doc_name, company = _text(obj, "financebench_id"), _text(obj, "doc_name"), _text(obj, "company")
            evidence = obj.get("evidence")
            if not isinstance(evidence, list) or not evidence:
                raise Malformed("no evidence")
            texts = []
            for ev in evidence:
                text = _clean_evidence(_text(ev, "evidence_text"))
                if text not in texts:
                    texts.append(text)
        except Malformed as e:
            skipped.append(f"{path.name}:{lineno}: {e}")
            continue
        rows.append(Row(f"financebench-{fid}", "financebench", question, "\n\n".join(texts), gold,
                        f"financebench-{company}", {"doc_name": doc_name, "company": company}))
    return rows, skipped


LOADERS = {
    "halueval": load_halueval,
    "pubmedqa": load_pubmedqa,
    "covidqa": load_covidqa,
    "drop": load_drop,
    "financebench": load_financebench,
}


def load_source(name: str, raw_dir: Path | None = None):
    """`(rows, skipped)` for one source by name."""
    if name not in LOADERS:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    return LOADERS[name](Path(raw_dir) if raw_dir is not None else DEFAULT_RAW_DIR)


def _group(passage: str) -> str:
    return "passage-" + hashlib.sha1(re.sub(r"\s+", " ", passage).encode()).hexdigest()[:16]
