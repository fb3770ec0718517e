"""Shared pieces of the trainer tests: synthetic pre-tokenized examples and tiny configs (small vocabulary, so a
training step takes milliseconds), and a runner for N gloo processes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from lynx.sft_data import IGNORE_INDEX, Example
from lynx.train import load_config, train

TINY_MODEL = dict(vocab_size=320, hidden_size=64, intermediate_size=98, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=1)


def synthetic_examples(n: int = 24, seed: int = 0, vocab: int = 320) -> list[Example]:
    """Random token sequences whose second half is the target (like a prompt followed by an answer)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(12, 60, (1,), generator=g))
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        examples.append(Example(ids, labels))
    return examples


def tiny_overrides(run_dir: Path, **extra) -> list[str]:
    """dotted.key=value overrides for a tiny fp32 run on synthetic data."""
    items = {
        "run_dir": str(run_dir), "seed": 3, "global_batch_size": 4, "max_steps": 4, "data.max_seq_len": 128,
        "data.micro_batch_size": 1, "optim.name": "adamw", "optim.lr": 1e-2, "optim.warmup_steps": 1,
        "optim.alpha_f": 0.1, "optim.grad_clip": 1.0, "optim.weight_decay": 0.1, "parallel.param_dtype": "float32",
        "parallel.activation_checkpointing": "none", "checkpoint.export_dtype": "float32",
    }
    if "model.init_from" not in extra:
        items = {"model.config": json.dumps(TINY_MODEL), **items}  # first, so model.config.* overrides apply on top
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], examples) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(load_config(None, overrides), examples=examples)


def run_ranks(world: int, overrides: list[str], examples) -> None:
    """Run `train` on `world` gloo processes (each a fresh interpreter, like torchrun) and wait for all."""
    mp.start_processes(_worker, args=(world, free_port(), overrides, examples), nprocs=world, join=True,
                       start_method="spawn")
