"""Problem loaders: built-in generator, JSONL/JSON, parquet and Hugging Face datasets.

Field names are configurable and may be dotted paths into nested records, which covers the
common math-RL shapes:

* AIME/HMMT/MATH style: ``problem`` + ``answer`` (the defaults);
* verl/DAPO-Math-17k style: ``problem_field="prompt"`` (a list of chat messages: the last user
  message's content is taken) and ``answer_field="reward_model.ground_truth"``.

A problem text taken from such data is used as is (any instruction the dataset embeds stays).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sgsd_fast.data.tasks import Problem, generate_problems

__all__ = ["BUILTIN_DEFAULT_SIZE", "load_problems"]

# Problems produced by a bare "builtin" source.
BUILTIN_DEFAULT_SIZE = 1000
_BUILTIN = re.compile(r"^builtin(?::(\d+))?$")
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _field(record: Mapping[str, Any], path: str, row: int, source: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            available = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(f"{source}: row {row} has no field {path!r} (top-level fields: {available})")
        value = value[part]
    return value


def _problem_text(value: Any, row: int, source: str, field: str) -> str:
    """A problem field is a string, or chat messages whose last user turn holds the problem."""
    if isinstance(value, list):
        users = [m for m in value if isinstance(m, Mapping) and m.get("role") == "user"]
        if not users:
            raise ValueError(f"{source}: row {row} field {field!r} is a list without a user message")
        value = users[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: row {row} field {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _answer_text(value: Any, row: int, source: str, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{source}: row {row} field {field!r} must be a string or number, got {value!r}")
    text = str(value).strip()
    if not text:
        raise ValueError(f"{source}: row {row} field {field!r} is empty")
    return text


def _records_to_problems(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str,
    problem_field: str,
    answer_field: str,
    id_field: str | None,
    limit: int | None,
) -> list[Problem]:
    problems = []
    for row, record in enumerate(records):
        if limit is not None and row >= limit:
            break
        if not isinstance(record, Mapping):
            raise ValueError(f"{source}: row {row} must be an object/record, got {type(record).__name__}")
        question = _problem_text(_field(record, problem_field, row, source), row, source, problem_field)
        answer = _answer_text(_field(record, answer_field, row, source), row, source, answer_field)
        if id_field is not None:
            problem_id = str(_field(record, id_field, row, source))
        else:
            problem_id = f"{Path(source).name or source}-{row}"
        problems.append(Problem(id=problem_id, question=question, answer=answer, source=source))
    return problems


def _read_json(path: Path) -> list[Any]:
    """JSON Lines, or a JSON file holding one list of records."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {line_no} is not valid JSON ({exc.msg})") from exc
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    if importlib.util.find_spec("pyarrow") is None:
        raise ModuleNotFoundError(
            f"reading {path} needs pyarrow: `pip install pyarrow` (or `pip install sgsd-fast[data]`)"
        )
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _read_hf(source: str, split: str, config: str | None = None) -> Iterable[Mapping[str, Any]]:
    path = Path(source)
    if importlib.util.find_spec("datasets") is None:
        # A local path is far more often a mistyped file name than a dataset folder.
        local = f"{source!r} is a local {'folder' if path.is_dir() else 'file'}, not a "\
                f"{'/'.join(_JSON_SUFFIXES + _PARQUET_SUFFIXES)} file; " if path.exists() else ""
        raise ModuleNotFoundError(
            f"{local}loading {source!r} as a Hugging Face dataset needs the `datasets` package: "
            "`pip install datasets` (or `pip install sgsd-fast[data]`)"
        )
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source}: no split {split!r} (available: {sorted(loaded)})")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(source, config, split=split)


def load_problems(
    source: str,
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
    id_field: str | None = None,
    seed: int = 0,
    levels: tuple[int, ...] = (1, 2, 3),
) -> list[Problem]:
    """Load problems from `source`.

    Args:
        source: ``"builtin"`` / ``"builtin:N"`` (the offline generator, `split` "train" or
            "eval", `seed` and `levels` forwarded), a ``.jsonl``/``.json`` or ``.parquet`` file
            (read whole; `split` does not apply), or a Hugging Face dataset (a `save_to_disk`
            directory, a local dataset directory, or a hub id — fetched or read from the cache
            by `datasets`).
        problem_field: dotted path to the problem (a string or a list of chat messages).
        answer_field: dotted path to the ground-truth answer (string or number).
        split: dataset split.
        config: configuration name of a Hub dataset (``"main"`` for ``openai/gsm8k``).
        limit: keep at most this many problems (the first ones, in source order).
        id_field: dotted path to a stable id; default ``"<file name>-<row>"``.

    Raises:
        ValueError: unknown source shape, missing/empty fields, bad JSON, bad `limit`.
        ModuleNotFoundError: pyarrow / datasets needed but not installed.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a non-empty str, got {source!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")

    builtin = _BUILTIN.match(source)
    if builtin:
        n = int(builtin.group(1)) if builtin.group(1) else BUILTIN_DEFAULT_SIZE
        if limit is not None:
            n = min(n, limit)
        return generate_problems(n, seed=seed, split=split, levels=levels)
    if source.startswith("builtin"):
        raise ValueError(
            f"builtin source must be 'builtin' or 'builtin:N' with N a non-negative integer, got {source!r}"
        )

    path = Path(source)
    fields = {"problem_field": problem_field, "answer_field": answer_field, "id_field": id_field, "limit": limit}
    if path.suffix in _JSON_SUFFIXES or path.suffix in _PARQUET_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f"problem file not found: {source}")
        records = _read_json(path) if path.suffix in _JSON_SUFFIXES else _read_parquet(path)
        return _records_to_problems(records, source=source, **fields)
    return _records_to_problems(_read_hf(source, split, config), source=source, **fields)
