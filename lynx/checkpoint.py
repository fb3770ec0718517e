"""Old import path of safetensors checkpoint I/O, kept so existing imports work: the code is lynx.weights.safetensors
(load_pretrained and save_pretrained are its load_safetensors and save_safetensors; the errors: lynx.weights)."""

from lynx.weights.errors import CheckpointError, raise_mismatch
from lynx.weights.safetensors import (INDEX_FILE, SINGLE_FILE, checkpoint_dtype, hf_name, load_state_dict_into,
                                      parse_size)
from lynx.weights.safetensors import load_safetensors as load_pretrained
from lynx.weights.safetensors import save_safetensors as save_pretrained

__all__ = ["CheckpointError", "INDEX_FILE", "SINGLE_FILE", "checkpoint_dtype", "hf_name", "load_pretrained",
           "load_state_dict_into", "parse_size", "raise_mismatch", "save_pretrained"]
