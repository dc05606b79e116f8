"""Every training prompt, in one place: the student's, the answer-conditioned teacher's (OPSD) and
the skill-conditioned teacher's (SGSD), plus the chat rendering both sides share.

    student_messages(question)                           -> the problem + the answer format
    answer_conditioned_messages(question, answer)        -> + the reference answer, for the teacher only
    skill_conditioned_messages(question, skill, mistake) -> + one retrieved skill / mistake note (SPEC §4)
    render_prompt(tokenizer, messages, ...)              -> the prompt string the model continues
    student_prompts(tokenizer, questions, ...)           -> rendered student prompts

Both sides must go through `render_prompt` with the same tokenizer template (a mismatch between
the student's and the teacher's template is a known bug class in self-distillation code). Every
teacher prompt ends with the student's own ending (the problem and `ANSWER_FORMAT`). The wording
that only the skill-bank builder sends (extraction, merging) lives in `sgsd_fast.skills.prompts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ANSWER_FORMAT",
    "answer_conditioned_messages",
    "render_prompt",
    "skill_conditioned_messages",
    "student_messages",
    "student_prompts",
]

# No worked example inside the instruction: small models copy it (with an "e.g. \\boxed{42}",
# SmolLM2-135M answered 42 to "What is 9 + 5?").
ANSWER_FORMAT = "Work through the problem step by step, then write the final answer on its own inside \\boxed{}."

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

TEACHER_PROBLEM = "Problem:\n{question}\n\n{answer_format}"


def _check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("question must be a non-empty string")
    return question.strip()


def student_messages(question: str) -> list[dict[str, str]]:
    """The student's chat: one user turn with the problem and the answer-format instruction."""
    return [{"role": "user", "content": f"{_check_question(question)}\n\n{ANSWER_FORMAT}"}]


def answer_conditioned_messages(question: str, answer: str) -> list[dict[str, str]]:
    """OPSD's privileged prompt: the problem, the reference answer, and the answer format."""
    content = (
        f"{_check_question(question)}\n\n"
        f"(For you only: the correct final answer is {answer}. Solve the problem yourself step by step "
        f"so that your reasoning arrives at it; do not mention that you were told the answer.)\n\n"
        f"{ANSWER_FORMAT}"
    )
    return [{"role": "user", "content": content}]


def skill_conditioned_messages(question: str, skill: Mapping[str, str] | None = None,
                               mistake: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """SGSD's teacher prompt for one (skill, mistake) pair: one user message with the soft-guidance
    instruction, the skill (title, principle, when to apply), the mistake (what not to do, why,
    what to do instead), then the problem and `ANSWER_FORMAT`. A missing side is left out.

    skill / mistake: the note's fields (`sgsd_fast.skills.FIELDS`), e.g. ``item.fields``.
    """
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
    parts.append(TEACHER_PROBLEM.format(question=question, answer_format=ANSWER_FORMAT))
    return [{"role": "user", "content": "\n\n".join(parts)}]


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
                    thinking: bool | None = None) -> list[str]:
    """The student side's rendered prompts: the problem and the answer format, nothing else."""
    return [render_prompt(tokenizer, student_messages(q), chat_template=chat_template, thinking=thinking)
            for q in questions]
