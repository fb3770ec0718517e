"""Checkpoint conversion.

    python -m lynx.convert gguf IN.gguf OUT_DIR [--dtype float32|bfloat16]

writes a Hugging Face folder (config.json, generation_config.json, model.safetensors, tokenizer files) from a
llama-architecture GGUF file; transformers' AutoModelForCausalLM / AutoTokenizer and lynx load it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lynx.checkpoint import CheckpointError
from lynx.config import DTYPES, ConfigError


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """GGUF file -> Hugging Face folder; returns out_dir. Model and tokenizer are both read before anything is
    written, so a file we cannot fully convert leaves no folder behind."""
    from lynx.gguf import load_gguf
    from lynx.model import Llama
    from lynx.tokenizer import Tokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model = load_gguf(Llama, gguf_path, dtype=dtype, progress=True)
    tokenizer = Tokenizer.from_pretrained(gguf_path)
    model.save_pretrained(out_dir)  # atomic: replaces out_dir as a whole, so the tokenizer files come after
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    try:
        out = convert_gguf(args.input, args.output, dtype=DTYPES[args.dtype])
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
