"""Rows in the HaluBench schema: reading them from the formats evaluation sets come in, checking them, writing them.

One reader for every tool: judge.py --input, the trainer's eval.data (lynx.train.validation), the data builder's
--source-file (lynx.data.source_file), the data map and the demo.

What can be read, by what it is:
  .jsonl             one JSON object a line (blank lines are ignored)
  .json              a list of objects (or JSON lines, as the `datasets` library also accepts)
  .csv, .tsv         a header row, then one row a record (csv module; an empty cell is a missing value)
  .parquet           pyarrow
  a folder           saved by `datasets` (`save_to_disk`), or holding data files in the layout of a Hugging Face
                     dataset repository (`data/test-00000-of-00001.parquet`, ...)
  owner/name[/split] a Hugging Face dataset already in the local hub cache (nothing is downloaded)

Each record has a place, used in every message about it: its line number for JSONL and CSV ("12"), its index for
the others ("row 12"). Columns: HaluBench's (`id`, `passage` or `context`, `question`, `answer`, `label`,
`source_ds`); a file that names them otherwise is read with a mapping, `--columns question=q,passage=ctx`.
The row checks (check_row, normalize_label) and the JSON-lines parser (iter_json_lines) are here too, for the readers
of other JSONL files (training rows, raw QA sources).
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path

FIELDS = ("id", "passage", "question", "answer", "label", "source_ds")  # HaluBench's columns
LABELS = ("PASS", "FAIL")
MAPPABLE = (*FIELDS, "context", "hallucinated_answer")  # what --columns can name
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
JUDGE_COLUMNS = (("passage", "context"), ("question",), ("answer",))  # alternatives: one of each is needed
HUB_ID = re.compile(r"([\w.\-]+/[\w.\-]+)(?:/([\w.\-]+))?")  # owner/name, optionally /split


class BadInput(ValueError):
    """A source that cannot be read as rows at all: its type, its columns or its structure. The message names the
    file and, where known, the row. (A row that reads but fails the checks is a bad row, reported by its caller.)"""


def parse_columns(spec: str | None) -> dict[str, str]:
    """`question=q,passage=ctx` -> {"question": "q", "passage": "ctx"} (our column -> the file's column)."""
    mapping = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        ours, sep, theirs = (s.strip() for s in item.partition("="))
        if not sep or not ours or not theirs:
            raise BadInput(f"--columns: expected OURS=THEIRS items separated by commas, got {item!r}")
        if ours not in MAPPABLE:
            raise BadInput(f"--columns: unknown column {ours!r}; lynx's columns: {', '.join(MAPPABLE)}")
        mapping[ours] = theirs
    return mapping


# --- reading --------------------------------------------------------------------------------------------------------


def read_records(source, columns: dict[str, str] | None = None):
    """(records as (place, object), unreadable records as (place, reason)) of `source`, with the `columns` mapping
    applied. Only JSON lines can be unreadable one by one (invalid JSON); any other defect is a BadInput."""
    records, unreadable = _read_source(source)
    if columns:
        found = columns_found(records)
        missing = [theirs for theirs in columns.values() if theirs not in found]
        if records and missing:
            raise BadInput(f"{source}: --columns names {', '.join(map(repr, missing))}, not a column of the file "
                           f"(columns found: {', '.join(found) or 'none'})")
        records = [(place, _renamed(obj, columns)) for place, obj in records]
    return records, unreadable


def read_dicts(source, columns: dict[str, str] | None = None) -> list[dict]:
    """Every record of `source` as a dict; the first unreadable or non-object record is a BadInput."""
    records, unreadable = read_records(source, columns)
    if unreadable:
        place, reason = unreadable[0]
        raise BadInput(f"{source}:{place}: {reason}")
    for place, obj in records:
        if not isinstance(obj, dict):
            raise BadInput(f"{source}:{place}: expected a JSON object, got {type(obj).__name__}")
    return [obj for _, obj in records]


def read_rows(source, require_label: bool = False, columns: dict[str, str] | None = None):
    """(valid rows as (place, object), bad rows as (place, reason)) of a file in the HaluBench schema. A file with
    no column for the question, the document or the answer (or the label, when required) is a BadInput."""
    records, unreadable = read_records(source, columns)
    return check_rows(source, records, unreadable, require_label)


def check_rows(source, records, unreadable, require_label: bool):
    """read_rows for records already read (read_records): the unreadable and failing ones, in file order, as bad."""
    require_columns(source, records, JUDGE_COLUMNS + ((("label",),) if require_label else ()))
    bad = list(unreadable)
    rows = []
    for place, obj in records:
        reason = check_row(obj, require_label)
        if reason:
            bad.append((place, reason))
        else:
            rows.append((place, obj))
    bad.sort(key=lambda item: _place_order(item[0]))
    return rows, bad


def columns_found(records) -> list[str]:
    """Every key of the records' objects, in order of first appearance."""
    found = {}
    for _, obj in records:
        if isinstance(obj, dict):
            found.update(dict.fromkeys(obj))
    return list(found)


def require_columns(source, records, needed) -> None:
    """A BadInput listing the columns found when no record has any of the alternatives of one `needed` entry."""
    if not records:
        return
    found = columns_found(records)
    for alternatives in needed:
        if not any(name in found for name in alternatives):
            raise BadInput(f"{source}: no {' or '.join(map(repr, alternatives))} column (columns found: "
                           f"{', '.join(found) or 'none'}); name the file's columns with --columns, e.g. "
                           f"--columns question=q,passage=ctx,answer=a")


def check_row(obj, require_label: bool) -> str | None:
    """Why a record cannot be judged, or None when it is fine (the same checks for every format)."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if obj.get("passage") is None and obj.get("context") is None:
        return "missing 'passage' (or 'context')"
    for key in ("question", "answer"):
        if obj.get(key) is None:
            return f"missing {key!r}"
    for key in ("passage", "context", "question", "answer"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            return f"{key!r} must be a string, got {type(obj[key]).__name__}"
    if not row_document(obj).strip():
        return "empty document ('passage' or 'context')"
    if obj.get("label") is not None:
        try:
            normalize_label(obj["label"])
        except ValueError as e:
            return str(e)
    elif require_label:
        return "missing 'label' (needed by --eval)"
    return None


def normalize_label(value) -> str:
    """"PASS"/"FAIL" from a label in any case; anything else raises ValueError."""
    if isinstance(value, str) and value.strip().upper() in LABELS:
        return value.strip().upper()
    raise ValueError(f"label must be PASS or FAIL, got {value!r}")


def row_document(obj: dict) -> str:
    """The document of a row: `passage`, or `context` when there is no passage."""
    return obj["passage"] if obj.get("passage") is not None else obj["context"]


def row_example(obj: dict) -> tuple[str, str, str]:
    """(question, document, answer) of a checked row, as lynx.judge.Judge takes them."""
    return obj["question"], row_document(obj), obj["answer"]


def _renamed(obj, columns: dict[str, str]):
    if not isinstance(obj, dict):
        return obj
    out = {key: value for key, value in obj.items() if key not in columns.values()}
    out.update({ours: obj[theirs] for ours, theirs in columns.items() if theirs in obj})
    return out


def _place_order(place: str) -> int:
    return int(place.removeprefix("row "))


def _read_source(source):
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, split=None), []
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_json_lines(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "\t" if suffix == ".tsv" else ","), []
        if suffix == ".parquet":
            return _read_parquet(path), []
        raise BadInput(f"{path}: cannot read {suffix or 'a file without an extension'!r} files; lynx reads "
                       f"{', '.join(EXTENSIONS)}, a `datasets` folder, or a Hugging Face dataset id in the hub cache")
    hub = HUB_ID.fullmatch(str(source))
    if hub and path.suffix.lower() not in EXTENSIONS:  # data/missing.jsonl is a missing file, not a hub id
        return _read_folder(_hub_snapshot(hub.group(1)), split=hub.group(2), name=hub.group(1)), []
    raise FileNotFoundError(f"input file not found: {source}")


def iter_json_lines(lines):
    """(place, object, None) for each line of JSON, (place, None, why) for each line that is not; the place is the
    line number. Blank lines are skipped. `lines`: an open text file (plain or gzip)."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield str(lineno), None, f"invalid JSON ({e.msg} at column {e.colno})"
            continue
        yield str(lineno), obj, None


def _read_json_lines(path: Path):
    records, unreadable = [], []
    with open(path, encoding="utf-8") as f:
        for place, obj, why in iter_json_lines(f):
            if why:
                unreadable.append((place, why))
            else:
                records.append((place, obj))
    return records, unreadable


def _read_json(path: Path):
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return _read_json_lines(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    return [(f"row {i}", obj) for i, obj in enumerate(data)], []


def _read_csv(path: Path, delimiter: str):
    records = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets start their CSV with a BOM
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        header, start = None, 1
        try:
            for cells in reader:
                if cells:
                    if header is None:
                        header = cells
                    elif len(cells) != len(header):
                        raise BadInput(f"{path}:{start}: malformed CSV row: {len(cells)} fields, the header has "
                                       f"{len(header)}")
                    else:  # csv has no null: an empty cell is a missing value
                        records.append((str(start), {k: (v if v != "" else None) for k, v in zip(header, cells)}))
                start = reader.line_num + 1  # a quoted cell can span lines: the next record starts after them
        except csv.Error as e:
            raise BadInput(f"{path}:{start}: malformed CSV row: {e}") from None
    return records


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise BadInput(f"{path}: pyarrow cannot read it as Parquet ({type(e).__name__}: {e})") from None
    return [(f"row {i}", obj) for i, obj in enumerate(table.to_pylist())]


def _read_folder(path: Path, split: str | None, name: str | None = None):
    """A `datasets` folder (save_to_disk), or a folder of data files read by `datasets.load_dataset`, which tells
    the splits apart by the Hub's file-naming conventions (and the README's `configs`)."""
    try:
        import datasets
    except ImportError:
        raise BadInput(f"{path}: reading a dataset folder needs the `datasets` library (pip install datasets)") \
            from None
    name = name or str(path)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            data = datasets.load_from_disk(str(path))
        else:
            # load_dataset converts the files into Arrow under cache_dir: a throw-away one, with the rows kept in
            # memory, leaves no cache behind.
            with tempfile.TemporaryDirectory() as cache:
                data = datasets.load_dataset(str(path), cache_dir=cache, keep_in_memory=True)
    except Exception as e:  # datasets raises many types (DataFilesNotFoundError, EmptyDatasetError, ...)
        raise BadInput(f"{path}: neither a `datasets` folder (save_to_disk) nor a folder of data files "
                       f"({type(e).__name__}: {e})") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            why = f"no split {split!r}" if split else "several splits"
            raise BadInput(f"{name}: {why} (splits: {', '.join(splits)}); name one, e.g. {name}/{splits[0]}")
        data = data[split]
    elif split is not None:
        raise BadInput(f"{name}: has no splits, so not {split!r}")
    return [(f"row {i}", obj) for i, obj in enumerate(data.to_list())]


def _hub_snapshot(repo_id: str) -> Path:
    """The local copy of a Hugging Face dataset repository, from the hub cache only."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset", local_files_only=True))
    except Exception as e:  # huggingface_hub raises several error types for "not cached"
        raise FileNotFoundError(
            f"input file not found: {repo_id} is neither a file or folder nor a dataset in the local Hugging Face "
            f"hub cache {constants.HF_HUB_CACHE} (nothing is downloaded here; fetch it first, e.g. "
            f"`huggingface-cli download --repo-type dataset {repo_id}`): {type(e).__name__}") from None


# --- writing --------------------------------------------------------------------------------------------------------


def write_rows(rows: list[dict], path) -> Path:
    """Rows to `path`: Parquet for a .parquet name, JSON lines for any other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = columns_found(enumerate(rows))
        pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in names}), path)
        return path
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")  # str: e.g. a Parquet date
    return path
