"""The training loop in one process (a one-rank FSDP2 mesh over gloo): config parsing, resume, the non-finite guard,
weight loading and export. Multi-process equivalence is in test_trainer_dist.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_tiny_checkpoint
from lynx.model import Llama
from lynx.train import ConfigError, load_config, main, train
from trainer_helpers import TINY_MODEL, metrics, synthetic_examples, tiny_overrides


pytestmark = pytest.mark.usefixtures("one_thread")


# --- config -------------------------------------------------------------------------------------------------------


def test_overrides_are_typed_by_the_dataclass_fields(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"optim.lr": "5e-7", "optim.betas": "[0.8, 0.9]",
                                                        "max_steps": "null", "parallel.compile": "false",
                                                        "model.config.num_hidden_layers": "3"}))
    assert cfg.optim.lr == 5e-7 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.max_steps is None and cfg.parallel.compile is False
    assert cfg.model.config["num_hidden_layers"] == 3 and cfg.model.config["hidden_size"] == 64


def test_unknown_and_badly_typed_keys_are_errors_naming_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"no 'lrr' in optim; valid keys there: \[.*'lr'"):
        load_config(None, tiny_overrides(tmp_path, **{"optim.lrr": "1"}))
    with pytest.raises(ConfigError, match="max_steps: expected an integer"):
        load_config(None, tiny_overrides(tmp_path, max_steps="1.5"))
    with pytest.raises(ConfigError, match="parallel.compile: expected true or false"):
        load_config(None, tiny_overrides(tmp_path, **{"parallel.compile": "maybe"}))
    with pytest.raises(ConfigError, match="parallel.activation_checkpointing: 'some'"):
        load_config(None, tiny_overrides(tmp_path, **{"parallel.activation_checkpointing": "some"}))
    with pytest.raises(ConfigError, match="checkpoint.export_dtype: 'fp8'"):
        load_config(None, tiny_overrides(tmp_path, **{"checkpoint.export_dtype": "fp8"}))
    with pytest.raises(ConfigError, match="parallel.reduce_dtype: 'auto'"):  # auto is for the compute dtype only
        load_config(None, tiny_overrides(tmp_path, **{"parallel.reduce_dtype": "auto"}))
    with pytest.raises(ConfigError, match="exactly one of model.init_from"):
        load_config(None, tiny_overrides(tmp_path, **{"model.init_from": "somewhere"}) + ["model.config={}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1.0e-5\n  warmpu_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['optim.warmpu_steps'\].*optim.warmup_steps"):
        load_config(bad)


def test_hsdp_replicas_must_divide_the_world_size():
    from lynx.parallel import build_mesh

    with pytest.raises(ValueError, match="parallel.replicate=3 must be >= 1 and divide the world size 4"):
        build_mesh("cpu", 4, 3)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["--config", str(REPO / "configs/tiny-cpu.yaml"), "optim.nope=1"]) == 2
    assert "no 'nope' in optim" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["lynx-8b", "lynx-70b"])
def test_published_recipe_configs(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    o = cfg.optim
    assert (o.name, o.lr, o.betas, o.weight_decay, o.warmup_steps, o.alpha_f, o.grad_clip) == (
        "lionw", 5e-7, (0.9, 0.95), 0.0, 100, 0.1, 1.0)
    assert (cfg.global_batch_size, cfg.data.max_seq_len, cfg.epochs, cfg.seed) == (32, 8000, 3, 17)
    assert cfg.parallel.param_dtype == "bfloat16" and cfg.parallel.activation_checkpointing == "full"
    assert cfg.max_steps is None


# --- training -----------------------------------------------------------------------------------------------------


def test_resumed_run_matches_an_uninterrupted_one_and_ignores_half_written_checkpoints(tmp_path):
    examples = synthetic_examples(48)
    # LionW, the recipe's optimizer; 48 examples pack into ~14 sequences, 3 steps of 4 per epoch, so the 8 steps
    # cross two epoch boundaries, one of them after the resume.
    common = {"optim.name": "lionw", "optim.lr": 3e-3, "max_steps": 8, "checkpoint.keep_last": 2}
    full = train(load_config(None, tiny_overrides(tmp_path / "full", **common)), examples=examples)
    assert full["finished"]

    run = tmp_path / "split"
    part = train(load_config(None, tiny_overrides(run, **common, stop_after_step=3, **{"checkpoint.every_steps": 2})),
                 examples=examples)
    assert part == {**part, "steps": 3, "finished": False}
    assert not (run / "final").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000003"]
    # A crash mid-save leaves a .tmp directory; a newer one must not be picked up.
    junk = run / "checkpoints" / "step_00000005.tmp"
    junk.mkdir()
    (junk / "rank_00000.pt").write_bytes(b"half written")
    # The metrics of steps after the checkpoint are dropped on resume (they are run again).
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")

    resumed = train(load_config(None, tiny_overrides(run, **common, **{"checkpoint.every_steps": 2})),
                    examples=examples)
    assert resumed["finished"] and not junk.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]

    a, b = metrics(tmp_path / "full"), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert a[-1]["loss"] < a[0]["loss"]  # it learns
    wa, wb = load_file(tmp_path / "full/final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = Llama.forward

    def poisoned(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls["n"] += 1
        # Micro-batches 5..8 = step 2 of 4 micro-batches each; and everything from step 4 on.
        return loss * float("nan") if 5 <= calls["n"] <= 8 or calls["n"] > 12 else loss

    monkeypatch.setattr(Llama, "forward", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(RuntimeError, match=r"stopping: 2 steps had a non-finite loss.*max_skipped_steps=2"):
        train(load_config(None, tiny_overrides(run, max_steps=6, **{"optim.max_skipped_steps": 2})),
              examples=synthetic_examples())
    m = metrics(run)
    assert [x["skipped"] for x in m] == [False, True, False, True]
    assert math.isnan(m[1]["loss"]) and m[2]["skipped_total"] == 1
    assert not (run / "final").exists()


def test_skipped_step_leaves_weights_and_optimizer_state_unchanged(tmp_path, monkeypatch):
    """A run of 2 steps whose step 2 is poisoned ends with the weights of a 1-step run (same lr at step 1: no
    warmup, and the 1-step run holds the lr constant)."""
    forward = Llama.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = forward(self, *args, **kwargs)
        return loss * float("inf") if 5 <= calls["n"] <= 8 else loss

    monkeypatch.setattr(Llama, "forward", poisoned)
    train(load_config(None, tiny_overrides(tmp_path / "a", max_steps=2, **{"optim.warmup_steps": 0})),
          examples=synthetic_examples())
    monkeypatch.setattr(Llama, "forward", forward)
    train(load_config(None, tiny_overrides(tmp_path / "b", max_steps=1, **{"optim.warmup_steps": 0,
                                                                         "optim.alpha_f": 1.0})),
          examples=synthetic_examples())
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert ma[0]["lr"] == mb[0]["lr"] == 1e-2 and ma[1]["skipped"]
    wa, wb = load_file(tmp_path / "a/final/model.safetensors"), load_file(tmp_path / "b/final/model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_hf_checkpoint_loads_into_the_sharded_model_and_exports_back(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "hf", intermediate_size=98)
    run = tmp_path / "run"
    overrides = tiny_overrides(run, max_steps=1, **{"model.init_from": str(ckpt), "optim.warmup_steps": 1})
    train(load_config(None, overrides), examples=synthetic_examples())
    # Step 1 runs at lr 0 (warmup from zero) and AdamW with zero lr does not move: the export is the checkpoint.
    exported, original = load_file(run / "final/model.safetensors"), load_file(ckpt / "model.safetensors")
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k
    reloaded = Llama.from_pretrained(run / "final")
    assert reloaded.config.intermediate_size == 98


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "hf")
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"model.init_from": str(ckpt)}))
    (ckpt / "config.json").write_text(
        json.dumps({**json.loads((ckpt / "config.json").read_text()), "intermediate_size": 100}))
    with pytest.raises(Exception, match=r"does not match the model: wrongly shaped tensors.*mlp"):
        train(cfg, examples=synthetic_examples())


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    base = train(load_config(None, tiny_overrides(tmp_path / "none", max_steps=2)), examples=synthetic_examples())
    ac = train(load_config(None, tiny_overrides(tmp_path / "ac", max_steps=2,
                                                **{"parallel.activation_checkpointing": "every_k",
                                                   "parallel.ac_every": 2})), examples=synthetic_examples())
    a, b = metrics(tmp_path / "none"), metrics(tmp_path / "ac")
    assert base["final_loss"] == ac["final_loss"]
    assert [m["grad_norm"] for m in a] == pytest.approx([m["grad_norm"] for m in b], rel=1e-6)


def test_tiny_cpu_config_runs_end_to_end_from_the_command_line(tmp_path):
    """The real path: JSONL rows, Llama-3 tokenizer and chat template, truncation, packing, export with tokenizer."""
    from lynx.prompt import training_messages

    rows = tmp_path / "train.jsonl"
    target = json.dumps({"REASONING": ["The answer matches the document."], "SCORE": "PASS"})
    with open(rows, "w") as f:
        for i in range(3):
            document = "The trial enrolled forty adults. " * (400 if i == 0 else 20)  # row 0 is too long
            f.write(json.dumps({"messages": training_messages("How many adults?", document, "Forty.", target)}) + "\n")
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/tiny-cpu.yaml"), f"run_dir={run}",
         f"data.train={rows}", "max_steps=1", "global_batch_size=1", "data.max_seq_len=1024"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 rows: 3 kept (1 with a truncated document), 0 dropped" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["rows"], summary["rows_truncated"], summary["rows_dropped"]) == (3, 1, 0)
    (m,) = metrics(run)
    assert m["step"] == 1 and math.isfinite(m["loss"]) and m["tokens"] > 0 and m["tokens_per_s"] > 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (run / "final").iterdir()}
    assert load_file(run / "final/model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_tied_embeddings_stay_one_parameter_through_sharding_and_export(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "hf", tie_word_embeddings=True)
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(run, max_steps=2, **{"model.init_from": str(ckpt)})),
          examples=synthetic_examples())
    exported = load_file(run / "final/model.safetensors")
    assert "lm_head.weight" not in exported  # stored once, as transformers does
    model = Llama.from_pretrained(run / "final")
    assert model.head.lm_head.weight is model.embed_tokens.weight
    original = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(exported["model.embed_tokens.weight"], original)  # trained, through both uses


def test_resuming_with_another_world_size_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(run, stop_after_step=1)), examples=synthetic_examples())
    state = run / "checkpoints/step_00000001/train_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))
    with pytest.raises(RuntimeError, match="written by 2 ranks, this run has 1"):
        train(load_config(None, tiny_overrides(run)), examples=synthetic_examples())


def test_step_flops_counts_parameters_and_causal_attention_per_document():
    from lynx.config import LlamaConfig
    from lynx.train.metrics import step_flops

    cfg = LlamaConfig(**TINY_MODEL)
    batch = {"cu_seqlens": torch.tensor([0, 3, 8], dtype=torch.int32), "num_tokens": 8}
    expected = 6 * 1000 * 8 + 6 * 2 * 64 * (3**2 + 5**2)
    assert step_flops(cfg, 1000, [batch, batch]) == 2 * expected


def test_one_rank_bf16_gradients_are_the_plain_bf16_gradients_upcast(tmp_path):
    """On one rank FSDP2 reduces in the parameter dtype (lynx.parallel); the fp32 sharded gradients must still be
    exactly the bf16 gradients of an unsharded bf16 model, upcast: no rounding, no scaling on the way."""
    import torch.distributed as dist

    from lynx import parallel, sft_data
    from lynx.distributed import init_distributed
    from lynx.train.build import build_model

    cfg = load_config(None, tiny_overrides(tmp_path, **{"parallel.param_dtype": "bfloat16"}))
    device, owns_group = init_distributed()
    try:
        model = build_model(cfg, parallel.build_mesh("cpu", 1, 1), device)
        reference = Llama(model.config)
        reference.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})
        reference.to(torch.bfloat16)
        examples = synthetic_examples(n=6)
        seq = sft_data.PackedSequence()
        for ex in examples:
            seq.input_ids += ex.input_ids
            seq.labels += ex.labels
            seq.lengths.append(len(ex.input_ids))
        batch = sft_data.collate([seq], len(seq.input_ids))
        for m in (model, reference):
            loss = m(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"],
                     attn_kwargs={"cu_seqlens": batch["cu_seqlens"], "max_seqlen": batch["max_seqlen"]},
                     reduction="sum")
            loss.backward()
        ref_grads = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            assert p.grad.dtype == torch.float32
            assert torch.equal(p.grad.full_tensor(), ref_grads[name].grad.float()), name
    finally:
        if owns_group:
            dist.destroy_process_group()


def test_train_on_inputs_reaches_the_tokenized_data(tmp_path):
    from lynx.prompt import training_messages
    from lynx.sft_data import IGNORE_INDEX
    from lynx.tokenizer import Tokenizer
    from lynx.train.build import tokenize_data

    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"messages": training_messages("How many?", "Forty adults.", "Forty.", "PASS")}) + "\n")
    tok = Tokenizer.llama3()
    for flag in (False, True):
        cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.train": str(rows), "data.max_seq_len": 1024,
                                                                   "data.train_on_inputs": str(flag).lower()}))
        (example,), stats = tokenize_data(cfg, tok, rank=0)
        assert stats.kept == 1
        assert (example.labels == example.input_ids) == flag
        assert (IGNORE_INDEX in example.labels) != flag


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_dtype_is_bf16_only_where_native(monkeypatch, native):
    from lynx import config, parallel

    monkeypatch.setattr(config, "bf16_is_native", lambda device="cpu": native)
    expected = torch.bfloat16 if native else torch.float32
    assert parallel.dtype_from_name("auto", "parallel.param_dtype", "cpu") == expected
    assert parallel.dtype_from_name("float32", "parallel.param_dtype", "cpu") == torch.float32
    from lynx.train import TrainConfig

    assert TrainConfig().parallel.param_dtype == "auto"  # the default

