"""Moved to lynx.train.validation (evaluation during training); this name stays for the imports that use it."""

from lynx.train.validation import Evaluator, load_eval_rows

__all__ = ["Evaluator", "load_eval_rows"]
