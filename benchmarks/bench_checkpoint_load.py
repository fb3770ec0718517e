"""Peak memory of loading a Hugging Face Llama checkpoint: lynx.model.Llama.from_pretrained vs transformers.

Builds a random Llama checkpoint of at least 1 GB in a temporary directory (deleted afterwards unless --keep),
then loads it in a fresh subprocess per loader and reports

    (peak RSS during the load - RSS just before the load) / checkpoint size

where peak RSS is the process's ru_maxrss. A loader that holds one copy of the weights scores about 1.0; one that
materialises a second copy (a random init, or a full state dict next to the model) scores about 2.0.

    python benchmarks/bench_checkpoint_load.py                 # ~1.2 GB bf16 checkpoint (about 600M parameters)
    python benchmarks/bench_checkpoint_load.py --layers 16 --max-shard-size 500MB
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    """Current resident set size (includes file pages mapped by safetensors' mmap, as ru_maxrss does)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (this benchmark needs Linux)")


def measure(loader: str, path: str, dtype_name: str) -> dict:
    """Runs in a fresh subprocess: import everything, note RSS, load, note peak RSS."""
    import torch

    dtype = getattr(torch, dtype_name)
    if loader == "lynx":
        from lynx.model import Llama

        def load():
            return Llama.from_pretrained(path, dtype=dtype)
    elif loader == "transformers":
        from transformers import AutoModelForCausalLM

        def load():
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        raise ValueError(f"unknown loader {loader!r}")

    baseline = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "loader": loader, "baseline_rss": baseline, "peak_rss": peak, "peak_before_load": peak_before,
        "rss_after_load": rss_bytes(), "seconds": seconds, "params": n_params,
    }


def build_checkpoint(path: Path, args) -> int:
    """Random weights written by our save_pretrained (allocated once, directly in the target dtype)."""
    import torch

    from lynx.config import LlamaConfig
    from lynx.model import Llama

    cfg = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        torch_dtype=args.dtype,
    )
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to(getattr(torch, args.dtype)).to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path, max_shard_size=args.max_shard_size)
    del model
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=1536)
    parser.add_argument("--intermediate-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the checkpoint and of the loaded model")
    parser.add_argument("--max-shard-size", default="5GB", help='shard limit for the written checkpoint, e.g. "500MB"')
    parser.add_argument("--min-size-gb", type=float, default=1.0, help="refuse smaller checkpoints (default 1 GB)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary checkpoint (default: system tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.dtype)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="lynx-bench-load-", dir=args.dir))
    try:
        ckpt = workdir / "checkpoint"
        start = time.perf_counter()
        size = build_checkpoint(ckpt, args)
        n_files = len(list(ckpt.glob("*.safetensors")))
        print(f"checkpoint: {size / 1e9:.2f} GB in {n_files} safetensors file(s), {args.dtype}, "
              f"written in {time.perf_counter() - start:.0f}s ({ckpt})")
        if size < args.min_size_gb * 1e9:
            sys.exit(f"error: checkpoint is {size / 1e9:.2f} GB, below --min-size-gb {args.min_size_gb}")

        results = {}
        for loader in ("transformers", "lynx"):  # transformers is the baseline
            cmd = [sys.executable, os.path.abspath(__file__), "--dtype", args.dtype, "--child", loader, str(ckpt)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results[loader] = r = json.loads(out.stdout.strip().splitlines()[-1])
            r["ratio"] = (r["peak_rss"] - r["baseline_rss"]) / size
            print(f"{loader:>12}: {r['params'] / 1e6:.0f}M params loaded in {r['seconds']:.1f}s; RSS before "
                  f"{r['baseline_rss'] / 1e9:.2f} GB, peak {r['peak_rss'] / 1e9:.2f} GB, after "
                  f"{r['rss_after_load'] / 1e9:.2f} GB -> (peak - before) / checkpoint = {r['ratio']:.2f}")
        lynx, hf = results["lynx"], results["transformers"]
        print(f"peak load memory / checkpoint size: lynx {lynx['ratio']:.2f}, transformers {hf['ratio']:.2f} "
              f"(lynx / transformers = {lynx['ratio'] / hf['ratio']:.2f}); "
              f"load time lynx / transformers = {lynx['seconds'] / hf['seconds']:.2f}")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
