"""lynx: train and evaluate Lynx-style hallucination judges on Llama-3."""
