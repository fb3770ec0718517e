"""Sharded training on several gloo processes equals single-process training.

The same global batch of 4 sequences per step, split as 1 process x 4 accumulation steps, 2 x 2 (full shard) and
4 x 1 (HSDP: 2 replicas x 2 shards), gives the same losses, gradient norms (computed over DTensor shards) and final
weights. The model is loaded from a Hugging Face checkpoint whose MLP width (99) divides by neither 2 nor 4, so
uneven shards are read and written too."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_checkpoint
from lynx.train import load_config, train
from trainer_helpers import metrics, run_ranks, synthetic_examples, tiny_overrides


def train_one_rank(tmp, extra, examples):
    """The single-process reference run, in tmp / "w1" (one thread: the tiny model gains nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, tiny_overrides(tmp / "w1", **extra)), examples=examples)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    ckpt = make_tiny_checkpoint(tmp / "hf", intermediate_size=99)
    examples = synthetic_examples(40)
    extra = {"model.init_from": str(ckpt), "max_steps": 3, "optim.warmup_steps": 1, "checkpoint.every_steps": 2}
    train_one_rank(tmp, extra, examples)
    run_ranks(2, tiny_overrides(tmp / "w2", **extra), examples)
    run_ranks(4, tiny_overrides(tmp / "w4", **extra, **{"parallel.replicate": 2}), examples)
    return tmp


@pytest.mark.parametrize("world", [2, 4])
def test_losses_and_grad_norms_do_not_depend_on_the_split(runs, world):
    one, many = metrics(runs / "w1"), metrics(runs / f"w{world}")
    assert [m["step"] for m in many] == [1, 2, 3]
    assert [m["tokens"] for m in many] == [m["tokens"] for m in one]
    assert [m["target_tokens"] for m in many] == [m["target_tokens"] for m in one]
    # fp32; only the order of the gradient sums differs.
    assert [m["loss"] for m in many] == pytest.approx([m["loss"] for m in one], rel=1e-6, abs=0)
    assert [m["grad_norm"] for m in many] == pytest.approx([m["grad_norm"] for m in one], rel=1e-5, abs=0)
    assert one[-1]["loss"] < one[0]["loss"] - 0.05  # the steps really changed the weights


@pytest.mark.parametrize("world", [2, 4])
def test_final_weights_do_not_depend_on_the_split(runs, world):
    one = load_file(runs / "w1/final/model.safetensors")
    many = load_file(runs / f"w{world}/final/model.safetensors")
    start = load_file(runs / "hf/model.safetensors")
    assert one.keys() == many.keys()
    for name in one:
        assert not torch.equal(one[name], start[name]) or "norm" in name, f"{name} never moved"
        torch.testing.assert_close(many[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_rank_wrote_its_checkpoint_shards(runs):
    ckpt = runs / "w4/checkpoints/step_00000003"
    names = {p.name for p in ckpt.iterdir()}
    assert {f"rank_{r:05d}.pt" for r in range(4)} <= names and ".metadata" in names
    assert {"step_00000002", "step_00000003"} == {p.name for p in (runs / "w4/checkpoints").iterdir()}


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory):
    """model.train_layers=1 on a tied model: the frozen embedding and lower block stay whole on every rank (outside
    FSDP), and the result must not depend on the number of ranks either."""
    tmp = tmp_path_factory.mktemp("frozen")
    ckpt = make_tiny_checkpoint(tmp / "hf", intermediate_size=99, tie_word_embeddings=True)
    examples = synthetic_examples(40)
    extra = {"model.init_from": str(ckpt), "max_steps": 3, "optim.warmup_steps": 1, "model.train_layers": 1}
    train_one_rank(tmp, extra, examples)
    run_ranks(2, tiny_overrides(tmp / "w2", **extra), examples)
    return tmp


def test_frozen_layers_are_replicated_and_unchanged(frozen_runs):
    one, two = metrics(frozen_runs / "w1"), metrics(frozen_runs / "w2")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5, abs=0)
    assert one[-1]["loss"] < one[0]["loss"] - 0.01
    start = load_file(frozen_runs / "hf/model.safetensors")
    w1, w2 = (load_file(frozen_runs / f"{w}/final/model.safetensors") for w in ("w1", "w2"))
    for name in start:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)
        frozen = name.startswith("model.embed_tokens") or name.startswith("model.layers.0.")
        assert torch.equal(w1[name], start[name]) == frozen, name  # frozen exactly as loaded; the rest moved
