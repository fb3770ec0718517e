"""Shared test helpers: tiny random Hugging Face Llama checkpoints built on the spot (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA3_TOKENIZER_DIR = REPO / "lynx" / "assets" / "llama3"


REFERENCE_PACKAGES = ("torch", "transformers", "accelerate", "gguf", "tokenizers", "tiktoken", "kernels", "xllamacpp")


def reference_versions() -> str:
    """The installed versions of the references the tests compare against."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return "references: " + ", ".join(f"{name} {installed(name)}" for name in REFERENCE_PACKAGES)


# CI installs the references' newest releases, so a failure a new release brings must say which release ran. Written
# through the terminal reporter, not pytest_report_header: the README's `pytest -q` hides the header.
def pytest_sessionstart(session):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(reference_versions())


def pytest_terminal_summary(terminalreporter, exitstatus):
    if exitstatus != 0:
        terminalreporter.write_line("failed with " + reference_versions())


def make_tiny_hf_model(seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny transformers.LlamaForCausalLM. Norm gains sit near 1 and weights are not tiny, so attention is
    far from uniform and a wrong rotary embedding or mask shows up in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=1,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
            # Parameters only: `model.to(dtype)` would also round the rotary inv_freq buffer and degrade the reference.
            p.data = p.data.to(dtype)
    return model


def make_tiny_checkpoint(path: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random tiny HF Llama to `path` (single safetensors file) and return the path."""
    make_tiny_hf_model(seed, dtype, **overrides).save_pretrained(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return make_tiny_checkpoint(tmp_path / "tiny")


@pytest.fixture
def one_thread():
    """The tiny trainer models are far too small for intra-op threads; on a shared 2-core machine they only add
    contention. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
