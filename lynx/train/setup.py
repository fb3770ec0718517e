"""Everything a run needs before its first step: seeds, the tokenized data and its loader, the sharded model and
its optimizer, where to start (a relaunch resumes from the newest complete checkpoint), and the evaluator."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lynx import parallel
from lynx.config import ConfigError
from lynx.runs import complete_checkpoints
from lynx.sft_data import PackedLoader, TokenizeStats
from lynx.train.build import build_loader, build_model, build_optimizer, load_tokenizer, tokenize_data
from lynx.train.checkpoint import load_checkpoint
from lynx.train.config import TrainConfig, config_yaml, grad_accum_steps


@dataclass
class TrainSetup:
    """What setup() built, and the step the loop starts from."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]  # what the optimizer updates and the gradient clipping measures
    loader: PackedLoader
    tokenizer: object | None  # None when given examples and no model.tokenizer
    stats: TokenizeStats | None  # rows of data.train kept, truncated, dropped (None when given examples)
    grad_accum: int
    total_steps: int  # the schedule's length
    stop_at: int  # the step this launch ends at (stop_after_step pauses a run before total_steps)
    step: int  # 0, or the resumed checkpoint's step
    skipped: int  # steps skipped for a non-finite loss or gradient norm so far
    resumed: bool


def setup(cfg: TrainConfig, device, examples=None) -> TrainSetup:
    """examples: pre-tokenized `lynx.sft_data.Example`s to train on instead of reading data.train (then no tokenizer
    is needed unless model.tokenizer is set)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grad_accum = grad_accum_steps(cfg, world)
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
    loader = build_loader(cfg, examples, pad_id=pad_id, grad_accum=grad_accum, rank=rank, world=world)
    if rank == 0 and cfg.data.shared_prefix:
        mean = sum(map(len, examples)) / max(len(examples), 1)
        print(f"data: shared prefix of {loader.sequences[0].prefix_len} tokens, once per packed sequence (examples "
              f"average {mean:.0f})", flush=True)
    total_steps = cfg.max_steps or cfg.epochs * loader.steps_per_epoch

    # Model and optimizer.
    mesh = parallel.build_mesh(device.type, world, cfg.parallel.replicate)
    model = build_model(cfg, mesh, device)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)

    checkpoint = newest_checkpoint(cfg, rank)
    step, skipped = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, loader)
        step, skipped = state["step"], state["skipped"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {step}", flush=True)
    return TrainSetup(
        model=model, optimizer=optimizer, trainable=trainable, loader=loader, tokenizer=tokenizer, stats=stats,
        grad_accum=grad_accum, total_steps=total_steps, stop_at=min(total_steps, cfg.stop_after_step or total_steps),
        step=step, skipped=skipped, resumed=checkpoint is not None,
    )


def newest_checkpoint(cfg: TrainConfig, rank: int) -> Path | None:
    """The newest complete checkpoint of run_dir, the same on every rank (rank 0 decides, so all load the same one).
    Rank 0 also prepares run_dir: it removes half-written checkpoints and saves the config."""
    run_dir = Path(cfg.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob("*.tmp") if (run_dir / "checkpoints").is_dir() else []:
            shutil.rmtree(stale)  # left by a run killed mid-save
        (run_dir / "config.yaml").write_text(config_yaml(cfg))
    found = [complete_checkpoints(run_dir)[-1:] if rank == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0][0] if found[0] else None


def build_evaluator(cfg: TrainConfig, tokenizer, rank: int, world: int):
    """The evaluator of eval.data (None when unset), its rows tokenized once here."""
    if cfg.eval.data is None:
        return None
    from lynx.train.validation import Evaluator

    if tokenizer is None:
        raise ConfigError("eval.data needs a tokenizer (model.tokenizer or model.init_from)")
    evaluator = Evaluator(cfg.eval.data, tokenizer, max_seq_len=cfg.data.max_seq_len, max_rows=cfg.eval.max_rows,
                          rank=rank, world=world, context_tokens=cfg.judge.context_tokens)
    if rank == 0:
        print(f"eval: {cfg.eval.data}: {evaluator.rows} {evaluator.kind} rows, every "
              f"{cfg.eval.every_steps or 'final'} step(s)", flush=True)
    return evaluator
