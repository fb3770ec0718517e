"""Hugging Face safetensors checkpoints: strict, tensor-by-tensor loading and atomic, sharded saving, and the map
from our parameter names to Hugging Face's (`hf_name`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lynx.config import DTYPES, LlamaConfig
from lynx.weights.errors import CheckpointError, raise_mismatch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_name(name: str) -> str:
    """Our parameter name -> the name in a Hugging Face LlamaForCausalLM state dict."""
    if name == "head.lm_head.weight":
        return "lm_head.weight"
    return "model." + name.removeprefix("head.")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB" (decimal and binary units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base**power)


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"missing shard {f} (listed in {index})")
        return files
    single = path / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"no weights in {path}: neither {SINGLE_FILE} nor {INDEX_FILE}")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(file: Path):
    """A safetensors handle; an unreadable file is a CheckpointError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e


# Slices of at most this many bytes are read per file handle (see _copy_tensor).
COPY_CHUNK_BYTES = 64 * 2**20


def _copy_tensor(file: Path, name: str, target: torch.Tensor) -> None:
    """Copy one tensor into `target` (converting dtype) in row slices, each through a fresh handle.

    safetensors memory-maps the file, and every mapped page read stays resident until the handle is closed; with one
    handle per file, loading would briefly hold the model plus the whole file in RSS (2x the checkpoint, measured by
    benchmarks/bench_checkpoint_load.py). Closing after each slice keeps the extra memory to one slice."""
    if target.dim() == 0:
        with open_safetensors(file) as f:
            target.copy_(f.get_tensor(name))
        return
    row_bytes = max(1, target[0].numel()) * 4  # sized for the widest dtype we read (fp32)
    rows = max(1, COPY_CHUNK_BYTES // row_bytes)
    for start in range(0, target.shape[0], rows):
        with open_safetensors(file) as f:
            target[start : start + rows].copy_(f.get_slice(name)[start : start + rows])


def load_state_dict_into(model: torch.nn.Module, path: str | Path, *, copy_tensor=None) -> None:
    """Copy a checkpoint into `model`'s (already allocated) tensors one at a time: peak memory stays near one copy
    of the weights. Missing, unexpected or wrongly shaped tensors raise one error listing all of them.

    copy_tensor(file, name, target) fills one tensor; the default reads it whole, in row slices. The sharded trainer
    passes one that reads only its rank's rows (lynx.weights.sharded.load_hf_into_sharded)."""
    copy_tensor = copy_tensor or _copy_tensor
    path = Path(path)
    files = _weight_files(path)
    ours = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    wanted = {hf_name(n): n for n in ours if not (tied and n == "head.lm_head.weight")}
    missing = sorted(set(wanted) - set(files))
    # A tied checkpoint may still carry lm_head.weight; it is the embedding, so it is not "unexpected".
    unexpected = sorted(set(files) - set(wanted) - ({"lm_head.weight"} if tied else set()))
    wrong_shape = []
    for name in sorted(set(wanted) & set(files), key=lambda n: str(files[n])):
        target = ours[wanted[name]]  # under FSDP2 a DTensor: its shape is the full tensor's
        with open_safetensors(files[name]) as f:
            shape = tuple(f.get_slice(name).get_shape())
        if shape != tuple(target.shape):
            wrong_shape.append(f"{name}: checkpoint {shape} vs model {tuple(target.shape)}")
            continue
        copy_tensor(files[name], name, target)
    raise_mismatch(CheckpointError, f"checkpoint {path}", missing, unexpected, wrong_shape)


def checkpoint_dtype(cfg: LlamaConfig) -> torch.dtype:
    return DTYPES.get(cfg.torch_dtype.removeprefix("torch."), torch.float32)


def load_safetensors(cls, path: str | Path, *, dtype=None, device="cpu"):
    """Build `cls` (lynx.model.Llama) on the meta device, allocate once at the target dtype and device, fill tensor
    by tensor from the Hugging Face checkpoint directory `path` (GGUF files: lynx.weights.gguf_read.load_gguf)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = LlamaConfig.from_json(path / "config.json")
    dtype = dtype or checkpoint_dtype(cfg)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        load_state_dict_into(model, path)
    return model.eval()


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_safetensors(state_dict: dict, cfg: LlamaConfig, path: str | Path, *, max_shard_size="5GB", dtype=None):
    """Write config.json, generation_config.json and safetensors (sharded above max_shard_size) to `path`.

    Everything goes to a temporary sibling directory renamed into place when complete, so a crash never leaves a
    half-written checkpoint under the final name. `state_dict` uses our names (full tensors, any device)."""
    path = Path(path)
    max_bytes = parse_size(max_shard_size)
    tensors = {}
    for name, t in state_dict.items():
        if cfg.tie_word_embeddings and name == "head.lm_head.weight":
            continue  # stored once, as the embedding, like transformers does
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        tensors[hf_name(name)] = t.cpu().contiguous()
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype_name), indent=2) + "\n")
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        shards = _shards(tensors, max_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
