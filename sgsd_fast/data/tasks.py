"""Built-in verifiable math word problems, generated offline and deterministically.

Difficulty levels (every answer is an integer, so verification is unambiguous):

1. one addition or subtraction on numbers up to 30 (``17 + 8``, "has 25, gives away 9"); the
   answer is never 0 — the embedded job's task: SmolLM2-135M with the few-shot ``answer_is``
   prompt solves about half of it, and its eval split holds ~270 distinct computations, so a
   200-problem evaluation has a different computation in every problem;
2. one operation on two-digit numbers, or a single-digit product;
3. two operations (precedence, buy-then-give-away, share equally, change from a bill);
4. linear equations ``a·x + b = c`` (also phrased as "think of a number");
5. equations with x on both sides and three-step word problems.

Train/eval separation is a property of the arithmetic, not of the wording: each problem has a
canonical key (the operation and its operands) and a stable SHA-256 of that key assigns it to
exactly one split. The same computation therefore never appears in both splits, whatever
template, name or object is drawn around it. The key travels with the problem
(`Problem.key`): rewordings of one computation are not independent evidence, so paired
statistics resample them together, and `distinct_keys=True` draws one problem per computation.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["EVAL_FRACTION_PERCENT", "LEVELS", "Problem", "canonical_split", "generate_problems"]

# Share of canonical keys reserved for evaluation.
EVAL_FRACTION_PERCENT = 20
_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem; `answer` is the ground truth in a form math-verify can parse."""

    id: str
    question: str
    answer: str
    source: str = ""
    level: int | None = None
    key: str | None = None  # the underlying computation (built-in task); rewordings share it


def canonical_split(key: str) -> str:
    """The split ("train" or "eval") that owns canonical key `key` (stable across runs/machines)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_FRACTION_PERCENT else "train"


_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "cards", "coins", "toys")

# A draw: (question, integer answer, canonical key of the underlying computation).
_Draw = tuple[str, int, str]
_Template = Callable[[random.Random], _Draw]


def _signed(value: int) -> str:
    """`+ 5` / `- 5`, for writing `a·x + b` with a negative b naturally."""
    return f"+ {value}" if value >= 0 else f"- {-value}"


# Level 1 ----------------------------------------------------------------------------------------


# Operands of level 1: 1..30 gives 900 sums and 435 differences (b < a, so no answer is 0 and no
# value dominates); 20 % of them (~270) belong to the eval split.
_L1_MAX = 30


def _l1_pair(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "add":
        return rng.randint(1, _L1_MAX), rng.randint(1, _L1_MAX)
    a = rng.randint(2, _L1_MAX)
    return a, rng.randint(1, a - 1)


def _l1_add(rng: random.Random) -> _Draw:
    a, b = _l1_pair(rng, "add")
    return f"What is {a} + {b}?", a + b, f"add:{a},{b}"


def _l1_sub(rng: random.Random) -> _Draw:
    a, b = _l1_pair(rng, "sub")
    return f"What is {a} - {b}?", a - b, f"sub:{a},{b}"


def _l1_story_add(rng: random.Random) -> _Draw:
    a, b = _l1_pair(rng, "add")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    question = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
    return question, a + b, f"add:{a},{b}"


def _l1_story_sub(rng: random.Random) -> _Draw:
    a, b = _l1_pair(rng, "sub")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    question = f"{name} has {a} {item} and gives away {b} of them. How many {item} does {name} have left?"
    return question, a - b, f"sub:{a},{b}"


# Level 2 ----------------------------------------------------------------------------------------


def _l2_add(rng: random.Random) -> _Draw:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", a + b, f"add:{a},{b}"


def _l2_sub(rng: random.Random) -> _Draw:
    a = rng.randint(20, 99)
    b = rng.randint(10, a)
    return f"What is {a} - {b}?", a - b, f"sub:{a},{b}"


def _l2_mul(rng: random.Random) -> _Draw:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}?", a * b, f"mul:{a},{b}"


def _l2_story_add(rng: random.Random) -> _Draw:
    a, b = rng.randint(10, 60), rng.randint(10, 60)
    name = rng.choice(_NAMES)
    question = f"{name} reads {a} pages on Monday and {b} pages on Tuesday. How many pages does {name} read in total?"
    return question, a + b, f"add:{a},{b}"


def _l2_story_mul(rng: random.Random) -> _Draw:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    item = rng.choice(_ITEMS)
    question = f"A box holds {a} {item}. How many {item} are in {b} boxes?"
    return question, a * b, f"mul:{a},{b}"


# Level 3 ----------------------------------------------------------------------------------------


def _l3_precedence(rng: random.Random) -> _Draw:
    a, b, c = rng.randint(1, 20), rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} + {b} times {c}?", a + b * c, f"add_mul:{a},{b},{c}"


def _l3_grouped(rng: random.Random) -> _Draw:
    a, b, c = rng.randint(1, 12), rng.randint(1, 12), rng.randint(2, 6)
    return f"What is ({a} + {b}) times {c}?", (a + b) * c, f"sum_mul:{a},{b},{c}"


def _l3_packs(rng: random.Random) -> _Draw:
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    question = (
        f"{name} buys {a} packs of {item} with {b} {item} in each pack, then gives away {c} {item}. "
        f"How many {item} does {name} have left?"
    )
    return question, a * b - c, f"mul_sub:{a},{b},{c}"


def _l3_share(rng: random.Random) -> _Draw:
    c, each = rng.randint(2, 6), rng.randint(2, 9)
    a = rng.randint(1, c * each - 1)
    b = c * each - a
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    question = (
        f"{name} has {a} {item} and buys {b} more. {name} shares all of them equally among {c} friends. "
        f"How many {item} does each friend get?"
    )
    return question, each, f"sum_div:{a},{b},{c}"


def _l3_change(rng: random.Random) -> _Draw:
    price, count = rng.randint(2, 9), rng.randint(2, 5)
    bill = rng.choice([bill for bill in (20, 50, 100) if bill > price * count])
    name = rng.choice(_NAMES)
    question = (
        f"A ticket costs {price} dollars. {name} buys {count} tickets and pays with a {bill}-dollar bill. "
        f"How many dollars of change does {name} get?"
    )
    return question, bill - price * count, f"change:{price},{count},{bill}"


# Level 4 ----------------------------------------------------------------------------------------


def _l4_equation(rng: random.Random) -> _Draw:
    a, x = rng.randint(2, 9), rng.choice([v for v in range(-9, 13) if v != 0])
    b = rng.choice([v for v in range(-20, 21) if v != 0])
    c = a * x + b
    return f"Solve for x: {a}x {_signed(b)} = {c}.", x, f"lin:{a},{b},{c}"


def _l4_think(rng: random.Random) -> _Draw:
    a, x, b = rng.randint(2, 9), rng.randint(1, 15), rng.randint(1, 30)
    c = a * x + b
    name = rng.choice(_NAMES)
    question = (
        f"{name} thinks of a number, multiplies it by {a} and then adds {b}. The result is {c}. "
        "What is the number?"
    )
    return question, x, f"lin:{a},{b},{c}"


# Level 5 ----------------------------------------------------------------------------------------


def _l5_both_sides(rng: random.Random) -> _Draw:
    a, c = rng.sample(range(2, 10), 2)
    x = rng.choice([v for v in range(-10, 13) if v != 0])
    b = rng.choice([v for v in range(-20, 21) if v != 0])
    d = a * x + b - c * x
    return f"Solve for x: {a}x {_signed(b)} = {c}x {_signed(d)}.", x, f"lin2:{a},{b},{c},{d}"


def _l5_wages(rng: random.Random) -> _Draw:
    rate, hours, days = rng.randint(5, 15), rng.randint(2, 8), rng.randint(2, 6)
    spent = rng.randint(1, rate * hours * days - 1)
    name = rng.choice(_NAMES)
    question = (
        f"{name} earns {rate} dollars per hour and works {hours} hours a day for {days} days, "
        f"then spends {spent} dollars. How many dollars does {name} have left?"
    )
    return question, rate * hours * days - spent, f"wages:{rate},{hours},{days},{spent}"


def _l5_average(rng: random.Random) -> _Draw:
    count, mean = rng.randint(3, 5), rng.randint(5, 40)
    values = [rng.randint(1, 2 * mean) for _ in range(count - 1)]
    last = count * mean - sum(values)
    if last <= 0:
        values = [mean] * (count - 1)
        last = mean
    shown = ", ".join(str(v) for v in values)
    question = (
        f"The average of {count} numbers is {mean}. {count - 1} of them are {shown}. What is the remaining number?"
    )
    return question, last, f"mean:{count},{mean},{shown}"


LEVELS: dict[int, tuple[_Template, ...]] = {
    1: (_l1_add, _l1_sub, _l1_story_add, _l1_story_sub),
    2: (_l2_add, _l2_sub, _l2_mul, _l2_story_add, _l2_story_mul),
    3: (_l3_precedence, _l3_grouped, _l3_packs, _l3_share, _l3_change),
    4: (_l4_equation, _l4_think),
    5: (_l5_both_sides, _l5_wages, _l5_average),
}

# Rejection sampling gives up after this many draws per requested problem: a level's space of
# distinct questions in one split is finite (level 1 has a few thousand).
_MAX_DRAWS_PER_PROBLEM = 200


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    if isinstance(levels, int) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"levels must be a non-empty sequence of levels from {sorted(LEVELS)}, got {levels!r}")
    for level in levels:
        if isinstance(level, bool) or level not in LEVELS:
            raise ValueError(f"levels must contain only levels from {sorted(LEVELS)}, got {level!r}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"levels must not repeat a level, got {levels!r}")
    return tuple(levels)


def generate_problems(
    n: int,
    *,
    seed: int,
    split: str = "train",
    levels: Sequence[int] = (1, 2, 3),
    distinct_keys: bool = False,
) -> list[Problem]:
    """Generate `n` distinct problems of the given split, spread evenly over `levels`.

    With ``distinct_keys=True`` no two problems share an underlying computation (an evaluation
    set whose every problem is independent evidence); otherwise only the questions are distinct.
    Deterministic in ``(n, seed, split, levels, distinct_keys)``. Problems of the train and eval splits never
    share a canonical computation (see module docstring), for any seeds. Questions within one
    call are distinct. Problem ids are content hashes, so the same problem has the same id in
    every run.

    Raises:
        ValueError: bad arguments, or `n` exceeds what a level can supply without repeats.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    levels = _check_levels(levels)
    if not isinstance(distinct_keys, bool):
        raise TypeError(f"distinct_keys must be a bool, got {distinct_keys!r}")

    rng = random.Random(f"sgsd_fast.builtin:{seed}:{split}")
    seen: set[str] = set()
    problems: list[Problem] = []
    for i in range(n):
        level = levels[i % len(levels)]
        for _ in range(_MAX_DRAWS_PER_PROBLEM):
            question, answer, key = rng.choice(LEVELS[level])(rng)
            if question not in seen and canonical_split(key) == split and not (distinct_keys and key in seen):
                break
        else:
            what = "computations" if distinct_keys else "problems"
            raise ValueError(
                f"could not draw {n} distinct level-{level} {what} for split {split!r}; request fewer"
            )
        seen.update((question, key))
        digest = hashlib.sha256(question.encode("utf-8")).hexdigest()[:12]
        problem_id = f"builtin-L{level}-{digest}"
        problems.append(Problem(problem_id, question, str(answer), source="builtin", level=level, key=key))
    rng.shuffle(problems)
    return problems
