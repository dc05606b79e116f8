"""One SGSD step with the real SmolLM2-135M-Instruct (starter bank, tf-idf retrieval), tiny generation lengths."""
from __future__ import annotations

import copy

import pytest
import torch

from sgsd_fast.config import TrainConfig
from sgsd_fast.train.metrics import read_metrics
from sgsd_fast.train.teachers import TeacherPool
from sgsd_fast.train.trainer import Trainer


class NoAnswerVerifier:
    """Scores without worker processes: these 6-token completions cannot state an answer anyway."""

    def score(self, completions, answers):
        from sgsd_fast.verify import VerifyResult, extract_answer

        extracted = [extract_answer(c) for c in completions]
        return VerifyResult(rewards=[0.0] * len(completions), extracted=extracted)


@pytest.mark.slow
def test_one_sgsd_step_on_smollm2(smollm2, tmp_path, monkeypatch, one_thread):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)  # the fixture is shared: never train it in place
    shapes = []
    real_score = TeacherPool.score

    def spy(self, prompts, completions, length):
        out = real_score(self, prompts, completions, length)
        shapes.append(tuple(out.shape))
        assert torch.isfinite(out).all() and (out <= 0).all()
        return out

    monkeypatch.setattr(TeacherPool, "score", spy)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = TrainConfig(max_steps=1, prompts_per_step=2, max_new_tokens=6, num_teachers=2, micro_batch_size=2,
                      num_train_problems=8, num_eval_problems=1, eval_at_start=False, eval_max_new_tokens=2,
                      builtin_levels=[1], output_dir=str(tmp_path), save_every=0, learning_rate=1e-4,
                      warmup_steps=0, deadzone=0.0, optim="adamw_torch", teacher_params="live", progress=False,
                      report_to="none", use_peft=False, sgsd_outcome="sign")
    with Trainer(cfg, model=model, tokenizer=tokenizer, verifier=NoAnswerVerifier(), log=lambda s: None) as trainer:
        summary = trainer.train()
    row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_step" not in r][0]
    assert shapes and shapes[0][:2] == (2, 2)
    assert row["skipped"] == 0 and row["loss"] is not None and row["mask_tokens"] > 0
    assert row["loss/support_raw_mean"] != 0.0  # the skill-conditioned teachers really disagree with the student
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    # the checkpoint of a GGUF-loaded model is a plain HF folder: from_pretrained loads the trained weights
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(f"{summary['checkpoint']}/model")
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
