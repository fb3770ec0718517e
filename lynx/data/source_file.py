"""--source-file: a team's own question / document / answer records as a source of the data builder.

`python -m lynx.data build --source-file my.jsonl[:NAME] [--columns question=q,...]` reads the file with lynx.rows
(JSONL, JSON, CSV/TSV, Parquet, a `datasets` folder or a cached hub dataset) and makes each record with a question,
a document (`passage` or `context`) and a gold answer a `Row`, as lynx.data.sources' loaders do: the builder then
writes its PASS example and a perturbed FAIL example like any shipped source's. The row's `group` is its document,
so no document is in two splits.

Answers the file marks as hallucinated are the FAIL answers, as HaluEval's are (hand-written perturbation is the
fallback): a `hallucinated_answer` column, or a record labelled FAIL for the same question and document (HaluBench's
own layout). Records the builder cannot use (a missing or empty field, a label other than PASS/FAIL, a FAIL answer
with no PASS answer to go with it) are skipped and reported with their place, as the shipped loaders' are.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from lynx.data.sources import Row, _group
from lynx.rows import JUDGE_COLUMNS, check_row, normalize_label, read_records, require_columns, row_document

NAME = re.compile(r"[A-Za-z][\w.\-]*")


@dataclass(frozen=True)
class SourceFile:
    """One --source-file: where it is, the source name its rows get, and the --columns mapping."""

    path: str
    name: str
    columns: dict = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, spec: str, columns: dict | None = None) -> SourceFile:
        """`my.jsonl` (named `my`) or `my.jsonl:NAME`: the part after the last colon is the name, unless the whole
        spec is an existing path."""
        path, sep, name = spec.rpartition(":")
        if not sep or Path(spec).exists() or not NAME.fullmatch(name):
            path, name = spec, Path(spec.rstrip("/")).stem
        if not NAME.fullmatch(name):
            raise ValueError(f"--source-file {spec}: name the source (letters, digits, _ . -), e.g. {spec}:mydomain")
        return cls(path, name, dict(columns or {}))

    def load(self) -> tuple[list[Row], list[str]]:
        """`(rows, skipped)` like a lynx.data.sources loader; an unreadable file raises lynx.rows.BadInput."""
        records, unreadable = read_records(self.path, self.columns)
        require_columns(self.path, records, JUDGE_COLUMNS)
        where = Path(self.path).name  # as the shipped loaders name their files in stats.json
        skipped = [f"{where}:{place}: {reason}" for place, reason in unreadable]
        usable = []  # (place, record, (question, document), labelled FAIL)
        for place, obj in records:
            problem = check_row(obj, require_label=False) or _empty_field(obj)
            if problem:
                skipped.append(f"{where}:{place}: {problem}")
                continue
            key = (obj["question"].strip(), row_document(obj).strip())
            usable.append((place, obj, key, obj.get("label") is not None and normalize_label(obj["label"]) == "FAIL"))
        golds = [(place, obj, key) for place, obj, key, fail in usable if not fail]
        gold_keys = {key for _, _, key in golds}
        hallucinated = defaultdict(list)  # (question, document) -> the answers the file marks as hallucinated
        for place, obj, key, fail in usable:
            if fail and key not in gold_keys:
                skipped.append(f"{where}:{place}: a FAIL answer with no PASS answer for its question and document")
            elif fail or obj.get("hallucinated_answer"):
                hallucinated[key].append((obj["answer"] if fail else obj["hallucinated_answer"]).strip())

        ids = [obj.get("id") for _, obj, _ in golds]
        use_ids = None not in ids and len(set(map(str, ids))) == len(ids)  # else the record's place names it
        rows = []
        for place, obj, (question, document) in golds:
            rid = str(obj["id"]) if use_ids else place.removeprefix("row ")
            answers = list(dict.fromkeys(hallucinated[question, document]))  # once each, in file order
            rows.append(Row(f"{self.name}-{rid}", self.name, question, document, obj["answer"].strip(),
                            _group(document), {"hallucinated_answers": answers} if answers else {}))
        return rows, skipped


def _empty_field(obj: dict) -> str | None:
    """What the builder needs beyond the judge's checks: a question and an answer that say something."""
    for key in ("question", "answer"):
        if not obj[key].strip():
            return f"empty {key!r}"
    value = obj.get("hallucinated_answer")
    if value is not None and not isinstance(value, str):
        return f"'hallucinated_answer' must be a string, got {type(value).__name__}"
    return None
