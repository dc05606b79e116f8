"""Student prompt text and chat rendering shared by the student and the teachers.

Both sides must go through `render_prompt` with the same tokenizer template (a mismatch between
the student's and the teacher's template is a known bug class in self-distillation code).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ANSWER_FORMAT", "render_prompt", "student_messages"]

# No worked example inside the instruction: small models copy it (with an "e.g. \\boxed{42}",
# SmolLM2-135M answered 42 to "What is 9 + 5?").
ANSWER_FORMAT = "Work through the problem step by step, then write the final answer on its own inside \\boxed{}."

_ROLES = ("system", "user", "assistant")


def _check_question(question: Any) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("question must be a non-empty string")
    return question.strip()


def student_messages(question: str) -> list[dict[str, str]]:
    """The student's chat: one user turn with the problem and the answer-format instruction."""
    return [{"role": "user", "content": f"{_check_question(question)}\n\n{ANSWER_FORMAT}"}]


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
