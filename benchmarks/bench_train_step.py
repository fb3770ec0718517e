"""One training step (forward, backward, clip, AdamW): lynx's trainer against transformers, same model, batch and
optimizer, on this CPU, in one run. Reports tokens/s, peak memory and model-FLOPs utilisation (MFU) against this
machine's bf16 matrix-product peak, measured in the same run.

Sides (each in its own subprocess, so memory is measured cleanly and one side's allocator state can't help the other):
  lynx  `lynx.train.train_step` (the function the training loop calls) on the model `lynx.train.build.build_model`
        builds: FSDP2 over a one-process gloo group (what plain `python train.py` makes), MixedPrecisionPolicy with
        bf16 parameters and fp32 gradient reduction (the trainer's param_dtype=bfloat16: bf16 weights, no autocast),
        fp32 master weights, the fused linear + cross-entropy loss, torch AdamW through lynx.optim.build_optimizer.
        The batch goes through lynx.sft_data.collate, so attention takes the packed (cu_seqlens) path as in training.
  hf    transformers.LlamaForCausalLM (SDPA attention), fp32 weights, torch.autocast(cpu, bfloat16), its own loss,
        clip_grad_norm_, torch AdamW (fused, as the transformers Trainer builds it with torch >= 2.8; --adamw loop
        runs torch's per-tensor loop on both sides).
  peak  the bf16 matrix-product peak: the best of several large square bf16 matmuls.

Default workload (the issue's): a Llama-3-shaped model of ~51M parameters (GQA 8 query / 2 key-value heads of 64,
SwiGLU 3x, RMSNorm, RoPE theta 500k, untied embeddings) with a 32,000-token vocabulary, batch 2 x 1024 tokens, one
document per row, every position a target. Why 32,000 and not Llama-3's 128,256: with the real vocabulary the two
embedding matrices alone would hold 131M parameters at width 512, so "~50M" would be mostly embedding; 32k keeps the
blocks a realistic share of the work (~18M in blocks, ~33M in embedding + output head).

Memory: peak RSS (ru_maxrss) at the end minus the process's resident memory after the model, optimizer and batch
exist (after malloc_trim, so freed init buffers don't count): the memory the training step itself adds (gradients,
optimizer state, activations, gathered bf16 weights, logits). Absolute peaks are printed too. If a side's peak
never rises above a transient high-water mark from before the baseline, the delta would be a lower bound; the script
says so when that happens.

MFU: model FLOPs per step / step time / measured bf16 matmul peak (both sides: same model, same tokens). Model FLOPs follow lynx.train.metrics.step_flops
(6 x parameters x tokens + causal attention) with the input embedding left out of the parameters (a lookup, not a
matmul). The machine is shared, so the load average is printed and saved, and each side's fastest step is reported
(other load only adds time); --threads 1 gives steadier numbers on a loaded machine.

  python benchmarks/bench_train_step.py
  python benchmarks/bench_train_step.py --batch 2 --seq 1024 --steps 5 --ac full
  python benchmarks/bench_train_step.py --demo     # the CPU demo's shape: packed ~500-token docs, dense-mask vs
                                                   # per-segment packed attention (lynx side only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from _common import ROOT, current_rss_mib, peak_rss_mib, timed_steps, trim_heap  # also puts ROOT on sys.path
from _common import matmul_peak
from _common import run_worker as _run_worker


# --- workload -----------------------------------------------------------------------------------------------------


def model_hf_config(args) -> dict:
    """Llama-3 shape (HF config.json names), shared by both sides."""
    return {
        "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.hidden * 3,
        "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": max(1, args.hidden // 256), "max_position_embeddings": max(2048, args.seq),
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1,
    }


def make_documents(args) -> list[list[int]]:
    """Per row, the documents (token id lists) that fill it: one per row by default; with --doc-len, documents of
    about that length (varied +-20%, seeded) packed until the row is full."""
    gen = torch.Generator().manual_seed(1234)
    rows = []
    for _ in range(args.batch):
        docs, left = [], args.seq
        while left > 0:
            if args.doc_len:
                n = int(args.doc_len * (0.8 + 0.4 * torch.rand((), generator=gen).item()))
                n = min(max(n, 2), left)
            else:
                n = left
            docs.append(torch.randint(2, args.vocab, (n,), generator=gen).tolist())
            left -= n
        rows.append(docs)
    return rows


# --- workers (one per subprocess) ---------------------------------------------------------------------------------


def worker_peak(args) -> dict:
    return matmul_peak(args.peak_size, args.peak_repeats)


def worker_lynx(args) -> dict:
    import torch.distributed as dist

    from lynx import attention, parallel, sft_data
    from lynx import train as trainer
    from lynx.distributed import init_distributed
    from lynx.train import config as train_config
    from lynx.train.build import build_model, build_optimizer
    from lynx.train.metrics import step_flops
    from lynx.config import LlamaConfig

    if args.packed_impl:
        attention.CPU_PACKED_IMPL = args.packed_impl
    cfg = train_config.TrainConfig(
        model=train_config.ModelConfig(config=model_hf_config(args)),
        data=train_config.DataConfig(max_seq_len=args.seq),
        optim=train_config.OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0),
        parallel=train_config.ParallelConfig(param_dtype=args.param_dtype, reduce_dtype="float32",
                                        activation_checkpointing=args.ac),
    )
    trainer.validate(cfg)
    device, _ = init_distributed()
    mesh = parallel.build_mesh(device.type, 1, 1)
    model = build_model(cfg, mesh, device)
    if args.adamw == "loop":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=False)
    else:  # what the trainer builds for optim.name=adamw
        optimizer = build_optimizer(cfg, model.parameters())
    sequences = []
    for docs in make_documents(args):
        seq = sft_data.PackedSequence()
        for d in docs:
            seq.input_ids += d
            seq.labels += [sft_data.IGNORE_INDEX, *d[1:]]  # what pack() does at each document start
            seq.lengths.append(len(d))
        sequences.append(seq)
    micro_batches = [sft_data.collate(sequences, args.seq)]
    model.train()
    trim_heap()
    baseline, peak_before = current_rss_mib(), peak_rss_mib()
    losses = []

    def step():
        losses.append(trainer.train_step(model, optimizer, micro_batches, device, clip=1.0).loss)

    times = timed_steps(step, args.warmup, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    model_cfg = LlamaConfig.from_hf_dict(model_hf_config(args), source="bench")
    flops = step_flops(model_cfg, n_params - model_cfg.vocab_size * model_cfg.hidden_size, micro_batches)
    dist.destroy_process_group()
    return {"times_s": times, "losses": losses, "n_params": n_params, "flops_per_step": flops,
            "tokens_per_step": micro_batches[0]["num_tokens"], "baseline_rss_mib": baseline,
            "peak_rss_before_steps_mib": peak_before, "peak_rss_mib": peak_rss_mib(),
            "segments": len(micro_batches[0]["cu_seqlens"]) - 1, "packed_impl": getattr(attention, "CPU_PACKED_IMPL", None)}


def worker_hf(args) -> dict:
    import transformers

    from lynx import sft_data

    transformers.logging.set_verbosity_error()
    if args.doc_len:
        raise SystemExit("--doc-len (packed documents) is for the lynx side only: transformers' CPU path has no packing")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model_hf_config(args), attn_implementation="sdpa"))
    if args.ac != "none":
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=args.adamw == "fused")
    rows = [docs[0] for docs in make_documents(args)]
    input_ids = torch.tensor(rows)
    labels = input_ids.clone()
    labels[:, 0] = sft_data.IGNORE_INDEX  # the same targets as the lynx side's batch
    model.train()
    trim_heap()
    baseline, peak_before = current_rss_mib(), peak_rss_mib()
    losses = []

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    times = timed_steps(step, args.warmup, args.steps)
    return {"times_s": times, "losses": losses, "n_params": sum(p.numel() for p in model.parameters()),
            "tokens_per_step": input_ids.numel(), "baseline_rss_mib": baseline,
            "peak_rss_before_steps_mib": peak_before, "peak_rss_mib": peak_rss_mib()}


WORKERS = {"peak": worker_peak, "lynx": worker_lynx, "hf": worker_hf}


# --- driver -------------------------------------------------------------------------------------------------------


def run_worker(name: str, argv: list[str], extra: list[str] = ()) -> dict:
    return _run_worker(__file__, name, argv, extra)


def summarise(r: dict, peak_flops: float) -> dict:
    t = min(r["times_s"])  # the machine is shared: other load only ever adds time, so the best step is the estimate
    out = {"step_s": t, "tokens_per_s": r["tokens_per_step"] / t,
           "step_memory_mib": r["peak_rss_mib"] - r["baseline_rss_mib"], "peak_rss_mib": r["peak_rss_mib"],
           "memory_lower_bound": r["peak_rss_mib"] <= r["peak_rss_before_steps_mib"]}
    if "flops_per_step" in r:
        out["mfu"] = r["flops_per_step"] / t / peak_flops
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=2, help="rows per step")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row")
    p.add_argument("--doc-len", type=int, default=0, help="pack documents of about this length (lynx side only)")
    p.add_argument("--param-dtype", default="bfloat16", help="lynx side: parallel.param_dtype")
    p.add_argument("--ac", default="none", choices=("none", "full"), help="activation checkpointing, both sides")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per side (0: torch's default; --demo: 1, what torchrun gives each of its 2 "
                        "processes)")
    p.add_argument("--adamw", choices=("fused", "loop"), default="fused",
                   help="torch AdamW implementation, both sides: fused (default; what lynx.optim builds and what the "
                        "transformers Trainer picks with torch >= 2.8) or torch's per-tensor loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (the fastest is reported)")
    p.add_argument("--peak-size", type=int, default=4096)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--demo", action="store_true",
                   help="the CPU demo's shape (vocab 4096, width 256, 4 layers, 1 x 1024 of ~500-token documents): "
                        "lynx with the dense block-causal mask vs per-segment attention, no transformers side")
    p.add_argument("--packed-impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.demo and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--demo",)]
    passed += ["--threads", str(args.threads)]
    load_before = os.getloadavg()
    peak = [run_worker("peak", passed)]
    results = {}
    if args.demo:
        shape = ["--vocab", "4096", "--hidden", "256", "--layers", "4", "--batch", "1", "--doc-len", "500"]
        sides = {"lynx dense mask": ("lynx", shape + ["--packed-impl", "mask"]),
                 "lynx per segment": ("lynx", shape + ["--packed-impl", "segments"])}
    else:
        sides = {"transformers": ("hf", []), "lynx": ("lynx", [])}
    for label, (worker, extra) in sides.items():
        print(f"running {label} ...", file=sys.stderr, flush=True)
        results[label] = run_worker(worker, passed, extra)
    peak.append(run_worker("peak", passed))
    load_after = os.getloadavg()
    peak_flops = max(r["peak_flops"] for r in peak)

    if not args.demo:  # same model and batch on both sides: the same model FLOPs, so transformers gets an MFU too
        results["transformers"]["flops_per_step"] = results["lynx"]["flops_per_step"]
    summary = {label: summarise(r, peak_flops) for label, r in results.items()}
    base_label, ours_label = list(summary)
    base, ours = summary[base_label], summary[ours_label]
    print(f"bf16 matmul peak ({args.peak_size}^3): {peak_flops / 1e9:.0f} GFLOP/s "
          f"(before {peak[0]['peak_flops'] / 1e9:.0f}, after {peak[1]['peak_flops'] / 1e9:.0f}); "
          f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    r0 = results[ours_label]
    print(f"model: {r0['n_params'] / 1e6:.1f}M parameters, {r0['tokens_per_step']} tokens/step "
          f"({args.batch if not args.demo else 1} x {args.seq}, {r0['segments']} segments), "
          f"activation checkpointing {args.ac}, {args.adamw} AdamW, {args.threads or torch.get_num_threads()} thread(s) per side")
    print(f"{'':18s} {'step s':>8s} {'tokens/s':>9s} {'step mem MiB':>13s} {'peak RSS MiB':>13s} {'MFU':>6s}")
    for label, s in summary.items():
        mfu = f"{s['mfu'] * 100:5.1f}%" if "mfu" in s else "   n/a"
        flag = " (lower bound)" if s["memory_lower_bound"] else ""
        print(f"{label:18s} {s['step_s']:8.2f} {s['tokens_per_s']:9.0f} {s['step_memory_mib']:13.0f} "
              f"{s['peak_rss_mib']:13.0f} {mfu}{flag}")
    speedup = ours["tokens_per_s"] / base["tokens_per_s"]
    mem_ratio = ours["step_memory_mib"] / base["step_memory_mib"]
    print(f"{ours_label} / {base_label}: {speedup:.2f}x tokens/s, {mem_ratio:.2f}x step memory, "
          f"{ours['peak_rss_mib'] / base['peak_rss_mib']:.2f}x absolute peak RSS")
    if not args.demo:
        # At 100% MFU a step takes model FLOPs / peak: the most any implementation could gain over this baseline.
        ceiling = base["step_s"] * peak_flops / results[ours_label]["flops_per_step"]
        print(f"ceiling: a step at 100% MFU would be {ceiling:.2f}x {base_label}'s tokens/s; 1.3x needs "
              f"{1.3 * base['mfu'] * 100:.0f}% MFU ({base_label}: {base['mfu'] * 100:.1f}%)")
        print(f"target: >= 1.3x tokens/s ({'met' if speedup >= 1.3 else 'NOT met'}), <= 0.7x peak memory "
              f"({'met' if mem_ratio <= 0.7 else 'NOT met'})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_step{'-demo' if args.demo else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "args": vars(args), "load_average_before": load_before, "load_average_after": load_after,
        "peak_flops": peak_flops, "peak_runs": peak, "summary": summary, "raw": results,
        "ratios": {"tokens_per_s": speedup, "step_memory": mem_ratio},
    }, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
