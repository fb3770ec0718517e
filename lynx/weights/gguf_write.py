"""Writing GGUF files (llama.cpp's format, architecture `llama`) from a model's weights, config and tokenizer: what
llama.cpp's convert_hf_to_gguf.py writes for a Llama, with the `gguf` package's GGUFWriter and gguf.quants. (A Hugging
Face folder to a GGUF file: lynx.convert.convert_to_gguf.)

- tensor names and the q/k row permutation: lynx.weights.gguf_layout's, the ones loading maps back (`gguf_tensor`,
  `permute_rows`);
- Llama-3.1 "llama3" rope scaling: no metadata key, a rope_freqs.weight tensor of per-frequency divisors, computed
  from the model's own frequencies (unscaled / scaled), which is what the converter computes from the config;
- tied embeddings: no output.weight (llama.cpp then uses token_embd as the output);
- the tokenizer (`tokenizer.ggml.*`) and chat template, checked by reading them back before anything is written;
- tensor types: F32 for 1-D tensors (norms, rope_freqs) whatever the type, as the converter does; the chosen type for
  the 2-D weights. For q4_0 / q4_1 the output tensor (the token embedding when tied) is Q8_0: llama.cpp's
  llama-quantize gives it more bits (Q6_K, or Q8_0 when its rows are not a multiple of 256, as in SmolLM2's Q4_1
  file) and gguf.quants cannot encode K-quants. A weight whose rows do not split into whole blocks falls back to F16,
  as in the converter.

K-quants (Q4_K_M, ...) come from llama.cpp's own `llama-quantize` run on an f16 / bf16 file (see the README).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from lynx.config import LlamaConfig
from lynx.weights.errors import GGUFExportError
from lynx.weights.gguf_layout import ARCHITECTURE, MODEL_TENSOR, ROPE_FREQS, ROTARY_TENSORS, gguf_tensor, permute_rows

Q = gguf.GGMLQuantizationType

# --type name -> (type of the 2-D weights, general.file_type)
GGUF_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
OUTPUT_TYPE_FOR_Q4 = Q.Q8_0

# A conversation the exported tokenizer must render to the same ids as the original (plain text: Meta's built-in
# format encodes special-token text in contents as text, a template does not).
CHECK_MESSAGES = [{"role": "system", "content": "You judge answers."},
                  {"role": "user", "content": "QUESTION: What is 12 + 30?\n\nANSWER: It's 42, isn't it?"},
                  {"role": "assistant", "content": '{"REASONING": [], "SCORE": "PASS"}'}]


def gguf_type(name: str) -> tuple[Q, gguf.LlamaFileType]:
    if name not in GGUF_TYPES:
        raise GGUFExportError(f"unsupported GGUF type {name!r}: choose one of {', '.join(GGUF_TYPES)}. K-quants such as "
                              "Q4_K_M come from llama.cpp's llama-quantize run on an f16 or bf16 file (see the README)")
    return GGUF_TYPES[name]


def tensor_type(kind: MODEL_TENSOR, shape: tuple[int, ...], weights: Q, tied: bool) -> Q:
    """The type a tensor is stored as in a file whose 2-D weights are `weights` (see the module docstring)."""
    if len(shape) == 1:
        return Q.F32
    is_output = kind == MODEL_TENSOR.OUTPUT or (tied and kind == MODEL_TENSOR.TOKEN_EMBD)
    qtype = OUTPUT_TYPE_FOR_Q4 if is_output and weights in (Q.Q4_0, Q.Q4_1) else weights
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block_size == 0 else Q.F16


def rope_freqs(cfg: LlamaConfig) -> np.ndarray | None:
    """rope_freqs.weight for Llama-3.1 scaling: the divisors that turn the unscaled frequencies into the model's
    (what lynx.weights.gguf_read.llama3_scaling_from_rope_freqs reads back); None without scaling."""
    from lynx.rope import rope_inv_freq

    if not cfg.rope_scaling:
        return None
    unscaled = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None)).double()
    return (unscaled / rope_inv_freq(cfg).double()).float().numpy()


def _tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """The tokenizer's GGUF metadata, read back through the GGUF tokenizer reader before it is written: the ids of a
    probe text and of a chat must come out the same, or the file would tokenize differently from the checkpoint."""
    from lynx.tokenizer import PRE_TOKENIZER_PROBE, Tokenizer, gguf_tokenizer_metadata, tokenizer_parts_from_gguf

    try:
        metadata = gguf_tokenizer_metadata(tokenizer, vocab_size)
        parts = tokenizer_parts_from_gguf(metadata.get, f"{tokenizer.source} as GGUF")
    except ValueError as e:
        raise GGUFExportError(f"cannot write the tokenizer to GGUF: {e}") from None
    written = Tokenizer(parts.pop("hf"), source=f"{tokenizer.source} as GGUF", **parts)
    checks = [("a probe text", lambda t: t.encode(PRE_TOKENIZER_PROBE))]
    if tokenizer.exported_chat_template:
        checks.append(("a chat", lambda t: t.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=False)))
    for what, ids in checks:
        expected, got = ids(tokenizer), ids(written)
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            raise GGUFExportError(f"cannot write the tokenizer of {tokenizer.source} to GGUF faithfully: {what} "
                                  f"tokenizes differently from token {at} on ({expected[at:at + 5]} vs "
                                  f"{got[at:at + 5]})")
    return metadata


def _add_metadata(writer: gguf.GGUFWriter, cfg: LlamaConfig, file_type, name: str, tokenizer_metadata: dict) -> None:
    """The keys convert_hf_to_gguf.py writes for a Llama (read back by lynx.weights.gguf_read.read_gguf_config)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in tokenizer_metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def write_gguf(state_dict: dict[str, torch.Tensor], cfg: LlamaConfig, tokenizer, path: str | Path, type_name: str,
               *, name: str = "lynx", force: bool = False, progress: bool = True) -> Path:
    """Write `state_dict` (our parameter names, any dtype and device) as a GGUF file of type `type_name`.

    Tensor infos go first, then each tensor is converted (permuted, quantized) and written before the next is read:
    memory beyond the model is one tensor in fp32 plus its encoding. The file is written under a temporary name in
    the same folder and renamed at the end; on any error that file is removed. An existing `path` is an error
    unless `force`."""
    path = Path(path)
    weights_type, file_type = gguf_type(type_name)
    if path.exists() and not force:
        raise GGUFExportError(f"{path} exists (pass --force to replace it)")
    if tokenizer is None:
        raise GGUFExportError("no tokenizer: a GGUF file carries its tokenizer (llama.cpp cannot run without one)")
    tokenizer_metadata = _tokenizer_metadata(tokenizer, cfg.vocab_size)

    tensors = []  # (gguf name, fp32 numpy getter, shape, type)
    factors = rope_freqs(cfg)
    if factors is not None:
        tensors.append((ROPE_FREQS, lambda: factors, factors.shape, Q.F32))
    for ours, t in state_dict.items():
        if ours == "head.lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        kind, gname = gguf_tensor(ours)
        head_dim = cfg.head_dim if kind in ROTARY_TENSORS else None

        def values(t=t, head_dim=head_dim):
            w = t.detach().to(device="cpu", dtype=torch.float32)
            return (permute_rows(w, head_dim) if head_dim else w).numpy()

        shape = tuple(t.shape)
        tensors.append((gname, values, shape, tensor_type(kind, shape, weights_type, cfg.tie_word_embeddings)))

    writer = gguf.GGUFWriter(None, ARCHITECTURE)
    _add_metadata(writer, cfg, file_type, name, tokenizer_metadata)
    for gname, _, shape, qtype in tensors:
        n_bytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), n_bytes, raw_dtype=qtype)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the final rename is atomic
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm

            tensors = tqdm(tensors, desc=f"writing GGUF {type_name}", unit="tensor")
        for gname, values, _, qtype in tensors:
            writer.write_tensor_data(gguf.quants.quantize(values(), qtype))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
