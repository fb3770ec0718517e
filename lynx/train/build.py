"""What the loop trains: the sharded model (from a checkpoint, a GGUF file or random init; frozen lower blocks kept
whole outside FSDP), its optimizer, the tokenized training rows and the loader that batches them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from lynx import optim, parallel, sft_data
from lynx.config import ConfigError, LlamaConfig
from lynx.train.config import TrainConfig
from lynx.weights import sharded


def build_model(cfg: TrainConfig, mesh, device: torch.device):
    """Build on the meta device, shard, allocate only this rank's shards, then fill them (checkpoint or random)."""
    model = shard_model(cfg, model_config(cfg), mesh, device)
    if cfg.model.init_from is not None and Path(cfg.model.init_from).suffix == ".gguf":
        from lynx.model import Llama

        sharded.load_gguf_into_sharded(model, cfg.model.init_from, model_class=Llama)
    elif cfg.model.init_from is not None:
        sharded.load_hf_into_sharded(model, cfg.model.init_from)
    else:
        parallel.init_random_sharded(model, seed=cfg.seed, std=cfg.model.init_std)
    return model


def model_config(cfg: TrainConfig) -> LlamaConfig:
    """The architecture: from the GGUF file or checkpoint directory of model.init_from, else model.config."""
    if cfg.model.init_from is None:
        return LlamaConfig.from_hf_dict(cfg.model.config, source="model.config")
    path = Path(cfg.model.init_from)
    if path.suffix == ".gguf":
        from lynx.weights.gguf_read import read_gguf_config

        if not path.is_file():
            raise FileNotFoundError(f"model.init_from: GGUF file not found: {path}")
        return read_gguf_config(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.init_from: checkpoint directory not found: {path}")
    return LlamaConfig.from_json(path / "config.json")


def shard_model(cfg: TrainConfig, model_cfg: LlamaConfig, mesh, device) -> torch.nn.Module:
    """The model as training runs it, before any weight is filled in: built on the meta device, lower blocks frozen,
    parallelized (FSDP2, activation checkpointing, mixed precision), then this rank's shards allocated on `device`.
    (lynx.plan calls this under FakeTensorMode, where allocating costs nothing.)"""
    from lynx.model import Llama

    with torch.device("meta"):
        model = Llama(model_cfg)
    frozen = frozen_modules(model, cfg.model.train_layers)
    for module in frozen:
        module.requires_grad_(False)
    parallel.parallelize(model, mesh, cfg.parallel, frozen)
    # The sharded master copy is fp32 (the optimizer updates it); MixedPrecisionPolicy gathers it in param_dtype.
    model.to_empty(device=device)
    model.tie_weights()  # to_empty unties a tied embedding that FSDP does not manage (frozen, kept whole)
    return model


def build_optimizer(cfg: TrainConfig, params):
    """optim.* over `params` (the trained ones): the one place the trainer, lynx.plan and the benchmarks build it."""
    o = cfg.optim
    return optim.build_optimizer(params, o.name, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)


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
    if cfg.data.train is None:
        raise ConfigError("data.train: no training file configured")
    rows = sft_data.load_rows(cfg.data.train)
    world = dist.get_world_size() if dist.is_initialized() else 1
    options = dict(max_seq_len=cfg.data.max_seq_len, overflow=cfg.data.overflow,
                   train_on_inputs=cfg.data.train_on_inputs, answer_loss=cfg.data.answer_loss,
                   progress=rank == 0, group_key=cfg.data.pack_group_key)
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


def build_loader(cfg: TrainConfig, examples, *, pad_id: int, grad_accum: int, rank: int,
                 world: int) -> sft_data.PackedLoader:
    """This rank's batches of the examples: packed several to a sequence (data.pack) or one per sequence, the shared
    prefix once per sequence (data.shared_prefix)."""
    if not cfg.data.pack:
        # One example per sequence, so a global batch is global_batch_size examples (the recipe's meaning).
        examples = [sft_data.pack([e], cfg.data.max_seq_len)[0] for e in examples]
    prefix = sft_data.shared_prefix(examples) if cfg.data.shared_prefix else None
    return sft_data.PackedLoader(
        examples, seq_len=cfg.data.max_seq_len, micro_batch_size=cfg.data.micro_batch_size, rank=rank,
        world_size=world, seed=cfg.seed, drop_last=cfg.data.drop_last, grad_accum=grad_accum, pad_id=pad_id,
        prefix=prefix,
    )
