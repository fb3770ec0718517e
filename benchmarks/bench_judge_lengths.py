"""Judging speed at real document lengths: lynx against transformers (sdpa) and llama.cpp, on the same token ids, by
prompt length. Fast mode (p_pass after the forced prefix) and full mode (greedy completion), per bucket of prompt
length (default <512, 512-2k, 2k-8k tokens): rows/s, prompt tokens/s, new tokens/s, the ratios, and lynx's MFU
against this machine's bf16 matmul peak (measured here: the best [2048 x 2048] @ [2048 x 2048] bf16 product).

Rows: the built test split with whole passages (python -m lynx.data build --out DATA --seed 17 --no-token-stats
writes DATA/halubench_test.jsonl; COVID-QA papers give the long prompts). Each row's prompt is Judge.prompt_ids of
its whole passage (the judge prompt through the chat template; passages beyond the 8,192-token context cut in the
middle as the judge cuts them); the bucket is that prompt's length. --rows A B C rows per bucket are drawn at random
(--seed). With --context-tokens N the judge reads each document's N most relevant tokens (lynx.context, as a
trained judge does by default): rows stay in the buckets of their whole documents, and every side gets the selected
prompts' ids.

Sides (each gets the same ids; fast mode: the prompt followed by the forced prefix's ids):
  lynx             Judge(..., dtype=bfloat16).judge_batch(examples, fast=...) as judge.py runs it (its prompts built
                   inside the timed call, as users get it; that time is printed on its own). Fast mode packs prompts
                   2,048 tokens (or the longest) to a forward pass behind their shared prefix; full mode decodes
                   --batch-size rows with continuous batching.
  hf-sdpa          transformers LlamaForCausalLM, bf16, sdpa, left-padded batches of --batch-size, longest first
                   (bench_judge_smollm2.py's hf_fast / hf_full).
  llama.cpp-q4_1   llama.cpp in process through the `xllamacpp` wheel (prebuilt; its CPU kernels are chosen at run
  llama.cpp-bf16   time, up to AVX-512 on this machine; pip install xllamacpp), on the shipped Q4_1 GGUF and on a
                   bf16 GGUF of the same weights: --slots sequences decoded together (continuous batching), the
                   prompt cache on (each slot reuses the judge prefix it already holds), all rows sent as one request
                   so the server schedules them; fast mode: one new token and its top --n-probs log-probabilities.
  llama-server     with --llama-server URL: a llama-server you started (e.g. built for your CPU, below) with
                   -np SLOTS, the same requests through its OpenAI-style /v1/completions; its slots are erased before
                   each timed call (that needs --slot-save-path; and --cache-ram 0, or the server keeps earlier
                   prompts' keys and values in memory and the full-mode call reuses the fast-mode one's). Name its
                   GGUF in --llama-server-label.

The bf16 GGUF (--gguf-bf16 PATH; default: made once in the temp folder): `python -m lynx.convert to-gguf DIR OUT.gguf
--type bf16` where lynx has it, else llama.cpp's `llama-quantize --allow-requantize Q4_1.gguf OUT.gguf BF16` (pass
--llama-quantize PATH); both hold the Q4_1 file's weights, as the lynx and transformers sides get them
(python -m lynx.convert gguf ... --dtype bfloat16). Without either, the bf16 side is skipped with a message.

A native llama.cpp for this CPU (outside the repository; ~12 minutes on 2 cores):
  pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
  cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
  cmake --build build -j2 --target llama-server llama-bench llama-quantize
  build/bin/llama-server -m SMOLLM2.gguf -np 8 -c 65536 -t 2 --cache-ram 0 --slot-save-path /tmp/slots --port 8089 &
  python benchmarks/bench_judge_lengths.py --llama-server http://127.0.0.1:8089 --llama-server-label bf16-native

Time: after one warm-up call per side and mode (on rows outside the measured ones), --repeats interleaved rounds,
the best of each kept. New tokens: every generated token, a stop token included. MFU: the model FLOPs of each
prompt computed alone (2 x the non-embedding parameters per token, causal attention 2 x layers x heads x head_dim x
L (L + 1) per prompt, the output projection at the read position) over the time, against the measured peak; lynx
computes fewer (the shared prefix once per pass), so this is work done for the user per second, not kernel efficiency.

  python benchmarks/bench_judge_lengths.py                                   # default: ~15 minutes on 2 cores
  python benchmarks/bench_judge_lengths.py --rows 2 2 1 --max-new-tokens 8    # quick check
  python benchmarks/bench_judge_lengths.py --context-tokens 1000              # with evidence selection
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from _common import DEFAULT_MODEL_CACHE, ROOT, load_average, matmul_peak, smollm2_dir
from bench_judge_smollm2 import GenerationCounter, hf_fast, hf_full, timed

DEFAULT_BF16_GGUF = Path(os.environ.get("TMPDIR", "/tmp")) / "lynx-bench-smollm2-bf16.gguf"
SIDES = ("lynx", "hf-sdpa", "llama.cpp-q4_1", "llama.cpp-bf16", "llama-server")


# --- llama.cpp ------------------------------------------------------------------------------------------------------


def bf16_gguf(args, q4_gguf: Path, model_dir: Path) -> Path | None:
    """The bf16 GGUF: --gguf-bf16, or one made once (lynx.convert to-gguf, else llama-quantize), or None."""
    if args.gguf_bf16:
        return Path(args.gguf_bf16)
    out = DEFAULT_BF16_GGUF
    if out.is_file():
        return out
    tries = [[sys.executable, "-m", "lynx.convert", "to-gguf", str(model_dir), str(out), "--type", "bf16"]]
    if args.llama_quantize:
        tries.append([args.llama_quantize, "--allow-requantize", str(q4_gguf), str(out), "BF16"])
    for cmd in tries:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode == 0 and out.is_file():
            print(f"made {out} with: {' '.join(cmd)}", file=sys.stderr)
            return out
    print("no bf16 GGUF (pass --gguf-bf16 PATH, or --llama-quantize PATH to make one): llama.cpp-bf16 skipped",
          file=sys.stderr)
    return None


class InProcessLlamaCpp:
    """llama.cpp through xllamacpp: a fresh server per timed call (an empty prompt cache, as llama-server's erased
    slots), loaded before the clock starts."""

    def __init__(self, gguf: Path, slots: int, threads: int, n_ctx: int):
        import xllamacpp

        self.xllamacpp, self.gguf, self.slots, self.threads, self.n_ctx = xllamacpp, gguf, slots, threads, n_ctx
        self.server = None

    def reset(self):
        x = self.xllamacpp
        self.server = None  # free the old one (its KV cache) first
        params = x.CommonParams()
        params.model.path = str(self.gguf)
        params.n_parallel = self.slots
        params.n_ctx = self.n_ctx
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = self.threads
        params.cache_prompt = True
        params.cache_ram_mib = 0  # no prompt cache beyond the slots (as the server is run above)
        params.warmup = True
        self.server = x.Server(params)

    def complete(self, request: dict) -> dict:
        out = self.server.handle_completions(request)
        if "error" in out:
            raise RuntimeError(f"llama.cpp: {out['error']}")
        return out


class LlamaServer:
    """A running llama-server, through its OpenAI-style completions endpoint."""

    def __init__(self, url: str, slots: int):
        self.url, self.slots = url.rstrip("/"), slots

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=3600) as resp:
            return json.loads(resp.read())

    def reset(self):
        for slot in range(self.slots):
            try:
                self._post(f"/slots/{slot}?action=erase", {})
            except Exception as e:  # noqa: BLE001 (old servers, or --slots larger than its -np)
                print(f"llama-server: could not erase slot {slot} ({e}); its prompt cache may help it", file=sys.stderr)
                break

    def complete(self, request: dict) -> dict:
        return self._post("/v1/completions", request)


def llama_fast(engine, prompts, score_ids, n_probs: int) -> list[float]:
    """p_pass from llama.cpp's top log-probabilities of the one token after the forced prefix (a score word outside
    the top n_probs counts as probability 0)."""
    out = engine.complete({"prompt": prompts, "max_tokens": 1, "temperature": 0, "n_probs": n_probs,
                           "cache_prompt": True})
    pass_ids, fail_ids = (set(ids) for ids in score_ids)
    p_pass = [0.0] * len(prompts)
    for choice in out["choices"]:
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        lp = [t["logprob"] for t in top if t["id"] in pass_ids] or [-math.inf]
        lf = [t["logprob"] for t in top if t["id"] in fail_ids] or [-math.inf]
        a, b = torch.logsumexp(torch.tensor(lp, dtype=torch.float64), 0), torch.logsumexp(
            torch.tensor(lf, dtype=torch.float64), 0)
        p_pass[choice["index"]] = 0.5 if a == b == -math.inf else float(torch.sigmoid(a - b))
    return p_pass


def llama_full(engine, prompts, max_new_tokens: int):
    """(completion text per prompt, tokens generated: each choice's tokens (its log-probabilities list them; the
    usage field counts one prompt's only), and the stop token where one ended it, as the other sides count)."""
    out = engine.complete({"prompt": prompts, "max_tokens": max_new_tokens, "temperature": 0, "cache_prompt": True,
                           "n_probs": 1})
    texts, generated = [""] * len(prompts), 0
    for choice in out["choices"]:
        texts[choice["index"]] = choice["text"]
        generated += len(choice["logprobs"]["content"]) + (choice.get("finish_reason") == "stop")
    return texts, generated


# --- FLOPs ----------------------------------------------------------------------------------------------------------


def bf16_peak(size: int = 2048, repeats: int = 8) -> float:
    """This machine's bf16 matmul peak now, FLOP/s: the best of `repeats` [size, size] products, through torch.matmul
    (_common.matmul_peak) and through oneDNN with the weight prepacked as lynx's linears run (the faster counts)."""
    best = matmul_peak(size, repeats)["peak_flops"]
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        x = torch.randn(size, size, dtype=torch.bfloat16)
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(size, size, dtype=torch.bfloat16), None)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            if i:
                best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def model_flops(cfg, prompt_lengths: list[int], new_tokens: list[int] | None = None) -> float:
    """Forward FLOPs of each prompt computed alone (and of its new tokens, each reading its whole context), the
    output projection at the positions whose logits are read (the last prompt position, then every new token)."""
    H, I, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_token = 2 * layers * (H * q_dim * 2 + H * kv_dim * 2 + 3 * H * I)  # q, o, k, v, MLP
    attn = 2 * layers * q_dim  # x (keys seen) per query: scores and weighted sum, 2 FLOPs each
    head = 2 * H * cfg.vocab_size
    total = 0.0
    for i, L in enumerate(prompt_lengths):
        total += per_token * L + attn * L * (L + 1) + head
        n = new_tokens[i] if new_tokens else 0
        total += per_token * n + attn * sum(L + j + 1 for j in range(n)) + head * n
    return total


# --- the run --------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default="/tmp/bench_data_whole", help="a built dataset folder (halubench_test.jsonl) "
                                                                    "with whole passages")
    p.add_argument("--model", default=None, help="SmolLM2 as a Hugging Face folder (default: the installed GGUF, "
                                                 f"converted once into {DEFAULT_MODEL_CACHE})")
    p.add_argument("--gguf", default=None, help="llama.cpp-q4_1's GGUF (default: the installed SmolLM2 Q4_1 file)")
    p.add_argument("--gguf-bf16", default=None, help="llama.cpp-bf16's GGUF (default: made once, see above)")
    p.add_argument("--llama-quantize", default=None, help="llama.cpp's llama-quantize, to make the bf16 GGUF")
    p.add_argument("--llama-server", default=None, help="URL of a running llama-server (adds that side)")
    p.add_argument("--llama-server-label", default="native", help="what the server runs (printed)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES[:4]))
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 512, 2048, 8192],
                   help="prompt-length bucket edges in tokens")
    p.add_argument("--rows", type=int, nargs="+", default=[24, 12, 4], help="rows per bucket (one number each)")
    p.add_argument("--modes", nargs="+", choices=("fast", "full"), default=["fast", "full"])
    p.add_argument("--max-new-tokens", type=int, default=32, help="full mode (the published judge allows 600)")
    p.add_argument("--batch-size", type=int, default=8, help="lynx full mode and transformers: rows together")
    p.add_argument("--slots", type=int, default=8, help="llama.cpp: sequences decoded together (-np)")
    p.add_argument("--n-probs", type=int, default=20, help="llama.cpp fast mode: top log-probabilities returned")
    p.add_argument("--context-tokens", type=int, default=0, help="evidence selection (0: whole documents)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved timed rounds; the best of each is kept")
    p.add_argument("--warmup-rows", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch and llama.cpp threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="which rows each bucket draws")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if len(args.rows) != len(args.buckets) - 1:
        raise SystemExit(f"--rows needs one number per bucket ({len(args.buckets) - 1}), got {args.rows}")
    if args.llama_server and "llama-server" not in args.sides:
        args.sides.append("llama-server")
    if not args.llama_server and "llama-server" in args.sides:
        args.sides.remove("llama-server")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    import transformers

    import lynx.judge as judge_module
    from lynx.demo import find_base_model
    from lynx.rows import read_dicts
    from lynx.judge import Judge
    from lynx.judge_cli import keep_freed_memory

    keep_freed_memory()  # as judge.py runs (every side of this process gets it)
    transformers.logging.set_verbosity_error()
    model_dir = smollm2_dir(args.model, DEFAULT_MODEL_CACHE)
    rows_path = Path(args.data) / "halubench_test.jsonl"
    if not rows_path.is_file():
        raise SystemExit(f"{rows_path} not found: build the data first, e.g. python -m lynx.data build --out "
                         f"{args.data} --seed 17 --no-token-stats")
    load_before = load_average()
    peak = bf16_peak()
    judge = Judge(model_dir, dtype=torch.bfloat16, device="cpu", max_new_tokens=args.max_new_tokens,
                  batch_size=args.batch_size, context_tokens=args.context_tokens)
    tok, cfg = judge.tokenizer, judge.model.config

    # Rows by the length of their whole-document prompt; the prompts each side gets are the judge's own.
    rows = read_dicts(rows_path)
    random.Random(args.seed).shuffle(rows)
    edges = args.buckets
    names = [f"{lo}-{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    chosen = {name: [] for name in names}
    spare = []
    for r in rows:
        if all(len(chosen[n]) >= k for n, k in zip(names, args.rows)) and len(spare) >= args.warmup_rows:
            break
        ids, _ = judge.prompt_ids(r["question"], r["passage"], r["answer"])  # the whole passage
        if ids is None:
            continue
        b = next((i for i in range(len(names)) if edges[i] <= len(ids) < edges[i + 1]), None)
        if b is not None and len(chosen[names[b]]) < args.rows[b]:
            chosen[names[b]].append(r)
        elif len(spare) < args.warmup_rows and len(ids) < 1024:
            spare.append(r)

    def prompts_of(examples):
        t0 = time.perf_counter()
        ids = [judge.prompt_ids(q, judge.select(q, c, a).text, a)[0] for q, c, a in examples]
        return ids, time.perf_counter() - t0

    hf = None
    if "hf-sdpa" in args.sides:
        hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").eval()
    engines = {}
    q4 = Path(args.gguf) if args.gguf else find_base_model()
    n_ctx = args.slots * cfg.max_position_embeddings
    if "llama.cpp-q4_1" in args.sides:
        engines["llama.cpp-q4_1"] = InProcessLlamaCpp(q4, args.slots, threads, n_ctx)
    if "llama.cpp-bf16" in args.sides:
        path = bf16_gguf(args, q4, model_dir)
        if path is not None:
            engines["llama.cpp-bf16"] = InProcessLlamaCpp(path, args.slots, threads, n_ctx)
    if args.llama_server:
        engines["llama-server"] = LlamaServer(args.llama_server, args.slots)
    sides = [s for s in args.sides if s in ("lynx", "hf-sdpa") or s in engines]

    def run(side, mode, examples, prompts):
        fast_prompts = [p + judge.fast_prefix_ids for p in prompts]
        if side == "lynx":
            if mode == "fast":
                verdicts = judge.judge_batch(examples, fast=True)
                return {"p_pass": [v.p_pass for v in verdicts]}
            with GenerationCounter(judge_module) as counter:
                verdicts = judge.judge_batch(examples, fast=False)
            return {"texts": [v.raw for v in verdicts], "new_tokens": counter.tokens,
                    "per_row": [len(t) for t in counter.outputs]}
        if side == "hf-sdpa":
            if mode == "fast":
                return {"p_pass": hf_fast(hf, fast_prompts, judge.fast_score_ids, tok.pad_id, args.batch_size)}
            tokens, generated = hf_full(hf, prompts, tok.stop_ids, tok.pad_id, args.batch_size, args.max_new_tokens)
            return {"texts": [tok.decode(t) for t in tokens], "new_tokens": generated}
        engine = engines[side]
        if mode == "fast":
            return {"p_pass": llama_fast(engine, fast_prompts, judge.fast_score_ids, args.n_probs)}
        texts, generated = llama_full(engine, prompts, args.max_new_tokens)
        return {"texts": texts, "new_tokens": generated}

    def timed_run(side, mode, examples, prompts):
        if side in engines:
            engines[side].reset()  # an empty prompt cache, outside the clock
        return timed(lambda: run(side, mode, examples, prompts))

    warm_examples = [(r["question"], r["passage"], r["answer"]) for r in spare]
    warm_prompts, _ = prompts_of(warm_examples)
    print(f"SmolLM2-135M bf16 ({model_dir}); llama.cpp: {', '.join(f'{s}' for s in engines)} "
          f"({args.slots} slots{', server: ' + args.llama_server_label if args.llama_server else ''}); "
          f"context_tokens {args.context_tokens}; full mode max_new_tokens {args.max_new_tokens}, batch "
          f"{args.batch_size}; torch {torch.__version__}, {threads} threads; bf16 matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s; load average {load_before[0]:.2f}", flush=True)
    for mode in args.modes:
        for side in sides:
            print(f"warm-up: {side} {mode} ...", file=sys.stderr, flush=True)
            timed_run(side, mode, warm_examples, warm_prompts)

    results = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"judge_lengths-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save(load_after=None):
        path.write_text(json.dumps({"args": vars(args), "model_dir": str(model_dir), "peak_flops": peak,
                                    "llama_cpp": {s: str(getattr(e, "gguf", args.llama_server))
                                                  for s, e in engines.items()},
                                    "load_average_before": load_before, "load_average_after": load_after,
                                    "results": results}, indent=2) + "\n")

    for name, chosen_rows in chosen.items():
        if not chosen_rows:
            print(f"\nbucket {name}: no rows")
            continue
        examples = [(r["question"], r["passage"], r["answer"]) for r in chosen_rows]
        prompts, build_s = prompts_of(examples)
        lengths = [len(p) for p in prompts]
        times, outputs = {}, {}
        for rnd in range(args.repeats):
            for mode in args.modes:
                for side in (sides if rnd % 2 == 0 else sides[::-1]):
                    print(f"bucket {name} round {rnd + 1}/{args.repeats}: {side} {mode} ...", file=sys.stderr,
                          flush=True)
                    t, out = timed_run(side, mode, examples, prompts)
                    times.setdefault((side, mode), []).append(t)
                    outputs[side, mode] = out
        load_now = load_average()
        peak = max(peak, bf16_peak())  # the best the machine gave during the run (others' load only lowers it)
        print(f"\nbucket {name} tokens: {len(examples)} rows, prompts {min(lengths)}-{max(lengths)} tokens (mean "
              f"{sum(lengths) / len(lengths):.0f}); building lynx's prompts (inside its timed calls) {build_s:.2f} s; "
              f"load average {load_now[0]:.2f}; bf16 peak so far {peak / 1e9:.0f} GFLOP/s")
        for mode in args.modes:
            n_prompt = sum(lengths) + (len(judge.fast_prefix_ids) * len(lengths) if mode == "fast" else 0)
            print(f"  {mode}: {'side':16s} {'time s':>8s} {'rows/s':>7s} {'prompt tok/s':>12s}"
                  + (f" {'new tok/s':>9s}" if mode == "full" else "") + f" {'lynx x':>7s}")
            lynx_t = min(times["lynx", mode]) if ("lynx", mode) in times else None
            for side in sides:
                t = min(times[side, mode])
                row = {"time_s": t, "times_s": times[side, mode], "rows_per_s": len(examples) / t,
                       "prompt_tokens_per_s": n_prompt / t, "rows": len(examples), "prompt_tokens": n_prompt}
                line = f"         {side:16s} {t:8.2f} {row['rows_per_s']:7.2f} {row['prompt_tokens_per_s']:12.0f}"
                if mode == "full":
                    row["new_tokens"] = outputs[side, mode]["new_tokens"]
                    row["new_tokens_per_s"] = row["new_tokens"] / t
                    line += f" {row['new_tokens_per_s']:9.1f}"
                if lynx_t:
                    row["lynx_speedup"] = t / lynx_t
                    line += f" {row['lynx_speedup']:7.2f}"
                if side == "lynx":
                    fast_lengths = [n + len(judge.fast_prefix_ids) for n in lengths]
                    flops = (model_flops(cfg, fast_lengths) if mode == "fast" else
                             model_flops(cfg, sorted(lengths, reverse=True), outputs[side, mode]["per_row"]))
                    row["mfu"] = flops / t / peak
                    line += f"   MFU {100 * row['mfu']:.1f}%"
                results[f"{name}/{mode}/{side}"] = row
                print(line)
            ours = outputs.get(("lynx", mode))
            for side in sides:
                if side == "lynx" or ours is None:
                    continue
                if mode == "fast":
                    a, b = ours["p_pass"], outputs[side, mode]["p_pass"]
                    same = sum((x >= 0.5) == (y >= 0.5) for x, y in zip(a, b))
                    diff = max(abs(x - y) for x, y in zip(a, b))
                    print(f"         {side}: same verdict on {same}/{len(a)}, largest p_pass difference {diff:.3f}")
                else:
                    same = sum(x == y for x, y in zip(ours["texts"], outputs[side, mode]["texts"]))
                    print(f"         {side}: identical completions {same}/{len(ours['texts'])}")
        save()  # after every bucket, so an interrupted run keeps what it measured
    load_after = load_average()
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f}; bf16 peak {peak / 1e9:.0f} GFLOP/s "
          "(MFU above: against the peak measured so far at each bucket)")
    save(load_after)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
