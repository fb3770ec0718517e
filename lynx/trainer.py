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

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from lynx import parallel
from lynx.config import ConfigError, LlamaConfig
from lynx.optim import build_optimizer, set_lr
from lynx.runs import RunState, complete_checkpoints

# --- configuration ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    init_from: str | None = None  # a Hugging Face Llama checkpoint directory (or a GGUF file) to fine-tune
    config: dict | None = None  # or LlamaConfig fields (HF config.json names) for a randomly initialised model
    tokenizer: str | None = None  # tokenizer directory (tokenizer.json or tokenizer.model); default: init_from
    # Fine-tune only the top N blocks and the output head (final norm; lm_head unless tied to the embedding); the
    # embedding and the blocks below stay frozen, so backward stops at block L - N. None: train everything.
    train_layers: int | None = None
    init_std: float = 0.02  # random init only


@dataclass
class DataConfig:
    train: str | None = None  # JSONL rows: {"messages": [...]} or {"prompt", "response"}
    max_seq_len: int = 8000  # packed sequence length; longer rows follow `overflow`
    overflow: str = "truncate_document"  # or "drop"
    train_on_inputs: bool = False  # loss on every token (prompt too), not only the assistant turns
    pack: bool = True  # several examples per sequence; False: one example per sequence (padded to max_seq_len)
    # The ids every row starts with (the judge instruction, the template's system turn) once per packed sequence,
    # attended to by each example in it (lynx.attention): fewer tokens per example, the same loss and gradients.
    shared_prefix: bool = False
    pack_group_key: str | None = None  # rows with the same value of this key share a packed sequence (and step)
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    drop_last: bool = True  # drop the last incomplete global batch of each epoch (else wrap around)


@dataclass
class OptimConfig:
    name: str = "lionw"  # "lionw" (decoupled, LLM Foundry's) or "adamw" (torch's)
    lr: float = 5e-7  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8  # adamw only
    warmup_steps: int = 100
    alpha_f: float = 0.1  # final lr = alpha_f * peak (cosine decay after warmup)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    max_skipped_steps: int = 10  # stop the run once this many steps had a non-finite loss or gradient norm


@dataclass
class ParallelConfig:
    param_dtype: str = "bfloat16"  # compute dtype of gathered parameters (the sharded master copy stays fp32)
    reduce_dtype: str = "float32"  # dtype of gradient reduce-scatter
    replicate: int = 1  # HSDP: number of replica groups (e.g. nodes); 1 = shard over all ranks
    activation_checkpointing: str = "full"  # "none", "full" (every block) or "every_k"
    ac_every: int = 2  # with "every_k": checkpoint blocks 0, k, 2k, ...
    compile: bool = False  # torch.compile each block
    reshard_after_forward: bool = True  # free gathered block weights after forward (ZeRO-3); False = ZeRO-2


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save a sharded training checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept
    export: bool = True  # export a Hugging Face checkpoint to <run_dir>/final at the end
    export_dtype: str = "bfloat16"
    max_shard_size: str = "5GB"


@dataclass
class EvalConfig:
    data: str | None = None  # JSONL: chat rows (validation loss) or HaluBench rows (loss, fast-mode accuracy, AUROC)
    every_steps: int = 0  # evaluate every N optimizer steps and at the end (0: only at the end, when data is set)
    max_rows: int | None = None  # the first N rows of eval.data


@dataclass
class LogConfig:
    wandb_project: str | None = None  # log to Weights & Biases (must be installed) when set
    wandb_run_name: str | None = None
    tensorboard: bool = False  # also write TensorBoard event files to <run_dir>/tensorboard (needs tensorboard)
    gpu_peak_tflops: float | None = None  # bf16 dense peak per GPU for the MFU estimate (default: known GPUs)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 17
    epochs: int = 1
    max_steps: int | None = None  # total optimizer steps (defines the schedule); default: epochs of the data
    stop_after_step: int | None = None  # exit (with a checkpoint) after this step without changing the schedule
    global_batch_size: int = 32  # packed sequences per optimizer step, over all ranks and accumulation steps
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _coerce(value, tp, key: str):
    """`value` (from YAML or a command-line string) as the dataclass field type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if isinstance(value, str) and tp is not str:
        value = yaml.safe_load(value) if value.strip() else value
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise ValueError(f"expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)  # also "5e-7", which YAML 1.1 reads as a string
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
        if origin is tuple:
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise ValueError(f"expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {value!r}")
            return dict(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls, d: dict, prefix: str = ""):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys here: {[prefix + k for k in fields]}"
        )
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(d: dict, dotted: str, value: str) -> None:
    """Put a command-line override into the raw config dict. Keys inside a mapping field (model.config.*) are
    free; everywhere else an unknown key is an error that lists the valid ones."""
    keys = dotted.split(".")
    node, cls = d, TrainConfig
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if cls is None:  # inside a mapping field: YAML-typed value
            if last:
                node[k] = yaml.safe_load(value)
            else:
                node = node.setdefault(k, {})
            continue
        hints = typing.get_type_hints(cls)
        if k not in hints:
            where = ".".join(keys[:i]) or "the top level"
            valid = [f.name for f in dataclasses.fields(cls)]
            raise ConfigError(f"unknown config key {dotted!r}: no {k!r} in {where}; valid keys there: {valid}")
        tp = hints[k]
        is_mapping = dict in (tp, typing.get_origin(tp), *typing.get_args(tp))
        if last:
            node[k] = yaml.safe_load(value) if is_mapping else value  # a mapping given whole, as YAML/JSON
            return
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif is_mapping:
            cls = None
        else:
            raise ConfigError(f"{'.'.join(keys[: i + 1])} is not a section (it has no key {keys[i + 1]!r})")
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML config file (or none: all defaults) with `dotted.key=value` overrides, typed by the dataclasses."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), value)
    cfg = _build(TrainConfig, raw)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if (cfg.model.init_from is None) == (cfg.model.config is None):
        raise ConfigError("set exactly one of model.init_from (a HF checkpoint dir) and model.config (random init)")
    if cfg.model.train_layers is not None and cfg.model.train_layers < 0:
        raise ConfigError("model.train_layers must be >= 0 (or null: train every layer)")
    if cfg.data.shared_prefix and (cfg.data.train_on_inputs or not cfg.data.pack):
        raise ConfigError("data.shared_prefix needs data.pack=true and data.train_on_inputs=false (the prefix is "
                          "computed once per packed row, so a loss on it would count once instead of per example)")
    if cfg.data.overflow not in ("truncate_document", "drop"):
        raise ConfigError(f"data.overflow: {cfg.data.overflow!r} (choose truncate_document or drop)")
    if cfg.optim.name not in ("lionw", "adamw"):
        raise ConfigError(f"optim.name: {cfg.optim.name!r} (choose lionw or adamw)")
    for key in ("global_batch_size", "epochs"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError("max_steps must be >= 1 (or null: run `epochs` over the data)")
    if cfg.data.micro_batch_size < 1 or cfg.data.max_seq_len < 2:
        raise ConfigError("data.micro_batch_size must be >= 1 and data.max_seq_len >= 2")
    if cfg.eval.every_steps < 0 or (cfg.eval.max_rows is not None and cfg.eval.max_rows < 1):
        raise ConfigError("eval.every_steps must be >= 0 and eval.max_rows >= 1 (or null)")
    if cfg.eval.every_steps and cfg.eval.data is None:
        raise ConfigError("eval.every_steps is set but eval.data is not")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last must be >= 1")
    if cfg.optim.max_skipped_steps < 1:
        raise ConfigError("optim.max_skipped_steps must be >= 1")
    if cfg.parallel.activation_checkpointing not in parallel.AC_MODES:
        raise ConfigError(f"parallel.activation_checkpointing: {cfg.parallel.activation_checkpointing!r} "
                          f"(choose from {parallel.AC_MODES})")
    for key in ("parallel.param_dtype", "parallel.reduce_dtype", "checkpoint.export_dtype"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in parallel.DTYPES:
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} (choose from {list(parallel.DTYPES)})")


def config_help() -> str:
    """Every key with its type and default, for --help."""
    lines = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], prefix + f.name + ".")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                tp = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
                lines.append(f"  {prefix + f.name:34s} {tp:24s} default {default!r}")

    walk(TrainConfig, "")
    return "\n".join(lines)


# --- distributed setup --------------------------------------------------------------------------------------------


def init_distributed() -> tuple[torch.device, bool]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or make a one-process group when run
    as plain `python train.py`, so FSDP2 and torch.distributed.checkpoint take the same path at any world size.
    Returns the device and whether this call created the group (and so must destroy it)."""
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device, False
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device, True


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --- model and data -----------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, mesh, device: torch.device):
    """Build on the meta device, shard, allocate only this rank's shards, then fill them (checkpoint or random)."""
    from lynx.model import Llama

    gguf_file = cfg.model.init_from is not None and Path(cfg.model.init_from).suffix == ".gguf"
    if gguf_file:
        from lynx.gguf import read_gguf_config

        if not Path(cfg.model.init_from).is_file():
            raise FileNotFoundError(f"model.init_from: GGUF file not found: {cfg.model.init_from}")
        model_cfg = read_gguf_config(cfg.model.init_from)
    elif cfg.model.init_from is not None:
        path = Path(cfg.model.init_from)
        if not path.is_dir():
            raise FileNotFoundError(f"model.init_from: checkpoint directory not found: {path}")
        model_cfg = LlamaConfig.from_json(path / "config.json")
    else:
        model_cfg = LlamaConfig.from_hf_dict(cfg.model.config, source="model.config")
    with torch.device("meta"):
        model = Llama(model_cfg)
    frozen = frozen_modules(model, cfg.model.train_layers)
    for module in frozen:
        module.requires_grad_(False)
    parallel.parallelize(model, mesh, cfg.parallel, frozen)
    # The sharded master copy is fp32 (the optimizer updates it); MixedPrecisionPolicy gathers it in param_dtype.
    model.to_empty(device=device)
    model.tie_weights()  # to_empty unties a tied embedding that FSDP does not manage (frozen, kept whole)
    if gguf_file:
        parallel.load_gguf_into_sharded(model, cfg.model.init_from)
    elif cfg.model.init_from is not None:
        parallel.load_hf_into_sharded(model, cfg.model.init_from)
    else:
        parallel.init_random_sharded(model, seed=cfg.seed, std=cfg.model.init_std)
    return model


def frozen_modules(model, train_layers: int | None) -> list[torch.nn.Module]:
    """The embedding and every block below the top `train_layers` (none when train_layers is None). A tied lm_head
    is the embedding, so it is frozen with it."""
    if train_layers is None:
        return []
    n = len(model.layers)
    if train_layers > n:
        raise ConfigError(f"model.train_layers={train_layers} but the model has only {n} blocks")
    return [model.embed_tokens, *model.layers[: n - train_layers]]


def load_tokenizer(cfg: TrainConfig):
    from lynx.tokenizer import Tokenizer

    path = cfg.model.tokenizer or cfg.model.init_from
    if path is None:
        raise ConfigError("model.tokenizer: no tokenizer configured (needed to tokenize data.train and to export)")
    return Tokenizer.from_pretrained(path)


def tokenize_data(cfg: TrainConfig, tokenizer, rank: int):
    from lynx import sft_data

    if cfg.data.train is None:
        raise ConfigError("data.train: no training file configured")
    rows = sft_data.load_rows(cfg.data.train)
    world = dist.get_world_size() if dist.is_initialized() else 1
    options = dict(max_seq_len=cfg.data.max_seq_len, overflow=cfg.data.overflow,
                   train_on_inputs=cfg.data.train_on_inputs, progress=rank == 0, group_key=cfg.data.pack_group_key)
    if world == 1:
        return sft_data.tokenize_rows(tokenizer, rows, **options)
    # Each rank tokenizes every world-th row, then all gather: every rank ends with the same examples in row order
    # (tokenize_row is deterministic), in 1/world of the time. An error on any rank is raised on all of them.
    mine, error = None, None
    try:
        mine, _ = sft_data.tokenize_rows(tokenizer, rows[rank::world], keep_dropped=True, **options)
    except Exception as e:  # noqa: BLE001 - re-raised below on every rank
        error = f"rank {rank}: {type(e).__name__}: {e}"
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, error))
    errors = [err for _, err in gathered if err]
    if errors:
        raise ValueError("tokenizing data.train failed: " + "; ".join(errors))
    stats = sft_data.TokenizeStats(rows=len(rows))
    examples = []
    for i in range(len(rows)):
        example = gathered[i % world][0][i // world]
        if example is None:
            stats.dropped += 1
            continue
        stats.kept += 1
        stats.truncated += example.truncated
        examples.append(example)
    return examples, stats


# --- checkpoints --------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, loader, train_state: dict, keep_last: int) -> Path:
    """Sharded save of model + optimizer (every rank writes its shards), plus per-rank data position and RNG.

    Written to step_N.tmp and renamed to step_N by rank 0 once every rank has finished; `train_state.json` (the
    step, skipped steps, world size) is the last file written, so its presence marks a complete checkpoint."""
    rank, world = dist.get_rank(), dist.get_world_size()
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"data": loader.state_dict(), "rng": rng_state()}, tmp / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps({**train_state, "step": step, "world_size": world}) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, loader) -> dict:
    """Restore everything save_checkpoint wrote; returns the train state (step, skipped, ...)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    train_state = json.loads((path / "train_state.json").read_text())
    if train_state["world_size"] != world:
        raise RuntimeError(
            f"{path} was written by {train_state['world_size']} ranks, this run has {world}: the data order would "
            "change; resume with the same number of processes (or start a new run_dir)"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank_{rank:05d}.pt", weights_only=False)
    loader.load_state_dict(extra["data"])
    set_rng_state(extra["rng"])
    return train_state


@torch.no_grad()
def export_hf(model, tokenizer, path: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """Gather the full weights tensor by tensor (cast to `dtype` as they arrive, kept on rank 0's CPU only) and
    write a Hugging Face checkpoint with the tokenizer files. Peak on rank 0: the exported model in `dtype`."""
    from lynx import checkpoint

    rank = dist.get_rank()
    full = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            full[name] = t.to(dtype).cpu()
        del t
    if rank == 0:
        checkpoint.save_pretrained(full, model.config, path, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    dist.barrier()


# --- metrics ------------------------------------------------------------------------------------------------------

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


def train_step(model, optimizer, micro_batches: list[dict], device, clip: float,
               params=None) -> tuple[float, float, int, int]:
    """One optimizer step on this rank's micro-batches (steps 2-4 of the module docstring); the optimizer's lr must
    already be set. Returns (mean loss, gradient norm, target tokens, tokens), the last two over all ranks. A
    non-finite loss or norm skips the update (the caller counts it). Also what benchmarks/bench_train_step.py runs.
    params: the trained parameters, whose gradient norm is clipped (default: all of the model's)."""
    local = [sum(b["num_target_tokens"] for b in micro_batches), sum(b["num_tokens"] for b in micro_batches)]
    n_target, n_tokens = all_reduce_sum(local, device)
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
    return mean_loss, grad_norm, int(n_target), int(n_tokens)


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
        (run_dir / "config.yaml").write_text(yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False))
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
                              max_rows=cfg.eval.max_rows, rank=rank, world=world)
        if rank == 0:
            print(f"eval: {cfg.eval.data}: {evaluator.rows} {evaluator.kind} rows, every "
                  f"{cfg.eval.every_steps or 'final'} step(s)", flush=True)
    log = MetricsLog(cfg, run_dir, step, enabled=rank == 0)
    if rank == 0:
        print(
            f"model: {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.1f}M trained) | world {world} x micro-batch {cfg.data.micro_batch_size} x "
            f"accumulation {grad_accum} = {cfg.global_batch_size} sequences of {cfg.data.max_seq_len} per step | "
            f"{loader.steps_per_epoch} steps/epoch, {total_steps} steps in all",
            flush=True,
        )
    peak_flops = gpu_peak_flops(cfg, device)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    last_saved = step if found[0] else -1
    clip = o.grad_clip if o.grad_clip > 0 else float("inf")
    losses, total_tokens, total_time = [], 0, 0.0
    model.train()
    while step < stop_at:
        t0 = time.perf_counter()
        micro_batches = loader.next_step()
        lr = set_lr(optimizer, step, warmup_steps=o.warmup_steps, total_steps=total_steps, alpha_f=o.alpha_f)
        mean_loss, grad_norm, n_target, n_tokens = train_step(model, optimizer, micro_batches, device, clip, trainable)
        finite = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        if not finite:
            skipped += 1
        step += 1
        dt = time.perf_counter() - t0

        n_examples = all_reduce_sum([sum(b["num_examples"] for b in micro_batches)], device)[0]
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
        run_state.update(step=step)
        if finite:
            losses.append(mean_loss)
        total_tokens += n_tokens
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
    if finished and cfg.checkpoint.export:
        dtype = parallel.dtype_from_name(cfg.checkpoint.export_dtype, "checkpoint.export_dtype")
        export_hf(model, tokenizer, run_dir / "final", dtype, cfg.checkpoint.max_shard_size)
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


def _plain(x):
    """dataclasses.asdict output with tuples as lists, for yaml.safe_dump."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


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
