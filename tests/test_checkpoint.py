"""Checkpoint I/O: round trips with transformers, sharding, atomic saves, and errors that name the culprit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_tiny_checkpoint, make_tiny_hf_model
from safetensors.torch import load_file, save_file

from lynx.config import ConfigError, LlamaConfig
from lynx.model import Llama
from lynx.weights import CheckpointError
from lynx.weights import safetensors as checkpoint
from lynx.weights.safetensors import parse_size

IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))


def random_lynx_model(tied: bool = False, seed: int = 0) -> Llama:
    """A model built by us (not by transformers), with norm gains away from 1 so every tensor matters."""
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    )
    model = Llama(cfg)
    with torch.no_grad():
        model.init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


@torch.no_grad()
def logits(model, ids=IDS):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    # transformers silently re-initialises tensors it did not find: require a complete, exact load.
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info[key])
    return model.eval()


# --- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("max_shard_size", ["5GB", 40_000], ids=["single-file", "sharded"])
def test_our_save_loads_in_transformers(tmp_path, record_property, tied, max_shard_size):
    ours = random_lynx_model(tied)
    ours.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in files and "generation_config.json" in files
    if max_shard_size == "5GB":
        assert "model.safetensors" in files and checkpoint.INDEX_FILE not in files
    else:
        assert checkpoint.INDEX_FILE in files and len([f for f in files if f.startswith("model-")]) > 2
    hf = hf_load(tmp_path / "out")
    assert hf.config.tie_word_embeddings == tied
    diff = (logits(hf) - logits(ours)).abs().max().item()
    print(f"ours -> transformers max abs logits diff: {diff:.3e}")
    record_property("max_abs_logits_diff", diff)
    torch.testing.assert_close(logits(hf), logits(ours), rtol=0, atol=1e-5)
    # And back: we reload our own checkpoint exactly.
    torch.testing.assert_close(logits(Llama.from_pretrained(tmp_path / "out")), logits(ours), rtol=0, atol=0)


def test_our_save_with_rope_scaling_loads_in_transformers(tmp_path):
    ours = Llama.from_pretrained(make_tiny_checkpoint(tmp_path / "src", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}))
    ours.save_pretrained(tmp_path / "out")
    hf = hf_load(tmp_path / "out")
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    long_ids = torch.randint(0, 320, (1, 300), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(hf, long_ids), logits(ours, long_ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_sharded_save_loads_in_lynx(tmp_path, record_property, tied):
    hf = make_tiny_hf_model(seed=2, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / checkpoint.INDEX_FILE).is_file()
    ours = Llama.from_pretrained(tmp_path / "hf")
    diff = (logits(ours) - logits(hf)).abs().max().item()
    record_property("max_abs_logits_diff", diff)
    torch.testing.assert_close(logits(ours), logits(hf), rtol=0, atol=1e-5)


def test_save_dtype_and_generation_config(tmp_path):
    ours = random_lynx_model()
    ours.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    generation = json.loads((tmp_path / "bf16" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 0 and generation["eos_token_id"] == 1
    reloaded = Llama.from_pretrained(tmp_path / "bf16")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert ours.head.lm_head.weight.dtype == torch.float32  # saving does not change the model


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    """Some tied checkpoints also store lm_head.weight (a copy of the embedding): that is not an error."""
    path = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = Llama.from_pretrained(path)
    assert model.head.lm_head.weight is model.embed_tokens.weight


# --- sharding sizes -------------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size(1000) == 1000
    assert parse_size("1000") == 1000
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("10KiB") == 10 * 1024
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="max_shard_size.*'five gigs'"):
        parse_size("five gigs")


@pytest.mark.parametrize("max_shard_size", [20_000, "20KB", "20000"], ids=["int", "str-KB", "str-bytes"])
def test_max_shard_size_int_and_string(tmp_path, max_shard_size):
    ours = random_lynx_model()
    ours.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    index = json.loads((tmp_path / "out" / checkpoint.INDEX_FILE).read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    n = len(shard_names)
    assert shard_names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total = 0
    for name in shard_names:
        tensors = load_file(tmp_path / "out" / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        # A shard exceeds the limit only when it holds one tensor bigger than the limit.
        assert size <= 20_000 or len(tensors) == 1, (name, size)
        total += size
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == {checkpoint.hf_name(n) for n in ours.state_dict()}
    torch.testing.assert_close(logits(Llama.from_pretrained(tmp_path / "out")), logits(ours), rtol=0, atol=0)


# --- atomic saves ---------------------------------------------------------------------------------------------


def fail_on_second_shard(monkeypatch):
    real_save_file, calls = checkpoint.save_file, []

    def flaky_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", flaky_save_file)
    return calls


def test_failed_save_leaves_no_final_dir(tmp_path, monkeypatch):
    calls = fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        random_lynx_model().save_pretrained(tmp_path / "out", max_shard_size=20_000)
    assert len(calls) == 2  # the failure happened mid-save, after a shard was written
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is cleaned up too


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    old = random_lynx_model(seed=1)
    old.save_pretrained(tmp_path / "out")
    fail_on_second_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        random_lynx_model(seed=2).save_pretrained(tmp_path / "out", max_shard_size=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    torch.testing.assert_close(logits(Llama.from_pretrained(tmp_path / "out")), logits(old), rtol=0, atol=0)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    random_lynx_model(seed=1).save_pretrained(tmp_path / "out", max_shard_size=20_000)
    new = random_lynx_model(seed=2)
    new.save_pretrained(tmp_path / "out")  # single file now: stale shards must not survive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (tmp_path / "out" / checkpoint.INDEX_FILE).exists()
    assert not list((tmp_path / "out").glob("model-*"))
    torch.testing.assert_close(logits(Llama.from_pretrained(tmp_path / "out")), logits(new), rtol=0, atol=0)


# --- errors name the culprit ----------------------------------------------------------------------------------


def rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]"):
        Llama.from_pretrained(tiny_checkpoint)


def test_untied_model_needs_lm_head(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: \['lm_head.weight'\]"):
        Llama.from_pretrained(tiny_checkpoint)


def test_unexpected_tensor(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: \['model.layers.0.self_attn.q_proj.bias'\]"):
        Llama.from_pretrained(tiny_checkpoint)


def test_wrongly_shaped_tensor(tiny_checkpoint):
    rewrite_tensors(tiny_checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: checkpoint \(65,\) vs model \(64,\)"):
        Llama.from_pretrained(tiny_checkpoint)


def test_all_mismatches_in_one_error(tiny_checkpoint):
    def edit(t):
        t.pop("model.layers.0.input_layernorm.weight")
        t.pop("model.embed_tokens.weight")
        t["model.layers.9.mlp.gate_proj.weight"] = torch.zeros(2, 2)
        t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)

    rewrite_tensors(tiny_checkpoint, edit)
    with pytest.raises(CheckpointError) as err:
        Llama.from_pretrained(tiny_checkpoint)
    message = str(err.value)
    assert str(tiny_checkpoint) in message
    for name in ("model.layers.0.input_layernorm.weight", "model.embed_tokens.weight",
                 "model.layers.9.mlp.gate_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert name in message, name
    assert "missing" in message and "unexpected" in message and "wrongly shaped" in message


def test_missing_shard_file(tmp_path):
    random_lynx_model().save_pretrained(tmp_path / "out", max_shard_size=20_000)
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        Llama.from_pretrained(tmp_path / "out")


def test_corrupt_index(tmp_path):
    random_lynx_model().save_pretrained(tmp_path / "out", max_shard_size=20_000)
    (tmp_path / "out" / checkpoint.INDEX_FILE).write_text("{ truncated")
    with pytest.raises(CheckpointError, match=checkpoint.INDEX_FILE):
        Llama.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("corruption", ["header-json", "header-length", "truncated"])
def test_corrupt_safetensors(tiny_checkpoint, corruption):
    file = tiny_checkpoint / "model.safetensors"
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    if corruption == "header-json":
        data[8:12] = b"@@@@"  # the JSON header no longer parses
    elif corruption == "header-length":
        data[:8] = (10**12).to_bytes(8, "little")  # the header claims to be larger than the file
    else:
        data = data[: 8 + header_len + 100]  # tensor data cut off
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Llama.from_pretrained(tiny_checkpoint)


def test_corrupt_shard_header(tmp_path):
    random_lynx_model().save_pretrained(tmp_path / "out", max_shard_size=20_000)
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1]
    shard.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match=shard.name):
        Llama.from_pretrained(tmp_path / "out")


def test_missing_config(tiny_checkpoint):
    (tiny_checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(tiny_checkpoint)


def test_missing_dir_and_missing_weights(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        Llama.from_pretrained(tmp_path / "no_such_checkpoint")
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        Llama.from_pretrained(tiny_checkpoint)


def test_invalid_config_json(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Llama.from_pretrained(tiny_checkpoint)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, culprit",
    [
        ({"model_type": "mistral"}, r"unsupported 'model_type'.*'mistral'"),
        ({"attention_bias": True}, r"unsupported 'attention_bias'"),
        ({"mlp_bias": True}, r"unsupported 'mlp_bias'"),
        ({"hidden_act": "gelu"}, r"unsupported 'hidden_act'.*'gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
         r"unsupported 'rope_parameters.rope_type'.*'yarn'"),
        ({"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         r"unsupported 'rope_scaling.rope_type'.*'dynamic'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
         r"'rope_parameters'.*lacks.*low_freq_factor"),
        ({"num_hidden_layers": None}, r"missing required keys \['num_hidden_layers'\]"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, r"num_key_value_heads \(3\)"),
    ],
    ids=["model_type", "attention_bias", "mlp_bias", "hidden_act", "rope_type", "rope_type_old_spelling",
         "llama3_rope_incomplete", "missing_key", "gqa_not_divisible"],
)
def test_unsupported_config(tiny_checkpoint, changes, culprit):
    edit_config(tiny_checkpoint, **changes)
    with pytest.raises(ConfigError, match=culprit) as err:
        Llama.from_pretrained(tiny_checkpoint)
    if "num_key_value_heads" not in changes:
        assert str(tiny_checkpoint / "config.json") in str(err.value)


def test_load_is_tensor_by_tensor_on_meta_first(tiny_checkpoint, monkeypatch):
    """The model is built on the meta device (no random init of a full model), then filled tensor by tensor."""
    inits = []
    real_init = torch.nn.Linear.reset_parameters

    def spy(self):
        inits.append(self.weight.device.type)
        real_init(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    Llama.from_pretrained(tiny_checkpoint)
    assert inits and set(inits) == {"meta"}
    assert os.path.getsize(tiny_checkpoint / "model.safetensors") > 0


def test_chunked_tensor_copy_is_exact(tmp_path, monkeypatch):
    """Loading reads big tensors in row slices; with a tiny slice size every tensor spans many slices."""
    monkeypatch.setattr(checkpoint, "COPY_CHUNK_BYTES", 1000)
    ours = random_lynx_model()
    ours.save_pretrained(tmp_path / "out", max_shard_size=30_000)
    loaded = Llama.from_pretrained(tmp_path / "out")
    for name, t in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    as_bf16 = Llama.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    for name, t in ours.state_dict().items():
        assert torch.equal(as_bf16.state_dict()[name], t.to(torch.bfloat16)), name
