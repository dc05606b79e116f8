"""TrainConfig: defaults, YAML + command-line precedence, coercion, and errors that name the field."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from sgsd_fast.config import ConfigError, TrainConfig, config_from_args, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_every_field_has_help():
    cfg = TrainConfig()
    assert cfg.method == "sgsd" and cfg.model == "smollm2"
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help string"


def test_cli_overrides_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 7, "learning_rate": 3e-4, "use_peft": True, "top_k": 5}))
    cfg = parse_config(["--config", str(path), "--max_steps", "9", "--use_peft", "false", "--builtin_levels", "1,3",
                        "--eval_max_new_tokens", "none", "--student_thinking", "true"])
    assert cfg.max_steps == 9  # CLI wins
    assert cfg.learning_rate == 3e-4 and cfg.top_k == 5  # from YAML
    assert cfg.use_peft is False
    assert cfg.builtin_levels == [1, 3]
    assert cfg.eval_max_new_tokens is None
    assert cfg.student_thinking is True
    assert cfg.prompts_per_step == TrainConfig().prompts_per_step  # default untouched


def test_yaml_round_trip(tmp_path):
    cfg = parse_config(["--method", "opsd", "--teacher_params", "frozen", "--opsd_entry_clip", "none"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path) == cfg


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--max_steps", "0"], "max_steps"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--top_p", "1.5"], "top_p"),
        (["--method", "ppo"], "method"),
        (["--method", "grpo"], "num_generations"),  # a group of one rollout has no baseline
        (["--num_generations", "0"], "num_generations"),
        (["--teacher_params", "copy"], "teacher_params"),
        (["--ema_decay", "1.0"], "ema_decay"),
        (["--use_peft", "maybe"], "use_peft"),
        (["--num_teachers", "two"], "num_teachers"),
        (["--max_new_tokens", "1.5"], "max_new_tokens"),
        (["--prompts_per_step", "none"], "prompts_per_step"),
        (["--skill_bank", "missing_bank.json"], "skill_bank"),
        (["--dataset", "missing.parquet"], "dataset"),
        (["--builtin_levels", ""], "builtin_levels"),
        (["--data_parallel", "zero3"], "data_parallel"),
        (["--fsdp_param_dtype", "bfloat16"], "fsdp_param_dtype"),  # only with data_parallel fsdp
        # what a sharded policy cannot do (sgsd_fast.config.TrainConfig._validate_fsdp)
        (["--data_parallel", "fsdp", "--teacher_params", "ema"], "teacher_params"),
        (["--data_parallel", "fsdp", "--use_peft", "false"], "teacher_params"),  # a frozen full copy
        (["--data_parallel", "fsdp", "--load_in_4bit", "true"], "load_in_4bit"),
        (["--data_parallel", "fsdp", "--online_update_every", "1"], "online_update_every"),
        (["--data_parallel", "fsdp", "--encoder", "policy"], "encoder"),
        (["--data_parallel", "fsdp", "--fsdp_param_dtype", "auto"], "fsdp_param_dtype"),
    ],
)
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=repr(field)):
        parse_config(argv)


@pytest.mark.parametrize(
    "argv, field, expected",
    [
        (["--learning_rate", "inf"], "learning_rate", "a finite number"),
        (["--learning_rate", "nan"], "learning_rate", "a finite number"),
        (["--learning_rate", "1e30"], "learning_rate", "a number in (0, 1]"),
        (["--temperature", "inf"], "temperature", "a finite number"),
        (["--verifier_timeout_s", "inf"], "verifier_timeout_s", "a finite number"),
        (["--max_grad_norm", "nan"], "max_grad_norm", "a finite number"),
        (["--builtin_levels", "99"], "builtin_levels", "a non-empty list of distinct levels from [1, 2, 3, 4, 5]"),
        (["--builtin_levels", "1,1"], "builtin_levels", "a non-empty list of distinct levels"),
        (["--encoder", "word2vec"], "encoder", "one of ('tfidf', 'policy', 'sentence-transformers', 'st')"),
        (["--max_consecutive_skipped_steps", "-1"], "max_consecutive_skipped_steps", "an integer >= 0"),
    ],
)
def test_values_that_used_to_fail_late_are_rejected_up_front(argv, field, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    assert f"config field {field!r}: expected {expected}" in str(info.value)


def test_report_to_tensorboard_needs_the_package(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="'report_to'.*pip install tensorboard"):
        parse_config(["--report_to", "tensorboard"])
    assert parse_config(["--report_to", "auto"]).report_to == "auto"  # auto: TensorBoard only when installed


def test_st_encoder_alias_is_accepted():
    assert parse_config(["--encoder", "st", "--encoder_model", "some/model"]).encoder == "st"


def test_names_config_copies_from_higher_layers_stay_in_step():
    from sgsd_fast.config import ENCODERS, TASK_LEVELS
    from sgsd_fast.data.tasks import LEVELS
    from sgsd_fast.skills import encoders

    assert set(ENCODERS) == set(encoders.ENCODERS) | set(encoders.ENCODER_ALIASES)
    assert TASK_LEVELS == tuple(sorted(LEVELS))


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"max_steps: [1, 2\n", "is not valid YAML"),
        (b"model: caf\xe9\n", "is not UTF-8 text"),
        (b"method: sgsd\n\tmax_steps: 3\n", "is not valid YAML"),
    ],
)
def test_unreadable_yaml_names_the_file(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        parse_config(["--config", str(path)])
    assert str(info.value).startswith(f"--config: {str(path)!r} {expected}") and "\n" not in str(info.value)


def test_empty_yaml_overrides_nothing_but_an_empty_saved_config_is_an_error(tmp_path):
    from sgsd_fast.config import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("")
    assert parse_config(["--config", str(path)]) == TrainConfig()
    with pytest.raises(ConfigError, match="checkpoint config: .*c.yaml' is empty"):
        read_yaml(path, what="checkpoint config", allow_empty=False)


def test_output_dir_check(tmp_path):
    from sgsd_fast.config import check_output_dir

    check_output_dir(tmp_path / "new" / "run")
    assert (tmp_path / "new" / "run").is_dir() and not list((tmp_path / "new" / "run").iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="'output_dir': .*file/run' is not a writable directory"):
        check_output_dir(tmp_path / "file" / "run")


def test_deprecated_teacher_weights_alias_warns_and_maps(tmp_path):
    """`teacher_weights` (the old name of the live/frozen/ema field) still reads from YAML, the command line
    and old checkpoints' config.yaml; the newer source wins whichever name either used."""
    path = tmp_path / "old.yaml"
    path.write_text("teacher_weights: ema\n")
    with pytest.warns(FutureWarning, match="'teacher_weights' is deprecated; use 'teacher_params'"):
        assert parse_config(["--config", str(path)]).teacher_params == "ema"
    with pytest.warns(FutureWarning):
        assert parse_config(["--teacher_weights", "live"]).teacher_params == "live"
    with pytest.warns(FutureWarning):
        assert parse_config(["--config", str(path), "--teacher_params", "live"]).teacher_params == "live"
    with pytest.raises(ConfigError, match="both given"):
        TrainConfig.from_dict({"teacher_weights": "ema", "teacher_params": "live"})
    # An old checkpoint's config.yaml is the base of `--resume`: it loads, and the command line still wins.
    with pytest.warns(FutureWarning):
        resumed = config_from_args(argparse.Namespace(teacher_params="live"), base={"teacher_weights": "ema"})
    assert resumed.teacher_params == "live"
    assert "teacher_weights" not in TrainConfig().to_yaml()  # new files use the new name


def test_grpo_needs_a_group_and_num_generations_serves_every_method():
    assert TrainConfig(method="grpo", num_generations=4).num_generations == 4
    assert TrainConfig(method="sgsd", num_generations=3).num_generations == 3


def test_unknown_yaml_key_suggests_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        parse_config(["--config", str(path)])


def test_wrong_yaml_type_and_non_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: [1, 2]\n")
    with pytest.raises(ConfigError, match="'max_steps'"):
        parse_config(["--config", str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_python_construction_is_type_checked():
    with pytest.raises(ConfigError, match="'max_steps'"):
        TrainConfig(max_steps="10")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'use_peft'"):
        TrainConfig(use_peft=1)  # type: ignore[arg-type]


def test_unknown_cli_option_is_an_error():
    with pytest.raises(ConfigError, match="--lr"):
        parse_config(["--lr", "1"])


def test_paper_config_matches_spec(tmp_path):
    data = tmp_path / "dapo.parquet"
    data.write_bytes(b"")  # only its existence is validated here
    cfg = parse_config(["--config", str(REPO / "configs" / "paper_qwen3_1p7b.yaml"), "--dataset", str(data)])
    assert cfg.model == "Qwen/Qwen3-1.7B"
    assert (cfg.use_peft, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules) == (True, 64, 128, "all-linear")
    assert (cfg.learning_rate, cfg.max_grad_norm, cfg.max_steps) == (5e-6, 0.1, 200)
    assert (cfg.prompts_per_step, cfg.max_new_tokens) == (16, 1024)
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (1.1, 0.95, 20)
    assert (cfg.tau_g, cfg.support_clip, cfg.deadzone, cfg.num_teachers) == (1.0, 3.0, 0.05, 8)
    assert cfg.online_update_every == 25 and cfg.teacher_params == "live"
    assert cfg.student_thinking is False and cfg.teacher_thinking is True
    # Without the user's dataset the file alone is rejected, naming the field.
    with pytest.raises(ConfigError, match="'dataset'"):
        parse_config(["--config", str(REPO / "configs" / "paper_qwen3_1p7b.yaml")])


def test_train_cli_help_and_errors(capsys):
    from sgsd_fast.commands.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--num_teachers" in capsys.readouterr().out
    assert main(["--max_steps", "-3"]) == 2  # a config error is one line, not argparse's usage
    err = capsys.readouterr().err
    assert "'max_steps'" in err and len(err.strip().splitlines()) == 1


def test_shipped_default_yaml_equals_the_embedded_defaults():
    assert TrainConfig.from_yaml(REPO / "configs" / "default.yaml") == TrainConfig()


def test_vllm_engine_needs_cuda_and_says_how_to_install(monkeypatch):
    with pytest.raises(ConfigError, match="rollout_engine"):
        TrainConfig(rollout_engine="vllm", device="cpu").validate()
    with pytest.raises(ConfigError, match="rollout_engine"):
        TrainConfig(rollout_engine="sglang").validate()
    from sgsd_fast.rollout import VLLMRolloutEngine

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            VLLMRolloutEngine("smollm2", None, max_new_tokens=8)
