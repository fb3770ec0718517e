"""Weights I/O, apart from the model: Hugging Face safetensors folders and llama.cpp GGUF files, read and written.

The model class is an argument: nothing in this package imports lynx.model, so the model's own from_pretrained /
save_pretrained can call in here without an import loop.

    errors.py       the errors (GGUFError is a CheckpointError) and the strict missing/unexpected/shape check
    safetensors.py  strict tensor-by-tensor loading, atomic sharded saving, our names -> Hugging Face's
    gguf_layout.py  llama.cpp's tensor names and q/k row order, both ways
    gguf_read.py    GGUF config, dequantized weights and metadata fields (`read_field`, also the tokenizer's)
    gguf_write.py   GGUF files from weights, config and tokenizer
    sharded.py      loading straight into the trainer's FSDP2 shards
"""

from lynx.weights.errors import CheckpointError, GGUFError, GGUFExportError

__all__ = ["CheckpointError", "GGUFError", "GGUFExportError"]
