"""`sgsd-fast compare` on the tiny random model: two arms, one table/JSON/PNG, resumable, same problems."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from sgsd_fast import commands as cli
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.compare import comparison_plan, run_comparison, summarize, write_report

pytestmark = pytest.mark.usefixtures("one_thread")


def in_process(argv: list[str], log_path: Path) -> int:
    with log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return cli.main(argv)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    tiny_random_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_plan_keeps_the_rollout_budget_equal():
    runs = comparison_plan(["base", "grpo", "sgsd", "sgsd_random"], main_seeds=[0, 1, 2], other_seeds=[5],
                           base={"prompts_per_step": 8, "num_generations": 1})
    assert [r.name for r in runs] == ["grpo-seed5", "sgsd-seed0", "sgsd-seed1", "sgsd-seed2", "sgsd_random-seed5"]
    grpo = runs[0].overrides
    assert grpo["prompts_per_step"] * grpo["num_generations"] == 8 and grpo["method"] == "grpo"
    assert runs[-1].overrides == {"method": "sgsd", "retrieval": "random", "seed": 5}
    with pytest.raises(ValueError, match="unknown arm"):
        comparison_plan(["sgsd", "ppo"])
    with pytest.raises(ValueError, match="divisible"):
        comparison_plan(["grpo"], base={"prompts_per_step": 6})


def test_two_arm_compare_end_to_end_and_resume(tmp_path, tiny_dir):
    shared = {"model": str(tiny_dir), "prompts_per_step": 2, "max_new_tokens": 4, "num_teachers": 1,
              "num_train_problems": 8, "num_eval_problems": 6, "max_steps": 2, "verifier_workers": 1,
              "report_to": "none", "save_every": 0, "answer_format": "answer_is"}
    runs = comparison_plan(["base", "sgsd", "sampled_rkl"], main_seeds=[0, 1], other_seeds=[0])
    out = tmp_path / "cmp"
    results = run_comparison(runs, out, overrides=shared, runner=in_process, log=lambda _: None)
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("sgsd", 0), ("sgsd", 1), ("sampled_rkl", 0)]
    base_ids = [r["id"] for r in results["base"]]
    assert len(base_ids) == 6
    assert all([r["id"] for r in run["records"]] == base_ids for run in results["runs"])  # same problems

    paths = write_report(results, out, machine="test")
    table = paths["markdown"].read_text()
    assert "| base |" in table and "| sgsd | 1 |" in table and "| sampled_rkl | 0 |" in table
    assert "Pooled over seeds" in table
    data = json.loads(paths["json"].read_text())
    assert data["num_problems"] == 6 and len(data["rows"]) == 4 and data["pooled"][0]["arm"] == "sgsd"
    for row in data["rows"][1:]:
        assert row["ci_low"] <= row["delta"] <= row["ci_high"]
    assert paths["plot"].stat().st_size > 1000

    calls = []
    again = run_comparison(runs, out, overrides=shared, log=lambda _: None,
                           runner=lambda argv, log: calls.append(argv) or 0)
    assert calls == [], "finished runs and the base evaluation must be skipped"
    assert summarize(again) == summarize(results)


def test_summary_rejects_runs_on_other_problems():
    base = [{"id": "a", "key": "k1", "correct": 1, "looping": False, "extracted": "1"}]
    run = {"arm": "sgsd", "seed": 0, "records": [{"id": "b", "key": "k2", "correct": 1, "looping": False,
                                                  "extracted": "1"}],
           "summary": {"wall_time_s": 1.0, "peak_memory_mb": 1.0}}
    with pytest.raises(ValueError, match="other problems"):
        summarize({"base": base, "runs": [run]})
