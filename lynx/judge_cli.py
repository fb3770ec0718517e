"""judge.py: judge answers for faithfulness to a document with a Lynx-compatible checkpoint (published Lynx or ours).

One example (prints the verdict as JSON):
  python judge.py --model DIR --question Q --context DOC --answer A

Rows in the HaluBench schema (`passage` or `context`, `question`, `answer`, optional `label`, `source_ds`, `id`) from
a .jsonl, .json, .csv, .tsv or .parquet file, a `datasets` folder, or a Hugging Face dataset id already in the local
hub cache (lynx/rows.py; --columns maps other column names); output rows are the input rows plus `score`, `p_pass`,
`reasoning`, `raw` (and `truncated`, `skipped`, `prompt_tokens`, and what of the document was read:
`context_tokens`, `document_tokens`, `selected`, the kept character spans or null for the whole document), as JSONL
(Parquet for an --output ending .parquet):
  python judge.py --model DIR --input rows.jsonl --output judged.jsonl
  python judge.py --model DIR --input HaluBench/data/test-00000-of-00001.parquet --output judged.jsonl --eval
  python judge.py --model DIR --input mine.csv --columns question=q,passage=doc,answer=reply --output judged.parquet

HaluBench-style evaluation (rows need `label`), written to --report-dir as report.json, report.md (+ report.png):
  python judge.py --model DIR --input halubench.jsonl --output judged.jsonl --eval
  torchrun --nproc_per_node 8 judge.py --model DIR --input halubench.jsonl --eval   # rows split across ranks

--model is a checkpoint directory (config.json + safetensors, tokenizer.json or tokenizer.model; without a
tokenizer the shipped Llama-3 tokenizer is used), a llama.cpp GGUF file (weights, tokenizer and chat template from
the file), or a Hugging Face hub id already in the local hub cache.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from lynx.config import DTYPES as CONFIG_DTYPES
from lynx.distributed import all_gather_objects, init_distributed
from lynx.rows import BadInput, parse_columns, read_rows, row_example, write_rows

DTYPES = {"auto": None, **CONFIG_DTYPES}  # auto: lynx.judge.auto_dtype
EXIT_BAD_INPUT = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="judge.py", description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="checkpoint directory, a GGUF file (e.g. the published Lynx Q4_K_M), or a hub id in the local "
                        "Hugging Face cache")
    single = p.add_argument_group("one example")
    single.add_argument("--question", help="the question")
    single.add_argument("--context", "--document", dest="context", help="the document the answer must be faithful to")
    single.add_argument("--answer", help="the answer to judge")
    batch = p.add_argument_group("a file of rows")
    batch.add_argument("--input", type=Path,
                       help="rows in the HaluBench schema: .jsonl, .json, .csv, .tsv, .parquet, a `datasets` folder, "
                            "or a Hugging Face dataset id (owner/name[/split]) in the local hub cache")
    batch.add_argument("--columns", metavar="OURS=THEIRS,...",
                       help="the file's names for our columns, e.g. question=q,passage=ctx,answer=reply,label=verdict")
    batch.add_argument("--output", type=Path,
                       help="write the input rows with the verdicts added (JSONL; Parquet for a .parquet name)")
    batch.add_argument("--eval", action="store_true",
                       help="compute HaluBench-style metrics (rows need `label`) into --report-dir")
    batch.add_argument("--report-dir", type=Path,
                       help="where --eval writes report.json/report.md/report.png (default: <output>_report, or "
                            "./judge_report without --output)")
    batch.add_argument("--strict", action="store_true",
                       help="if any row is bad, list them all and exit with code 2 before judging (default: skip "
                            "bad rows, report their line numbers and count)")
    batch.add_argument("--limit", type=int, help="judge only the first N valid rows")
    batch.add_argument("--no-fast-compare", action="store_true",
                       help="with --eval in full mode, do not also run the fast mode to report its agreement")
    batch.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals")
    gen = p.add_argument_group("judging")
    gen.add_argument("--fast", action="store_true",
                     help="skip the reasoning: read p_pass right after a forced "
                          "'{\"REASONING\": [], \"SCORE\": \"' (one forward pass per example)")
    gen.add_argument("--max-new-tokens", type=int, default=600, help="generation length (published: 600)")
    gen.add_argument("--batch-size", type=int, default=8,
                     help="full mode: rows decoded together (continuous batching: a finished row takes the next "
                          "example at once)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                     help="weights dtype (auto: bfloat16 on GPU; on CPU the checkpoint's dtype, but float32 for a bf16 "
                          "checkpoint where the CPU has no native bf16)")
    gen.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available; under torchrun, the local rank's GPU)")
    gen.add_argument("--context-tokens", type=int, default=None, metavar="N",
                     help="read at most N tokens of each document: the chunks of whole sentences most relevant to "
                          "the question and answer (TF-IDF), in document order, '[...]' where text was left out; 0: "
                          "the whole document (cut to the context only). Default: the checkpoint's lynx.json, else 0")
    gen.add_argument("--p-pass-threshold", type=float, default=None, metavar="T",
                     help="fast mode: PASS when p_pass >= T (default: the threshold the checkpoint's lynx.json fitted "
                          "on validation, else 0.5)")
    gen.add_argument("--long-inputs", choices=["truncate", "skip"], default="truncate",
                     help="prompts longer than --max-input-tokens: cut the middle of the document (with a marker) "
                          "or skip the row (counted, excluded from metrics)")
    gen.add_argument("--max-input-tokens", type=int,
                     help="prompt token limit (default: the model's context minus --max-new-tokens; the published "
                          "evaluation dropped prompts over 4000 tokens)")
    args = p.parse_args(argv)

    single_given = [x is not None for x in (args.question, args.context, args.answer)]
    if args.input is None:
        if not all(single_given):
            p.error("give --question, --context (or --document) and --answer, or --input rows.jsonl")
        if args.eval or args.output:
            p.error("--eval and --output need --input")
    elif any(single_given):
        p.error("--question/--context/--answer and --input are exclusive")
    if args.input is not None and not (args.output or args.eval):
        p.error("--input needs --output and/or --eval")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1")
    if args.context_tokens is not None and args.context_tokens < 0:
        p.error("--context-tokens must be >= 0 (0: the whole document)")
    if args.p_pass_threshold is not None and not 0 <= args.p_pass_threshold <= 1:
        p.error("--p-pass-threshold must be between 0 and 1")
    try:
        args.columns = parse_columns(args.columns)
    except BadInput as e:
        p.error(str(e))
    return args


# --- main -----------------------------------------------------------------------------------------------------------


def judge_rows(judge, rows, args, rank: int, world: int) -> list[tuple[int, dict]]:
    """Judge this rank's share of the rows; returns (row index, output row) pairs."""
    from tqdm import tqdm

    mine = list(range(rank, len(rows), world))
    examples = [row_example(rows[i][1]) for i in mine]
    compare_fast = args.eval and not args.fast and not args.no_fast_compare
    passes = [("fast" if args.fast else "full", args.fast)] + ([("fast", True)] if compare_fast else [])
    results = {}
    for name, fast in passes:
        desc = f"judging ({name}{', rank 0 of ' + str(world) if world > 1 else ''})"
        with tqdm(total=len(examples), desc=desc, unit="ex", disable=rank != 0, file=sys.stderr) as bar:
            results[name, fast] = judge.judge_batch(examples, fast=fast, progress=bar.update)
    out = []
    for k, i in enumerate(mine):
        row = dict(rows[i][1])
        v = results[passes[0]][k]
        row.update(score=v.score, p_pass=v.p_pass, reasoning=v.reasoning, raw=v.raw, truncated=v.truncated,
                   skipped=v.skipped, prompt_tokens=v.prompt_tokens, context_tokens=v.context_tokens,
                   document_tokens=v.document_tokens, selected=v.selected)
        if compare_fast:
            f = results["fast", True][k]
            row.update(score_fast=f.score, p_pass_fast=f.p_pass)
        out.append((i, row))
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc keep freed memory for reuse: no mmap for blocks under mmap_threshold (32 MiB, glibc's largest on
    64-bit systems; a judging pass's activations are smaller), and up to trim_threshold of
    free heap kept instead of returned to the OS. By default a forward pass's activations are mapped and unmapped
    again and again, so every pass page-faults them back in: 88k minor faults per 2,048-token bf16 judging pass of
    SmolLM2-135M, ~15% of its time on a 2-core CPU (none after this). Resident memory then stays near its peak.
    Process-wide, so the command-line tools call it and the library does not; False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    device, owns_group = init_distributed(args.device)
    try:
        return run(args, dist.get_rank(), dist.get_world_size(), device)
    finally:
        if owns_group:
            dist.destroy_process_group()


def run(args, rank: int, world: int, device) -> int:
    from lynx.judge import Judge

    if world > 1 and args.input is None:
        print("error: torchrun is for --input files; judge one example without it", file=sys.stderr)
        return EXIT_BAD_INPUT

    rows, bad = [], []
    if args.input is not None:
        try:
            rows, bad = read_rows(args.input, require_label=args.eval, columns=args.columns)
        except (FileNotFoundError, BadInput) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if rank == 0:
            for lineno, reason in bad:
                print(f"{args.input}:{lineno}: bad row: {reason}", file=sys.stderr)
        if bad and args.strict:
            if rank == 0:
                print(f"error: {len(bad)} bad row(s) in {args.input} (--strict)", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.limit is not None:
            rows = rows[: args.limit]
        if not rows:
            print(f"error: no valid rows in {args.input}", file=sys.stderr)
            return EXIT_BAD_INPUT

    try:
        # The fast mode generates nothing, so the whole context (minus the forced prefix) is left to the prompt.
        max_new_tokens = 1 if args.fast else args.max_new_tokens
        judge = Judge(args.model, dtype=DTYPES[args.dtype], device=device, max_new_tokens=max_new_tokens,
                      batch_size=args.batch_size, max_input_tokens=args.max_input_tokens,
                      long_inputs=args.long_inputs, context_tokens=args.context_tokens,
                      p_pass_threshold=args.p_pass_threshold)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if rank == 0:
        used = [f"{key} {value} ({origin})" for key, (value, origin) in judge.settings.items()
                if key != "p_pass_threshold" or args.fast]
        print(f"judge: {', '.join(used)}", file=sys.stderr)

    if args.input is None:
        verdict = judge.judge(args.question, args.context, args.answer, fast=args.fast)
        print(json.dumps(verdict.to_dict(), indent=2, ensure_ascii=False))
        return 0

    start = time.perf_counter()
    mine = judge_rows(judge, rows, args, rank, world)
    gathered = all_gather_objects(mine)
    elapsed = time.perf_counter() - start
    if rank != 0:
        return 0
    judged = [row for _, row in sorted(pair for part in gathered for pair in part)]

    if args.output:
        write_rows(judged, args.output)
    n_skipped = sum(1 for r in judged if r["skipped"])
    n_unparsed = sum(1 for r in judged if r["score"] is None and not r["skipped"])
    print(f"judged {len(judged) - n_skipped} rows in {elapsed:.1f}s ({len(judged) / elapsed:.2f} ex/s, "
          f"{world} process(es)); bad rows skipped: {len(bad)}; too long, skipped: {n_skipped}; "
          f"evidence selected: {sum(1 for r in judged if r['selected'])}; "
          f"truncated: {sum(1 for r in judged if r['truncated'])}; unparsed: {n_unparsed}"
          + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)

    if args.eval:
        from lynx.evaluate import compute_metrics, write_reports

        report_dir = args.report_dir or (
            args.output.with_name(args.output.stem + "_report") if args.output else Path("judge_report"))
        run = {"model": str(args.model), "input": str(args.input), "mode": "fast" if args.fast else "full",
               "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
               "dtype": str(judge.model.embed_tokens.weight.dtype).removeprefix("torch."),
               "device": str(judge.device), "processes": world, "long_inputs": args.long_inputs,
               "context_tokens": judge.context_tokens,
               **({"p_pass_threshold": judge.p_pass_threshold} if args.fast else {}),
               "max_input_tokens": judge.max_input_tokens, "rows_read": len(rows) + len(bad),
               "bad_rows_skipped": len(bad), "seconds": round(elapsed, 2),
               "examples_per_s": round(len(judged) / elapsed, 3)}
        try:
            report = compute_metrics(judged, n_bootstrap=args.bootstrap)
        except ValueError as e:  # e.g. every row skipped as too long
            print(f"error: cannot evaluate: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        written = write_reports(report, report_dir, run)
        acc = report["accuracy"]
        print(f"accuracy: mean of sources {100 * acc['mean_of_sources']:.1f}%, pooled {100 * acc['pooled']:.1f}%; "
              f"reports: {', '.join(map(str, written))}")
    return 0

