"""Hugging Face / TRL argument names, bare boolean flags, list-valued flags and one flag spelling across
commands: the alias table itself, its command line, YAML and --help, and `skills build`'s dataset fields."""
from __future__ import annotations

import dataclasses
import json

import pytest

from sgsd_fast import commands
from sgsd_fast.commands import skills as skills_cmd
from sgsd_fast.commands import train as train_cmd
from sgsd_fast.config import ALIASES, DEPRECATED_FIELDS, ConfigError, TrainConfig, parse_config

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
VALUES = {"model": "smollm2", "dtype": "float32", "liger": "false", "dataset": "builtin", "dataset_split": "train",
          "eval_split": "test", "max_new_tokens": "12", "save_every": "5", "eval_every": "3"}


def test_the_alias_table_names_real_fields_and_no_field_is_shadowed():
    assert set(ALIASES.values()) <= FIELDS
    assert not set(ALIASES) & (FIELDS | set(DEPRECATED_FIELDS))
    assert set(VALUES) == set(ALIASES.values())  # every alias is exercised below


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_each_alias_sets_its_field_from_the_command_line_and_yaml(alias, tmp_path):
    name = ALIASES[alias]
    assert parse_config([f"--{alias}", VALUES[name]]) == parse_config([f"--{name}", VALUES[name]])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"{alias}: {VALUES[name]}\n")
    assert parse_config(["--config", str(yaml_file)]) == parse_config([f"--{name}", VALUES[name]])
    assert f"--{name} " in train_cmd.build_parser().format_help()


def test_an_alias_and_its_field_together_is_an_error():
    with pytest.raises(ConfigError, match="'save_steps' and 'save_every' are the same field"):
        TrainConfig.from_dict({"save_steps": 1, "save_every": 2})


def test_help_lists_the_aliases():
    text = " ".join(train_cmd.build_parser().format_help().split())
    for alias, name in ALIASES.items():
        assert f"--{name} " in text and f"--{alias} " in text
    assert "--resume PATH|auto, --resume_from_checkpoint PATH|auto" in text


def test_bare_booleans_and_list_values():
    cfg = parse_config(["--use_peft", "--gradient_checkpointing", "--liger", "false",
                        "--lora_target_modules", "q_proj", "k_proj", "--builtin_levels", "1", "2",
                        "--report_to", "none"])
    assert cfg.use_peft and cfg.gradient_checkpointing and not cfg.liger
    assert cfg.lora_target_modules == "q_proj,k_proj" and cfg.builtin_levels == [1, 2]
    assert parse_config(["--lora_target_modules", "q_proj,v_proj"]).lora_target_modules == "q_proj,v_proj"
    assert TrainConfig.from_dict({"lora_target_modules": ["q_proj", "o_proj"]}).lora_target_modules == "q_proj,o_proj"
    with pytest.raises(ConfigError, match="'use_peft': expected bool, got 'maybe'"):
        parse_config(["--use_peft", "maybe"])


def test_resume_from_checkpoint_is_resume():
    assert train_cmd.build_parser().parse_args(["--resume_from_checkpoint", "auto"]).resume == "auto"


def test_skills_build_takes_trains_spellings_and_the_dataset_fields(tmp_path, monkeypatch):
    """Underscored flags (the dashed ones still parse) and problem_field/answer_field/dataset_config,
    checked up to the data loading: a DAPO-layout file no longer fails on a missing 'problem' field."""
    data = tmp_path / "dapo.jsonl"
    data.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is 2+3?"}],
                                "reward_model": {"ground_truth": "5"}}) + "\n")
    common = ["build", "--data", str(data), "--out", str(tmp_path / "bank.db"), "--max_new_tokens", "8",
              "--batch-size", "2", "--answer_phrase", "--problem_field", "prompt",
              "--answer_field", "reward_model.ground_truth", "--dataset_config", "main"]
    args = skills_cmd._parser().parse_args(common)
    assert (args.max_new_tokens, args.batch_size, args.answer_phrase) == (8, 2, True)
    problems = skills_cmd.load_build_problems(args.data, split=args.split, problem_field=args.problem_field,
                                              answer_field=args.answer_field)
    assert [(p.question, p.answer) for p in problems] == [("What is 2+3?", "5")]
    seen = {}
    monkeypatch.setattr(skills_cmd, "load_build_problems", lambda data, **kw: seen.update(kw) or problems)
    monkeypatch.setattr("sgsd_fast.models.load_model_and_tokenizer",
                        lambda *a, **kw: (_ for _ in ()).throw(ValueError("stop before the model")))
    assert commands.main(["skills"] + common) == 2
    assert seen["problem_field"] == "prompt" and seen["config"] == "main"
