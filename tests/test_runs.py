"""Run state and the runs dashboard (python -m lynx.runs), on real runs: finished, paused, failed, stopped by
SIGTERM, killed with SIGKILL, and a 2-process torchrun whose worker is killed once and restarted (--max-restarts 1);
the cluster launch scripts' --dry-run against the README's torchrun command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import LLAMA3_TOKENIZER_DIR, REPO
from lynx import runs
from lynx.train import load_config, train
from trainer_helpers import TINY_MODEL, free_port, metrics, synthetic_examples, tiny_overrides

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("one_thread")


def dashboard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lynx.runs", *args], capture_output=True, text=True, cwd=REPO,
                          env=ENV, timeout=60)


def row_of(table: str, run_dir: Path) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(str(run_dir)))
    return line.split()


# --- in-process runs ----------------------------------------------------------------------------------------------


def test_finished_and_paused_runs(tmp_path):
    done, paused = tmp_path / "done", tmp_path / "paused"
    train(load_config(None, tiny_overrides(done, **{"checkpoint.every_steps": 2})), examples=synthetic_examples())
    train(load_config(None, tiny_overrides(paused, stop_after_step=2)), examples=synthetic_examples())

    state = json.loads((done / "state.json").read_text())
    assert state["state"] == "finished" and state["step"] == 4 and state["total_steps"] == 4
    assert state["pid"] == os.getpid() and state["ended_at"] >= state["started_at"]
    status = runs.run_status(done)
    assert status["state"] == "finished" and status["step"] == 4 and status["checkpoint"] == 4
    assert status["loss"] == metrics(done)[-1]["loss"] and status["eta_s"] is None
    assert runs.run_status(paused)["state"] == "paused" and runs.run_status(paused)["checkpoint"] == 2

    shown = dashboard(str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert row_of(shown.stdout, done)[1:3] == ["finished", "4/4"]
    assert row_of(shown.stdout, paused)[1:3] == ["paused", "2/4"]
    assert row_of(shown.stdout, done)[-2:] == ["step", "4"]

    # Relaunching the paused run resumes it and the state follows.
    train(load_config(None, tiny_overrides(paused)), examples=synthetic_examples())
    assert runs.run_status(paused)["state"] == "finished"

    png = tmp_path / "curves.png"
    assert dashboard(str(done), str(paused), "--plot", str(png)).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failure_is_recorded_with_its_error(tmp_path):
    run_dir = tmp_path / "failed"
    missing = tmp_path / "no_such_file.jsonl"
    cfg = load_config(None, tiny_overrides(run_dir, **{"model.tokenizer": str(LLAMA3_TOKENIZER_DIR),
                                                       "data.train": str(missing)}))
    with pytest.raises(FileNotFoundError):
        train(cfg)
    status = runs.run_status(run_dir)
    assert status["state"] == "failed" and "no_such_file.jsonl" in status["detail"]
    assert row_of(dashboard(str(run_dir)).stdout, run_dir)[1] == "failed"


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "tb"
    train(load_config(None, tiny_overrides(run_dir, **{"log.tensorboard": "true"})), examples=synthetic_examples())
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in metrics(run_dir)]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [1, 2, 3, 4]
    torch.testing.assert_close([v for _, v in losses], [v for _, v in expected], rtol=1e-6, atol=0)


# --- runs in their own processes, killed ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "chat.jsonl"
    words = "the judge reads a document and an answer then says pass or fail with its reasons".split()
    rows = [{"prompt": " ".join(words[i % 7:] + words[: i % 7]), "response": " ".join(words[i % 5: i % 5 + 6])}
            for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli_overrides(run_dir: Path, chat_file: Path, **extra) -> list[str]:
    """A tiny model with the Llama-3 tokenizer (all 128,256 ids) training on chat_file for many short steps."""
    model = {**TINY_MODEL, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128009}
    return tiny_overrides(run_dir, **{"model.config": json.dumps(model), "model.tokenizer": str(LLAMA3_TOKENIZER_DIR),
                                      "data.train": str(chat_file), "max_steps": 400, "checkpoint.every_steps": 3,
                                      "checkpoint.export": "false", "global_batch_size": 2, **extra})


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def steps_logged(run_dir: Path) -> int:
    return len(runs.read_metrics(run_dir))


def start_train(run_dir: Path, chat_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *cli_overrides(run_dir, chat_file)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigterm_is_recorded_as_stopped(tmp_path, chat_file):
    run_dir = tmp_path / "term"
    proc = start_train(run_dir, chat_file)
    try:
        wait_for(lambda: steps_logged(run_dir) >= 3, 300, "three steps", proc)
        live = runs.run_status(run_dir)
        assert live["state"] == "running" and live["total_steps"] == 400 and live["eta_s"] > 0
        assert runs.run_status(run_dir, now=time.time() + 3600)["state"] == "unresponsive"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM  # the process still dies by the signal
    finally:
        proc.kill()
    status = runs.run_status(run_dir)
    assert status["state"] == "stopped" and status["detail"] == "by SIGTERM" and status["step"] >= 3
    assert row_of(dashboard(str(run_dir)).stdout, run_dir)[1:2] == ["stopped"]


def test_sigkill_shows_as_died(tmp_path, chat_file):
    run_dir = tmp_path / "kill"
    proc = start_train(run_dir, chat_file)
    try:
        wait_for(lambda: steps_logged(run_dir) >= 2, 300, "two steps", proc)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert json.loads((run_dir / "state.json").read_text())["state"] == "running"  # nothing could record it
    status = runs.run_status(run_dir)
    assert status["state"] == "died" and str(proc.pid) in status["detail"]
    assert row_of(dashboard(str(run_dir)).stdout, run_dir)[1] == "died"


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_and_finishes(tmp_path, chat_file):
    run_dir = tmp_path / "elastic"
    steps = 60
    # c10d rendezvous as in configs/launch/ (a restarted group meets again on the same endpoint).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "1", "train.py",
           *cli_overrides(run_dir, chat_file, max_steps=steps, **{"checkpoint.every_steps": 4})]
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # as configs/launch/ set it (see there)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: runs.complete_checkpoints(run_dir), 300, "a checkpoint", proc)
        killed_at = steps_logged(run_dir)
        assert killed_at < steps - 8, "the run went too fast to be killed mid-way"
        first = json.loads((run_dir / "state.json").read_text())
        os.kill(first["pid"], signal.SIGKILL)  # rank 0's worker; torchrun tears the group down and restarts it
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    finally:
        proc.kill()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "finished" and state["restart_count"] == 1 and state["pid"] != first["pid"]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, steps + 1))  # each step once, none lost
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True
    assert runs.run_status(run_dir)["detail"] == "(restart 1)"


# --- launch scripts ---------------------------------------------------------------------------------------------------


def readme_torchrun_command() -> str:
    """The multi-node torchrun command of the README (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"^(\S*=1 torchrun --nnodes .*?)$\n(?:^(\s+.*)$)?", text, re.M)
    command = match.group(1).rstrip("\\ ") + " " + (match.group(2) or "").strip()
    return " ".join(command.split())


def test_launch_scripts_print_the_readme_command(tmp_path):
    documented = readme_torchrun_command()
    assert "--max-restarts" in documented
    assert documented.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 4")

    plain = subprocess.run(["bash", "configs/launch/multinode.sh", "--dry-run"], cwd=REPO, capture_output=True,
                           text=True, env={**ENV, "MASTER": "node0", "NNODES": "4"})
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == documented.replace("$MASTER", "node0")

    # Slurm: a stand-in scontrol expands the node list as the real one does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu01\\ngpu02\\n'
                                      'gpu03\\ngpu04\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm_env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4",
                 "SLURM_JOB_ID": "4242"}
    slurm = subprocess.run(["bash", "configs/launch/slurm-lynx-70b.sbatch", "--dry-run", "optim.lr=1e-6"], cwd=REPO,
                           capture_output=True, text=True, env=slurm_env)
    assert slurm.returncode == 0, slurm.stderr
    expected = documented.replace("$MASTER", "gpu01").replace("--rdzv_id lynx70b", "--rdzv_id 4242")
    env_var, torchrun = expected.split(" ", 1)
    assert slurm.stdout.strip() == f"{env_var} srun {torchrun} optim.lr=1e-6"

    missing = subprocess.run(["bash", "configs/launch/multinode.sh", "--dry-run"], cwd=REPO, capture_output=True,
                             text=True, env={**ENV, "NNODES": "4"})
    assert missing.returncode != 0 and "MASTER" in missing.stderr


def test_watch_refreshes_until_interrupted_and_bad_paths_are_errors(tmp_path):
    run_dir = tmp_path / "w"
    train(load_config(None, tiny_overrides(run_dir, max_steps=2)), examples=synthetic_examples())
    # A test run in the background (nohup, `&`) inherits SIGINT ignored, and Python then keeps it ignored: restore
    # the default in the child, as an interactive terminal has it, so Ctrl-C is what the test sends.
    proc = subprocess.Popen([sys.executable, "-m", "lynx.runs", str(run_dir), "--watch", "0.2"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(8)  # interpreter start-up, then refreshes every 0.2 s
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.count("finished") >= 2 and out.count("\033[2J") == out.count("finished")

    missing = dashboard(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere is not a directory" in missing.stderr
