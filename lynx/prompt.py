"""The Lynx judge prompt, verbatim.

Published Lynx weights were trained on exactly this text (see the Lynx model cards and the public inference
script), so it is an interoperability spec: do not reword it. The template is sent as ONE user message through the
Llama-3 chat template, which strips the content (the leading newline of the published template disappears; we keep
the stripped form here so `format_prompt` is exactly what the model sees).
"""

from __future__ import annotations

import math

PROMPT_TEMPLATE = """Given the following QUESTION, DOCUMENT and ANSWER you must analyze the provided answer and determine whether it is faithful to the contents of the DOCUMENT. The ANSWER must not offer new information beyond the context provided in the DOCUMENT. The ANSWER also must not contradict information provided in the DOCUMENT. Output your final verdict by strictly following this format: "PASS" if the answer is faithful to the DOCUMENT and "FAIL" if the answer is not faithful to the DOCUMENT. Show your reasoning.

--
QUESTION (THIS DOES NOT COUNT AS BACKGROUND INFORMATION):
{question}

--
DOCUMENT:
{context}

--
ANSWER:
{answer}

--

Your output should be in JSON FORMAT with the keys "REASONING" and "SCORE":
{{"REASONING": <your reasoning as bullet points>, "SCORE": <your final score>}}"""


def format_prompt(question: str, context: str, answer: str) -> str:
    """The judge prompt for one example (the user message content, already stripped)."""
    # str.format would also interpret braces inside the substituted texts if we formatted twice; one call is safe.
    return PROMPT_TEMPLATE.format(question=question, context=context, answer=answer).strip()


def judge_messages(question: str, context: str, answer: str) -> list[dict]:
    """Chat messages for the judge: one user turn carrying the whole prompt (what Lynx was trained on)."""
    return [{"role": "user", "content": format_prompt(question, context, answer)}]


def training_messages(question: str, context: str, answer: str, target: str) -> list[dict]:
    """Chat messages for fine-tuning: the judge prompt as the user turn, the JSON verdict as the assistant turn."""
    return judge_messages(question, context, answer) + [{"role": "assistant", "content": target}]


# --- over-long documents --------------------------------------------------------------------------------------------

# The DOCUMENT section of PROMPT_TEMPLATE: the text between these markers is what `truncate_document` shortens.
DOCUMENT_START = "\n--\nDOCUMENT:\n"
DOCUMENT_END = "\n\n--\nANSWER:"
ANSWER_END = "\n\n--\n\nYour output"  # what follows the ANSWER section's text
# Replaces the removed middle, so the model sees that the document was cut.
TRUNCATION_MARKER = "\n[... document truncated ...]\n"


def truncate_document(tokenizer, messages: list[dict], max_seq_len: int) -> list[dict] | None:
    """Messages whose chat-template ids fit max_seq_len after cutting the middle of the Lynx DOCUMENT section, or
    None if there is no document section or even an empty document does not fit.

    Cuts are made in characters (so no token is split into invalid UTF-8), sized from the measured characters per
    token of the document, and re-measured until the row fits; the first half of the kept text comes from the
    start of the document and the second half from its end."""
    for index, message in enumerate(messages):
        content = message["content"]
        start = content.find(DOCUMENT_START)
        end = content.rfind(DOCUMENT_END)
        if message["role"] == "user" and start >= 0 and end >= start + len(DOCUMENT_START):
            break
    else:
        return None
    before, document, after = content[: start + len(DOCUMENT_START)], content[start + len(DOCUMENT_START) : end], content[end:]

    def with_document(text: str) -> list[dict]:
        new = list(messages)
        new[index] = {**message, "content": before + text + after}
        return new

    keep = len(document)  # characters of the original document kept
    kept_text = document
    marker_tokens = len(tokenizer.encode(TRUNCATION_MARKER, allow_special=False))
    n_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    while n_tokens > max_seq_len:
        if keep == 0:
            return None
        kept_tokens = len(tokenizer.encode(kept_text, allow_special=False))
        chars_per_token = keep / max(1, kept_tokens)
        # Tokens to remove: the overflow, room for the marker on the first cut, and one for the seams.
        excess = n_tokens - max_seq_len + (marker_tokens if keep == len(document) else 0) + 1
        keep = max(0, keep - max(1, math.ceil(excess * chars_per_token)))
        head, tail = keep - keep // 2, keep // 2
        kept_text = document[:head] + TRUNCATION_MARKER + (document[len(document) - tail :] if tail else "")
        n_tokens = len(tokenizer.apply_chat_template(with_document(kept_text), add_generation_prompt=False))
    return with_document(kept_text)
