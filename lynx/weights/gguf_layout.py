"""How llama.cpp lays out a Llama's tensors, both ways: its tensor names and its q/k row order. The GGUF reader maps
back with it and the GGUF writer maps forward, so the two cannot disagree.

llama.cpp's convert_hf_to_gguf.py renames every tensor (token_embd, blk.N.attn_q, ...) and permutes the rows of
attn_q and attn_k per head for llama.cpp's interleaved rotary layout; transformers' GGUF loader undoes both, exactly
as `gguf_tensor` and `unpermute_rows` do here.
"""

from __future__ import annotations

import gguf

ARCHITECTURE = "llama"
MODEL_TENSOR, TENSOR_NAMES = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"

# Our parameter names -> llama.cpp's tensors, named as gguf.constants names them (token_embd, blk.{bid}.attn_q, ...).
TOP_TENSORS = {
    "embed_tokens.weight": MODEL_TENSOR.TOKEN_EMBD,
    "head.norm.weight": MODEL_TENSOR.OUTPUT_NORM,
    "head.lm_head.weight": MODEL_TENSOR.OUTPUT,
}
LAYER_TENSORS = {
    "input_layernorm.weight": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj.weight": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj.weight": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj.weight": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj.weight": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm.weight": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj.weight": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj.weight": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj.weight": MODEL_TENSOR.FFN_DOWN,
}
ROTARY_TENSORS = (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K)  # rows permuted by convert_hf_to_gguf.py (see below)


def gguf_tensor(name: str) -> tuple[MODEL_TENSOR, str]:
    """Our parameter name -> (llama.cpp's tensor kind, its tensor name), e.g. layers.3.self_attn.q_proj.weight ->
    (ATTN_Q, "blk.3.attn_q.weight")."""
    if name in TOP_TENSORS:
        kind, bid = TOP_TENSORS[name], None
    else:
        _, bid, rest = name.split(".", 2)  # layers.N.<module>.weight
        kind = LAYER_TENSORS[rest]
    return kind, TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def gguf_name(name: str) -> str:
    """Our parameter name -> llama.cpp's tensor name."""
    return gguf_tensor(name)[1]


def _rotary_rows(w, head_dim: int, to_gguf: bool):
    """convert_hf_to_gguf.py's per-head row permutation of attn_q/attn_k (to_gguf) or its inverse (whole heads only):
    llama.cpp orders a head's rows (0, d/2, 1, d/2 + 1, ...) for its interleaved rotary pairs; ours (Hugging Face's)
    are rotate-half pairs (i, i + d/2). Works on torch tensors and numpy arrays alike."""
    rows, cols = w.shape
    halves = (2, head_dim // 2) if to_gguf else (head_dim // 2, 2)
    return w.reshape(rows // head_dim, *halves, cols).swapaxes(1, 2).reshape(rows, cols)


def permute_rows(w, head_dim: int):
    """Our q/k rows -> llama.cpp's (what the GGUF writer stores)."""
    return _rotary_rows(w, head_dim, to_gguf=True)


def unpermute_rows(w, head_dim: int):
    """llama.cpp's q/k rows -> ours (what loading undoes)."""
    return _rotary_rows(w, head_dim, to_gguf=False)
