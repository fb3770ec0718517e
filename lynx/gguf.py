"""Old import path of GGUF reading, kept so existing imports work: the code is lynx.weights.gguf_read (tensor names
and q/k row order: lynx.weights.gguf_layout)."""

from lynx.weights.errors import GGUFError
from lynx.weights.gguf_layout import (ARCHITECTURE, LAYER_TENSORS, ROPE_FREQS, ROTARY_TENSORS, TOP_TENSORS, gguf_name,
                                      gguf_tensor, permute_rows)
from lynx.weights.gguf_read import (GGUFTensor, llama3_scaling_from_rope_freqs, load_gguf, load_gguf_state_dict_into,
                                    open_gguf, read_gguf_config, tensor_table)

__all__ = ["ARCHITECTURE", "GGUFError", "GGUFTensor", "LAYER_TENSORS", "ROPE_FREQS", "ROTARY_TENSORS", "TOP_TENSORS",
           "gguf_name", "gguf_tensor", "llama3_scaling_from_rope_freqs", "load_gguf", "load_gguf_state_dict_into",
           "open_gguf", "permute_rows", "read_gguf_config", "tensor_table"]
