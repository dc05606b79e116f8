"""`sgsd-fast skills show | stats | export | import | diff` on a temporary bank."""
from __future__ import annotations

import json

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
