"""python -m lynx.data build --out DIR --seed 17 [--sources ...] [--source-file my.jsonl[:NAME] ...]: build
HaluBench-style PASS/FAIL data (from the shipped QA sources, your own QA records, or both).
python -m lynx.data map DIR: draw a built dataset (DIR/map.html and DIR/map.png)."""

from __future__ import annotations

import argparse
import sys
import time

from lynx.data.build import DEFAULT_FRACTIONS, build
from lynx.data.source_file import SourceFile
from lynx.data.sources import SOURCES
from lynx.rows import parse_columns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lynx.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "build", help="build train/val/test splits (chat JSONL for training, HaluBench-schema JSONL for evaluation)",
        description="Each kept question gives a PASS example (the gold answer) and a FAIL example (a perturbed "
                    "answer) on the same passage. No passage, near-duplicate of a passage or question is in two "
                    "splits, and no FAIL answer equals a gold answer of its question. Same seed and options: "
                    "byte-identical output.")
    b.add_argument("--out", required=True, help="output folder (created)")
    b.add_argument("--seed", type=int, default=17, help="seed for row order, perturbations and splits (default 17)")
    b.add_argument("--sources", nargs="+", choices=[*SOURCES, "none"], default=list(SOURCES), metavar="SOURCE",
                   help=f"shipped sources to use (default all: {' '.join(SOURCES)}; none: only --source-file)")
    b.add_argument("--source-file", action="append", default=[], metavar="FILE[:NAME]",
                   help="your own question / document / gold answer records (.jsonl, .json, .csv, .tsv, .parquet, a "
                        "`datasets` folder or a hub dataset id in the local cache) as one more source, named NAME "
                        "(default: the file's stem); repeatable. A `hallucinated_answer` column, or rows labelled FAIL "
                        "for the same question and document, give the FAIL answers (perturbation is the fallback)")
    b.add_argument("--columns", default=None, metavar="OURS=THEIRS,...",
                   help="the --source-file columns' names for ours, e.g. question=q,passage=doc,answer=gold")
    b.add_argument("--max-per-source", type=int, default=None, metavar="N",
                   help="at most N examples (N/2 PASS + N/2 FAIL) per source, e.g. for a quick CPU demo")
    b.add_argument("--max-passage-chars", type=int, default=None, metavar="C",
                   help="cut passages longer than C characters to a window of whole sentences around the answer's "
                        "evidence (COVID-QA papers are ~21k characters, ~5k tokens). For small CPU models only: "
                        "answers that need facts from far apart in the passage may lose their support")
    b.add_argument("--train-contexts", default=None, metavar="FORMS",
                   help="the documents training rows show, one form per question drawn from a comma-separated list: "
                        "window:C (C characters of whole sentences around the answer's evidence), select:T (the "
                        "evidence chunks the judge's --context-tokens T selection keeps, the gold evidence always "
                        "among them), whole. E.g. window:300,select:256,select:512. Validation and test rows keep "
                        "whole passages (default: training rows as validation and test)")
    b.add_argument("--train-fail-variants", type=int, default=1, metavar="K",
                   help="FAIL answers per training question, each next to a copy of its PASS example (default 1); "
                        "validation and test keep one pair per question")
    b.add_argument("--train-document-edits", action="store_true",
                   help="also show each training question with its document edited to say what a replacement "
                        "perturbation of its answer says (a number, date, unit, name or antonym): the gold answer "
                        "becomes FAIL and the perturbed one PASS on that document, so only comparing the answer with "
                        "the document separates the four rows (validation and test rows are not edited)")
    b.add_argument("--split-fractions", type=float, nargs=3, default=list(DEFAULT_FRACTIONS),
                   metavar=("TRAIN", "VAL", "TEST"), help="share of examples per split (default 0.7 0.15 0.15)")
    b.add_argument("--raw-dir", default=None, help="raw sources folder (default: the repository's data/raw)")
    b.add_argument("--no-token-stats", action="store_true", help="skip the Llama-3 token length statistics")
    b.add_argument("--perturb-model", default=None, metavar="DIR",
                   help="Hugging Face Llama checkpoint folder (with its tokenizer) to write the FAIL answers; "
                        "hand-written perturbation is the fallback when its output is invalid")
    b.add_argument("--perturb-max-new-tokens", type=int, default=256, help="generation budget per model answer")
    m = sub.add_parser(
        "map", help="draw a built dataset: DIR/map.html (interactive, self-contained) and DIR/map.png",
        description="Every row of the built dataset in DIR (all halubench_*.jsonl splits) becomes a point of a 2-D "
                    "projection of its text (TF-IDF of question, answer and passage start, truncated SVD), coloured "
                    "by source, label, perturbation type or split. Beside it: counts per source, split, label and "
                    "perturbation type, and passage and prompt length histograms. map.html is one file with its data "
                    "and script inline (open it in a browser, no server or network needed; hover a point to see its "
                    "question, answer and label); map.png shows the same in three scatter panels and bar charts.")
    m.add_argument("dir", metavar="DIR", help="folder written by `python -m lynx.data build --out DIR`")
    args = parser.parse_args(argv)

    if args.command == "map":
        from lynx.data.map import write_map  # scikit-learn and matplotlib are needed only here

        start = time.perf_counter()
        try:
            html_path, png_path = write_map(args.dir)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {html_path} and {png_path} in {time.perf_counter() - start:.1f}s")
        return 0

    try:
        columns = parse_columns(args.columns)
        source_files = [SourceFile.parse(spec, columns) for spec in args.source_file]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sources = [] if "none" in args.sources else args.sources
    perturber = None
    if args.perturb_model:
        from lynx.data.model_perturb import ModelPerturber

        perturber = ModelPerturber.from_pretrained(args.perturb_model, max_new_tokens=args.perturb_max_new_tokens)
    start = time.perf_counter()
    try:
        build(args.out, seed=args.seed, sources=sources, source_files=source_files, max_per_source=args.max_per_source,
              max_passage_chars=args.max_passage_chars, fractions=tuple(args.split_fractions),
              raw_dir=args.raw_dir, token_stats=not args.no_token_stats, perturber=perturber,
              train_fail_variants=args.train_fail_variants, train_contexts=args.train_contexts,
              train_document_edits=args.train_document_edits)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
