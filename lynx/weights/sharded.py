"""Loading a checkpoint straight into the trainer's FSDP2-sharded parameters: each rank fills only its own shard,
with the strict checks of the single-process loaders. (Sharding itself is lynx.parallel's.)"""

from __future__ import annotations

from pathlib import Path

import torch

from lynx.parallel import local_slices, local_tensor
from lynx.weights.safetensors import load_state_dict_into, open_safetensors


def _copy_local_rows(file: Path, name: str, target: torch.Tensor) -> None:
    """Fill this rank's shard of `target` with only its rows of the checkpoint tensor (safetensors `get_slice` reads
    just those bytes). A fresh handle per tensor: mapped pages stay resident until their handle closes."""
    local = local_tensor(target)
    if local.numel():
        with open_safetensors(file) as f:
            local.copy_(f.get_slice(name)[local_slices(target)])  # converts dtype


@torch.no_grad()
def load_hf_into_sharded(model: torch.nn.Module, path: str | Path) -> None:
    """Fill the (sharded, materialised) parameters of `model` from a Hugging Face safetensors checkpoint, with the
    strict checks of lynx.weights.safetensors. Each rank reads only the rows it owns, so no rank ever holds the whole
    model: peak extra memory is one shard of one tensor."""
    load_state_dict_into(model, path, copy_tensor=_copy_local_rows)


@torch.no_grad()
def load_gguf_into_sharded(model: torch.nn.Module, path: str | Path, *, model_class) -> None:
    """Fill the sharded parameters of `model` from a GGUF file: every rank dequantizes the whole file into a full
    `model_class` (lynx.model.Llama, passed in: this package never imports the model) in fp32 and keeps its rows.
    Fine for the small models a GGUF is fine-tuned from here; convert a large one once with `python -m lynx.convert
    gguf` and train from the folder, which each rank reads only its rows of."""
    from lynx.weights.gguf_read import load_gguf  # the gguf library only for GGUF files

    full = load_gguf(model_class, path, dtype=torch.float32)
    full_state = full.state_dict()
    for name, t in model.state_dict().items():
        local = local_tensor(t)
        if local.numel():
            local.copy_(full_state[name][local_slices(t)])
