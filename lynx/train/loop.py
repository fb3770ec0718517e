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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lynx import parallel
from lynx.config import ConfigError
from lynx.distributed import all_reduce_sum, init_distributed
from lynx.optim import set_lr
from lynx.train.checkpoint import export_gguf, export_hf, save_checkpoint, write_judge_card
from lynx.train.config import TrainConfig, config_help, load_config
from lynx.train.metrics import MetricsLog, gpu_peak_flops, peak_memory_gib, step_flops
from lynx.train.run_state import RunState
from lynx.train.setup import TrainSetup, build_evaluator, setup


@dataclass
class StepResult:
    """One optimizer step, the counts over all ranks."""

    loss: float  # mean loss per target token of the global batch
    grad_norm: float  # before clipping
    target_tokens: int
    tokens: int
    examples: int

    @property
    def finite(self) -> bool:
        """False for a skipped step: its loss or gradient norm is not finite, so the optimizer did not step."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def train_step(model, optimizer, micro_batches: list[dict], device, clip: float, params=None) -> StepResult:
    """One optimizer step on this rank's micro-batches (steps 2-4 of the module docstring); the optimizer's lr must
    already be set. A non-finite loss or norm skips the update (the caller counts it). Also what
    benchmarks/bench_train_step.py runs.
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
    result = StepResult(loss=mean_loss, grad_norm=grad_norm.item(), target_tokens=int(n_target),
                        tokens=int(n_tokens), examples=int(n_examples))
    if result.finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return result


# --- the loop -----------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the loop stands: the step, and what the summary reports of this launch's steps."""

    step: int
    skipped: int  # steps skipped in the whole run (resumed from the checkpoint)
    last_loss: float | None = None  # of the latest finite step
    tokens: int = 0
    examples: int = 0
    seconds: float = 0.0


def train(cfg: TrainConfig, *, examples=None) -> dict:
    """Run (or resume) the training described by `cfg`; returns a summary dict.

    examples: pre-tokenized `lynx.sft_data.Example`s to train on instead of reading data.train (then no tokenizer
    is needed unless model.tokenizer is set)."""
    device, owns_group = init_distributed()
    try:
        # state.json: running, then finished / paused / failed / stopped (read by python -m lynx.runs).
        with RunState(cfg.run_dir, enabled=dist.get_rank() == 0, world_size=dist.get_world_size()) as run_state:
            run = setup(cfg, device, examples)
            run_state.update(step=run.step, total_steps=run.total_steps, stop_at=run.stop_at)
            evaluator = build_evaluator(cfg, run.tokenizer, dist.get_rank(), dist.get_world_size())
            progress = run_steps(cfg, run, evaluator, device, run_state)
            summary = finish(cfg, run, evaluator, progress, device)
            run_state.end(summary["finished"])
            return summary
    finally:
        if owns_group:
            dist.destroy_process_group()


def run_steps(cfg: TrainConfig, run: TrainSetup, evaluator, device, run_state: RunState) -> Progress:
    """Optimizer steps from run.step to run.stop_at, each logged to metrics.jsonl, with evaluations and checkpoints
    as configured; the last step's checkpoint is always saved."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    o = cfg.optim
    model, optimizer, loader = run.model, run.optimizer, run.loader
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in run.trainable)
    log = MetricsLog(cfg, run_dir, run.step, enabled=rank == 0)
    if rank == 0:
        print(
            f"model: {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.1f}M trained) | world {world} x micro-batch {cfg.data.micro_batch_size} x "
            f"accumulation {run.grad_accum} = {cfg.global_batch_size} sequences of {cfg.data.max_seq_len} per step | "
            f"{loader.steps_per_epoch} steps/epoch, {run.total_steps} steps in all | compute in "
            f"{str(parallel.dtype_from_name(cfg.parallel.param_dtype, 'parallel.param_dtype', device.type)).removeprefix('torch.')}",
            flush=True,
        )
    peak_flops = gpu_peak_flops(cfg, device)
    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=rank != 0,
               dynamic_ncols=True)
    progress = Progress(step=run.step, skipped=run.skipped)
    last_saved = run.step if run.resumed else -1
    model.train()
    while progress.step < run.stop_at:
        t0 = time.perf_counter()
        micro_batches = loader.next_step()
        lr = set_lr(optimizer, progress.step, warmup_steps=o.warmup_steps, total_steps=run.total_steps,
                    alpha_f=o.alpha_f)
        result = train_step(model, optimizer, micro_batches, device, o.max_grad_norm, run.trainable)
        if not result.finite:
            progress.skipped += 1
        progress.step += 1
        step, skipped = progress.step, progress.skipped
        dt = time.perf_counter() - t0

        record = {"step": step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": result.tokens,
                  "target_tokens": result.target_tokens, "examples": result.examples,
                  "tokens_per_s": result.tokens / dt, "examples_per_s": result.examples / dt, "step_time_s": dt,
                  "peak_memory_gib": peak_memory_gib(device), "skipped": not result.finite, "skipped_total": skipped}
        if evaluator is not None and ((cfg.eval.every_steps and step % cfg.eval.every_steps == 0)
                                      or step == run.stop_at):
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
        if result.finite:
            progress.last_loss = result.loss
        progress.tokens += result.tokens
        progress.examples += result.examples
        progress.seconds += dt
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{result.tokens / dt:.0f}",
                        ex_s=f"{result.examples / dt:.2f}")
        if not result.finite and rank == 0:
            tqdm.write(f"step {step}: non-finite loss {result.loss} or grad norm {result.grad_norm}: step skipped "
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
        if (every and step % every == 0) or step == run.stop_at:
            save_checkpoint(run_dir, step, model, optimizer, loader, {"skipped": skipped}, cfg.checkpoint.keep_last)
            last_saved = step
    bar.close()
    log.close()
    if last_saved != progress.step:  # nothing trained this launch and no checkpoint yet (e.g. max_steps reached)
        save_checkpoint(run_dir, progress.step, model, optimizer, loader, {"skipped": progress.skipped},
                        cfg.checkpoint.keep_last)
    return progress


def finish(cfg: TrainConfig, run: TrainSetup, evaluator, progress: Progress, device) -> dict:
    """Export a finished run (Hugging Face folder, lynx.json, GGUF files) and write summary.json; returns the
    summary."""
    rank = dist.get_rank()
    run_dir = Path(cfg.run_dir)
    step, stats = progress.step, run.stats
    finished = step >= run.total_steps
    if finished and cfg.checkpoint.export and evaluator is not None and evaluator.kind == "judge" \
            and evaluator.last_judged is None:
        evaluator.run(run.model, device)  # a relaunch after the last step: lynx.json's threshold needs a validation
    if finished and cfg.checkpoint.export:
        dtype = parallel.dtype_from_name(cfg.checkpoint.export_dtype, "checkpoint.export_dtype")
        export_hf(run.model, run.tokenizer, run_dir / "final", dtype, cfg.checkpoint.max_shard_size)
        if rank == 0:
            write_judge_card(run_dir / "final", judge_card(cfg, evaluator, stats, step, progress.examples))
        export_gguf(run_dir / "final", cfg.checkpoint.export_gguf)
    summary = {
        "steps": step, "total_steps": run.total_steps, "finished": finished, "skipped_steps": progress.skipped,
        "final_loss": progress.last_loss,
        "tokens_per_s": progress.tokens / progress.seconds if progress.seconds else None,
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
        print(f"done: step {step}/{run.total_steps}, loss {loss}, {tps} tokens/s, {progress.skipped} skipped steps, "
              f"{where}{rows}", flush=True)
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
