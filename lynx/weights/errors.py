"""The errors weights I/O raises, and the one strict check both loaders share.

Apart from the readers so that catching them (`except CheckpointError`) never imports the `gguf` library."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model; the message names every culprit."""


class GGUFError(CheckpointError):
    """A GGUF file we cannot load faithfully; the message names the file and the culprit."""


class GGUFExportError(GGUFError):
    """An input we cannot write as a GGUF file llama.cpp would run faithfully; the message names the culprit."""


def raise_mismatch(error: type, what: str, missing: list, unexpected: list, wrong_shape: list) -> None:
    """One error listing every missing, unexpected and wrongly shaped tensor (nothing when all three are empty)."""
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if wrong_shape:
        problems.append(f"wrongly shaped tensors: {wrong_shape}")
    if problems:
        raise error(f"{what} does not match the model: " + "; ".join(problems))
