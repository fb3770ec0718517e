"""Supervised fine-tuning with FSDP2, from one CPU process to many GPU nodes (the loop behind train.py).

One optimizer step:
  1. take this rank's grad_accum micro-batches of the global batch (lynx.sft_data.PackedLoader);
  2. all-reduce the number of target tokens of the whole global batch, N;
  3. per micro-batch, backward of (sum of its token losses) / N; FSDP2 sums (not averages) gradients over ranks,
     so the gradient is that of the mean loss over the global batch however it is split across ranks and steps;
  4. clip the gradient norm (over DTensor shards), skip the step if the loss or the norm is not finite, else step.
Checkpoints (torch.distributed.checkpoint) go to <run_dir>/checkpoints/step_XXXXXXXX, written under a .tmp name and
renamed when complete; a relaunch resumes from the newest complete one. The end exports a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lynx import parallel
from lynx.config import ConfigError
from lynx.distributed import all_reduce_sum, init_distributed
from lynx.optim import build_optimizer, set_lr
from lynx.runs import RunState, complete_checkpoints
from lynx.train.build import build_model, load_tokenizer, tokenize_data
from lynx.train.checkpoint import export_gguf, export_hf, load_checkpoint, save_checkpoint, write_judge_card
from lynx.train.config import TrainConfig, config_help, config_yaml, load_config
from lynx.train.metrics import MetricsLog, gpu_peak_flops, peak_memory_gib, step_flops


def train_step(model, optimizer, micro_batches: list[dict], device, clip: float,
               params=None) -> tuple[float, float, int, int, int]:
    """One optimizer step on this rank's micro-batches (steps 2-4 of the module docstring); the optimizer's lr must
    already be set. Returns (mean loss, gradient norm, target tokens, tokens, examples), the counts over all ranks. A
    non-finite loss or norm skips the update (the caller counts it). Also what benchmarks/bench_train_step.py runs.
    params: the trained parameters, whose gradient norm is clipped (default: all of the model's)."""
    # One all-reduce for every count the step and its metrics need.
    local = [sum(b[k] for b in micro_batches) for k in ("num_target_tokens", "num_tokens", "num_examples")]
    n_target, n_tokens, n_examples = all_reduce_sum(local, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro_batches:
        loss = model(
            b["input_ids"].to(device), b["labels"].to(device), position_ids=b["position_ids"].to(device),
            attn_kwargs={"cu_seqlens": b["cu_seqlens"].to(device), "max_seqlen": b["max_seqlen"],
                         "prefix_len": b.get("prefix_len", 0)},
            reduction="sum",
        )
        # Divide by the global count, not this micro-batch's: every target token weighs the same.
        (loss / max(n_target, 1)).backward()
        loss_sum += loss.detach().double()
    dist.all_reduce(loss_sum)
    mean_loss = (loss_sum / max(n_target, 1)).item()
    params = model.parameters() if params is None else params
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    if math.isfinite(mean_loss) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, int(n_target), int(n_tokens), int(n_examples)


# --- the loop -----------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, examples=None) -> dict:
    """Run (or resume) the training described by `cfg`; returns a summary dict.

    examples: pre-tokenized `lynx.sft_data.Example`s to train on instead of reading data.train (then no tokenizer
    is needed unless model.tokenizer is set)."""
    from lynx import sft_data

    device, owns_group = init_distributed()
    try:
        # state.json: running, then finished / paused / failed / stopped (see lynx/runs.py, python -m lynx.runs).
        with RunState(cfg.run_dir, enabled=dist.get_rank() == 0, world_size=dist.get_world_size()) as run_state:
            return _train(cfg, examples, device, sft_data, run_state)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, examples, device, sft_data, run_state: RunState) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    per_step = cfg.data.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not a multiple of data.micro_batch_size x world size "
            f"= {cfg.data.micro_batch_size} x {world}"
        )
    grad_accum = cfg.global_batch_size // per_step
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # Data.
    tokenizer = None
    stats = None
    if examples is None or cfg.model.tokenizer is not None:
        tokenizer = load_tokenizer(cfg)
    if examples is None:
        examples, stats = tokenize_data(cfg, tokenizer, rank)
        if rank == 0:
            print(f"data: {cfg.data.train}: {stats} (overflow policy: {cfg.data.overflow})", flush=True)
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    if not cfg.data.pack:
        # One example per sequence, so a global batch is global_batch_size examples (the recipe's meaning).
        examples = [sft_data.pack([e], cfg.data.max_seq_len)[0] for e in examples]
    prefix = sft_data.shared_prefix(examples) if cfg.data.shared_prefix else None
    if rank == 0 and cfg.data.shared_prefix:
        mean = sum(map(len, examples)) / max(len(examples), 1)
        print(f"data: shared prefix of {len(prefix)} tokens, once per packed sequence (examples average {mean:.0f})",
              flush=True)
    loader = sft_data.PackedLoader(
        examples, seq_len=cfg.data.max_seq_len, micro_batch_size=cfg.data.micro_batch_size, rank=rank,
        world_size=world, seed=cfg.seed, drop_last=cfg.data.drop_last, grad_accum=grad_accum, pad_id=pad_id,
        prefix=prefix,
    )
    total_steps = cfg.max_steps or cfg.epochs * loader.steps_per_epoch

    # Model and optimizer.
    mesh = parallel.build_mesh(device.type, world, cfg.parallel.replicate)
    model = build_model(cfg, mesh, device)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    n_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    o = cfg.optim
    optimizer = build_optimizer(trainable, o.name, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                eps=o.eps)

    # Resume from the newest complete checkpoint, if any (rank 0 decides so every rank loads the same one).
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob("*.tmp") if (run_dir / "checkpoints").is_dir() else []:
            shutil.rmtree(stale)  # left by a run killed mid-save
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
    found = [complete_checkpoints(run_dir)[-1:] if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    step, skipped = 0, 0
    if found[0]:
        state = load_checkpoint(found[0][0], model, optimizer, loader)
        step, skipped = state["step"], state["skipped"]
        if rank == 0:
            print(f"resumed from {found[0][0]} at step {step}", flush=True)

    stop_at = min(total_steps, cfg.stop_after_step or total_steps)
    run_state.update(step=step, total_steps=total_steps, stop_at=stop_at)
    evaluator = None
    if cfg.eval.data is not None:
        from lynx.validation import Evaluator

        if tokenizer is None:
            raise ConfigError("eval.data needs a tokenizer (model.tokenizer or model.init_from)")
        evaluator = Evaluator(cfg.eval.data, tokenizer, max_seq_len=cfg.data.max_seq_len,
                              max_rows=cfg.eval.max_rows, rank=rank, world=world,
                              context_tokens=cfg.judge.context_tokens)
        if rank == 0:
            print(f"eval: {cfg.eval.data}: {evaluator.rows} {evaluator.kind} rows, every "
                  f"{cfg.eval.every_steps or 'final'} step(s)", flush=True)
    log = MetricsLog(cfg, run_dir, step, enabled=rank == 0)
    if rank == 0:
        print(
            f"model: {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.1f}M trained) | world {world} x micro-batch {cfg.data.micro_batch_size} x "
            f"accumulation {grad_accum} = {cfg.global_batch_size} sequences of {cfg.data.max_seq_len} per step | "
            f"{loader.steps_per_epoch} steps/epoch, {total_steps} steps in all | compute in "
            f"{str(parallel.dtype_from_name(cfg.parallel.param_dtype, 'parallel.param_dtype', device.type)).removeprefix('torch.')}",
            flush=True,
        )
    peak_flops = gpu_peak_flops(cfg, device)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    last_saved = step if found[0] else -1
    clip = o.grad_clip if o.grad_clip > 0 else float("inf")
    losses, total_tokens, total_time, total_examples = [], 0, 0.0, 0
    model.train()
    while step < stop_at:
        t0 = time.perf_counter()
        micro_batches = loader.next_step()
        lr = set_lr(optimizer, step, warmup_steps=o.warmup_steps, total_steps=total_steps, alpha_f=o.alpha_f)
        mean_loss, grad_norm, n_target, n_tokens, n_examples = train_step(model, optimizer, micro_batches, device, clip,
                                                                          trainable)
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        if not finite:
            skipped += 1
        step += 1
        dt = time.perf_counter() - t0

        record = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(n_tokens),
                  "target_tokens": int(n_target), "examples": int(n_examples), "tokens_per_s": n_tokens / dt,
                  "examples_per_s": n_examples / dt, "step_time_s": dt,
                  "peak_memory_gib": peak_memory_gib(device), "skipped": not finite, "skipped_total": skipped}
        if evaluator is not None and ((cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == stop_at):
            record.update(evaluator.run(model, device))
            if rank == 0:
                shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in record.items()
                                  if k.startswith("eval_") and isinstance(v, float))
                tqdm.write(f"step {step}: eval {shown}")
        if peak_flops:
            flops = all_reduce_sum([step_flops(model.config, n_params, micro_batches, n_trainable)], device)[0]
            record["mfu"] = flops / (dt * world * peak_flops)
        log.write(record)
        run_state.beat(step=step)
        if finite:
            losses.append(mean_loss)
        total_tokens += n_tokens
        total_examples += n_examples
        total_time += dt
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}", ex_s=f"{n_examples / dt:.2f}")
        if not finite and rank == 0:
            tqdm.write(f"step {step}: non-finite loss {mean_loss} or grad norm {grad_norm}: step skipped "
                       f"({skipped} of at most {o.max_skipped_steps})")
        if skipped >= o.max_skipped_steps:
            bar.close()
            log.close()
            raise RuntimeError(
                f"stopping: {skipped} steps had a non-finite loss or gradient norm (optim.max_skipped_steps="
                f"{o.max_skipped_steps}); last at step {step}. Check the data and the learning rate; the newest "
                f"checkpoint in {run_dir / 'checkpoints'} is from before the failure"
            )
        every = cfg.checkpoint.every_steps
        if (every and step % every == 0) or step == stop_at:
            save_checkpoint(run_dir, step, model, optimizer, loader, {"skipped": skipped}, cfg.checkpoint.keep_last)
            last_saved = step
    bar.close()
    log.close()
    if last_saved != step:  # nothing trained this launch and no checkpoint yet (e.g. max_steps reached already)
        save_checkpoint(run_dir, step, model, optimizer, loader, {"skipped": skipped}, cfg.checkpoint.keep_last)

    finished = step >= total_steps
    if finished and cfg.checkpoint.export and evaluator is not None and evaluator.kind == "judge" \
            and evaluator.last_judged is None:
        evaluator.run(model, device)  # a relaunch after the last step: lynx.json's threshold needs a validation
    if finished and cfg.checkpoint.export:
        dtype = parallel.dtype_from_name(cfg.checkpoint.export_dtype, "checkpoint.export_dtype")
        export_hf(model, tokenizer, run_dir / "final", dtype, cfg.checkpoint.max_shard_size)
        if rank == 0:
            write_judge_card(run_dir / "final", judge_card(cfg, evaluator, stats, step, total_examples))
        export_gguf(run_dir / "final", cfg.checkpoint.export_gguf)
    summary = {
        "steps": step, "total_steps": total_steps, "finished": finished, "skipped_steps": skipped,
        "final_loss": losses[-1] if losses else None, "tokens_per_s": total_tokens / total_time if total_time else None,
        "rows": stats.rows if stats else None, "rows_truncated": stats.truncated if stats else None,
        "rows_dropped": stats.dropped if stats else None,
    }
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        rows = f" | rows: {stats}" if stats else ""
        tps = f"{summary['tokens_per_s']:.0f}" if summary["tokens_per_s"] else "n/a"
        exported = finished and cfg.checkpoint.export
        where = f"exported to {run_dir / 'final'}" if exported else f"checkpoint at step {step}"
        loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
        print(f"done: step {step}/{total_steps}, loss {loss}, {tps} tokens/s, {skipped} skipped steps, {where}{rows}",
              flush=True)
    run_state.end(finished)
    return summary


def judge_card(cfg: TrainConfig, evaluator, stats, steps: int, examples: int) -> dict:
    """lynx.json for the exported judge (lynx.judge.read_judge_card): the evidence budget it was validated with, the
    fast-mode p_pass threshold with the best accuracy on the final validation (judge rows only), and what it was
    trained on. `examples` counts this launch's steps only when a run was resumed."""
    from lynx.baselines import fit_p_pass_threshold

    card = {"prompt_format": "lynx", "context_tokens": cfg.judge.context_tokens, "p_pass_threshold": None}
    if evaluator is not None and evaluator.last_judged is not None:
        is_pass, p_pass = evaluator.last_judged
        judged = [{"label": "PASS" if y else "FAIL", "p_pass": float(p)} for y, p in zip(is_pass, p_pass)]
        threshold = fit_p_pass_threshold(judged)
        card["p_pass_threshold"] = threshold
        card["p_pass_threshold_fit"] = {
            "data": cfg.eval.data, "rows": len(judged),
            "accuracy_at_threshold": float(((p_pass >= threshold) == is_pass).mean()),
            "accuracy_at_0.5": float(((p_pass >= 0.5) == is_pass).mean())}
    card["training"] = {"base": cfg.model.init_from, "data": cfg.data.train, "steps": steps, "examples": examples,
                        "max_seq_len": cfg.data.max_seq_len,
                        **({"rows": stats.rows, "rows_truncated": stats.truncated} if stats else {})}
    return card


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Supervised fine-tuning of a Llama-3 model (the Lynx recipe) with FSDP2. Run with "
        "`python train.py --config C.yaml` (one process) or `torchrun --nproc_per_node N train.py --config C.yaml`. "
        "Relaunching the same command resumes from the newest complete checkpoint in run_dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any as dotted.key=value, e.g. optim.lr=1e-6 max_steps=10):\n" + config_help(),
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, typed by the config field")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0
