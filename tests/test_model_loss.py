"""Llama(input_ids, labels=...) (fused linear cross-entropy) equals transformers' LlamaForCausalLM loss, and every
parameter gradient matches."""

from __future__ import annotations

import pytest
import torch

from lynx.weights.safetensors import hf_name
from lynx.model import Llama
from conftest import make_tiny_hf_model


def labels_with_ignored(input_ids: torch.Tensor) -> torch.Tensor:
    labels = input_ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, 9:] = -100  # padding at the end
    labels[1, 3] = -100  # and a hole in the middle
    return labels


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_all_gradients_match_transformers(tmp_path, tied):
    hf = make_tiny_hf_model(seed=0, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "tiny")
    model = Llama.from_pretrained(tmp_path / "tiny")
    model.train()
    hf.train()  # no dropout in Llama; train() only so nothing is in inference mode

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=g)
    labels = labels_with_ignored(input_ids)

    hf_loss = hf(input_ids=input_ids, labels=labels).loss
    loss = model(input_ids, labels=labels)
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)

    hf_loss.backward()
    loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    n_checked = 0
    for name, p in model.named_parameters():  # tied: named_parameters lists the shared weight once
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, hf_grads[hf_name(name)], rtol=1e-4, atol=1e-6, msg=name)
        n_checked += 1
    assert n_checked == len(hf_grads)


def test_sum_reduction_is_mean_times_token_count(tmp_path):
    hf = make_tiny_hf_model(seed=1)
    hf.save_pretrained(tmp_path / "tiny")
    model = Llama.from_pretrained(tmp_path / "tiny")
    input_ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = labels_with_ignored(input_ids)
    n_predicted = (labels[:, 1:] != -100).sum()  # label t is predicted at position t - 1
    with torch.no_grad():
        hf_loss = hf(input_ids=input_ids, labels=labels).loss
        total = model(input_ids, labels=labels, reduction="sum")
    torch.testing.assert_close(total, hf_loss * n_predicted, rtol=1e-5, atol=1e-5)
