"""Built-in problem generator (answers recomputed independently) and problem loaders."""

import json
import re
from fractions import Fraction

import pytest

from sgsd_fast.data import Problem, generate_problems, load_problems
from sgsd_fast.data.tasks import canonical_split
from sgsd_fast.data import loaders as loaders_module

# -- an independent solver for every built-in question form ----------------------------------------
# Each entry: (pattern, operation name, answer from the captured integers). The operation name and
# operands form the problem's computation, which must never be shared between train and eval.


def _signed(sign, value):
    return value if sign == "+" else -value


_FORMS = [
    (r"^What is (\d+) \+ (\d+)\?$", "add", lambda a, b: a + b),
    (r"^What is (\d+) - (\d+)\?$", "sub", lambda a, b: a - b),
    (r"^What is (\d+) times (\d+)\?$", "mul", lambda a, b: a * b),
    (r"^\w+ has (\d+) (\w+)\. \w+ gets (\d+) more \2\. How many \2 does \w+ have now\?$", "add",
     lambda a, b: a + b),
    (r"^\w+ has (\d+) (\w+) and gives away (\d+) of them\. How many \2 does \w+ have left\?$", "sub",
     lambda a, b: a - b),
    (r"^\w+ reads (\d+) pages on Monday and (\d+) pages on Tuesday\. How many pages does \w+ read in total\?$",
     "add", lambda a, b: a + b),
    (r"^A box holds (\d+) (\w+)\. How many \2 are in (\d+) boxes\?$", "mul", lambda a, b: a * b),
    (r"^What is (\d+) \+ (\d+) times (\d+)\?$", "add_mul", lambda a, b, c: a + b * c),
    (r"^What is \((\d+) \+ (\d+)\) times (\d+)\?$", "sum_mul", lambda a, b, c: (a + b) * c),
    (r"^\w+ buys (\d+) packs of (\w+) with (\d+) \2 in each pack, then gives away (\d+) \2\. "
     r"How many \2 does \w+ have left\?$", "mul_sub", lambda a, b, c: a * b - c),
    (r"^\w+ has (\d+) (\w+) and buys (\d+) more\. \w+ shares all of them equally among (\d+) friends\. "
     r"How many \2 does each friend get\?$", "sum_div", lambda a, b, c: Fraction(a + b, c)),
    (r"^A ticket costs (\d+) dollars\. \w+ buys (\d+) tickets and pays with a (\d+)-dollar bill\. "
     r"How many dollars of change does \w+ get\?$", "change", lambda p, n, bill: bill - p * n),
    (r"^\w+ thinks of a number, multiplies it by (\d+) and then adds (\d+)\. The result is (\d+)\. "
     r"What is the number\?$", "lin", lambda a, b, c: Fraction(c - b, a)),
    (r"^\w+ earns (\d+) dollars per hour and works (\d+) hours a day for (\d+) days, then spends (\d+) dollars\. "
     r"How many dollars does \w+ have left\?$", "wages", lambda r, h, d, s: r * h * d - s),
]
_WORDS = re.compile(r"^[A-Za-z]+$")


def solve(question):
    """(operation key, exact answer) of a built-in question, computed without the generator."""
    for pattern, op, fn in _FORMS:
        match = re.match(pattern, question)
        if match:
            numbers = [int(g) for g in match.groups() if not _WORDS.match(g)]
            return (op, *numbers), fn(*numbers)
    match = re.match(r"^Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\.$", question)
    if match:
        a, b, c = int(match[1]), _signed(match[2], int(match[3])), int(match[4])
        return ("lin", a, b, c), Fraction(c - b, a)
    match = re.match(r"^Solve for x: (\d+)x ([+-]) (\d+) = (\d+)x ([+-]) (\d+)\.$", question)
    if match:
        a, b = int(match[1]), _signed(match[2], int(match[3]))
        c, d = int(match[4]), _signed(match[5], int(match[6]))
        return ("lin2", a, b, c, d), Fraction(d - b, a - c)
    match = re.match(r"^The average of (\d+) numbers is (\d+)\. (\d+) of them are ([\d, ]+)\. "
                     r"What is the remaining number\?$", question)
    if match:
        count, mean, shown = int(match[1]), int(match[2]), [int(v) for v in match[4].split(", ")]
        assert int(match[3]) == count - 1 == len(shown)
        return ("mean", count, mean, *shown), count * mean - sum(shown)
    raise AssertionError(f"unrecognized built-in question: {question!r}")


# -- generator -------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_are_correct_integers(level, split):
    for problem in generate_problems(150, seed=7, split=split, levels=(level,)):
        _, answer = solve(problem.question)
        assert Fraction(answer).denominator == 1, problem.question
        assert problem.answer == str(int(answer)), problem.question
        assert problem.level == level and problem.source == "builtin"
        if level <= 3:
            assert int(answer) >= 0, "word problems of levels 1-3 have non-negative answers"


def test_train_and_eval_never_share_a_computation():
    keys = {}
    for split, seeds in (("train", (0, 1, 2)), ("eval", (3, 4, 5))):
        problems = [p for s in seeds for p in generate_problems(500, seed=s, split=split, levels=(1, 2, 3, 4, 5))]
        questions = [p.question for p in problems]
        keys[split] = {solve(q)[0] for q in questions}
    assert keys["train"] and keys["eval"]
    assert not keys["train"] & keys["eval"]


def test_deterministic_and_seed_dependent():
    first = generate_problems(60, seed=11, split="train")
    assert first == generate_problems(60, seed=11, split="train")
    assert first != generate_problems(60, seed=12, split="train")
    # Same problem, same id, in any run.
    assert all(p.id.startswith(f"builtin-L{p.level}-") for p in first)


def test_levels_balanced_and_questions_distinct():
    problems = generate_problems(90, seed=0, split="eval", levels=(1, 3, 5))
    counts = {level: sum(p.level == level for p in problems) for level in (1, 3, 5)}
    assert counts == {1: 30, 3: 30, 5: 30}
    assert len({p.question for p in problems}) == 90
    assert len({p.id for p in problems}) == 90
    assert generate_problems(0, seed=0) == []


def test_level_one_is_addition_or_subtraction_up_to_30():
    for problem in generate_problems(100, seed=3, split="train", levels=(1,)):
        (op, *numbers), _ = solve(problem.question)
        assert op in ("add", "sub") and all(1 <= v <= 30 for v in numbers)
        assert int(problem.answer) > 0, "no zero answers (60 of 200 eval answers were 0 before)"
        assert problem.key == f"{op}:{numbers[0]},{numbers[1]}"


def test_eval_split_has_200_distinct_computations_without_a_dominant_answer():
    problems = generate_problems(200, seed=0, split="eval", levels=(1,), distinct_keys=True)
    assert len({p.key for p in problems}) == 200
    assert all(canonical_split(p.key) == "eval" for p in problems)
    top = max(sum(p.answer == a for p in problems) for a in {p.answer for p in problems})
    assert top <= 10, "no answer value may dominate the eval split"
    # The computation space is finite: asking for more distinct keys than exist fails clearly.
    with pytest.raises(ValueError, match="distinct level-1 computations"):
        generate_problems(400, seed=0, split="eval", levels=(1,), distinct_keys=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": -1}, ValueError, "n must"),
        ({"n": 2.0}, ValueError, "n must"),
        ({"split": "test"}, ValueError, "split"),
        ({"seed": "0"}, TypeError, "seed"),
        ({"levels": ()}, ValueError, "levels"),
        ({"levels": (0,)}, ValueError, "levels"),
        ({"levels": (6,)}, ValueError, "levels"),
        ({"levels": (1, 1)}, ValueError, "repeat"),
        ({"levels": 1}, ValueError, "levels"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, error, match):
    args = {"n": 3, "seed": 0, "split": "train", "levels": (1, 2)} | kwargs
    n = args.pop("n")
    with pytest.raises(error, match=match):
        generate_problems(n, **args)


def test_generate_reports_exhausted_level():
    # Level 1 eval has only a few thousand distinct questions.
    with pytest.raises(ValueError, match="distinct level-1"):
        generate_problems(20_000, seed=0, split="eval", levels=(1,))


# -- loaders ---------------------------------------------------------------------------------------


def test_load_builtin():
    problems = load_problems("builtin:12", split="eval")
    assert problems == generate_problems(12, seed=0, split="eval")
    assert len(load_problems("builtin", limit=5)) == 5
    assert len(load_problems("builtin")) == loaders_module.BUILTIN_DEFAULT_SIZE
    assert {p.level for p in load_problems("builtin:6", levels=(4,), seed=2)} == {4}
    with pytest.raises(ValueError, match="builtin:N"):
        load_problems("builtin:ten")


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return str(path)


def test_load_jsonl_default_fields(tmp_path):
    source = _write_jsonl(tmp_path / "aime.jsonl", [
        {"problem": " Find x. ", "answer": 204, "id": "aime-1"},
        {"problem": "Compute y.", "answer": "\\frac{1}{2}", "id": "aime-2"},
        {"problem": "Third.", "answer": "3", "id": "aime-3"},
    ])
    problems = load_problems(source)
    assert [p.question for p in problems] == ["Find x.", "Compute y.", "Third."]
    assert [p.answer for p in problems] == ["204", "\\frac{1}{2}", "3"]
    assert [p.id for p in problems] == ["aime.jsonl-0", "aime.jsonl-1", "aime.jsonl-2"]
    assert all(isinstance(p, Problem) and p.source == source and p.level is None for p in problems)
    assert [p.id for p in load_problems(source, id_field="id", limit=2)] == ["aime-1", "aime-2"]


def _dapo_records():
    return [
        {
            "data_source": "math_dapo",
            "prompt": [{"role": "user", "content": f"Problem {i}: what is {i} squared?"}],
            "reward_model": {"ground_truth": str(i * i), "style": "rule"},
            "extra_info": {"index": f"idx-{i}"},
        }
        for i in range(4)
    ]


DAPO_FIELDS = {"problem_field": "prompt", "answer_field": "reward_model.ground_truth", "id_field": "extra_info.index"}


def test_load_dapo_shape_jsonl_and_json_list(tmp_path):
    jsonl = _write_jsonl(tmp_path / "dapo.jsonl", _dapo_records())
    json_list = tmp_path / "dapo.json"
    json_list.write_text(json.dumps(_dapo_records()), encoding="utf-8")
    for source in (jsonl, str(json_list)):
        problems = load_problems(source, **DAPO_FIELDS)
        assert [(p.id, p.question, p.answer) for p in problems] == [
            (f"idx-{i}", f"Problem {i}: what is {i} squared?", str(i * i)) for i in range(4)
        ]


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(_dapo_records()), path)
    problems = load_problems(str(path), limit=3, **DAPO_FIELDS)
    assert [(p.id, p.answer) for p in problems] == [("idx-0", "0"), ("idx-1", "1"), ("idx-2", "4")]


def test_load_reports_bad_rows(tmp_path):
    missing = _write_jsonl(tmp_path / "a.jsonl", [{"problem": "p", "answer": "1"}, {"question": "q", "answer": "2"}])
    with pytest.raises(ValueError, match=r"row 1 has no field 'problem'.*question"):
        load_problems(missing)
    empty = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "  ", "answer": "1"}])
    with pytest.raises(ValueError, match="non-empty"):
        load_problems(empty)
    no_answer = _write_jsonl(tmp_path / "c.jsonl", [{"problem": "p", "answer": None}])
    with pytest.raises(ValueError, match="'answer'"):
        load_problems(no_answer)
    no_user = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": [{"role": "system", "content": "x"}], "answer": "1"}])
    with pytest.raises(ValueError, match="without a user message"):
        load_problems(no_user, problem_field="prompt")
    broken = tmp_path / "e.jsonl"
    broken.write_text('{"problem": "p", "answer": "1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_problems(str(broken))
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="limit"):
        load_problems("builtin:3", limit=-1)


def test_missing_optional_packages_are_named(tmp_path, monkeypatch):
    real_find_spec = loaders_module.importlib.util.find_spec
    monkeypatch.setattr(
        loaders_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("datasets", "pyarrow") else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        load_problems("some-org/some-dataset")
    parquet = tmp_path / "x.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ModuleNotFoundError, match="pip install pyarrow"):
        load_problems(str(parquet))


def test_undecodable_files_are_named(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl: not UTF-8 text"):
        load_problems(str(latin))
    broken_list = tmp_path / "list.json"
    broken_list.write_text('[{"problem": "p", "answer": "1"},', encoding="utf-8")
    with pytest.raises(ValueError, match=r"list.json: not valid JSON"):
        load_problems(str(broken_list))


def test_local_path_without_a_known_extension_is_called_one(tmp_path, monkeypatch):
    real_find_spec = loaders_module.importlib.util.find_spec
    monkeypatch.setattr(loaders_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else real_find_spec(name, *a))
    (tmp_path / "good").mkdir()
    with pytest.raises(ModuleNotFoundError, match=r"good' is a local folder, not a .jsonl/.json/.parquet/.pq file"):
        load_problems(str(tmp_path / "good"))
