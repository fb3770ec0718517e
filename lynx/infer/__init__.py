"""Inference on a loaded lynx.model.Llama, apart from the judge's prompt and parsing (lynx.judge).

    generation.py  batched KV-cache generation with continuous batching (Decoder; run_generation, generate)
    scoring.py     P(PASS) from logits: the score tokens, and prompts packed behind their shared prefix
    cpu_fast.py    bf16 CPU fast paths swapped into a loaded model: prepacked linears, compiled norms and rope
"""
