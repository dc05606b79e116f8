"""Skill bank storage: item schema, JSON exchange, versions/diff, and transaction safety."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgsd_fast.skills import SkillBank, SkillItem, starter_bank_path
from sgsd_fast.skills.items import FIELDS, make_item_id


def skill(title: str, principle: str = "a principle", when: str = "sometimes", **kw) -> SkillItem:
    return SkillItem.new("skill", {"title": title, "principle": principle, "when_to_apply": when}, **kw)


def mistake(description: str, why: str = "a reason", how: str = "a remedy", **kw) -> SkillItem:
    return SkillItem.new("mistake", {"description": description, "why_it_happens": why, "how_to_avoid": how}, **kw)


def test_new_item_validates_and_normalizes_whitespace():
    item = skill("  Check   units ", "Keep\nunits attached", "always")
    assert item.fields == {"title": "Check units", "principle": "Keep units attached", "when_to_apply": "always"}
    assert item.id == make_item_id("skill", item.fields) and item.id.startswith("skill-")
    assert item.origin == "static" and item.created and item.created == item.updated
    assert item.text == "Check units Keep units attached always"
    with pytest.raises(ValueError, match="missing required skill field 'principle'"):
        SkillItem.new("skill", {"title": "t", "when_to_apply": "w"})
    with pytest.raises(ValueError, match="'how_to_avoid' is empty"):
        SkillItem.new("mistake", {"description": "d", "why_it_happens": "w", "how_to_avoid": "   "})
    with pytest.raises(ValueError, match="must be a string"):
        SkillItem.new("skill", {"title": 3, "principle": "p", "when_to_apply": "w"})
    with pytest.raises(ValueError, match="kind must be one of"):
        SkillItem.new("hint", {"title": "t"})
    with pytest.raises(ValueError, match="origin must be one of"):
        skill("t", origin="learned")


def test_transaction_writes_one_version_with_snapshot(tmp_path):
    bank = SkillBank(tmp_path / "b.db")
    assert bank.version == 0 and bank.items() == []
    with bank.transaction("first") as tx:
        tx.add(skill("A"))
        tx.add(mistake("B", provenance={"source": "cold_start", "outcome": "failure", "model": "m"}))
    assert bank.version == 1
    with bank.transaction("second") as tx:
        tx.remove(skill("A").id)
        tx.add(skill("C", origin="dynamic"))
    assert bank.version == 2
    assert [i.fields.get("title", i.fields.get("description")) for i in bank.items()] == ["B", "C"]
    assert [i.id for i in bank.items(version=1)] == [skill("A").id, mistake("B").id]
    assert [i.id for i in bank.items("skill", origin="dynamic")] == [skill("C").id]
    assert bank.items(version=0) == []
    assert bank.get(mistake("B").id).provenance == {"source": "cold_start", "outcome": "failure", "model": "m"}
    infos = bank.versions()
    assert [(v.version, v.message, v.n_skills, v.n_mistakes) for v in infos] == [
        (1, "first", 1, 1), (2, "second", 1, 1)]
    d = bank.diff(1, 2)
    assert [i.id for i in d.added] == [skill("C").id] and [i.id for i in d.removed] == [skill("A").id]
    assert d.changed == []
    assert bank.diff(2, 2).empty
    with pytest.raises(ValueError, match="version 7 does not exist"):
        bank.items(version=7)


def test_failed_transaction_rolls_back_everything(tmp_path):
    bank = SkillBank(tmp_path / "b.db")
    with bank.transaction("base") as tx:
        tx.add(skill("A"))
    with pytest.raises(RuntimeError, match="boom"):
        with bank.transaction("broken") as tx:
            tx.add(skill("B"))
            tx.remove(skill("A").id)
            raise RuntimeError("boom")
    assert bank.version == 1 and [i.id for i in bank.items()] == [skill("A").id]
    with pytest.raises(ValueError, match="duplicates an item"):
        with bank.transaction("dup") as tx:
            tx.add(skill("a", "A PRINCIPLE.", "Sometimes!"))  # same normalized text as A
    assert bank.version == 1
    with pytest.raises(KeyError, match="no item with id"):
        with bank.transaction("missing") as tx:
            tx.remove("skill-nope")
    assert bank.version == 1


def test_json_round_trip_keeps_everything(tmp_path):
    bank = SkillBank(tmp_path / "b.db")
    with bank.transaction("seed") as tx:
        tx.add(skill("A", provenance={"source": "online", "step": 25}, origin="dynamic"))
        tx.add(mistake("B"))
    exported = bank.export_json(tmp_path / "bank.json")
    assert json.loads((tmp_path / "bank.json").read_text()) == exported
    assert exported["format"] == "sgsd-fast-skill-bank" and exported["version"] == 1
    assert set(exported["skills"][0]) >= {"id", *FIELDS["skill"], "origin", "provenance", "created", "updated"}

    other = SkillBank(tmp_path / "c.db")
    report = other.import_json(tmp_path / "bank.json")
    assert report.added == 2 and report.skipped == []
    assert other.items() == bank.items()  # ids, fields, origin, provenance, timestamps


def test_import_is_tolerant_of_optional_fields_and_strict_on_required(tmp_path):
    bank = SkillBank(tmp_path / "b.db")
    data = {"skills": [{"title": "T", "principle": "P", "when_to_apply": "W", "source_note": "kept"}],
            "mistakes": [{"id": "m1", "description": "D", "why_it_happens": "Y", "how_to_avoid": "H",
                          "origin": "dynamic"}]}
    report = bank.import_json(data)
    assert report.added == 2
    s, m = bank.items()
    assert s.origin == "static" and s.provenance == {} and s.extra == {"source_note": "kept"}
    assert s.id == make_item_id("skill", s.fields)
    assert m.id == "m1" and m.origin == "dynamic"
    assert bank.export_json()["skills"][0]["source_note"] == "kept"

    # re-importing the same items skips them, and says so
    again = bank.import_json(data)
    assert again.added == 0 and {reason for _, reason in again.skipped} == {"id already present"}

    bad = {"skills": [{"title": "T2", "principle": "P2", "when_to_apply": "W2"}, {"title": "X", "principle": "Y"}]}
    with pytest.raises(ValueError, match=r"skills\[1\]: missing required skill field 'when_to_apply'"):
        bank.import_json(bad)
    assert bank.count() == 2 and bank.version == 2  # validated before anything was written
    with pytest.raises(ValueError, match="'skills' and/or a 'mistakes' list"):
        bank.import_json({"items": []})
    with pytest.raises(ValueError, match="'mistakes' must be a list"):
        bank.import_json({"mistakes": {"description": "D"}})
    with pytest.raises(ValueError, match="origin must be one of"):
        bank.import_json({"skills": [{"title": "T", "principle": "P", "when_to_apply": "W", "origin": "x"}]})
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        bank.import_json(tmp_path / "broken.json")

    replaced = bank.import_json({"mistakes": [{"description": "Z", "why_it_happens": "Y", "how_to_avoid": "H"}]},
                                replace=True)
    assert replaced.added == 1 and [i.fields["description"] for i in bank.items()] == ["Z"]


def test_starter_bank_is_valid_and_general():
    data = json.loads(starter_bank_path().read_text())
    assert len(data["skills"]) >= 8 and len(data["mistakes"]) >= 8
    for kind, key in (("skill", "skills"), ("mistake", "mistakes")):
        for record in data[key]:
            item = SkillItem.from_record(kind, record)
            assert item.origin == "static"
            assert not any(ch.isdigit() for ch in item.text), f"starter note {item.id} mentions a number"


def test_missing_bank_is_not_created_by_readers(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SkillBank(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()
    import sqlite3

    conn = sqlite3.connect(tmp_path / "foreign.db")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="not an sgsd-fast skill bank"):
        SkillBank(tmp_path / "foreign.db")


_WRITER = textwrap.dedent("""
    import sys, time
    from sgsd_fast.skills import SkillBank, SkillItem
    bank = SkillBank(sys.argv[1])
    with bank.transaction("doomed update") as tx:
        tx.remove(bank.items()[0].id)
        for i in range(50):
            tx.add(SkillItem.new("mistake", {"description": f"new {i}", "why_it_happens": "w", "how_to_avoid": "h"}))
        print("inside", flush=True)
        time.sleep(60)
""")


def test_killed_writer_leaves_previous_version_intact(tmp_path):
    path = tmp_path / "b.db"
    bank = SkillBank(path)
    with bank.transaction("base") as tx:
        tx.add(skill("A"))
        tx.add(mistake("B"))
    before = bank.items()
    bank.close()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "inside"
        # a concurrent reader sees only the committed version while the writer is mid-update
        reader = SkillBank(path, create=False)
        assert reader.version == 1 and reader.items() == before
        reader.close()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    reopened = SkillBank(path, create=False)
    assert reopened.version == 1 and reopened.items() == before
    assert reopened.query("PRAGMA integrity_check")[0][0] == "ok"
    with reopened.transaction("after the crash") as tx:  # the file is usable: no stale lock
        tx.add(skill("C"))
    assert reopened.version == 2 and reopened.count() == 3


def test_hand_built_items_are_validated_on_add(tmp_path):
    bank = SkillBank(tmp_path / "b.db")
    with pytest.raises(ValueError, match="missing required mistake field 'how_to_avoid'"):
        with bank.transaction("bad") as tx:
            tx.add(SkillItem(id="m", kind="mistake", fields={"description": "d", "why_it_happens": "w"}))
    with pytest.raises(ValueError, match="item.id must be a non-empty string"):
        with bank.transaction("bad") as tx:
            tx.add(SkillItem(id="", kind="skill", fields={"title": "t", "principle": "p", "when_to_apply": "w"}))
    assert bank.version == 0


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda t: t.strip())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(_text, _text, _text), min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_json_round_trip_of_arbitrary_text(rows):
    with tempfile.TemporaryDirectory() as tmp:
        bank = SkillBank(Path(tmp) / "b.db")
        with bank.transaction("seed") as tx:
            for title, principle, when in rows:
                item = SkillItem.new("skill", {"title": title, "principle": principle, "when_to_apply": when})
                if not tx.contains_key(item.key) and item.id not in {i.id for i in tx.items()}:
                    tx.add(item)
        copy = SkillBank(Path(tmp) / "c.db")
        copy.import_json(json.loads(json.dumps(bank.export_json())))
        assert copy.items() == bank.items()
        assert bank.items(version=1) == bank.items()
        bank.close()
        copy.close()


def test_backup_copies_items_and_history(tmp_path):
    bank = SkillBank(tmp_path / "b.db")
    with bank.transaction("one") as tx:
        tx.add(skill("A"))
    with bank.transaction("two") as tx:
        tx.add(mistake("B"))
    copy = SkillBank(bank.backup(tmp_path / "sub" / "copy.db"), create=False)
    assert copy.items() == bank.items() and copy.versions() == bank.versions()
    assert copy.diff(1, 2).added[0].id == mistake("B").id
    with pytest.raises(ValueError, match="must differ"):
        bank.backup(tmp_path / "b.db")
