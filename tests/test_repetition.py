"""Looping completions are detected (lines and n-grams), in linear time, and never rewarded."""
import time

import pytest

from sgsd_fast.verify.repetition import gate_repetitive, is_repetitive


@pytest.mark.parametrize("text", [
    "3 plus 4 is 7.\nSo we add them.\nThe answer is 7.",
    "Ava has 5 apples and gets 3 more, so Ava has 5 + 3 = 8 apples. The answer is 8.",
    "5 + 3 = 8. Check: 8 - 3 = 5, so 5 + 3 = 8. The answer is 8.",  # a restatement, twice
    "",
])
def test_ordinary_answers_are_not_loops(text):
    assert not is_repetitive(text)


@pytest.mark.parametrize("text", [
    "The answer is 7. " * 5,                                         # a sentence loop on one line
    "Step: add the numbers together\n" * 3 + "The answer is 9.",    # a repeated line
    "We know that 4 + 4 = 8 and " * 3,                               # an n-gram loop
])
def test_loops_are_detected(text):
    assert is_repetitive(text)


def test_thresholds_are_parameters():
    text = "the cat sat on the mat and " * 2
    assert not is_repetitive(text)
    assert is_repetitive(text, max_repeats=2)
    assert not is_repetitive("a b c a b c a b c", ngram=4)
    assert is_repetitive("a b c a b c a b c", ngram=3)


def test_linear_time_on_pathological_text():
    t0 = time.perf_counter()
    assert not is_repetitive("\n" * 200_000)
    assert is_repetitive("x " * 200_000)
    assert time.perf_counter() - t0 < 2.0


def test_gate_zeroes_only_looping_successes():
    texts = ["The answer is 7.", "The answer is 7. " * 4, "no idea"]
    rewards, flags = gate_repetitive(texts, [1.0, 1.0, 0.0])
    assert rewards == [1.0, 0.0, 0.0] and flags == [False, True, False]
    with pytest.raises(ValueError, match="same length"):
        gate_repetitive(texts, [1.0])


@pytest.mark.parametrize("kw, match", [({"ngram": 0}, "ngram"), ({"max_repeats": 1}, "max_repeats")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        is_repetitive("abc", **kw)
    with pytest.raises(TypeError, match="text must be a str"):
        is_repetitive(None)
