"""Bad inputs through the `sgsd-fast` entry point, in-process: each one is answered by ONE stderr line
naming the field or file (plus its exit status), never a traceback and never a model load first.

Each case is (command line, expected message fragment, exit status); files it needs are made by
the module's fixtures, and a case may damage its own copy of a finished run first.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sgsd_fast import commands
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.skills import SkillBank, starter_bank_path
from sgsd_fast.train import setup as train_setup
from sgsd_fast.train import trainer as trainer_module

pytestmark = pytest.mark.usefixtures("one_thread")

SKILL = {"title": "Add carefully", "principle": "Line up the digits.", "when_to_apply": "Sums."}
MISTAKE = {"description": "Dropped carry", "why_it_happens": "Rushing.", "how_to_avoid": "Check each column."}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every input file a case refers to as {name}."""
    d = tmp_path_factory.mktemp("inputs")
    f = {"d": d}

    def write(name: str, data: str | bytes) -> None:
        f[name.replace(".", "_").replace("-", "_")] = path = d / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    write("bank.json", json.dumps({"skills": [SKILL], "mistakes": [MISTAKE]}))
    write("bad.json", "{not json")
    write("latin1.json", '{"skills": [{"title": "caf\xe9"}]}'.encode("latin-1"))
    write("field.json", json.dumps({"skills": [{"title": "only a title"}]}))
    write("empty.jsonl", "\n")
    write("latin1.jsonl", '{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    write("broken.jsonl", '{"problem": "p", "answer": "1"}\n{"problem": "q", "ans\n')
    write("nofield.jsonl", '{"question": "p", "answer": "1"}\n')
    write("bad.yaml", "max_steps: [1, 2\n")
    write("latin1.yaml", b"model: caf\xe9\n")
    write("list.yaml", "- a\n- b\n")
    write("typo.yaml", "learning_rat: 0.1\n")
    write("a_file", "")
    write("corrupt.db", b"this is not a database" * 64)
    write("results.json", "{oops")
    conn = sqlite3.connect(d / "foreign.db")
    conn.execute("CREATE TABLE notes (x TEXT)")
    conn.commit()
    conn.close()
    f["foreign_db"] = d / "foreign.db"
    f["empty_db"] = d / "empty.db"
    SkillBank(f["empty_db"]).close()
    f["bank_db"] = d / "bank.db"
    with SkillBank(f["bank_db"]) as bank:
        bank.import_json(starter_bank_path())
    f["truncated_db"] = d / "truncated.db"
    f["truncated_db"].write_bytes(f["bank_db"].read_bytes()[:1500])
    (d / "good").mkdir()
    f["good"] = d / "good"
    tok = tiny_tokenizer()
    f["tiny"] = d / "tiny"
    tiny_random_model(tok, hidden_size=32, layers=2, seed=1).save_pretrained(f["tiny"])
    tok.save_pretrained(f["tiny"])
    return f


TINY_RUN = ["--prompts_per_step", "2", "--max_new_tokens", "4", "--num_teachers", "2", "--num_train_problems", "8",
            "--num_eval_problems", "2", "--builtin_levels", "1", "--eval_at_start", "false", "--progress", "false",
            "--verifier_workers", "1", "--report_to", "none", "--use_peft", "true", "--lora_r", "2",
            "--save_every", "1", "--max_steps", "2"]


@pytest.fixture(scope="module")
def run(files, tmp_path_factory) -> Path:
    """A finished two-step run of the tiny model (checkpoint-1 and checkpoint-2), made once."""
    out = tmp_path_factory.mktemp("run") / "run"
    argv = ["train", "--model", str(files["tiny"]), "--skill_bank", str(files["bank_json"]),
            "--output_dir", str(out), *TINY_RUN]
    assert commands.main(argv) == 0
    return out


@dataclass
class Case:
    argv: list[str]  # "{name}" is a file of `files`; "{run}" this case's own copy of the finished run
    fragment: str  # must appear in the one error line
    status: int = 2
    damage: Callable[[Path], None] | None = None  # applied to {run} first
    loads_model: bool = False  # the LoRA check needs the (tiny) model's module names
    skip: str | None = None


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def blank(path: Path) -> None:
    path.write_text("")


TRAIN = ["train", "--output_dir", "{d}/out"]
RESUME = ["train", "--resume", "auto", "--output_dir", "{run}"]
HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None

CASES: dict[str, Case] = {
    # -- command line and config values (all rejected before any file is touched) --
    "lr-inf": Case(TRAIN + ["--learning_rate", "inf"], "'learning_rate': expected a finite number"),
    "lr-nan": Case(TRAIN + ["--learning_rate", "nan"], "'learning_rate': expected a finite number"),
    "lr-1e30": Case(TRAIN + ["--learning_rate", "1e30"], "'learning_rate': expected a number in (0, 1]"),
    "temperature-inf": Case(TRAIN + ["--temperature", "inf"], "'temperature': expected a finite number"),
    "top-p": Case(TRAIN + ["--top_p", "1.5"], "'top_p': expected a number in (0, 1]"),
    "levels-99": Case(TRAIN + ["--builtin_levels", "99"], "'builtin_levels': expected a non-empty list"),
    "encoder": Case(TRAIN + ["--encoder", "word2vec"], "'encoder': expected one of"),
    "tensorboard": Case(TRAIN + ["--report_to", "tensorboard"], "pip install tensorboard",
                        skip="tensorboard is installed" if HAS_TB else None),
    "max-steps-0": Case(TRAIN + ["--max_steps", "0"], "'max_steps': expected an integer >= 1"),
    "method": Case(TRAIN + ["--method", "ppo"], "'method': expected one of"),
    "skip-limit": Case(TRAIN + ["--max_consecutive_skipped_steps", "-1"], "'max_consecutive_skipped_steps'"),
    "bool": Case(TRAIN + ["--use_peft", "maybe"], "'use_peft': expected bool, got 'maybe'"),
    "unknown-option": Case(TRAIN + ["--lr", "1"], "unrecognized arguments: --lr"),
    "config-missing": Case(TRAIN + ["--config", "{d}/nope.yaml"], "nope.yaml' does not exist"),
    "config-malformed": Case(TRAIN + ["--config", "{bad_yaml}"], "bad.yaml' is not valid YAML"),
    "config-not-utf8": Case(TRAIN + ["--config", "{latin1_yaml}"], "latin1.yaml' is not UTF-8 text"),
    "config-list": Case(TRAIN + ["--config", "{list_yaml}"], "list.yaml' must hold a mapping"),
    "config-typo": Case(TRAIN + ["--config", "{typo_yaml}"], "did you mean 'learning_rate'"),
    # -- run directory and data (checked before the model loads) --
    "output-dir-file": Case(["train", "--output_dir", "{a_file}/run"], "'output_dir': "),
    "eval-empty": Case(TRAIN + ["--eval_dataset", "{empty_jsonl}"], "'eval_dataset': "),
    "train-empty": Case(TRAIN + ["--dataset", "{empty_jsonl}"], "'dataset': "),
    "data-not-utf8": Case(TRAIN + ["--dataset", "{latin1_jsonl}"], "latin1.jsonl: not UTF-8 text"),
    "data-broken-line": Case(TRAIN + ["--dataset", "{broken_jsonl}"], "broken.jsonl: line 2 is not valid JSON"),
    "data-no-field": Case(TRAIN + ["--dataset", "{nofield_jsonl}"], "row 0 has no field 'problem'"),
    "data-missing": Case(TRAIN + ["--dataset", "{d}/missing.jsonl"], "'dataset': expected 'builtin', an existing"),
    "data-folder": Case(TRAIN + ["--dataset", "{good}"], "good' is a local folder",
                        skip="datasets is installed" if HAS_DATASETS else None),
    # -- skill banks given to train --
    "bank-foreign": Case(TRAIN + ["--skill_bank", "{foreign_db}"], "foreign.db' is not an sgsd-fast skill bank"),
    "bank-empty": Case(TRAIN + ["--skill_bank", "{empty_db}"], "empty.db' holds no skills and no mistakes"),
    "bank-corrupt": Case(TRAIN + ["--skill_bank", "{corrupt_db}"], "file is not a database"),
    "bank-bad-json": Case(TRAIN + ["--skill_bank", "{bad_json}"], "bad.json: not valid JSON"),
    "bank-missing": Case(TRAIN + ["--skill_bank", "{d}/missing.json"], "'skill_bank': expected"),
    "bank-json-field": Case(TRAIN + ["--skill_bank", "{field_json}"], "missing required skill field 'principle'"),
    # -- resume and checkpoints --
    "resume-nothing": Case(["train", "--resume", "auto", "--output_dir", "{d}/fresh"], "no complete checkpoint"),
    "resume-bad-path": Case(["train", "--resume", "{d}/nowhere"], "neither a checkpoint folder"),
    "resume-empty-config": Case(["train", "--resume", "{run}/checkpoint-2"], "config.yaml' is empty",
                                damage=lambda r: blank(r / "checkpoint-2" / "config.yaml")),
    "resume-truncated-optimizer": Case(["train", "--resume", "{run}/checkpoint-2"], "optimizer.pt: truncated",
                                       damage=lambda r: truncate(r / "checkpoint-2" / "optimizer.pt")),
    "resume-bad-state": Case(["train", "--resume", "{run}/checkpoint-2"], "trainer_state.json: not valid JSON",
                             damage=lambda r: (r / "checkpoint-2" / "trainer_state.json").write_text("{")),
    "resume-all-corrupt": Case(RESUME, "no usable checkpoint",
                               damage=lambda r: [truncate(r / f"checkpoint-{s}" / "model" / "adapter_model.safetensors")
                                                 for s in (1, 2)]),
    "resume-method": Case(RESUME + ["--method", "opsd"], "method 'sgsd' -> 'opsd'"),
    "resume-optim": Case(RESUME + ["--optim", "adamw_torch"], "optim 'auto' -> 'adamw_torch'"),
    "resume-lora": Case(RESUME + ["--lora_r", "4"], "lora_r 2 -> 4"),
    "resume-model": Case(RESUME + ["--model", "{d}/other-model"], "model "),
    # -- LoRA targets (need the model's module names: the tiny model is loaded) --
    "lora-targets": Case(TRAIN + ["--model", "{tiny}", "--skill_bank", "{bank_json}", "--use_peft", "true",
                                  "--lora_target_modules", "q_proj,qproj"],
                         "lora_target_modules ['qproj'] match no module", loads_model=True),
    # -- eval --
    "eval-not-checkpoint": Case(["eval", "--checkpoint", "{d}"], "is not a checkpoint folder"),
    "eval-truncated-weights": Case(["eval", "--checkpoint", "{run}/checkpoint-2"], "adapter_model.safetensors: ",
                                   damage=lambda r: truncate(r / "checkpoint-2" / "model" / "adapter_model.safetensors")),
    "eval-empty-data": Case(["eval", "--eval_dataset", "{empty_jsonl}"], "'eval_dataset': "),
    "eval-config": Case(["eval", "--config", "{bad_yaml}"], "bad.yaml' is not valid YAML"),
    "eval-lr": Case(["eval", "--eval_temperature", "nan"], "'eval_temperature': expected a finite number"),
    # -- skill bank commands --
    "show-foreign": Case(["skills", "show", "{foreign_db}"], "foreign.db' is not an sgsd-fast skill bank"),
    "stats-corrupt": Case(["skills", "stats", "{corrupt_db}"], "corrupt.db' cannot be read: file is not a database"),
    "export-truncated": Case(["skills", "export", "{truncated_db}"], "truncated.db' "),
    "diff-version": Case(["skills", "diff", "{bank_db}", "0", "99"], "version 99 does not exist"),
    "show-missing": Case(["skills", "show", "{d}/missing.db"], "missing.db' does not exist"),
    "show-bad-version": Case(["skills", "show", "{bank_db}", "--version", "-1"], "version must be a non-negative"),
    "import-field": Case(["skills", "import", "{field_json}", "{d}/new.db"], "missing required skill field"),
    "import-not-utf8": Case(["skills", "import", "{latin1_json}", "{d}/new.db"], "not valid JSON ('utf-8' codec"),
    "import-foreign": Case(["skills", "import", "{bank_json}", "{foreign_db}"], "is not an sgsd-fast skill bank"),
    "build-count": Case(["skills", "build", "--data", "builtin:0", "--out", "{d}/b.db"], "positive integer N"),
    "build-data": Case(["skills", "build", "--data", "{d}/missing.jsonl", "--out", "{d}/b.db"],
                       "problem file not found"),
    # -- compare, bench, the router --
    "compare-arm": Case(["compare", "--out", "{d}/cmp", "--methods", "sgsd", "ppo"], "unknown arm"),
    "compare-main-arm": Case(["compare", "--out", "{d}/cmp", "--methods", "sgsd", "--main_arm", "grpo"],
                             "--main_arm 'grpo' is not among"),
    "compare-config": Case(["compare", "--out", "{d}/cmp", "--learning_rate", "inf"], "'learning_rate'"),
    "bench-render": Case(["bench", "--render", "{results_json}"], "results.json' is not a results JSON file"),
    "bench-preset": Case(["bench", "--preset", "nope"], "invalid choice: 'nope'"),
    "unknown-command": Case(["frobnicate"], "unknown command 'frobnicate'"),
}


def invoke(argv: list[str]) -> int:
    try:
        return commands.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        return int(exit_.code or 0)


@pytest.fixture()
def no_model(monkeypatch):
    def fail(cfg):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(trainer_module, "build_model", fail)
    monkeypatch.setattr(train_setup, "build_model", fail)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, files, run, tmp_path, monkeypatch, capsys, request):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    if not case.loads_model:
        request.getfixturevalue("no_model")
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository (runs/, bench-results/)
    shutil.copytree(files["d"], tmp_path, dirs_exist_ok=True)  # a case may write to or damage its files
    names = {k: str(tmp_path / v.relative_to(files["d"])) for k, v in files.items() if k != "d"}
    names["d"] = str(tmp_path)
    if "{run}" in " ".join(case.argv):
        shutil.copytree(run, tmp_path / "run")
        names["run"] = str(tmp_path / "run")
        if case.damage:
            case.damage(tmp_path / "run")
    capsys.readouterr()
    status = invoke([arg.format(**names) for arg in case.argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line or "unknown command" in line]
    assert status == case.status, err
    assert len(errors) == 1 and case.fragment in errors[0], err
    assert "Traceback" not in err


def test_enough_cases_cover_every_command():
    assert len(CASES) >= 40
    assert {c.argv[0] for c in CASES.values()} >= {"train", "eval", "skills", "compare", "bench"}


def test_debug_shows_the_traceback(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["--debug", "skills", "show", str(files["foreign_db"])],
                 ["skills", "show", str(files["foreign_db"]), "--debug"]):
        assert commands.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("sgsd-fast skills show: error:")
    assert commands.main(["skills", "show", str(files["foreign_db"])]) == 2
    assert "rerun with --debug" in capsys.readouterr().err


def test_a_failed_import_leaves_no_bank_and_a_read_only_command_changes_nothing(files, tmp_path, capsys):
    before = files["foreign_db"].read_bytes()
    assert commands.main(["skills", "import", str(files["field_json"]), str(tmp_path / "new.db")]) == 2
    assert not (tmp_path / "new.db").exists()
    assert commands.main(["skills", "show", str(files["foreign_db"])]) == 2
    assert files["foreign_db"].read_bytes() == before
