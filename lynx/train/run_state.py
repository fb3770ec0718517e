"""<run_dir>/state.json, which python -m lynx.runs reads: the run's state (running, then finished, paused, failed or
stopped), its step and a heartbeat."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from lynx.runs import STATE_FILE


def write_json_atomic(path: Path, obj: dict) -> None:
    """Readers never see a half-written file: write a sibling, then rename over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class RunState:
    """<run_dir>/state.json, written by rank 0 only (the others hold a disabled instance).

    Use as a context manager around the whole run: an exception marks the run failed, SIGTERM/SIGINT/SIGHUP mark it
    stopped and then end the process as the signal would have (so torchrun and Slurm see the usual exit status)."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
    HEARTBEAT_S = 5.0  # beat() writes at most this often: the step count is in metrics.jsonl anyway

    def __init__(self, run_dir: Path, enabled: bool, world_size: int = 1):
        self.path = Path(run_dir) / STATE_FILE
        self.enabled = enabled
        self.state = {
            "state": "running", "pid": os.getpid(), "host": socket.gethostname(), "world_size": world_size,
            # torchrun counts restarts of the worker group (--max-restarts) in this variable.
            "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            "started_at": time.time(), "heartbeat_at": time.time(), "step": 0, "total_steps": None,
        }
        self._previous_handlers = {}
        self._last_write = 0.0

    def __enter__(self) -> "RunState":
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()
            if threading.current_thread() is threading.main_thread():
                for name in self.SIGNALS:
                    sig = getattr(signal, name)
                    self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
        if exc is not None and self.state["state"] == "running":
            self.update(state="failed", error=f"{exc_type.__name__}: {exc}", ended_at=time.time())

    def update(self, **fields) -> None:
        """Merge `fields` (step, total_steps, state, ...) and write; every call is also a heartbeat."""
        self.state.update(fields, heartbeat_at=time.time())
        if self.enabled:
            self._write()

    def beat(self, **fields) -> None:
        """update(), but written at most every HEARTBEAT_S seconds (a training step calls it)."""
        if time.time() - self._last_write >= self.HEARTBEAT_S:
            self.update(**fields)
        else:
            self.state.update(fields)

    def end(self, finished: bool) -> None:
        self.update(state="finished" if finished else "paused", ended_at=time.time())

    def _write(self) -> None:
        write_json_atomic(self.path, self.state)
        self._last_write = time.time()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.update(state="stopped", signal=name, ended_at=time.time())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
