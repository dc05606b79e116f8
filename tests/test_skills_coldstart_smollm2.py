"""A small real cold start with SmolLM2-135M through `sgsd-fast skills build`: the pipeline runs
end to end (student prompt, sampling, verifier pool, prefilled JSON extraction, merge, storage) and
its counts add up. Whether the 135M model writes useful notes is not what is tested."""
from __future__ import annotations

import pytest

import sgsd_fast.models
from sgsd_fast.skills import SkillBank, build_bank
from sgsd_fast.commands.skills import load_build_problems, main


def _never(*_args):
    raise AssertionError("a finished build must not call the model or the verifier again")


@pytest.mark.slow
def test_cold_start_cli_with_smollm2(smollm2, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(sgsd_fast.models, "load_model_and_tokenizer", lambda *args, **kw: smollm2)
    path = tmp_path / "bank.db"
    # 128 extraction tokens: at 80 every reply was cut off before its first complete JSON item, and a
    # build with no note at all is an error (an empty bank would fail the trainer at step 1).
    argv = ["build", "--data", "builtin:4", "--out", str(path), "--max-new-tokens", "32",
            "--extract-max-new-tokens", "128", "--merge-max-new-tokens", "96", "--batch-size", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\ncold-start summary (SmolLM2-135M, builtin:4, 32/128/96 new tokens):\n" + printed)
    s = {" ".join(line.split()[:-1]): int(line.split()[-1]) for line in printed.strip().splitlines()}

    assert s["problems"] == s["attempts"] == 4
    assert s["successes"] + s["failures"] == s["attempts"]
    assert 0 <= s["extraction parse failures"] <= s["attempts"]
    assert s["skill candidates"] <= 3 * s["successes"] and s["mistake candidates"] <= 3 * s["failures"]
    assert s["skills"] <= s["skill candidates"] and s["mistakes"] <= s["mistake candidates"]
    assert s["merge calls"] <= 2 and s["merge parse failures"] <= s["merge calls"]
    bank = SkillBank(path, create=False)
    assert bank.version == s["version"] == 1
    assert (bank.count("skill"), bank.count("mistake")) == (s["skills"], s["mistakes"])
    assert all(i.origin == "static" and i.provenance["model"] == "smollm2" for i in bank.items())
    replies = bank.query("SELECT reply, failed FROM build_extractions")
    assert len(replies) == 4 and sum(r["failed"] for r in replies) == s["extraction parse failures"]

    problems = load_build_problems("builtin:4")
    again = build_bank(problems, _never, _never, out_path=path, progress=False)
    assert {k.replace("_", " "): v for k, v in again.as_dict().items()} == s
