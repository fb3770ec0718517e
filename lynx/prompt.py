"""The Lynx judge prompt, verbatim.

Published Lynx weights were trained on exactly this text (see the Lynx model cards and the public inference
script), so it is an interoperability spec: do not reword it. The template is sent as ONE user message through the
Llama-3 chat template, which strips the content (the leading newline of the published template disappears; we keep
the stripped form here so `format_prompt` is exactly what the model sees).
"""

from __future__ import annotations

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
