"""Reading GGUF checkpoints (llama.cpp's format), architecture `llama`: config from the metadata, weights dequantized
by `gguf.quants` tensor by tensor straight into the model's preallocated tensors, and `read_field`, the one reader of
a metadata value (the GGUF tokenizer in lynx.tokenizer reads its fields with it too).

What llama.cpp's convert_hf_to_gguf.py changes, and how it is undone here:
- tensor names (token_embd, blk.N.attn_q, ...): mapped back to ours (lynx.weights.gguf_layout);
- the rows of attn_q and attn_k are permuted per head for llama.cpp's interleaved rotary layout: un-permuted, exactly
  as transformers' GGUF loader does, back to Hugging Face's rotate-half layout (lynx.weights.gguf_layout);
- Llama-3.1 "llama3" rope scaling is not stored as metadata but as a tensor, rope_freqs.weight, of per-frequency
  divisors. transformers' GGUF loader (5.x) ignores that tensor and runs such files with unscaled rope; we recover the
  four "llama3" parameters from it (`llama3_scaling_from_rope_freqs`), so the model computes what llama.cpp and the
  original checkpoint compute, and a converted folder carries the scaling in its config.json.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import mmap
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch

from lynx.config import ConfigError, LlamaConfig
from lynx.weights.errors import GGUFError, raise_mismatch
from lynx.weights.gguf_layout import ARCHITECTURE, ROPE_FREQS, ROTARY_TENSORS, gguf_name, gguf_tensor, unpermute_rows

# At most this many bytes of fp32 values are dequantized at a time (the only temporary memory besides the model).
DEQUANT_CHUNK_BYTES = 2 * 2**20


# --- reading the file -----------------------------------------------------------------------------------------


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader (memory-mapped) over a readable GGUF file, or a GGUFError that says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        # The reader indexes its memory map as the header dictates: a short file fails as a short read.
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise GGUFError(f"{path}: big-endian GGUF files are not supported")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte "
                            f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def read_field(reader: gguf.GGUFReader, key: str, default=None):
    """The value of metadata `key` (`default` when the file lacks it)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _check_architecture(reader: gguf.GGUFReader, path) -> None:
    arch = read_field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (only {ARCHITECTURE!r})")


def read_gguf_config(path: str | Path, reader: gguf.GGUFReader | None = None) -> LlamaConfig:
    """The model configuration stored in a llama-architecture GGUF file: keys as convert_hf_to_gguf.py writes them,
    read as transformers' GGUF loader reads them, plus the rope scaling stored as rope_freqs.weight (which
    transformers ignores; see the module docstring)."""
    reader = reader or open_gguf(path)
    _check_architecture(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def key(name, default=None, required=False):
        value = read_field(reader, f"{ARCHITECTURE}.{name}", default)
        if required and value is None:
            raise GGUFError(f"{path}: missing metadata key {ARCHITECTURE}.{name!r}")
        return value

    if key("expert_count", 0):
        raise GGUFError(f"{path}: {ARCHITECTURE}.expert_count = {key('expert_count')}: mixture-of-experts (Mixtral) "
                        "files are not supported")
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type != "none" and not (scaling_type == "linear" and key("rope.scaling.factor", 1.0) == 1.0):
        raise GGUFError(f"{path}: unsupported rope scaling {ARCHITECTURE}.rope.scaling.type = {scaling_type!r}")

    hidden_size = key("embedding_length", required=True)
    num_heads = key("attention.head_count", required=True)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden_size // num_heads
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings ({ARCHITECTURE}.rope.dimension_count = "
                        f"{key('rope.dimension_count')}, head dim {head_dim}) are not supported")
    vocab_size = key("vocab_size")
    if vocab_size is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab_size = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab_size is None and "token_embd.weight" in tensors:
        vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes list the fastest dimension first
    if vocab_size is None:
        raise GGUFError(f"{path}: no vocabulary size ({ARCHITECTURE}.vocab_size, tokenizer.ggml.tokens)")
    # llama.cpp's (and transformers') default base when the key is absent; LlamaConfig's default is Llama-3's.
    rope_theta = float(key("rope.freq_base", 10000.0))

    try:
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=key("feed_forward_length", required=True),
            num_hidden_layers=key("block_count", required=True),
            num_attention_heads=num_heads,
            num_key_value_heads=key("attention.head_count_kv") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=key("context_length", required=True),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", required=True)),
            rope_theta=rope_theta,
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id"),
            torch_dtype="float32",
        )
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None
    if ROPE_FREQS in tensors:
        factors = _dequantize(tensors[ROPE_FREQS], path)
        cfg.rope_scaling = llama3_scaling_from_rope_freqs(factors, cfg, path)
    return cfg


# --- Llama-3.1 rope scaling -----------------------------------------------------------------------------------


def llama3_scaling_from_rope_freqs(factors: np.ndarray, cfg: LlamaConfig, path="GGUF file") -> dict | None:
    """The "llama3" rope_scaling dict whose frequencies equal llama.cpp's rope_freqs (inv_freq / factors).

    convert_hf_to_gguf.py writes factors of 1 for short wavelengths, `factor` for long ones and
    1 / ((1 - s) / factor + s) between, with s = (old / wavelen - low) / (high - low). s is linear in 1 / wavelen, so
    two or more in-between frequencies (Llama-3.x have 3 to 7) give the parameters. Only the ratios old / low and
    old / high matter; low_freq_factor = 1 (Meta's value) makes original_max_position_embeddings the low-frequency
    boundary wavelength, as in Meta's configs."""
    from lynx.rope import rope_inv_freq

    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (cfg.head_dim // 2,):
        raise GGUFError(f"{path}: {ROPE_FREQS} has {factors.size} values, expected head_dim / 2 = {cfg.head_dim // 2}")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    wavelen = 2 * math.pi * cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    factor = float(factors.max())
    between = (factors > 1 + 1e-6) & (factors < factor - 1e-6 * factor)
    cannot = f"{path}: {ROPE_FREQS} is not a Llama-3.1 (\"llama3\") rope scaling we can recover"
    if between.sum() < 2 or factor <= 1:
        raise GGUFError(f"{cannot}: it needs two or more interpolated frequencies, it has {int(between.sum())}")
    s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[between], s, 1)
    if intercept >= 0:
        raise GGUFError(f"{cannot}: the interpolated band does not follow the llama3 rule")
    high = 1 - 1 / intercept
    old = -slope / intercept
    scaling = {
        "factor": _tidy(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": _tidy(high),
        "original_max_position_embeddings": round(old) if abs(old - round(old)) < 1e-3 * old else old,
    }
    # Check against what the model will compute, not against the formula above.
    unscaled = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    ours = (unscaled / rope_inv_freq(dataclasses.replace(cfg, rope_scaling=scaling))).double().numpy()
    if not np.allclose(ours, factors, rtol=1e-4, atol=0):
        worst = float(np.abs(ours / factors - 1).max())
        raise GGUFError(f"{cannot}: the best llama3 fit {scaling} is off by {worst:.1e} (relative)")
    return scaling


def _tidy(x: float) -> float:
    """8.000000476837158 -> 8.0: the fp32 file and the fit leave noise in the last digits."""
    return float(f"{x:.6g}")


# --- weights --------------------------------------------------------------------------------------------------


def _dequantize(tensor, path, rows: slice = slice(None)) -> np.ndarray:
    """fp32 values of `tensor` (all of it, or a slice of its rows) via gguf.quants."""
    data = tensor.data[rows] if tensor.data.ndim > 1 else tensor.data
    try:
        values = gguf.quants.dequantize(data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf.quants "
                        f"cannot dequantize ({e})") from e
    # F32 comes back as a read-only view of the memory map; torch wants writable memory.
    return values if values.flags.writeable else values.copy()


def _release_pages(data: np.memmap, offset: int, n_bytes: int) -> None:
    """Drop the file pages of bytes [offset, offset + n_bytes) from our resident memory (they stay in the page cache):
    without it, a file read through the memory map stays resident to the end and peak memory is the model plus the
    whole file. Called per chunk: a large tensor's pages (a 49k-row embedding: 30 MB) do not pile up either."""
    mm = getattr(data, "_mmap", None)  # the memory map under a numpy.memmap view; if absent we only lose the saving
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, offset + n_bytes - start)


def _copy_tensor(tensor: GGUFTensor, target: torch.Tensor, head_dim: int | None, path) -> None:
    """Dequantize `tensor` into `target` in row chunks of at most DEQUANT_CHUNK_BYTES of fp32 (whole heads when
    head_dim is given: the q/k un-permutation works per head)."""
    if target.dim() == 1:
        target.copy_(torch.from_numpy(_dequantize(tensor, path)))
        _release_pages(tensor.data, tensor.data_offset, tensor.n_bytes)
        return
    n_rows, row_bytes = target.shape[0], target.shape[1] * 4
    file_row_bytes = tensor.n_bytes // n_rows
    step = max(1, DEQUANT_CHUNK_BYTES // row_bytes)
    if head_dim:
        step = max(head_dim, step // head_dim * head_dim)
    for start in range(0, n_rows, step):
        rows = slice(start, min(start + step, n_rows))
        chunk = torch.from_numpy(_dequantize(tensor, path, rows))
        if head_dim:
            chunk = unpermute_rows(chunk, head_dim)
        target[rows].copy_(chunk)
        _release_pages(tensor.data, tensor.data_offset + start * file_row_bytes, (rows.stop - start) * file_row_bytes)


class GGUFTensor(NamedTuple):
    """What loading needs of one of the reader's tensor records."""
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # as GGUF lists it: the fastest dimension first
    data_offset: int
    n_bytes: int
    data: np.memmap  # the tensor's bytes (or values, for float types): a view of the memory map


def tensor_table(reader: gguf.GGUFReader) -> dict[str, GGUFTensor]:
    """The reader's tensors by name, as GGUFTensor records. Once the metadata is freed, the reader's own records
    (ReaderTensor, each with a ReaderField of six numpy views) keep ~40 MB of the parse's small-object memory
    resident (SmolLM2); these do not, so a loader can drop the reader before it allocates the weights."""
    return {t.name: GGUFTensor(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset),
                               int(t.n_bytes), t.data) for t in reader.tensors}


def load_gguf_state_dict_into(model: torch.nn.Module, path: str | Path, *, tensors: dict[str, GGUFTensor] | None = None,
                              progress: bool = False) -> None:
    """Dequantize a GGUF file's tensors into `model`'s (already allocated) tensors, one at a time. Strict like the
    safetensors loader: missing, unexpected or wrongly shaped tensors raise one error listing all of them.
    rope_freqs.weight is configuration (see `read_gguf_config`), not a weight. `tensors`: the `tensor_table` of a
    file already checked by read_gguf_config (the file is opened here when None)."""
    path = Path(path)
    if tensors is None:
        reader = open_gguf(path)
        _check_architecture(reader, path)
        tensors = tensor_table(reader)
        del reader
    cfg = model.config
    ours = model.state_dict()
    wanted = {gguf_name(n): n for n in ours if not (cfg.tie_word_embeddings and n == "head.lm_head.weight")}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted) - {ROPE_FREQS})
    wrong_shape, to_copy = [], []
    for name in sorted(set(wanted) & set(tensors)):
        target = ours[wanted[name]]
        shape = tuple(reversed(tensors[name].shape))  # GGUF lists the fastest dimension first
        if shape != tuple(target.shape):
            wrong_shape.append(f"{name}: file {shape} vs model {tuple(target.shape)}")
        else:
            to_copy.append((name, target))
    raise_mismatch(GGUFError, f"GGUF file {path}", missing, unexpected, wrong_shape)

    if progress:
        from tqdm import tqdm

        to_copy = tqdm(to_copy, desc="dequantizing GGUF tensors", unit="tensor")
    for name, target in to_copy:
        permuted = gguf_tensor(wanted[name])[0] in ROTARY_TENSORS
        _copy_tensor(tensors[name], target, cfg.head_dim if permuted else None, path)


def load_gguf(cls, path: str | Path, *, dtype=None, device="cpu", progress: bool = False):
    """`cls` (lynx.model.Llama) from a GGUF file: built on the meta device, allocated once at `dtype` (default
    float32) on `device`, filled tensor by tensor."""
    path = Path(path)
    reader = open_gguf(path)
    cfg = read_gguf_config(path, reader)
    # The reader holds every metadata value as numpy views: a vocabulary's ~100k token and merge strings take ~100 MB,
    # more than a small model's weights in bf16. The weights need none of it: keep the tensor table, drop the rest
    # before allocating (measured by benchmarks/bench_gguf_load.py).
    tensors = tensor_table(reader)
    del reader
    gc.collect()
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype=dtype or torch.float32).to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        load_gguf_state_dict_into(model, path, tensors=tensors, progress=progress)
    return model.eval()
