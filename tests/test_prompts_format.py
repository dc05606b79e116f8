"""The `answer_is` answer format: few-shot turns shared by student and teachers, read by the verifier."""
from __future__ import annotations

import re

import pytest

from sgsd_fast.data.tasks import canonical_split
from sgsd_fast.prompts import (ANSWER_FORMATS, answer_conditioned_messages, answer_format, skill_conditioned_messages,
                               student_messages)
from sgsd_fast.skills.items import SkillItem
from sgsd_fast.verify import answers_match, extract_answer

FMT = ANSWER_FORMATS["answer_is"]


def test_examples_are_train_split_computations():
    # An example whose computation were in the eval split would put an eval answer in every prompt.
    for question, reply in FMT.examples:
        a, op, b = re.match(r"(\d+) ([+-]) (\d+) = ", reply).groups()
        assert canonical_split(f"{'add' if op == '+' else 'sub'}:{a},{b}") == "train", question
        assert extract_answer(reply, answer_phrase=True) == str(eval(f"{a}{op}{b}"))


def test_student_and_teachers_share_the_example_turns_and_instruction():
    student = student_messages("What is 12 + 9?", "answer_is")
    assert [m["role"] for m in student] == ["user", "assistant", "user"]
    assert student[-1]["content"].endswith(FMT.instruction) and "What is 12 + 9?" in student[-1]["content"]
    skill = SkillItem.new("skill", {"title": "Count on", "principle": "Start from the larger number.",
                                    "when_to_apply": "Small sums."})
    mistake = SkillItem.new("mistake", {"description": "Off by one", "why_it_happens": "Counting the start.",
                                        "how_to_avoid": "Count the steps."})
    teacher = skill_conditioned_messages("What is 12 + 9?", skill.fields, mistake.fields, "answer_is")
    assert teacher[:-1] == student[:-1]
    assert teacher[-1]["content"].endswith(FMT.instruction) and "Count on" in teacher[-1]["content"]
    opsd = answer_conditioned_messages("What is 12 + 9?", "21", "answer_is")
    assert opsd[:-1] == student[:-1] and "21" in opsd[-1]["content"]
    assert opsd[-1]["content"].endswith(FMT.instruction)


def test_boxed_format_is_the_spec_default():
    (message,) = student_messages("What is 2 + 2?")
    assert message["content"].endswith(ANSWER_FORMATS["boxed"].instruction) and "\\boxed{}" in message["content"]
    with pytest.raises(ValueError, match="answer_format must be one of"):
        answer_format("latex")


@pytest.mark.parametrize("completion, gold, ok", [
    ("12 + 9 = 21. The answer is 21.", "21", True),
    ("12 + 9 = 21. The answer is 22.", "21", False),
    ("The answer is 21.\n12 + 9 = 21.", "21", True),
    ("12 + 9 = 21.", "21", False),  # no stated answer: the format was not followed
])
def test_verifier_reads_the_answer_is_format(completion, gold, ok):
    assert answers_match(extract_answer(completion, answer_phrase=True), gold) is ok
