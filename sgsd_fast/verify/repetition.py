"""Degenerate-repetition detection: a completion that loops is not an answer.

Small models trained on their own samples can fall into loops ("The answer is 7. The answer is
7. The answer is 7. ...") that still end in the right number. Counting such a completion as a
success rewards the loop and inflates accuracy, so the trainer and the evaluation zero the
reward of a looping completion and report the rate beside accuracy.

A completion loops when either
* one line with at least `min_line_words` words appears `max_repeats` times or more, or
* one word n-gram (n = `ngram`) appears `max_repeats` times or more.

Both checks are linear in the completion's length (one pass with a counter), so a
pathological completion cannot stall the caller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

__all__ = ["DEFAULT_MAX_REPEATS", "DEFAULT_NGRAM", "gate_repetitive", "is_repetitive"]

# Three copies of the same 6-word run: a legitimate short solution restates a phrase at most
# twice ("3 + 4 = 7 ... so 3 + 4 = 7"); three copies were loops in every case we read.
DEFAULT_NGRAM = 6
DEFAULT_MAX_REPEATS = 3
_MIN_LINE_WORDS = 3


def is_repetitive(text: str, *, ngram: int = DEFAULT_NGRAM, max_repeats: int = DEFAULT_MAX_REPEATS) -> bool:
    """Whether `text` repeats a line or a word n-gram at least `max_repeats` times (see module doc)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise ValueError(f"ngram must be an int >= 1, got {ngram!r}")
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 2:
        raise ValueError(f"max_repeats must be an int >= 2, got {max_repeats!r}")
    lines = Counter(" ".join(line.split()) for line in text.splitlines() if len(line.split()) >= _MIN_LINE_WORDS)
    if lines and max(lines.values()) >= max_repeats:
        return True
    words = text.split()
    grams = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    return bool(grams) and max(grams.values()) >= max_repeats


def gate_repetitive(texts: Sequence[str], rewards: Sequence[float], **kw: int) -> tuple[list[float], list[bool]]:
    """(rewards with every looping completion set to 0, the looping flags), in input order."""
    if len(texts) != len(rewards):
        raise ValueError(f"texts and rewards must have the same length, got {len(texts)} and {len(rewards)}")
    flags = [is_repetitive(t, **kw) for t in texts]
    return [0.0 if loop else float(r) for r, loop in zip(rewards, flags)], flags
