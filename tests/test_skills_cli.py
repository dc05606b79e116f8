"""`sgsd-fast skills show | stats | export | import | diff` on a temporary bank."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from sgsd_fast.commands import main as top_main
from sgsd_fast.skills import SkillBank, starter_bank_path
from sgsd_fast.commands.skills import load_build_problems, main


@pytest.fixture()
def bank_path(tmp_path):
    path = tmp_path / "bank.db"
    assert main(["import", str(starter_bank_path()), str(path)]) == 0
    with SkillBank(path) as bank, bank.transaction("drop one") as tx:
        tx.remove("starter-skill-01")
    return path


def test_import_show_stats(bank_path, capsys):
    capsys.readouterr()
    assert main(["stats", str(bank_path)]) == 0
    out = capsys.readouterr().out
    assert "version: 2" in out and "skills: 9 (static 9, dynamic 0)" in out and "mistakes: 10 (static 10" in out
    assert "v1" in out and "drop one" in out

    assert main(["show", str(bank_path), "--kind", "mistake"]) == 0
    out = capsys.readouterr().out
    assert out.count("[mistake]") == 10 and "[skill]" not in out and out.rstrip().endswith("10 items")
    assert "how_to_avoid:" in out

    assert main(["show", str(bank_path), "--version", "1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 20 and records[0]["id"] == "starter-skill-01" and records[0]["kind"] == "skill"


def test_export_import_round_trip_and_diff(bank_path, tmp_path, capsys):
    out_json = tmp_path / "bank.json"
    assert main(["export", str(bank_path), "--out", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert len(data["skills"]) == 9 and len(data["mistakes"]) == 10 and data["version"] == 2

    assert main(["export", str(bank_path), "--version", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["skills"]) == 10

    copy = tmp_path / "copy.db"
    assert main(["import", str(out_json), str(copy), "--origin", "dynamic"]) == 0
    assert "imported 19 items" in capsys.readouterr().out
    assert SkillBank(copy).items() == SkillBank(bank_path).items()  # stated origins win over --origin

    assert main(["import", str(out_json), str(copy)]) == 0
    out = capsys.readouterr().out
    assert "imported 0 items" in out and out.count("skipped") == 19

    assert main(["diff", str(bank_path), "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "- [skill] starter-skill-01: Name the unknown first" in out
    assert "1 -> v2: 0 added, 1 removed, 0 changed" in out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["show", str(tmp_path / "missing.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing.db").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"skills": [{"title": "only a title"}]}))
    assert main(["import", str(bad), str(tmp_path / "b.db")]) == 2
    assert "missing required skill field 'principle'" in capsys.readouterr().err
    bank = tmp_path / "b.db"
    assert not bank.exists()  # a failed import into a new file leaves no empty bank behind
    SkillBank(bank).close()
    assert main(["diff", str(bank), "0", "5"]) == 2
    assert "version 5 does not exist" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "build" in capsys.readouterr().out
    assert main(["build", "--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out


def test_top_level_router_dispatches(bank_path, capsys):
    assert top_main(["skills", "stats", str(bank_path)]) == 0
    assert "skills: 9" in capsys.readouterr().out


def test_build_data_sources(tmp_path):
    problems = load_build_problems("builtin:3", seed=1)
    assert len(problems) == 3 and all(p.question and p.answer for p in problems)
    with pytest.raises(ValueError, match="builtin:N needs a positive integer"):
        load_build_problems("builtin:many")
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) for i in range(4)))
    assert [p.answer for p in load_build_problems(str(path), limit=2)] == ["1", "2"]


def _foreign_db(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.commit()
    conn.close()
    return path


def _schema_and_mode(path):
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return (sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master")),
                conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("command", [["show"], ["stats"], ["export"], ["diff", "0", "1"]])
def test_read_only_commands_refuse_a_foreign_database_and_leave_it_untouched(tmp_path, capsys, command):
    foreign = _foreign_db(tmp_path / "other.db")
    before = (_schema_and_mode(foreign), foreign.read_bytes())
    argv = [command[0], str(foreign), *command[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "not an sgsd-fast skill bank" in err and str(foreign) in err and len(err.splitlines()) == 1
    assert (_schema_and_mode(foreign), foreign.read_bytes()) == before  # no tables created, still not WAL
    assert not Path(f"{foreign}-wal").exists()


def test_writing_commands_refuse_a_foreign_database_too(tmp_path, capsys):
    foreign = _foreign_db(tmp_path / "other.db")
    before = _schema_and_mode(foreign)
    assert main(["import", str(starter_bank_path()), str(foreign)]) == 2
    assert "not an sgsd-fast skill bank" in capsys.readouterr().err
    assert _schema_and_mode(foreign) == before and foreign.exists()  # an existing file is never deleted


def test_read_only_commands_do_not_write_a_real_bank(bank_path, capsys):
    before = bank_path.read_bytes()
    for argv in (["show", str(bank_path)], ["stats", str(bank_path)], ["diff", str(bank_path), "1", "2"]):
        assert main(argv) == 0
    assert bank_path.read_bytes() == before
    with SkillBank(bank_path, read_only=True) as bank, pytest.raises(RuntimeError, match="read-only"):
        with bank.transaction("nope"):
            pass


@pytest.mark.parametrize(("content", "fragment"), [
    (b"this is not a database" * 50, "file is not a database"),
    (b"SQLite format 3\x00" + b"\x00" * 84, "cannot be read"),
])
def test_corrupt_bank_files_are_named(tmp_path, capsys, content, fragment):
    path = tmp_path / "broken.db"
    path.write_bytes(content)
    assert main(["stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and str(path) in err


def test_truncated_bank_is_named(bank_path, tmp_path, capsys):
    cut = tmp_path / "cut.db"
    SkillBank(bank_path).backup(cut)
    cut.write_bytes(cut.read_bytes()[:1500])
    assert main(["show", str(cut)]) == 2
    assert str(cut) in capsys.readouterr().err


def test_failed_import_of_undecodable_json_leaves_no_file(tmp_path, capsys):
    source = tmp_path / "latin1.json"
    source.write_bytes('{"skills": [{"title": "caf\xe9"}]}'.encode("latin-1"))
    assert main(["import", str(source), str(tmp_path / "new.db")]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON ('utf-8' codec" in err and str(source) in err
    assert list(tmp_path.iterdir()) == [source]
