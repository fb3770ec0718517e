"""Old import path of GGUF writing, kept so existing imports work: the code is lynx.weights.gguf_write, and a Hugging
Face folder -> GGUF file is lynx.convert.convert_to_gguf."""

from lynx.convert import convert_to_gguf
from lynx.weights.errors import GGUFExportError
from lynx.weights.gguf_write import GGUF_TYPES, gguf_type, rope_freqs, tensor_type, write_gguf

__all__ = ["GGUFExportError", "GGUF_TYPES", "convert_to_gguf", "gguf_type", "rope_freqs", "tensor_type", "write_gguf"]
