"""Training runs on disk, as a dashboard reads them: the state file the trainer keeps (lynx.train.run_state), its
metrics and checkpoints.

    python -m lynx.runs                      # every run under runs/: state, step, loss, tokens/s, ETA, checkpoint
    python -m lynx.runs runs/a runs/b --plot curves.png
    python -m lynx.runs --watch              # refresh every 10 s until Ctrl-C

A run directory holds `config.yaml`, `metrics.jsonl` (one line per optimizer step), `checkpoints/step_N/`,
`summary.json` (at the end) and `state.json`, which rank 0 rewrites at start, after every step (the heartbeat) and
at exit: `running`, then `finished`, `paused` (stop_after_step), `failed` (with the error) or `stopped` (with the
signal). A run killed without warning (SIGKILL, out of memory, a lost node) still says `running`; the dashboard
shows it as `died` when its process is gone from this host, or `unresponsive` when its heartbeat is older than
--stale-after seconds. No torch import here (nor any of lynx.train), so the dashboard starts at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones keep their .tmp name and are never listed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "train_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


# --- reading runs -------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete line of metrics.jsonl (a line being written or cut short by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path, now: float | None = None, stale_after: float = 600.0) -> dict:
    """What the dashboard shows for one run, as data: state, step, total_steps, loss, tokens_per_s, eta_s,
    checkpoint (newest complete step or None), heartbeat_age_s and detail (error, signal, ...)."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    state = _read_json(run_dir / STATE_FILE)
    summary = _read_json(run_dir / "summary.json")
    records = read_metrics(run_dir)
    last = records[-1] if records else {}
    checkpoints = complete_checkpoints(run_dir)
    status = {
        "run": str(run_dir), "state": "unknown", "detail": "", "step": last.get("step", 0), "total_steps": None,
        "loss": last.get("loss"), "tokens_per_s": None, "eta_s": None,
        "checkpoint": int(STEP_DIR.match(checkpoints[-1].name).group(1)) if checkpoints else None,
        "heartbeat_age_s": None,
    }
    recent = [r for r in records[-20:] if "step_time_s" in r]
    if recent:
        status["tokens_per_s"] = sum(r["tokens"] for r in recent) / sum(r["step_time_s"] for r in recent)
    if state is not None:
        status["total_steps"] = state.get("total_steps")
        status["heartbeat_age_s"] = now - state["heartbeat_at"]
        status["step"] = max(status["step"], state.get("step", 0))
        status["state"] = state["state"]
        if state["state"] == "running":
            if state.get("host") == socket.gethostname() and not _pid_alive(state["pid"]):
                status["state"], status["detail"] = "died", f"process {state['pid']} is gone (killed without warning?)"
            elif status["heartbeat_age_s"] > stale_after:
                status["state"] = "unresponsive"
                status["detail"] = f"no heartbeat for {status['heartbeat_age_s']:.0f} s"
        elif state["state"] == "failed":
            status["detail"] = state.get("error", "")
        elif state["state"] == "stopped":
            status["detail"] = f"by {state.get('signal', 'a signal')}"
        if state.get("restart_count"):
            status["detail"] = (status["detail"] + f" (restart {state['restart_count']})").strip()
    elif summary is not None:  # a run from before state.json existed
        status["state"] = "finished" if summary.get("finished") else "paused"
        status["total_steps"] = summary.get("total_steps")
    if status["state"] == "running" and recent and status["total_steps"]:
        per_step = sum(r["step_time_s"] for r in recent) / len(recent)
        status["eta_s"] = max(status["total_steps"] - status["step"], 0) * per_step
    return status


def find_runs(root: Path) -> list[Path]:
    """Directories under `root` that hold a run (state.json or metrics.jsonl), sorted."""
    root = Path(root)
    found = {p.parent for name in (STATE_FILE, "metrics.jsonl") for p in root.rglob(name)}
    return sorted(p for p in found if "checkpoints" not in p.parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def format_table(statuses: list[dict]) -> str:
    header = ["run", "state", "step", "loss", "tokens/s", "eta", "checkpoint", "detail"]
    rows = []
    for s in statuses:
        step = f"{s['step']}/{s['total_steps']}" if s["total_steps"] else str(s["step"])
        rows.append([
            s["run"], s["state"], step, f"{s['loss']:.4f}" if s["loss"] is not None else "-",
            f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] is not None else "-", _duration(s["eta_s"]),
            f"step {s['checkpoint']}" if s["checkpoint"] is not None else "-", s["detail"],
        ])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Loss, learning rate, gradient norm and tokens/s against step, one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        for ax, (key, _) in zip(axes.flat, panels):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), label=str(run_dir), linewidth=1)
    for ax, (key, title) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "loss":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lynx.runs",
        description="One line per training run: state (running, finished, paused, failed, stopped by a signal, died, "
        "unresponsive), step/max_steps, loss, tokens/s over the last 20 steps, ETA and the newest complete "
        "checkpoint. Reads <run_dir>/state.json, metrics.jsonl and checkpoints/ (nothing is written).",
    )
    parser.add_argument("runs", nargs="*", type=Path,
                        help="run directories, or directories to search for runs (default: runs/)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write loss/lr/grad-norm/tokens-per-s curves")
    parser.add_argument("--watch", type=float, nargs="?", const=10.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print the statuses as JSON lines instead of a table")
    parser.add_argument("--stale-after", type=float, default=600.0, metavar="SECONDS",
                        help="a running run with no heartbeat for this long is shown as unresponsive (default 600)")
    args = parser.parse_args(argv)

    targets = args.runs or [Path("runs")]
    for t in targets:
        if not t.is_dir():
            print(f"lynx.runs: error: {t} is not a directory", file=sys.stderr)
            return 2
    while True:
        run_dirs = []
        for t in targets:
            run_dirs += [t] if (t / STATE_FILE).is_file() or (t / "metrics.jsonl").is_file() else find_runs(t)
        statuses = [run_status(r, stale_after=args.stale_after) for r in run_dirs]
        if args.json:
            text = "\n".join(json.dumps(s) for s in statuses)
        else:
            text = format_table(statuses) if statuses else f"no runs under {', '.join(map(str, targets))}"
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + text, flush=True)
        else:
            print(text)
        if args.plot:
            plot_runs(run_dirs, args.plot)
        if not args.watch:
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
