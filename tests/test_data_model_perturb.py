"""Model-based perturbation with an injected fake generate(): prompt, JSON parsing, validation, fallback."""

import json
import random

import pytest

from lynx.data.model_perturb import InvalidOutput, ModelPerturber, parse_model_output, perturbation_prompt
from lynx.data.perturb import Context, PerturbStats

PASSAGE = "The trial enrolled 120 patients in Boston. Mortality fell by 12% in the treated group."
GOLD = "Mortality fell by 12% in the treated group."


class CharTokenizer:
    """Characters as token ids: enough to check what the perturber sends and decodes."""

    stop_ids = [0]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        assert add_generation_prompt and [m["role"] for m in messages] == ["user"]
        return [ord(c) for c in messages[0]["content"]]

    def decode(self, ids):
        return "".join(map(chr, ids))


def fake_generate(reply: str, calls: list):
    def generate(model, prompts, *, max_new_tokens, stop_ids, temperature=0.0):
        calls.append({"model": model, "prompt": "".join(map(chr, prompts[0])), "max_new_tokens": max_new_tokens,
                      "stop_ids": stop_ids, "temperature": temperature})
        return [[ord(c) for c in reply]]
    return generate


def run(reply: str):
    calls, stats = [], PerturbStats()
    perturber = ModelPerturber("MODEL", CharTokenizer(), generate_fn=fake_generate(reply, calls), max_new_tokens=64)
    ctx = Context("How much did mortality fall?", PASSAGE, source="pubmedqa")
    p = perturber(GOLD, ctx, random.Random(0), stats=stats)
    return p, perturber, calls, stats.counts["model"]


def reply(answer, before, after, prefix="Sure! Here it is:\n", suffix="\nDone."):
    return prefix + json.dumps({"perturbed_answer": answer, "original_span": before, "new_span": after}) + suffix


def test_valid_reply_is_used():
    p, perturber, calls, counts = run(reply("Mortality fell by 21% in the treated group.", "12%", "21%"))
    assert p.kind == "model" and p.answer == "Mortality fell by 21% in the treated group."
    assert (p.before, p.after, p.edits[0].start) == ("12%", "21%", GOLD.index("12%"))
    call = calls[0]
    assert call["model"] == "MODEL" and call["max_new_tokens"] == 64 and call["stop_ids"] == [0]
    assert call["temperature"] == 0.0
    assert call["prompt"] == perturbation_prompt("How much did mortality fall?", PASSAGE, GOLD)
    assert "the DOCUMENT shows that it is wrong" in call["prompt"] and PASSAGE in call["prompt"]
    assert counts["tried"] == 1 and counts["accepted"] == 1 and perturber.failures == []


@pytest.mark.parametrize("bad, why", [
    ("I cannot do that.", "no JSON object"),
    ('{"perturbed_answer": "x"}', "no JSON object"),
    (reply("Mortality fell by 21%.", "13%", "21%"), "original_span is not part of the gold answer"),
    (reply("Mortality fell by 21%.", "12%", "31%"), "new_span is not part of perturbed_answer"),
    (reply(GOLD, "12%", "12%"), "rejected: noop"),
    # the passage says the trial enrolled 120 patients: swapping in a supported statement is refused
    (reply("The trial enrolled 120 patients in Boston.", "Mortality fell by 12% in the treated group.",
           "The trial enrolled 120 patients in Boston."), "rejected: supported"),
])
def test_invalid_replies_fall_back_to_hand_written(bad, why):
    p, perturber, calls, counts = run(bad)
    assert perturber.failures and perturber.failures[0].startswith(why)
    assert p is not None and p.kind != "model"  # the hand-written fallback produced the FAIL answer
    assert counts["tried"] == 1 and counts["accepted"] == 0
    assert sum(counts[k] for k in ("invalid", "noop", "supported")) == 1


def test_parse_model_output():
    obj = parse_model_output('noise {"a": 1} {"perturbed_answer": "b", "original_span": "c", "new_span": "d"} x')
    assert obj["perturbed_answer"] == "b"
    with pytest.raises(InvalidOutput):
        parse_model_output('{"perturbed_answer": 1, "original_span": "c", "new_span": "d"}')
    # braces in a document do not break the prompt
    assert "{x}" in perturbation_prompt("q", "a {x} b", "c")


def test_real_generate_on_tiny_model_falls_back(tmp_path):
    """Through lynx.generate.generate (imported lazily) with a tiny random Llama: its output is not JSON, so the
    hand-written perturbation takes over; this checks the call contract end to end."""
    from conftest import make_tiny_checkpoint
    from lynx.model import Llama

    path = make_tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=1024)
    perturber = ModelPerturber(Llama.from_pretrained(path), CharTokenizer(), max_new_tokens=4)
    stats = PerturbStats()
    ctx = Context("How much did mortality fall?", PASSAGE, source="pubmedqa")
    p = perturber(GOLD, ctx, random.Random(0), stats=stats)
    assert perturber.failures == ["no JSON object with perturbed_answer, original_span and new_span"]
    assert p is not None and p.kind != "model" and stats.counts["model"]["invalid"] == 1
