"""The judge prompt must be byte-identical to the published Lynx template (copied here from LYNX.md)."""

import json

from lynx.prompt import (
    DOCUMENT_END, DOCUMENT_START, PROMPT_TEMPLATE, format_prompt, judge_messages, training_messages,
)

# Verbatim from the Lynx model card / LYNX.md, with the placeholders left in; doubled braces are literal braces.
PUBLISHED_TEMPLATE = """
Given the following QUESTION, DOCUMENT and ANSWER you must analyze the provided answer and determine whether it is faithful to the contents of the DOCUMENT. The ANSWER must not offer new information beyond the context provided in the DOCUMENT. The ANSWER also must not contradict information provided in the DOCUMENT. Output your final verdict by strictly following this format: "PASS" if the answer is faithful to the DOCUMENT and "FAIL" if the answer is not faithful to the DOCUMENT. Show your reasoning.

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
{{"REASONING": <your reasoning as bullet points>, "SCORE": <your final score>}}
"""


def test_format_prompt_matches_published_text():
    q, c, a = "Who wrote it?", "The book was written by Ann {Smith}.", "Ann"
    expected = PUBLISHED_TEMPLATE.format(question=q, context=c, answer=a).strip()
    assert format_prompt(q, c, a) == expected
    assert PROMPT_TEMPLATE == PUBLISHED_TEMPLATE.strip()
    # Spot checks that do not depend on the copied template: literal braces and the substituted texts.
    text = format_prompt(q, c, a)
    assert text.endswith('{"REASONING": <your reasoning as bullet points>, "SCORE": <your final score>}')
    assert "DOCUMENT:\nThe book was written by Ann {Smith}.\n\n--\nANSWER:\nAnn\n\n--" in text
    assert text.startswith("Given the following QUESTION")


def test_messages():
    msgs = judge_messages("q", "c", "a")
    assert msgs == [{"role": "user", "content": format_prompt("q", "c", "a")}]
    target = json.dumps({"REASONING": ["x"], "SCORE": "PASS"})
    msgs = training_messages("q", "c", "a", target)
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["content"] == target


def test_document_markers_enclose_the_document_of_the_published_template():
    # truncate_document finds the document between these markers: they must frame {context} exactly, once.
    assert PUBLISHED_TEMPLATE.count(DOCUMENT_START + "{context}" + DOCUMENT_END) == 1
    assert PUBLISHED_TEMPLATE.count(DOCUMENT_START) == PUBLISHED_TEMPLATE.count(DOCUMENT_END) == 1
