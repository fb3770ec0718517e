"""Training checkpoints (torch.distributed.checkpoint): sharded model and optimizer, per-rank data position and RNG,
written under a .tmp name and renamed when complete; and the final Hugging Face export."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from lynx.runs import complete_checkpoints


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
    from lynx.weights.safetensors import save_safetensors

    rank = dist.get_rank()
    full = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if rank == 0:
            full[name] = t.to(dtype).cpu()
        del t
    if rank == 0:
        save_safetensors(full, model.config, path, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    dist.barrier()


def write_judge_card(path: Path, card: dict) -> None:
    """<export>/lynx.json: what judge.py needs to judge as the model was trained and validated (context budget,
    p_pass threshold) and a summary of its training. Written whole under a temporary name, then renamed."""
    from lynx.judge import CARD_FILE

    tmp = path / (CARD_FILE + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(path / CARD_FILE)


def export_gguf(final: Path, types: list[str]) -> list[Path]:
    """GGUF files of the exported Hugging Face folder, next to it (<run_dir>/final-<type>.gguf), written by rank 0
    from `final` (read back one tensor at a time), replacing older ones."""
    from lynx.convert import convert_to_gguf

    written = [final.with_name(f"{final.name}-{t}.gguf") for t in types]
    if dist.get_rank() == 0:
        for type_name, path in zip(types, written):
            convert_to_gguf(final, path, type_name, force=True)
    dist.barrier()
    return written
