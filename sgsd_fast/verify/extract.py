"""Answer extraction and comparison (pure functions; the process pool lives in `pool.py`).

`extract_answer` takes the content of the last complete ``\\boxed{...}`` (nested braces
balanced), falling back to an ``Answer: ...`` line (SPEC §5). With ``answer_phrase=True`` an
"answer is ..." phrase also counts: an opt-in extension of the SPEC rule for small instruct models
(SmolLM2-135M) that ignore the box instruction and end with "The final answer is: 11" — a
verifier that never fires gives the trainer no signal. It is off by default because on real
reasoning traces a phrase like "the answer is not 5" would be read as an answer. `answers_match` compares with math-verify
(symbolic/numeric equivalence) and accepts a normalized string match as well.
"""

from __future__ import annotations

import re
import threading

__all__ = ["answers_match", "extract_answer", "normalize_answer"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Linear time by construction (completions are untrusted: thousands of tokens of whitespace are
# possible). The leading blanks stay on the line (`[^\S\n]`; `\s*` there let every line start
# re-scan all following blank lines: cubic), "blanks, stars, blanks" is written as "blanks, then
# optionally stars and blanks" so two quantifiers never compete for the same characters, and the
# answer runs to the end of its line (`.+`; the caller strips it) instead of a lazy `.+?` followed
# by `\s*$`, which re-scans a long blank tail from every position.
_ANSWER_LINE = re.compile(r"^[^\S\n]*(?:\*+\s*)?(?:final\s+)?answer\s*(?:\*+\s*)?[:：]\s*\**(.+)$",
                          re.IGNORECASE | re.MULTILINE)
_ANSWER_PHRASE = re.compile(r"\banswer\s+is\s*(?::\s*)?\**([^\n]+)", re.IGNORECASE)
# A phrase's answer ends at the end of its sentence or clause ("is 11, which ..." -> "11"). A blank
# run is tried only from its first character (the lookbehind), which keeps the split linear.
_CLAUSE_END = re.compile(r"[.,;](?:\s|$)|(?<!\s)\s+(?:which|because|since|as|and|so)\s")
# math-verify's own limits (signal-based: only usable on the main thread of a process).
_PARSE_TIMEOUT_S = 5
_VERIFY_TIMEOUT_S = 5


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each unescaped `{` -> index of its matching unescaped `}` (unbalanced ones absent).

    One stack pass over the text, so finding the content of every ``\\boxed{`` costs O(len(text))
    in total; scanning forward from each box instead is quadratic on text full of unclosed boxes.
    """
    matches: dict[int, int] = {}
    open_stack: list[int] = []
    for i, char in enumerate(text):
        if char not in "{}" or (i > 0 and text[i - 1] == "\\"):
            continue
        if char == "{":
            open_stack.append(i)
        elif open_stack:
            matches[open_stack.pop()] = i
    return matches


def extract_answer(text: str, *, answer_phrase: bool = False) -> str | None:
    """The final answer stated in a completion, or None when it states none.

    The last non-empty ``\\boxed{...}`` whose braces close wins (a box cut off by truncation, or
    an empty one such as a restated format instruction, is skipped). Without one, the last stated
    answer is used: a line ``Answer: ...`` (whole line) or, with ``answer_phrase=True``, a phrase
    "... answer is ..." (up to the end of its clause), whichever comes last; surrounding
    ``$``/``**`` and a trailing period are removed.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    boxes = list(_BOXED.finditer(text))
    if boxes:
        closing = _matching_braces(text)
        for match in reversed(boxes):
            end = closing.get(match.end() - 1)
            content = text[match.end() : end].strip() if end is not None else ""
            if content:
                return content
    lines = list(_ANSWER_LINE.finditer(text))
    phrases = list(_ANSWER_PHRASE.finditer(text)) if answer_phrase else []
    line = lines[-1] if lines else None
    phrase = phrases[-1] if phrases else None
    if line is None and phrase is None:
        return None
    if line is not None and (phrase is None or line.start() >= phrase.start()):
        answer = line.group(1)
    else:
        answer = _CLAUSE_END.split(phrase.group(1) + " ", maxsplit=1)[0]
    answer = answer.strip().strip("*").strip().strip("$").strip().rstrip(".").strip()
    return answer or None


_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def normalize_answer(answer: str) -> str:
    """A canonical string form: no `$`, spaces, ``\\text{}`` wrappers, thousands commas,
    ``\\left``/``\\right``, trailing period; ``\\dfrac``/``\\tfrac`` written as ``\\frac``."""
    text = answer.strip()
    text = _TEXT_MACRO.sub(r"\1", text)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("$", "")):
        text = text.replace(old, new)
    text = _THOUSANDS.sub("", text)
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


def _math_verify_match(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # Off the main thread math-verify's signal.alarm timeouts raise; disable them there (the
    # process pool enforces an outer timeout instead).
    on_main = threading.current_thread() is threading.main_thread()
    parse_timeout = _PARSE_TIMEOUT_S if on_main else None
    verify_timeout = _VERIFY_TIMEOUT_S if on_main else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=parse_timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=parse_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=verify_timeout))


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether predicted answer `pred` equals ground truth `gold`.

    True when math-verify finds them equivalent (``\\frac{1}{2}`` = ``0.5``, ``x=2`` = ``2``) or
    their normalized strings are equal. A missing prediction (None) or an empty one never matches.
    """
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    if pred is None:
        return False
    if not isinstance(pred, str):
        raise TypeError(f"pred must be a str or None, got {type(pred).__name__}")
    if not pred.strip():
        return False
    if normalize_answer(pred) == normalize_answer(gold):
        return True
    return _math_verify_match(pred, gold)
