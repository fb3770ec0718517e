"""Weights I/O, apart from the model: Hugging Face safetensors folders and llama.cpp GGUF files, read and written.

    load_pretrained(cls, path)    a folder of safetensors, or a .gguf file, into a new `cls` (lynx.model.Llama)
    save_pretrained(model, path)  a folder of safetensors, or a .gguf file (which also carries the tokenizer)

The model class is an argument: nothing in this package imports lynx.model, so the model's own from_pretrained /
save_pretrained can call in here without an import loop.

    errors.py       the errors (GGUFError is a CheckpointError) and the strict missing/unexpected/shape check
    safetensors.py  strict tensor-by-tensor loading, atomic sharded saving, our names -> Hugging Face's
    gguf_layout.py  llama.cpp's tensor names and q/k row order, both ways
    gguf_read.py    GGUF config, dequantized weights and metadata fields (`read_field`, also the tokenizer's)
    gguf_write.py   GGUF files from weights, config and tokenizer
    sharded.py      loading straight into the trainer's FSDP2 shards
"""

from __future__ import annotations

from pathlib import Path

from lynx.weights.errors import CheckpointError, GGUFError, GGUFExportError
from lynx.weights.safetensors import load_safetensors, save_safetensors

__all__ = ["CheckpointError", "GGUFError", "GGUFExportError", "is_gguf", "load_pretrained", "save_pretrained"]


def is_gguf(path: str | Path) -> bool:
    """A path names a GGUF file by its suffix (a folder that happens to end in .gguf is still a folder)."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def load_pretrained(cls, path: str | Path, *, dtype=None, device="cpu"):
    """`cls` built from a Hugging Face checkpoint folder (in the checkpoint's dtype unless `dtype` is given) or a
    llama.cpp GGUF file (float32 unless `dtype` is given), in eval mode on `device`."""
    if is_gguf(path):
        from lynx.weights.gguf_read import load_gguf  # imports the gguf library only for GGUF files

        return load_gguf(cls, Path(path), dtype=dtype, device=device)
    return load_safetensors(cls, path, dtype=dtype, device=device)


def save_pretrained(model, path: str | Path, *, max_shard_size: int | str = "5GB", dtype=None, tokenizer=None,
                    gguf_type: str = "f16") -> None:
    """Write `model` to a folder of safetensors, or, when `path` ends in .gguf, to a GGUF file.

    Folder: config.json, generation_config.json and safetensors, sharded above max_shard_size, cast to `dtype` when
    given, replacing `path` once complete; then the tokenizer's files when one is given.
    GGUF: weights of type `gguf_type` (f32, f16, bf16, q8_0, q4_0, q4_1) and `tokenizer` in the metadata (required:
    llama.cpp cannot run a file without one), written under a temporary name and renamed over `path`."""
    if is_gguf(path):
        from lynx.weights.gguf_write import write_gguf  # imports the gguf library only for GGUF files

        if dtype is not None:
            raise ValueError("dtype applies to safetensors folders; a GGUF file's precision is its gguf_type")
        write_gguf(model.state_dict(), model.config, tokenizer, path, gguf_type, force=True, progress=False)
        return
    save_safetensors(model.state_dict(), model.config, path, max_shard_size=max_shard_size, dtype=dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
