"""Every training prompt, in one place: the student's, the answer-conditioned teacher's (OPSD) and
the skill-conditioned teacher's (SGSD), plus the chat rendering both sides share.

    student_messages(question, fmt)                           -> the problem + the answer format
    answer_conditioned_messages(question, answer, fmt)        -> + the reference answer, for the teacher only
    skill_conditioned_messages(question, skill, mistake, fmt) -> + one retrieved skill / mistake note (SPEC §4)
    render_prompt(tokenizer, messages, ...)              -> the prompt string the model continues
    student_prompts(tokenizer, questions, ...)           -> rendered student prompts

Both sides must go through `render_prompt` with the same tokenizer template (a mismatch between
the student's and the teacher's template is a known bug class in self-distillation code), and
with the same `AnswerFormat`: the instruction that ends every prompt and, optionally, few-shot
example turns placed before the problem. Every teacher prompt thus ends like the student's. The
wording that only the skill-bank builder sends (extraction, merging) lives in
`sgsd_fast.skills.prompts`.

Two formats:

* ``boxed`` (SPEC §5, the library default and the paper config): "... write the final answer
  inside \\boxed{}", no examples;
* ``answer_is`` (the embedded SmolLM2 job): one worked example turn, then "Write the
  calculation, then end with: The answer is <number>." SmolLM2-135M never writes a box; with the
  ``boxed`` instruction it solved 10-27 % of 48 level-1 problems (most answers truncated rambling),
  with this format 45 % greedy and 28 % sampled at T = 0.7 (120 level-1 eval problems), in ~18
  tokens and with a 110-token prompt. The verifier reads it with ``answer_phrase=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ANSWER_FORMAT",
    "ANSWER_FORMATS",
    "AnswerFormat",
    "answer_conditioned_messages",
    "answer_format",
    "render_prompt",
    "skill_conditioned_messages",
    "student_messages",
    "student_prompts",
]

# No worked example inside the instruction: small models copy it (with an "e.g. \\boxed{42}",
# SmolLM2-135M answered 42 to "What is 9 + 5?"). Worked examples go in separate turns instead.
ANSWER_FORMAT = "Work through the problem step by step, then write the final answer on its own inside \\boxed{}."

_ANSWER_IS = "Write the calculation, then end with: The answer is <number>."


@dataclass(frozen=True)
class AnswerFormat:
    """How every prompt asks for the answer: an instruction ending the user turn, and optional
    few-shot (question, reply) example turns before it. The examples use numbers and wording of
    their own (no built-in problem is rendered this way: names and objects differ)."""

    name: str
    instruction: str
    examples: tuple[tuple[str, str], ...] = ()

    def example_turns(self) -> list[dict[str, str]]:
        """The few-shot turns that open every prompt of this format (student and teachers alike).

        The instruction is not repeated inside them: the worked reply already shows the format,
        and every prompt token is paid for by every rollout, teacher pass and evaluation (with it
        in each example the answer_is prompt was 177 tokens instead of 110, at the same accuracy)."""
        turns: list[dict[str, str]] = []
        for question, reply in self.examples:
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return turns

    def messages(self, content: str) -> list[dict[str, str]]:
        """The example turns, then one user turn: `content` and the instruction."""
        return self.example_turns() + [{"role": "user", "content": f"{content}\n\n{self.instruction}"}]


# The example's computation (add 6,7) belongs to the built-in train split, so no
# eval problem has its answer in the prompt (tests/test_prompts_format.py checks it).
ANSWER_FORMATS: dict[str, AnswerFormat] = {
    "boxed": AnswerFormat("boxed", ANSWER_FORMAT),
    "answer_is": AnswerFormat("answer_is", _ANSWER_IS, examples=(
        ("Mia has 6 pears and gets 7 more pears. How many pears does Mia have now?",
         "6 + 7 = 13. The answer is 13."),
    )),
}


def answer_format(name: str | AnswerFormat) -> AnswerFormat:
    """The format named `name` (or `name` itself when it already is one)."""
    if isinstance(name, AnswerFormat):
        return name
    if name not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {sorted(ANSWER_FORMATS)}, got {name!r}")
    return ANSWER_FORMATS[name]

_ROLES = ("system", "user", "assistant")

# ---- the skill-conditioned teacher (SPEC §4; the project's own wording) -------------------------

TEACHER_PREAMBLE = (
    "Some notes from earlier practice are below. Treat them as soft guidance: follow them only "
    "where they genuinely help with this problem, and never quote, cite or mention the notes "
    "in your solution."
)

SKILL_NOTE = (
    "A technique that often helps: {title}\n"
    "How it works: {principle}\n"
    "When to use it: {when_to_apply}"
)

MISTAKE_NOTE = (
    "A trap to stay out of: {description}\n"
    "Why people fall into it: {why_it_happens}\n"
    "What to do instead: {how_to_avoid}"
)

TEACHER_PROBLEM = "Problem:\n{question}\n\n{instruction}"


def _check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("question must be a non-empty string")
    return question.strip()


def student_messages(question: str, fmt: str | AnswerFormat = "boxed") -> list[dict[str, str]]:
    """The student's chat: the format's example turns, then the problem and its instruction."""
    return answer_format(fmt).messages(_check_question(question))


def answer_conditioned_messages(question: str, answer: str, fmt: str | AnswerFormat = "boxed") -> list[dict[str, str]]:
    """OPSD's privileged prompt: the format's example turns, the problem, the reference answer, and
    the format's instruction."""
    content = (
        f"{question}\n\n"
        f"(For you only: the correct final answer is {answer}. Solve the problem yourself step by step "
        f"so that your reasoning arrives at it; do not mention that you were told the answer.)"
    )
    return answer_format(fmt).messages(content)


def skill_conditioned_messages(question: str, skill: Mapping[str, str] | None = None,
                               mistake: Mapping[str, str] | None = None,
                               fmt: str | AnswerFormat = "boxed") -> list[dict[str, str]]:
    """SGSD's teacher prompt for one (skill, mistake) pair: the format's example turns (as in the
    student's prompt), then one user message with the soft-guidance instruction, the skill (title,
    principle, when to apply), the mistake (what not to do, why, what to do instead), then the
    problem and the format's instruction. A missing side is left out.

    skill / mistake: the note's fields (`sgsd_fast.skills.FIELDS`), e.g. ``item.fields``.
    """
    fmt = answer_format(fmt)
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if skill is None and mistake is None:
        raise ValueError("skill and mistake are both None (the context carries neither a skill nor a mistake): "
                         "a teacher needs at least one note")
    parts = [TEACHER_PREAMBLE]
    if skill is not None:
        parts.append(SKILL_NOTE.format(**skill))
    if mistake is not None:
        parts.append(MISTAKE_NOTE.format(**mistake))
    parts.append(TEACHER_PROBLEM.format(question=question, instruction=fmt.instruction))
    return fmt.example_turns() + [{"role": "user", "content": "\n\n".join(parts)}]


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        if message["role"] not in _ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {_ROLES}, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise TypeError(f"messages[{i}]['content'] must be a str, got {type(message['content']).__name__}")
    return messages


def _plain_text(messages: list[dict[str, str]]) -> str:
    """Template-free rendering: role-labelled turns ending with an open assistant turn."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    chat_template: bool = True,
    thinking: bool | None = None,
) -> str:
    """Render `messages` into the prompt string the model continues.

    Args:
        tokenizer: a transformers tokenizer.
        messages: chat turns (``role`` in system/user/assistant, ``content`` a str).
        chat_template: use the tokenizer's chat template (with the generation prompt appended);
            False, or a tokenizer without a template, gives a plain ``Role: text`` rendering.
        thinking: passed as ``enable_thinking`` to templates that support it (Qwen3); None leaves
            the template's default. Templates that ignore the flag render unchanged.
    """
    messages = _check_messages(messages)
    if thinking is not None and not isinstance(thinking, bool):
        raise TypeError(f"thinking must be None or a bool, got {thinking!r}")
    if not chat_template or not getattr(tokenizer, "chat_template", None):
        return _plain_text(messages)
    kwargs: dict[str, Any] = {}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def student_prompts(tokenizer: Any, questions: Sequence[str], *, chat_template: bool = True,
                    thinking: bool | None = None, fmt: str | AnswerFormat = "boxed") -> list[str]:
    """The student side's rendered prompts: the format's examples, the problem and its instruction."""
    return [render_prompt(tokenizer, student_messages(q, fmt), chat_template=chat_template, thinking=thinking)
            for q in questions]
