"""Model-based perturbation, behind the same interface as lynx.data.perturb.perturb.

A Llama checkpoint is asked, in the spirit of HaluBench's instruction, to change the gold answer subtly so that it
still looks like a valid answer without the document while the document shows it is wrong, and to say what it
changed, as JSON. The reply is parsed and validated (the changed span must be in the gold answer, the new span in
the new answer, and lynx.data.perturb.check must accept it); on any failure the hand-written types are used.
"""

from __future__ import annotations

import json
import random
from typing import Callable

from lynx.data.perturb import Context, Edit, Perturbation, PerturbStats, check, perturb

INSTRUCTION = (
    "You are helping to build a test set for hallucination detectors. Below are a QUESTION, a DOCUMENT and the "
    "correct ANSWER to the question according to the document.\n"
    "Change the ANSWER subtly so that it still looks like a valid answer to the QUESTION to someone who has not "
    "read the DOCUMENT, but the DOCUMENT shows that it is wrong. Change as little as possible: for example a "
    "number, a date, a name, a unit, a negation or a comparison. Keep the style and length of the ANSWER.\n"
    "Reply with JSON only, with exactly these keys:\n"
    '{"perturbed_answer": "<the changed answer>", "original_span": "<the exact words of the ANSWER you changed>", '
    '"new_span": "<the words that replace them>"}\n\n'
    "QUESTION:\n{question}\n\nDOCUMENT:\n{document}\n\nANSWER:\n{answer}"
)


def perturbation_prompt(question: str, document: str, answer: str) -> str:
    # Plain replacement, not str.format: documents contain braces.
    return (INSTRUCTION.replace("{question}", question).replace("{document}", document)
            .replace("{answer}", answer))


class InvalidOutput(ValueError):
    pass


def parse_model_output(text: str) -> dict:
    """The first JSON object in the model's reply that has the three keys, as a dict of strings."""
    decoder = json.JSONDecoder()
    for start in [i for i, c in enumerate(text) if c == "{"]:
        try:
            obj, _ = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and {"perturbed_answer", "original_span", "new_span"} <= obj.keys():
            if not all(isinstance(obj[k], str) for k in ("perturbed_answer", "original_span", "new_span")):
                raise InvalidOutput("perturbed_answer, original_span and new_span must be strings")
            return obj
    raise InvalidOutput("no JSON object with perturbed_answer, original_span and new_span")


def validate(obj: dict, gold: str, ctx: Context) -> Perturbation:
    """A Perturbation of kind "model" from the parsed reply, or InvalidOutput saying what is wrong with it."""
    answer, before, after = obj["perturbed_answer"].strip(), obj["original_span"], obj["new_span"]
    if not answer:
        raise InvalidOutput("empty perturbed_answer")
    if len(answer) > 3 * len(gold) + 100:
        raise InvalidOutput("perturbed_answer is much longer than the gold answer")
    start = gold.find(before) if before else -1
    if start < 0:
        start = gold.lower().find(before.lower()) if before else -1
        if start < 0:
            raise InvalidOutput("original_span is not part of the gold answer")
        before = gold[start:start + len(before)]
    if not after or after not in answer:
        raise InvalidOutput("new_span is not part of perturbed_answer")
    p = Perturbation(answer, "model", (Edit(start, before, after),))
    reason = check(gold, p, ctx)
    if reason is not None:
        raise InvalidOutput(f"rejected: {reason}")
    return p


class ModelPerturber:
    """`perturber(gold, ctx, rng, stats=...) -> Perturbation | None`, like lynx.data.perturb.perturb.

    generate_fn defaults to lynx.generate.generate (imported when first needed); tests pass a fake one. The
    tokenizer needs `apply_chat_template(messages, add_generation_prompt=True)` and `decode(ids)`.
    """

    def __init__(self, model, tokenizer, *, generate_fn: Callable | None = None, max_new_tokens: int = 256,
                 stop_ids=None, fallback: Callable = perturb):
        self.model, self.tokenizer = model, tokenizer
        self.generate_fn = generate_fn
        self.max_new_tokens = max_new_tokens
        self.stop_ids = list(stop_ids if stop_ids is not None else getattr(tokenizer, "stop_ids", ()))
        self.fallback = fallback
        self.failures: list[str] = []  # why each model answer was refused, in order

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "ModelPerturber":
        from lynx.model import Llama
        from lynx.tokenizer import Tokenizer

        return cls(Llama.from_pretrained(path), Tokenizer.from_pretrained(path), **kwargs)

    def propose(self, gold: str, ctx: Context) -> Perturbation:
        """One model answer, parsed and validated (InvalidOutput otherwise)."""
        generate_fn = self.generate_fn
        if generate_fn is None:
            from lynx.generate import generate as generate_fn
        messages = [{"role": "user", "content": perturbation_prompt(ctx.question, ctx.passage, gold)}]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        new_ids = generate_fn(self.model, [prompt], max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                              temperature=0.0)[0]
        text = self.tokenizer.decode(new_ids)
        return validate(parse_model_output(text), gold, ctx)

    def __call__(self, gold: str, ctx: Context, rng: random.Random, *, stats: PerturbStats | None = None
                 ) -> Perturbation | None:
        if stats is not None:
            stats.add("model", "tried")
        try:
            p = self.propose(gold, ctx)
        except InvalidOutput as e:
            self.failures.append(str(e))
            if stats is not None:
                reason = str(e).removeprefix("rejected: ")
                stats.add("model", reason if reason in ("noop", "gold", "supported") else "invalid")
            return self.fallback(gold, ctx, rng, stats=stats)
        if stats is not None:
            stats.add("model", "accepted")
        return p
