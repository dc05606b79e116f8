"""`sgsd-fast export`: a trained LoRA checkpoint of a tiny model (saved as a plain folder, like a Hub
model) written as an adapter and as a merged model; both load with
`AutoModelForCausalLM.from_pretrained` and give the trainer's logits. `--push_to_hub` is checked
for its argument only (no network here)."""
from __future__ import annotations

import json

import pytest
import torch

from sgsd_fast import commands
from sgsd_fast.config import TrainConfig
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint folder, the trained policy) after one LoRA step on a tiny model from disk."""
    d = tmp_path_factory.mktemp("export")
    tok = tiny_tokenizer()
    tiny_random_model(tok, hidden_size=32, layers=2, seed=3).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    bank = d / "bank.json"
    bank.write_text(json.dumps({"skills": [{"title": "Add", "principle": "Digits.", "when_to_apply": "Sums."}],
                                "mistakes": [{"description": "Carry", "why_it_happens": "Rush.",
                                              "how_to_avoid": "Check."}]}))
    cfg = TrainConfig(model=str(d / "base"), use_peft=True, lora_r=4, lora_alpha=8, max_steps=1, prompts_per_step=2,
                      max_new_tokens=6, num_teachers=1, micro_batch_size=2, num_train_problems=4, num_eval_problems=2,
                      output_dir=str(d / "run"), skill_bank=str(bank), eval_at_start=False, progress=False,
                      report_to="none", learning_rate=5e-2, warmup_steps=0, deadzone=0.0, sgsd_outcome="sign",
                      verifier_workers=1, optim="adamw_torch", save_every=0)
    with Trainer(cfg) as trainer:
        trainer.train()
        model = trainer.model
    return d / "run" / "checkpoint-1", model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 30, 44, 60, 2]])


@pytest.mark.parametrize("merge", [False, True])
def test_export_loads_with_from_pretrained_and_matches_the_trainer(trained, tmp_path, merge):
    from transformers import AutoModelForCausalLM

    ckpt, model = trained
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(ckpt), "--out", str(out)] + (["--merge"] if merge else [])
    assert commands.main(argv) == 0
    files = {p.name for p in out.iterdir()}
    assert "tokenizer.json" in files
    assert ("model.safetensors" in files and "adapter_config.json" not in files) if merge else \
        {"adapter_config.json", "adapter_model.safetensors"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with model.disable_adapter():
        base_logits = _logits(model, IDS)
    assert (_logits(model, IDS) - base_logits).abs().max() > 1e-4  # the adapter moved: the comparison means something
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)
    assert loaded.generate(IDS, min_new_tokens=3, max_new_tokens=3, do_sample=False).shape == (1, IDS.shape[1] + 3)


def test_finished_run_leaves_its_model_at_the_top_level(trained):
    """TRL's layout: `from_pretrained(run_dir)` gives the trained policy (adapter on its base)."""
    from transformers import AutoModelForCausalLM

    ckpt, model = trained
    run = ckpt.parent
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in run.iterdir()}
    assert not list(run.glob(".*.tmp-*")), "no temporary copy left behind"
    loaded = AutoModelForCausalLM.from_pretrained(run).eval()
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=1e-5, atol=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_dir"] == str(run)


def test_export_refuses_bad_arguments_before_loading(trained, tmp_path, capsys):
    ckpt, _ = trained
    cases = [(["--push_to_hub", "not a/valid/repo"], "--push_to_hub: expected a Hub repository id"),
             (["--checkpoint", str(tmp_path)], "is not a checkpoint folder"),
             (["--out", str(ckpt)], "--out:")]
    for extra, message in cases:
        argv = ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")] + extra
        assert commands.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "\n" not in err.strip()
        assert not (tmp_path / "o").exists()
