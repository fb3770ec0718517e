"""The trainer behind train.py: supervised fine-tuning with FSDP2, from one CPU process to many GPU nodes.

    config.py      TrainConfig (YAML + dotted overrides, checked up front)
    build.py       the sharded model, its optimizer, the tokenized rows it trains on and their loader
    setup.py       all of them for one run, and where it resumes (setup), the evaluator
    checkpoint.py  sharded training checkpoints (resume) and the Hugging Face export
    metrics.py     metrics.jsonl, MFU, W&B / TensorBoard
    validation.py  evaluation during training (eval.data): validation loss, judge accuracy and AUROC
    run_state.py   <run_dir>/state.json (running, finished, failed, ...), which python -m lynx.runs shows
    loop.py        one optimizer step (train_step) and the loop (train), the command line (main)
Process groups are set up by lynx.distributed (shared with judge.py).
"""

from lynx.config import ConfigError
from lynx.train.config import TrainConfig, load_config, validate
from lynx.train.loop import main, train, train_step

__all__ = ["ConfigError", "TrainConfig", "load_config", "main", "train", "train_step", "validate"]
