"""Per-step metrics: peak memory, model FLOPs for MFU, and <run_dir>/metrics.jsonl (with optional W&B and
TensorBoard)."""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path

import torch

from lynx.config import ConfigError, LlamaConfig
from lynx.train.config import TrainConfig

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak RSS of the process


def gpu_peak_flops(cfg: TrainConfig, device) -> float | None:
    if device.type != "cuda":
        return None
    if cfg.log.gpu_peak_tflops:
        return cfg.log.gpu_peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def step_flops(model_cfg: LlamaConfig, n_params: int, micro_batches: list[dict], n_trained: int | None = None) -> float:
    """Model FLOPs of forward + backward on these micro-batches: 2 per parameter per token forward and 4 per trained
    parameter backward (6 per parameter when all train; frozen lower layers run forward only), plus causal attention
    over each segment of cu_seqlens (QK^T and AV: 2 matmuls x 2 FLOPs x head_dim x heads, halved by causality, x3
    for forward + backward; a row's padding is a segment too, so padded batches slightly overstate it)."""
    n_trained = n_params if n_trained is None else n_trained
    flops = 0.0
    width = model_cfg.num_attention_heads * model_cfg.head_dim
    for b in micro_batches:
        lengths = (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).double()
        flops += (2 * n_params + 4 * n_trained) * b["num_tokens"] + 6 * model_cfg.num_hidden_layers * width * float((lengths**2).sum())
    return flops


class MetricsLog:
    """<run_dir>/metrics.jsonl (rank 0), one object per optimizer step, flushed as written; optional W&B and
    TensorBoard (every numeric field as a scalar)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.wandb = None
        self.tensorboard = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            # Steps after the checkpoint we resume from are run again: drop their stale lines (and a line cut
            # short by a crash).
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        if cfg.log.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("log.wandb_project is set but wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name,
                                    config=dataclasses.asdict(cfg), dir=str(run_dir), resume="allow")
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log.tensorboard is true but tensorboard is not installed (pip install "
                                  "tensorboard)") from None
            # purge_step: a resumed run drops the events of the steps it runs again, as metrics.jsonl does.
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
