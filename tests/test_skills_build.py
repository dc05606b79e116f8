"""Reply parsing, hierarchical merge and the cold-start builder, driven by scripted fake LLMs."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgsd_fast.skills import SkillBank, build_bank
from sgsd_fast.skills.items import problem_hash
from sgsd_fast.skills.merge import Note, exact_dedupe, merge_notes
from sgsd_fast.skills.parsing import parse_items
from sgsd_fast.skills.prompts import EXTRACT_MISTAKES, EXTRACT_SKILLS, MERGE, REPLY_PREFIX

SKILL_JSON = {"title": "T", "principle": "P", "when_to_apply": "W"}


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("reply, n_items, malformed, failed", [
    ('Sure!\n```json\n[{"title": "T", "principle": "P", "when_to_apply": "W"}]\n```\nDone.', 1, 0, False),
    ('{"skills": [{"title": "T", "principle": "P", "when_to_apply": "W"}, {"title": "U"}]}', 1, 1, False),
    ('{"title": "T", "principle": "P", "when_to_apply": "W"}', 1, 0, False),
    ('[see below] [{"title": "T", "principle": "P", "when_to_apply": "W"}]', 1, 0, False),
    ('[{"title": "T", "principle": "P", "when_to_apply": "W"}, {"title": "cut off', 1, 0, False),  # salvaged
    ('[{"title": "T", "principle": "P", "when_to_apply": "W"}, {"title": "cut off"}', 1, 1, False),
    ('{"skills": [{"title": "cut off', 0, 0, True),
    ('[{"title": "T", "principle": "P", "when_to_apply": "W", "extra_key": "cut off', 1, 0, False),  # repaired
    ('[{"title": "T", "principle": "P, and then the reply was cut', 0, 1, True),  # repaired but incomplete
    ('I think the key skill is careful addition.', 0, 0, True),
    ('["careful", "addition"]', 0, 0, True),
    ('[{"title": "", "principle": "P", "when_to_apply": "W"}, {"title": 3, "principle": "P", "when_to_apply": "W"}]',
     0, 2, True),
    ("", 0, 0, True),
])
def test_parse_items_shapes(reply, n_items, malformed, failed):
    result = parse_items(reply, "skill", max_items=3)
    assert (len(result.items), result.malformed, result.failed) == (n_items, malformed, failed)
    if n_items:
        assert result.items[0] == SKILL_JSON


def test_parse_items_caps_and_never_raises():
    many = json.dumps([{**SKILL_JSON, "title": f"T{i}"} for i in range(5)])
    result = parse_items(many, "skill", max_items=3)
    assert [i["title"] for i in result.items] == ["T0", "T1", "T2"] and result.excess == 2 and not result.failed
    assert parse_items(None, "skill").failed
    assert parse_items("{" * 500, "mistake").failed
    mistake = parse_items('{"description": "d", "why_it_happens": "w", "how_to_avoid": "h"}', "mistake")
    assert mistake.items == [{"description": "d", "why_it_happens": "w", "how_to_avoid": "h"}]


# ---------------------------------------------------------------- merge

def as_continuation(prompt: str, reply: str) -> str:
    """What a model continuing a prefilled prompt returns: the reply without the prefilled opening."""
    for prefix in REPLY_PREFIX.values():
        if prompt.endswith(prefix):
            return reply[len(prefix):] if reply.startswith(prefix) else reply
    return reply


def prompt_items(prompt: str) -> list[dict]:
    """The JSON list a merge prompt shows the LLM."""
    start = prompt.index("[")
    return json.JSONDecoder().raw_decode(prompt, start)[0]


class FamilyMerger:
    """Scripted merge LLM: notes whose title (skill) or description (mistake) differ only in
    trailing digits become one note."""

    def __init__(self, bad_calls=(), grow_calls=(), fenced=False):
        self.calls: list[str] = []
        self.bad_calls, self.grow_calls, self.fenced = set(bad_calls), set(grow_calls), fenced

    def __call__(self, prompts):
        return [as_continuation(p, r) for p, r in zip(prompts, self._replies(prompts))]

    def _replies(self, prompts):
        replies = []
        for prompt in prompts:
            assert prompt.startswith(MERGE.split("{")[0])
            index = len(self.calls)
            self.calls.append(prompt)
            items = prompt_items(prompt)
            if index in self.bad_calls:
                replies.append('Here you go: [{"title": "unfinished", "princ')
                continue
            if index in self.grow_calls:
                items = items + [{**SKILL_JSON, "title": f"invented {i}"} for i in range(len(items) + 1)]
                replies.append(json.dumps(items))
                continue
            families: dict[str, dict] = {}
            for item in items:
                head = "title" if "title" in item else "description"
                family = item[head].rstrip("0123456789 ")
                families.setdefault(family, {**item, head: family})
            text = json.dumps(list(families.values()))
            replies.append(f"Merged list:\n```json\n{text}\n```" if self.fenced else text)
        return replies


def notes(n: int, n_families: int) -> list[Note]:
    return [Note({"title": f"family {chr(65 + i % n_families)} {i}", "principle": "P", "when_to_apply": "W"},
                 (f"src{i}",)) for i in range(n)]


@pytest.mark.parametrize("prefill", [True, False])
def test_hierarchical_merge_rounds_and_sources(prefill):
    llm = FamilyMerger(fenced=not prefill)
    merged, stats = merge_notes("skill", notes(70, 5), llm, group_size=32, prefill=prefill)
    assert all(p.endswith(REPLY_PREFIX["skill"]) == prefill for p in llm.calls)
    # round 1: groups of 32, 32, 6 -> 5 + 5 + 5 notes -> exact dedupe -> 5 -> round 2 is one group: stop
    assert len(llm.calls) == 4 and stats.calls == 4 and stats.rounds == 2
    assert [n.fields["title"] for n in merged] == [f"family {c}" for c in "ABCDE"]
    assert stats.n_in == 70 and stats.n_out == 5 and stats.parse_failures == 0
    # rewritten notes are credited to every source of their group (the LLM does not say which)
    assert set(merged[0].sources) == {f"src{i}" for i in range(70)}


def test_verbatim_merge_output_keeps_its_own_sources():
    group = notes(3, 3)

    def keep_second_and_invent(prompts):
        (prompt,) = prompts
        items = prompt_items(prompt)
        return [as_continuation(prompt, json.dumps([items[1], {**SKILL_JSON, "title": "new insight"}]))]

    merged, stats = merge_notes("skill", group, keep_second_and_invent)
    assert [(n.fields["title"], set(n.sources)) for n in merged] == [
        ("family B 1", {"src1"}), ("new insight", {"src0", "src1", "src2"})]


def test_merge_keeps_group_on_malformed_or_growing_reply():
    llm = FamilyMerger(bad_calls={0}, grow_calls={1})
    merged, stats = merge_notes("skill", notes(40, 2), llm, group_size=32)
    # round 1: group 0 (32 notes) unparseable -> kept; group 1 (8 notes) grows -> kept; 40 notes stay
    # -> 1 stale round, notes dealt across groups -> round 2 merges both groups to 2 + 2 -> 2 -> round 3 single group
    assert stats.parse_failures == 1 and stats.kept_unmerged == 2
    assert stats.rounds == 3 and stats.calls == 5
    assert sorted(n.fields["title"] for n in merged) == ["family A", "family B"]


def test_merge_stops_after_three_non_shrinking_rounds():
    calls = []

    def echo(prompts):
        calls.extend(prompts)
        return [as_continuation(p, json.dumps(prompt_items(p))) for p in prompts]

    merged, stats = merge_notes("skill", notes(70, 70), echo, group_size=32, max_stale_rounds=3)
    assert stats.rounds == 3 and len(calls) == 9 and len(merged) == 70


def test_merge_resumes_from_checkpoint():
    class DictCheckpoint:
        def __init__(self):
            self.saved = {}

        def get(self, kind, r, g, h):
            return self.saved.get((kind, r, g, h))

        def put(self, kind, r, g, h, value):
            self.saved[(kind, r, g, h)] = value

    class Crash(Exception):
        pass

    checkpoint, llm = DictCheckpoint(), FamilyMerger()

    def crashing(prompts):
        if len(llm.calls) >= 2:
            raise Crash
        return llm(prompts)

    with pytest.raises(Crash):
        merge_notes("skill", notes(70, 5), crashing, group_size=32, batch_size=1, checkpoint=checkpoint)
    assert len(checkpoint.saved) == 2
    resumed = FamilyMerger()
    merged, stats = merge_notes("skill", notes(70, 5), resumed, group_size=32, batch_size=1, checkpoint=checkpoint)
    assert stats.calls == 2 and len(resumed.calls) == 2  # round-1 group 2 and round 2 only
    assert [n.fields["title"] for n in merged] == [f"family {c}" for c in "ABCDE"]


def test_exact_dedupe_normalizes_and_pools_sources():
    a = Note({"title": "Check Units.", "principle": "p", "when_to_apply": "w"}, ("x",))
    b = Note({"title": "check   units", "principle": "P", "when_to_apply": "W!"}, ("y",))
    (only,) = exact_dedupe("skill", [a, b])
    assert only.fields == a.fields and only.sources == ("x", "y")


# ---------------------------------------------------------------- cold-start builder

PROBLEMS = [{"id": f"p{i}", "question": f"Q{i}: add {i} and {i}", "answer": str(2 * i)} for i in range(10)]


def question_index(prompt: str) -> int:
    return int(re.search(r"Q(\d+):", prompt).group(1))


class FakeModel:
    """Attempts: right for i % 3 != 0. Extraction: two skills per success; mistakes: problem 3 gets
    prose (parse failure), the others one good and one malformed element. Merge: FamilyMerger."""

    def __init__(self, fail_after=None, where="generate"):
        self.generated, self.extracted = [], []
        self.merger = FamilyMerger()
        self.fail_after, self.where = fail_after, where

    def _maybe_fail(self, where, done):
        if self.where == where and self.fail_after is not None and done >= self.fail_after:
            raise KeyboardInterrupt

    def generate(self, prompts):
        self._maybe_fail("generate", len(self.generated))
        self.generated += prompts
        return [f"so \\boxed{{{2 * i if i % 3 else -1}}}" for i in map(question_index, prompts)]

    def extract(self, prompts):
        self._maybe_fail("extract", len(self.extracted))
        self.extracted += prompts
        replies = []
        for prompt in prompts:
            i = question_index(prompt)
            if prompt.startswith(EXTRACT_SKILLS.split("{")[0]):
                replies.append(json.dumps([{**SKILL_JSON, "title": "topic A"},
                                           {**SKILL_JSON, "title": f"topic B{i % 2}"}]))
            else:
                assert prompt.startswith(EXTRACT_MISTAKES.split("{")[0]) and f"({2 * i})" in prompt
                good = {"description": f"slip kind {i % 2}", "why_it_happens": "w", "how_to_avoid": "h"}
                replies.append("no idea" if i == 3 else json.dumps([good, {"description": ""}]))
        return [as_continuation(p, r) for p, r in zip(prompts, replies)]


def verify(completions, answers):
    return [float(re.search(r"\\boxed\{(-?\d+)\}", c).group(1) == a) for c, a in zip(completions, answers)]


def run_build(model: FakeModel, path, problems=PROBLEMS):
    return build_bank(problems, model.generate, verify, extractor_fn=model.extract, merge_fn=model.merger,
                      out_path=path, model_name="fake", batch_size=4, progress=False)


EXPECTED = dict(problems=10, attempts=10, successes=6, failures=4, extraction_parse_failures=1, malformed_items=3,
                skill_candidates=12, mistake_candidates=3, merge_calls=2, merge_parse_failures=0, skills=2,
                mistakes=1, version=1)


def test_build_bank_with_fakes(tmp_path):
    model = FakeModel()
    summary = run_build(model, tmp_path / "bank.db")
    assert summary.as_dict() == EXPECTED
    assert len(model.generated) == 10 and len(model.extracted) == 10 and len(model.merger.calls) == 2
    bank = SkillBank(tmp_path / "bank.db", create=False)
    assert bank.version == 1 and bank.count("skill") == 2 and bank.count("mistake") == 1
    assert sorted(i.fields["title"] for i in bank.items("skill")) == ["topic A", "topic B"]
    (slip,) = bank.items("mistake")
    assert slip.fields["description"] == "slip kind" and slip.origin == "static"
    assert slip.provenance["source"] == "cold_start" and slip.provenance["model"] == "fake"
    assert slip.provenance["outcome"] == "failure"
    assert sorted(slip.provenance["problem_hashes"]) == sorted(problem_hash(PROBLEMS[i]["question"]) for i in (0, 6, 9))

    again = FakeModel()
    assert run_build(again, tmp_path / "bank.db").as_dict() == EXPECTED  # finished: stored summary, no calls
    assert not again.generated and not again.extracted and not again.merger.calls


@pytest.mark.parametrize("where, fail_after", [("generate", 4), ("extract", 8)])
def test_build_resumes_after_interruption(tmp_path, where, fail_after):
    path = tmp_path / "bank.db"
    first = FakeModel(fail_after=fail_after, where=where)
    with pytest.raises(KeyboardInterrupt):
        run_build(first, path)
    second = FakeModel()
    summary = run_build(second, path)
    assert summary.as_dict() == EXPECTED
    if where == "generate":
        assert len(first.generated) == 4 and len(second.generated) == 6
    else:
        assert len(second.generated) == 0 and len(first.extracted) == 8 and len(second.extracted) == 2
    fresh = FakeModel()
    run_build(fresh, tmp_path / "fresh.db")
    resumed_items = [(i.kind, dict(i.fields)) for i in SkillBank(path).items()]
    assert resumed_items == [(i.kind, dict(i.fields)) for i in SkillBank(tmp_path / "fresh.db").items()]


def test_build_refuses_foreign_or_mismatched_banks(tmp_path):
    path = tmp_path / "bank.db"
    with pytest.raises(KeyboardInterrupt):
        run_build(FakeModel(fail_after=4), path)
    with pytest.raises(ValueError, match="unfinished build of a different problem set"):
        run_build(FakeModel(), path, problems=PROBLEMS[:5])
    used = tmp_path / "used.db"
    SkillBank(used).import_json({"skills": [SKILL_JSON]})
    with pytest.raises(ValueError, match="already holds a skill bank"):
        run_build(FakeModel(), used)
    with pytest.raises(ValueError, match="ids must be unique"):
        run_build(FakeModel(), tmp_path / "x.db", problems=PROBLEMS[:2] + PROBLEMS[:1])
    with pytest.raises(ValueError, match=r"problems\[0\] needs a non-empty string 'question'"):
        run_build(FakeModel(), tmp_path / "y.db", problems=[{"id": "a", "question": "", "answer": "1"}])
    with pytest.raises(TypeError, match="verify_fn must be callable"):
        build_bank(PROBLEMS, FakeModel().generate, None, out_path=tmp_path / "v.db")
    with pytest.raises(ValueError, match="problems is empty"):
        run_build(FakeModel(), tmp_path / "z.db", problems=[])


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300),
                 st.lists(st.dictionaries(st.sampled_from(["title", "principle", "when_to_apply", "x"]),
                                          st.one_of(st.text(max_size=20), st.integers(), st.none()), max_size=4),
                          max_size=4).map(json.dumps)),
       st.integers(0, 40))
def test_parse_items_never_raises_and_counts_add_up(reply, cut):
    for text in (reply, reply[: len(reply) - cut]):
        result = parse_items(text, "skill", max_items=3)
        assert len(result.items) <= 3 and result.failed == (not result.items)
        assert all(set(i) == {"title", "principle", "when_to_apply"} and all(v.strip() for v in i.values())
                   for i in result.items)


def test_build_with_no_usable_notes_fails_loudly(tmp_path):
    def prose(prompts):
        return ["I cannot think of anything." for _ in prompts]

    path = tmp_path / "empty.db"
    with pytest.raises(ValueError, match=r"0 skills and 0 mistakes \(10 attempts, 6 successes; 10 extraction"):
        build_bank(PROBLEMS, FakeModel().generate, verify, extractor_fn=prose, merge_fn=prose, out_path=path,
                   batch_size=4, progress=False)
    with SkillBank(path, read_only=True) as bank:
        assert bank.version == 0 and bank.count() == 0  # no empty version that a trainer could pick up
