"""Cold-start bank construction (SPEC §4): attempt, verify, extract, merge, store as static items.

Stages, each persisted in the bank file as it goes so an interrupted build resumes where it
stopped (finished attempts, extractions and group merges are never redone):

1. attempt every problem once with the student prompt (`generate_fn`, the caller samples at
   temperature 1.0) and verify it (`verify_fn`) — table ``build_attempts``;
2. ask the extractor for at most `max_skills` skills per success and `max_mistakes` mistakes per
   failure, as JSON — tables ``build_extractions`` (one row per attempt, with the raw reply) and
   ``build_candidates``; unusable replies are counted, never fatal;
3. merge each kind hierarchically (`sgsd_fast.skills.merge.merge_notes`) — table ``build_merges``;
4. write the merged notes as static items in ONE bank transaction (a new version) together with
   the finished marker and the summary.

Only the model side differs between a real build and a test: everything model-related comes in
as plain callables mapping rendered prompts to texts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from .items import SkillItem, problem_hash, utc_now
from .merge import GenerateFn, Note, RenderFn, full_reply, merge_notes, prompt_with_prefill, render_plain
from .parsing import parse_items
from .prompts import extraction_text
from .store import SkillBank

VerifyFn = Callable[[list[str], list[str]], Sequence[float]]

_STATE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS build_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS build_attempts (problem_id TEXT PRIMARY KEY, problem_hash TEXT NOT NULL,"
    " question TEXT NOT NULL, answer TEXT NOT NULL, completion TEXT NOT NULL, reward REAL NOT NULL,"
    " created TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS build_extractions (problem_id TEXT PRIMARY KEY, kind TEXT NOT NULL,"
    " reply TEXT NOT NULL, n_items INTEGER NOT NULL, malformed INTEGER NOT NULL, failed INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS build_candidates (seq INTEGER PRIMARY KEY AUTOINCREMENT, problem_id TEXT NOT NULL,"
    " kind TEXT NOT NULL, fields TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS build_merges (kind TEXT NOT NULL, round INTEGER NOT NULL, grp INTEGER NOT NULL,"
    " input_hash TEXT NOT NULL, notes TEXT NOT NULL, PRIMARY KEY (kind, round, grp))",
)


@dataclasses.dataclass
class BuildSummary:
    """Counts of a cold-start build (attempt/extraction counts cover the whole build, resumed or not;
    merge_calls counts the merge calls made by the run that finished the build)."""

    problems: int
    attempts: int
    successes: int
    failures: int
    extraction_parse_failures: int
    malformed_items: int
    skill_candidates: int
    mistake_candidates: int
    merge_calls: int
    merge_parse_failures: int
    skills: int
    mistakes: int
    version: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        width = max(len(name) for name in self.as_dict())
        return "\n".join(f"{name.replace('_', ' '):<{width}}  {value}" for name, value in self.as_dict().items())


@dataclasses.dataclass(frozen=True)
class _Problem:
    id: str
    question: str
    answer: str

    @property
    def hash(self) -> str:
        return problem_hash(self.question)


def _as_problem(problem: Any, index: int) -> _Problem:
    get = problem.get if isinstance(problem, Mapping) else (lambda name: getattr(problem, name, None))
    values = {}
    for name in ("id", "question", "answer"):
        value = get(name)
        if not isinstance(value, str) or (name != "answer" and not value.strip()):
            raise ValueError(f"problems[{index}] needs a non-empty string {name!r} "
                             f"(a sgsd_fast.data.Problem or a mapping), got {value!r}")
        values[name] = value
    return _Problem(**values)


class _SQLiteMergeCheckpoint:
    def __init__(self, bank: SkillBank) -> None:
        self.bank = bank

    def get(self, kind: str, round_index: int, group_index: int, input_hash: str) -> list[Note] | None:
        rows = self.bank.query("SELECT input_hash, notes FROM build_merges WHERE kind = ? AND round = ? AND grp = ?",
                               (kind, round_index, group_index))
        if not rows or rows[0]["input_hash"] != input_hash:
            return None
        return [Note(n["fields"], tuple(n["sources"])) for n in json.loads(rows[0]["notes"])]

    def put(self, kind: str, round_index: int, group_index: int, input_hash: str, notes: list[Note]) -> None:
        payload = json.dumps([{"fields": n.fields, "sources": list(n.sources)} for n in notes])
        with self.bank.state_transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO build_merges VALUES (?, ?, ?, ?, ?)",
                         (kind, round_index, group_index, input_hash, payload))


def _check_replies(replies: Sequence[str], n: int, who: str) -> list[str]:
    replies = list(replies)
    if len(replies) != n:
        raise ValueError(f"{who} returned {len(replies)} texts for {n} prompts")
    for i, reply in enumerate(replies):
        if not isinstance(reply, str):
            raise TypeError(f"{who} must return strings; item {i} is a {type(reply).__name__}")
    return replies


def _chunks(seq: Sequence[Any], size: int):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def build_bank(
    problems: Sequence[Any],
    generate_fn: GenerateFn,
    verify_fn: VerifyFn,
    *,
    extractor_fn: GenerateFn | None = None,
    merge_fn: GenerateFn | None = None,
    out_path: str | os.PathLike[str],
    render_fn: RenderFn = render_plain,
    model_name: str = "",
    max_skills: int = 3,
    max_mistakes: int = 3,
    group_size: int = 32,
    max_stale_rounds: int = 3,
    batch_size: int = 16,
    progress: bool = True,
    prefill: bool = True,
) -> BuildSummary:
    """Build (or resume building) a cold-start skill bank at `out_path`.

    Args:
        problems: `sgsd_fast.data.Problem`s (or mappings with id, question, answer); ids unique.
        generate_fn: rendered student prompts -> completions (the caller samples, temperature 1.0).
        verify_fn: (completions, answers) -> rewards; reward > 0 counts as a success.
        extractor_fn: rendered extraction prompts -> replies (default: `generate_fn`; the CLI
            passes the same model decoding greedily).
        merge_fn: rendered merge prompts -> replies (default: `extractor_fn`; the CLI gives it a
            longer length limit, since a reply may list a whole group of notes).
        out_path: the bank file. A new file, or one holding an unfinished build of the same
            problems (resumed). A finished build returns its stored summary without any call.
        render_fn: chat messages -> prompt string (the CLI passes the tokenizer's chat template).
        model_name: recorded in every item's provenance.
        max_skills, max_mistakes: per attempt, at most this many notes are kept from a reply.
        group_size, max_stale_rounds: the hierarchical merge (SPEC §4: 32 and 3).
        batch_size: prompts per `generate_fn` / `extractor_fn` call (also the commit granularity).
        progress: show tqdm progress bars.
        prefill: end extraction/merge prompts with the opening of the JSON reply
            (`prompts.REPLY_PREFIX`); the raw replies stored in ``build_extractions`` include it.
    """
    from sgsd_fast.prompts import student_messages

    if not isinstance(problems, Sequence) or isinstance(problems, (str, bytes)):
        raise TypeError(f"problems must be a sequence of problems, got {type(problems).__name__}")
    if not problems:
        raise ValueError("problems is empty: the cold start needs at least one problem")
    probs = [_as_problem(p, i) for i, p in enumerate(problems)]
    ids = [p.id for p in probs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"problem ids must be unique; {dup!r} appears more than once")
    for name, value in (("max_skills", max_skills), ("max_mistakes", max_mistakes), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    optional = {"extractor_fn", "merge_fn"}
    for name, fn in (("generate_fn", generate_fn), ("verify_fn", verify_fn), ("extractor_fn", extractor_fn),
                     ("merge_fn", merge_fn), ("render_fn", render_fn)):
        if not callable(fn) and not (fn is None and name in optional):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    extractor_fn = extractor_fn or generate_fn
    merge_fn = merge_fn or extractor_fn

    bank = SkillBank(out_path)
    try:
        with bank.state_transaction() as conn:
            for statement in _STATE_SCHEMA:
                conn.execute(statement)
        meta = {row["key"]: row["value"] for row in bank.query("SELECT key, value FROM build_meta")}
        fingerprint = hashlib.sha256(json.dumps([[p.id, p.question, p.answer] for p in probs]).encode()).hexdigest()
        if "summary" in meta:
            if meta.get("problems") != fingerprint:
                raise ValueError(f"out_path {str(out_path)!r} holds a finished build of a different problem set")
            return BuildSummary(**json.loads(meta["summary"]))
        if "problems" not in meta:
            if bank.count() > 0:
                raise ValueError(f"out_path {str(out_path)!r} already holds a skill bank; "
                                 "the cold start needs a new file")
            with bank.state_transaction() as conn:
                conn.execute("INSERT INTO build_meta VALUES ('problems', ?)", (fingerprint,))
                conn.execute("INSERT INTO build_meta VALUES ('started', ?)", (utc_now(),))
        elif meta["problems"] != fingerprint:
            raise ValueError(f"out_path {str(out_path)!r} holds an unfinished build of a different problem set; "
                             "use a new file or the same problems to resume")

        _attempt(bank, probs, generate_fn, verify_fn, render_fn, student_messages, batch_size, progress)
        _extract(bank, extractor_fn, render_fn, max_skills, max_mistakes, batch_size, progress, prefill)
        return _merge_and_store(bank, len(probs), merge_fn, render_fn, model_name, group_size,
                                max_stale_rounds, batch_size, progress, prefill)
    finally:
        bank.close()


def _attempt(bank, probs, generate_fn, verify_fn, render_fn, student_messages, batch_size, progress) -> None:
    done = {row[0] for row in bank.query("SELECT problem_id FROM build_attempts")}
    pending = [p for p in probs if p.id not in done]
    with tqdm(total=len(probs), initial=len(probs) - len(pending), desc="attempts", disable=not progress) as bar:
        for batch in _chunks(pending, batch_size):
            prompts = [render_fn(student_messages(p.question)) for p in batch]
            completions = _check_replies(generate_fn(prompts), len(batch), "generate_fn")
            rewards = [float(r) for r in verify_fn(completions, [p.answer for p in batch])]
            if len(rewards) != len(batch):
                raise ValueError(f"verify_fn returned {len(rewards)} rewards for {len(batch)} completions")
            with bank.state_transaction() as conn:
                conn.executemany("INSERT INTO build_attempts VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(p.id, p.hash, p.question, p.answer, c, r, utc_now())
                                  for p, c, r in zip(batch, completions, rewards)])
            bar.update(len(batch))


def _extract(bank, extractor_fn, render_fn, max_skills, max_mistakes, batch_size, progress, prefill) -> None:
    rows = bank.query("SELECT a.problem_id, a.question, a.answer, a.completion, a.reward FROM build_attempts a"
                      " LEFT JOIN build_extractions e ON a.problem_id = e.problem_id"
                      " WHERE e.problem_id IS NULL ORDER BY a.rowid")
    total = bank.query("SELECT COUNT(*) FROM build_attempts")[0][0]
    with tqdm(total=total, initial=total - len(rows), desc="extraction", disable=not progress) as bar:
        for batch in _chunks(rows, batch_size):
            kinds = ["skill" if row["reward"] > 0 else "mistake" for row in batch]
            prompts = [prompt_with_prefill(render_fn, extraction_text(
                kind, row["question"], row["completion"], answer=row["answer"],
                max_items=max_skills if kind == "skill" else max_mistakes), kind, prefill)
                for kind, row in zip(kinds, batch)]
            replies = [full_reply(r, kind, prefill) for r, kind in
                       zip(_check_replies(extractor_fn(prompts), len(batch), "extractor_fn"), kinds)]
            with bank.state_transaction() as conn:
                for kind, row, reply in zip(kinds, batch, replies):
                    parsed = parse_items(reply, kind, max_items=max_skills if kind == "skill" else max_mistakes)
                    conn.execute("INSERT INTO build_extractions VALUES (?, ?, ?, ?, ?, ?)",
                                 (row["problem_id"], kind, reply, len(parsed.items), parsed.malformed,
                                  int(parsed.failed)))
                    conn.executemany("INSERT INTO build_candidates (problem_id, kind, fields) VALUES (?, ?, ?)",
                                     [(row["problem_id"], kind, json.dumps(f)) for f in parsed.items])
            bar.update(len(batch))


def _merge_and_store(bank, n_problems, merge_fn, render_fn, model_name, group_size, max_stale_rounds,
                     batch_size, progress, prefill) -> BuildSummary:
    checkpoint = _SQLiteMergeCheckpoint(bank)
    merged: dict[str, list[Note]] = {}
    merge_calls = merge_failures = 0
    for kind in ("skill", "mistake"):
        rows = bank.query("SELECT c.fields, a.problem_hash FROM build_candidates c"
                          " JOIN build_attempts a ON a.problem_id = c.problem_id WHERE c.kind = ? ORDER BY c.seq",
                          (kind,))
        notes = [Note(json.loads(row["fields"]), (row["problem_hash"],)) for row in rows]
        with tqdm(desc=f"merge {kind}s", unit="group", disable=not progress) as bar:
            merged[kind], stats = merge_notes(kind, notes, merge_fn, render_fn=render_fn, group_size=group_size,
                                              max_stale_rounds=max_stale_rounds, batch_size=batch_size,
                                              checkpoint=checkpoint, progress=bar.update, prefill=prefill)
        merge_calls += stats.calls
        merge_failures += stats.parse_failures

    def count(sql: str) -> int:
        return int(bank.query(sql)[0][0])

    attempts = count("SELECT COUNT(*) FROM build_attempts")
    successes = count("SELECT COUNT(*) FROM build_attempts WHERE reward > 0")
    if not merged["skill"] and not merged["mistake"]:
        # A bank without a single note gives a trainer no teacher at all; say so now, not at step 1.
        unparsable = count("SELECT COALESCE(SUM(failed), 0) FROM build_extractions")
        raise ValueError(f"the cold start produced 0 skills and 0 mistakes ({attempts} attempts, {successes} "
                         f"successes; {unparsable} extraction replies had no usable JSON item): no bank version "
                         f"written; the attempts and raw replies stay in {str(bank.path)!r} for inspection")
    with bank.transaction(f"cold start: {attempts} attempts, {successes} successes") as tx:
        for kind in ("skill", "mistake"):
            for note in merged[kind]:
                tx.add(SkillItem.new(kind, note.fields, origin="static", provenance={
                    "source": "cold_start", "model": model_name,
                    "outcome": "success" if kind == "skill" else "failure",
                    "problem_hashes": list(note.sources)}))
        summary = BuildSummary(
            problems=n_problems,
            attempts=attempts,
            successes=successes,
            failures=attempts - successes,
            extraction_parse_failures=count("SELECT COALESCE(SUM(failed), 0) FROM build_extractions"),
            malformed_items=count("SELECT COALESCE(SUM(malformed), 0) FROM build_extractions"),
            skill_candidates=count("SELECT COUNT(*) FROM build_candidates WHERE kind = 'skill'"),
            mistake_candidates=count("SELECT COUNT(*) FROM build_candidates WHERE kind = 'mistake'"),
            merge_calls=merge_calls,
            merge_parse_failures=merge_failures,
            skills=len(merged["skill"]),
            mistakes=len(merged["mistake"]),
            version=bank.version + 1,
        )
        tx._execute("INSERT INTO build_meta VALUES ('summary', ?)", (json.dumps(summary.as_dict()),))
        tx._execute("INSERT OR REPLACE INTO build_meta VALUES ('finished', ?)", (utc_now(),))
    return summary
