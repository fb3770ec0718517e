"""Checkpoint conversion, both ways between Hugging Face folders and llama.cpp GGUF files.

    python -m lynx.convert gguf IN.gguf OUT_DIR [--dtype float32|bfloat16]
    python -m lynx.convert to-gguf DIR OUT.gguf [--type f32|f16|bf16|q8_0|q4_0|q4_1] [--force]

`gguf` writes a Hugging Face folder (config.json, generation_config.json, model.safetensors, tokenizer files) from a
llama-architecture GGUF file; transformers' AutoModelForCausalLM / AutoTokenizer and lynx load it. `to-gguf` writes a
GGUF file of architecture llama from a Hugging Face Llama folder (ours, transformers', or one `gguf` converted), for
llama.cpp, ollama or LM Studio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lynx.config import DTYPES, ConfigError
from lynx.weights import CheckpointError, GGUFExportError


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """GGUF file -> Hugging Face folder; returns out_dir. Model and tokenizer are both read before anything is
    written, so a file we cannot fully convert leaves no folder behind."""
    from lynx.model import Llama
    from lynx.tokenizer import Tokenizer
    from lynx.weights.gguf_read import load_gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model = load_gguf(Llama, gguf_path, dtype=dtype, progress=True)
    tokenizer = Tokenizer.from_pretrained(gguf_path)
    model.save_pretrained(out_dir)  # atomic: replaces out_dir as a whole, so the tokenizer files come after
    tokenizer.save_pretrained(out_dir)
    return out_dir


def convert_to_gguf(folder: str | Path, path: str | Path, type_name: str, *, force: bool = False,
                    progress: bool = True) -> Path:
    """A Hugging Face Llama folder (config.json, safetensors, tokenizer) -> a GGUF file; returns its path."""
    from lynx.model import Llama
    from lynx.tokenizer import Tokenizer
    from lynx.weights.gguf_write import gguf_type, write_gguf

    folder, path = Path(folder), Path(path)
    gguf_type(type_name)  # refuse a bad type or an existing output before reading anything
    if path.exists() and not force:
        raise GGUFExportError(f"{path} exists (pass --force to replace it)")
    if not (folder / "config.json").is_file():
        raise GGUFExportError(f"{folder} is not a Hugging Face Llama checkpoint: no config.json")
    try:
        model = Llama.from_pretrained(folder)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise GGUFExportError(f"{folder} is not a Llama checkpoint we can export: {e}") from None
    try:
        tokenizer = Tokenizer.from_pretrained(folder)
    except (FileNotFoundError, ValueError) as e:
        raise GGUFExportError(f"{folder}: no tokenizer we can read ({e})") from None
    return write_gguf(model.state_dict(), model.config, tokenizer, path, type_name, name=folder.resolve().name,
                      force=force, progress=progress)


def main(argv: list[str] | None = None) -> int:
    from lynx.weights.gguf_write import GGUF_TYPES

    parser = argparse.ArgumentParser(prog="python -m lynx.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    from_gguf = formats.add_parser(
        "gguf", help="llama.cpp GGUF file (architecture llama) -> Hugging Face folder",
        description="Dequantize a llama-architecture GGUF file (any type gguf.quants dequantizes: F32, F16, BF16, "
                    "Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K, ...) and write a Hugging Face folder: config.json, "
                    "generation_config.json, model.safetensors and the tokenizer from the GGUF metadata.")
    from_gguf.add_argument("input", type=Path, metavar="IN.gguf", help="the GGUF file")
    from_gguf.add_argument("output", type=Path, metavar="OUT_DIR", help="folder to write (replaced if it exists)")
    from_gguf.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                           help="dtype of the written weights (default float32: the dequantized values exactly; "
                                "bfloat16 halves the size and rounds them)")
    to_gguf = formats.add_parser(
        "to-gguf", help="Hugging Face Llama folder -> llama.cpp GGUF file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a GGUF file (architecture llama) from a Hugging Face Llama folder, as llama.cpp's "
                    "convert_hf_to_gguf.py would: llama.cpp's tensor names and q/k row order, Llama-3.1 rope scaling "
                    "as a rope_freqs tensor, no output.weight when the embeddings are tied, the tokenizer and chat "
                    "template in the metadata.\n\n"
                    "Tensor types: the 1-D tensors (norms, rope_freqs) stay F32 whatever --type says; the 2-D "
                    "weights get --type. With q4_0 / q4_1 the output tensor (the token embedding when tied) is "
                    "Q8_0, as llama-quantize keeps it at higher precision. A weight whose rows do not split into "
                    "whole 32-value blocks falls back to F16.\n\n"
                    "K-quants (Q4_K_M, the published Lynx type): write f16 or bf16 here, then run llama.cpp's "
                    "`llama-quantize OUT.gguf OUT-Q4_K_M.gguf Q4_K_M`.")
    to_gguf.add_argument("input", type=Path, metavar="DIR", help="Hugging Face Llama folder (with its tokenizer)")
    to_gguf.add_argument("output", type=Path, metavar="OUT.gguf", help="the GGUF file to write")
    to_gguf.add_argument("--type", default="f16", metavar="|".join(GGUF_TYPES),
                         help="type of the 2-D weights (default f16)")
    to_gguf.add_argument("--force", action="store_true", help="replace OUT.gguf if it exists")
    args = parser.parse_args(argv)
    try:
        if args.format == "to-gguf":
            out = convert_to_gguf(args.input, args.output, args.type, force=args.force)
        else:
            out = convert_gguf(args.input, args.output, dtype=DTYPES[args.dtype])
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
