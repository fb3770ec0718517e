"""A few-second end-to-end check of what exists: `python -m lynx.smoke`.

Builds a tiny random Llama with the Llama-3 vocabulary, saves it as a Hugging Face checkpoint in a temporary
directory, loads it back, tokenizes a Lynx judge conversation with the shipped Llama-3 tokenizer, and runs a forward
pass and the assistant-turn loss. Nothing is downloaded. Exits non-zero if anything disagrees.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lynx.config import LlamaConfig
from lynx.model import Llama
from lynx.prompt import judge_messages, training_messages
from lynx.tokenizer import Tokenizer

EXAMPLE = dict(
    question="In which year did the Apollo 11 crew land on the Moon?",
    context="Apollo 11 was the American spaceflight that first landed humans on the Moon. Commander Neil Armstrong "
    "and lunar module pilot Buzz Aldrin landed the Apollo Lunar Module Eagle on July 20, 1969.",
    answer="The crew landed on the Moon in 1968.",
)
TARGET = '{"REASONING": ["The document says the landing was on July 20, 1969.", "The answer says 1968, which ' \
    'contradicts the document."], "SCORE": "FAIL"}'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    tokenizer = Tokenizer.llama3()
    print(f"tokenizer: Llama-3 BPE from lynx/assets/llama3, {tokenizer.vocab_size} ids "
          f"(bos {tokenizer.bos_id}, eot {tokenizer.eot_id}, stop {tokenizer.stop_ids})")

    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 1024},
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.stop_ids, torch_dtype="float32",
    )
    with torch.device("meta"):  # allocate once, then initialise (no default init of a model we re-initialise)
        model = Llama(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(args.seed))
    n_params = sum(p.numel() for p in model.parameters())

    with tempfile.TemporaryDirectory(prefix="lynx-smoke-") as tmp:
        path = Path(tmp) / "tiny-llama"
        model.save_pretrained(path, max_shard_size="20MB")
        tokenizer.save_pretrained(path)
        files = sorted(p.name for p in path.iterdir())
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        print(f"model: tiny random Llama-3 ({n_params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
              f"GQA {cfg.num_attention_heads}/{cfg.num_key_value_heads}, llama3 rope scaling, tied embeddings)")
        print(f"saved: {len(files)} files, {size / 1e6:.1f} MB of safetensors: {', '.join(files)}")
        loaded = Llama.from_pretrained(path)
        loaded_tokenizer = Tokenizer.from_pretrained(path)

    mismatched = [n for n, t in model.state_dict().items() if not torch.equal(t, loaded.state_dict()[n])]
    if mismatched:
        print(f"FAILED: tensors differ after the save/load round trip: {mismatched}", file=sys.stderr)
        return 1
    print("loaded back: every tensor identical")

    prompt_ids = tokenizer.apply_chat_template(judge_messages(**EXAMPLE), add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(training_messages(**EXAMPLE, target=TARGET), add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids or loaded_tokenizer.apply_chat_template(
        judge_messages(**EXAMPLE)) != prompt_ids:
        print("FAILED: chat template is not a stable prefix / tokenizer round trip differs", file=sys.stderr)
        return 1
    print(f"chat: judge prompt {len(prompt_ids)} tokens, with the assistant verdict {len(full_ids)} tokens; "
          f"prompt ends with {tokenizer.decode(prompt_ids[-4:])!r}")

    input_ids = torch.tensor([full_ids])
    labels = input_ids.clone()
    labels[:, : len(prompt_ids)] = -100  # loss on the assistant turn only, as in the Lynx recipe
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids)
        loss = loaded(input_ids, labels=labels)
        reference = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    print(f"forward: logits {tuple(logits.shape)}; assistant-turn loss {loss.item():.4f} "
          f"(from logits {reference.item():.4f}; ln(vocab) = {math.log(cfg.vocab_size):.4f} for a random model)")
    if not torch.isfinite(loss) or abs(loss.item() - reference.item()) > 1e-4:
        print("FAILED: the fused loss disagrees with cross-entropy on the logits", file=sys.stderr)
        return 1
    greedy = logits[0, len(prompt_ids) - 1].argmax().item()
    print(f"next token after the prompt (untrained, so arbitrary): {greedy} {tokenizer.decode([greedy])!r}")
    print(f"smoke test passed in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
