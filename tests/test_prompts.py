"""The training prompts: skill-conditioned (SGSD) and answer-conditioned (OPSD) teachers end like the student."""
from __future__ import annotations

import pytest

from sgsd_fast.models import tiny_tokenizer
from sgsd_fast.prompts import (ANSWER_FORMAT, answer_conditioned_messages, skill_conditioned_messages,
                               student_messages, student_prompts)

SKILL = {"title": "Draw a picture", "principle": "principle of Draw a picture", "when_to_apply": "often"}
MISTAKE = {"description": "Forgetting a quantity", "why_it_happens": "because", "how_to_avoid": "care"}


def test_skill_conditioned_layout():
    (message,) = skill_conditioned_messages("How many apples?", SKILL, MISTAKE)
    text = message["content"]
    assert message["role"] == "user"
    for value in [*SKILL.values(), *MISTAKE.values()]:
        assert value in text
    assert "quote" in text and "soft guidance" in text
    assert text.index("Draw a picture") < text.index("Forgetting a quantity") < text.index("How many apples?")
    assert text.endswith("How many apples?\n\n" + ANSWER_FORMAT)

    only_mistake = skill_conditioned_messages("Q?", mistake=MISTAKE)[0]["content"]
    assert "Forgetting a quantity" in only_mistake and "technique" not in only_mistake
    with pytest.raises(ValueError, match="neither a skill nor a mistake"):
        skill_conditioned_messages("Q?")


def test_answer_conditioned_prompt_carries_the_answer_and_ends_like_the_student():
    (message,) = answer_conditioned_messages("What is 2 + 3?", "5")
    assert message["role"] == "user" and "the correct final answer is 5" in message["content"]
    assert message["content"].startswith("What is 2 + 3?") and message["content"].endswith(ANSWER_FORMAT)
    assert student_messages("What is 2 + 3?")[0]["content"].endswith(ANSWER_FORMAT)


def test_student_prompts_are_rendered_student_messages():
    tok = tiny_tokenizer()
    (prompt,) = student_prompts(tok, ["What is 2 + 3?"])
    assert prompt == f"<|im_start|>user\nWhat is 2 + 3?\n\n{ANSWER_FORMAT}<|im_end|>\n<|im_start|>assistant\n"
