"""Online self-evolution: when it fires, caps, static items untouched, one version per update."""
from __future__ import annotations

import itertools
import json

import pytest

from sgsd_fast.skills import OnlineEvolver, Retriever, SkillBank, make_encoder
from sgsd_fast.skills.prompts import EXTRACT_SKILLS, MERGE, REPLY_PREFIX

STATIC = {
    "skills": [{"title": "Static skill one", "principle": "P", "when_to_apply": "W"},
               {"title": "Static skill two", "principle": "P", "when_to_apply": "W"}],
    "mistakes": [{"description": "Static mistake", "why_it_happens": "Y", "how_to_avoid": "H"}],
}


class ScriptedLLM:
    """Extraction: numbered fresh notes (one reply per prompt is unparseable when asked).
    Merge: `merge_mode` "echo" returns the group unchanged, "rewrite" returns 3 brand-new notes."""

    def __init__(self, merge_mode="echo", bad_extractions=0, static_echo=False):
        self.counter = itertools.count()
        self.merge_mode, self.bad_left, self.static_echo = merge_mode, bad_extractions, static_echo
        self.prompts: list[str] = []

    def __call__(self, prompts):
        self.prompts += prompts
        return [self._continuation(p, self._reply(p)) for p in prompts]

    @staticmethod
    def _continuation(prompt, reply):
        prefix = next(p for p in REPLY_PREFIX.values() if prompt.endswith(p))  # prompts are prefilled
        return reply[len(prefix):] if reply.startswith(prefix) else reply

    def _reply(self, prompt):
        if prompt.startswith(MERGE.split("{")[0]):
            items = json.JSONDecoder().raw_decode(prompt, prompt.index("["))[0]
            if self.merge_mode == "echo":
                return json.dumps(items)
            key = "title" if "title" in items[0] else "description"
            return json.dumps([{**items[0], key: f"rewritten {key} {next(self.counter)}"} for _ in range(3)])
        if self.bad_left:
            self.bad_left -= 1
            return "I would rather not."
        n = next(self.counter)
        if prompt.startswith(EXTRACT_SKILLS.split("{")[0]):
            notes = [{"title": f"learned skill {n}", "principle": "P", "when_to_apply": "W"}]
            if self.static_echo:
                notes.append(STATIC["skills"][0])
            return json.dumps(notes)
        return json.dumps([{"description": f"learned mistake {n}.{j}", "why_it_happens": "Y", "how_to_avoid": "H"}
                           for j in range(2)])


@pytest.fixture()
def bank(tmp_path):
    b = SkillBank(tmp_path / "run.db")
    b.import_json(STATIC)
    return b


def rollouts(rewards):
    n = len(rewards)
    return [f"question {i}" for i in range(n)], [f"answer text {i}" for i in range(n)], rewards


def test_skips_off_schedule_and_successful_steps(bank):
    llm = ScriptedLLM()
    evolver = OnlineEvolver(bank, llm, every=5, success_threshold=0.8)
    assert evolver.maybe_update(0, *rollouts([0, 0])) == {}
    assert evolver.maybe_update(3, *rollouts([0, 0])) == {}
    assert evolver.maybe_update(5, *rollouts([1, 1, 1, 1, 0])) == {}  # 0.8 is not below 0.8
    assert evolver.maybe_update(10, *rollouts([])) == {}
    assert llm.prompts == [] and bank.version == 1


def test_updates_cap_growth_keep_static_and_version(bank):
    static_before = bank.items(origin="static")
    llm = ScriptedLLM(bad_extractions=1)
    evolver = OnlineEvolver(bank, llm, every=5, max_new=2, cap=3, model_name="policy")

    m = evolver.maybe_update(5, *rollouts([1.0, 1.0, 0.0, 0.0]), answers=["1", "2", "3", "4"])
    # the first (skill) reply is unparseable: 1 skill candidate, 2 + 2 mistake candidates; limit 0 + 2
    assert m["parse_failures"] == 1 and m["candidates"] == 5 and m["version"] == 2
    assert (m["skills_added"], m["dynamic_skills"], m["total_skills"]) == (1, 1, 3)
    assert (m["mistakes_added"], m["dynamic_mistakes"], m["total_mistakes"]) == (2, 2, 3)
    assert m["success_rate"] == 0.5 and "(3)" in llm.prompts[2]  # the mistake extractor saw the answer
    dyn = bank.items(origin="dynamic")
    assert all(i.provenance["source"] == "online" and i.provenance["step"] == 5 for i in dyn)

    m = evolver.maybe_update(10, *rollouts([1.0, 1.0, 1.0, 0.0, 0.0]))
    # limit = min(cap 3, previous + 2): skills 1 -> 3 (2 new kept), mistakes 2 -> 3 (1 new kept, old first)
    assert (m["skills_added"], m["skills_removed"], m["dynamic_skills"]) == (2, 0, 3)
    assert (m["mistakes_added"], m["mistakes_removed"], m["dynamic_mistakes"]) == (1, 0, 3)
    assert {i.fields["description"] for i in bank.items("mistake", origin="dynamic")} >= {
        i.fields["description"] for i in dyn if i.kind == "mistake"}

    rewriting = OnlineEvolver(bank, ScriptedLLM(merge_mode="rewrite"), every=5, max_new=2, cap=3)
    m = rewriting.maybe_update(15, *rollouts([1.0, 0.0]))
    assert (m["skills_added"], m["skills_removed"], m["dynamic_skills"]) == (3, 3, 3)
    assert all(i.fields["title"].startswith("rewritten") for i in bank.items("skill", origin="dynamic"))

    assert bank.items(origin="static") == static_before  # same ids, text and timestamps
    assert [v.message for v in bank.versions()][1:] == ["online update at step 5", "online update at step 10",
                                                         "online update at step 15"]
    d = bank.diff(3, 4)
    assert len(d.added) == len(d.removed) == 6 and all(i.origin == "dynamic" for i in d.added + d.removed)


def test_notes_repeating_a_static_item_are_dropped(bank):
    evolver = OnlineEvolver(bank, ScriptedLLM(static_echo=True), every=1, max_new=5)
    m = evolver.maybe_update(1, *rollouts([1.0, 0.0]))
    assert m["skills_added"] == 1 and bank.count("skill", origin="static") == 2
    assert [i.fields["title"] for i in bank.items("skill", origin="dynamic")] == ["learned skill 0"]


def test_retriever_sees_the_update(bank):
    retriever = Retriever(bank, make_encoder(), k=8)
    before = {c.skill.id for c in retriever.retrieve("learned skill", "p") if c.skill}
    OnlineEvolver(bank, ScriptedLLM(), every=1).maybe_update(1, *rollouts([1.0, 0.0]))
    after = retriever.retrieve("learned skill", "p")
    assert len(before) == 2 and after[0].skill.fields["title"] == "learned skill 0"


def test_rejects_bad_arguments(bank):
    with pytest.raises(ValueError, match="every must be a positive int"):
        OnlineEvolver(bank, ScriptedLLM(), every=0)
    with pytest.raises(ValueError, match=r"success_threshold must be in \[0, 1\]"):
        OnlineEvolver(bank, ScriptedLLM(), success_threshold=1.5)
    with pytest.raises(TypeError, match="generate_fn must be callable"):
        OnlineEvolver(bank, None)
    with pytest.raises(ValueError, match="equal lengths"):
        OnlineEvolver(bank, ScriptedLLM()).maybe_update(25, ["q"], ["a", "b"], [0.0])
