"""What the trainer reports about learning: per-problem eval records, the paired before/after comparison,
looping completions never rewarded, and the advantage SGSD outcome variant."""
from __future__ import annotations

import json

import pytest
import torch

from sgsd_fast.config import TrainConfig
from sgsd_fast.ops import sgsd_gated_loss
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.evaluate import eval_records_path, read_records
from sgsd_fast.train.trainer import Trainer
from sgsd_fast.verify import VerifyResult
from sgsd_fast.verify import repetition

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedVerifier:
    """Reward 1 for every completion (the tests check what the trainer does with it)."""

    def score(self, completions, answers):
        n = len(completions)
        return VerifyResult(rewards=[1.0] * n, extracted=["1"] * n, timeouts=0, errors=0)

    def close(self):
        pass


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def cfg_for(tmp_path, **kw):
    base = dict(max_steps=2, prompts_per_step=2, max_new_tokens=4, num_teachers=1, micro_batch_size=2,
                generation_batch_size=4, num_train_problems=8, num_eval_problems=5, builtin_levels=[1],
                output_dir=str(tmp_path / "run"), save_every=0, warmup_steps=0, progress=False, report_to="none",
                answer_format="answer_is")
    return TrainConfig(**(base | kw))


def test_eval_records_and_paired_comparison_are_written(tmp_path, tok):
    cfg = cfg_for(tmp_path)
    lines = []
    with Trainer(cfg, model=tiny_random_model(tok, seed=3), tokenizer=tok, verifier=ScriptedVerifier(),
                 log=lines.append) as trainer:
        summary = trainer.train()
    run = tmp_path / "run"
    before, after = read_records(eval_records_path(run, 0)), read_records(eval_records_path(run, 2))
    assert len(before) == len(after) == 5 and [r["id"] for r in before] == [r["id"] for r in after]
    assert all(r["key"] and set(r) >= {"correct", "looping", "completion"} for r in before)
    cmp = json.loads((run / "comparison.json").read_text())
    assert cmp == summary["comparison"] and cmp["n"] == 5 and cmp["ci_low"] <= cmp["delta"] <= cmp["ci_high"]
    assert any(line.startswith("paired comparison: accuracy") for line in "\n".join(lines).splitlines())
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    # one problem per computation in the built-in eval split
    assert len({r["key"] for r in before}) == 5


@pytest.mark.parametrize("reject", [True, False])
def test_looping_rollouts_are_not_rewarded(tmp_path, tok, monkeypatch, reject):
    monkeypatch.setattr(repetition, "is_repetitive", lambda text, **kw: True)  # every completion "loops"
    cfg = cfg_for(tmp_path, max_steps=1, eval_at_start=False, reject_repetition=reject)
    with Trainer(cfg, model=tiny_random_model(tok, seed=3), tokenizer=tok, verifier=ScriptedVerifier(),
                 log=lambda s: None) as trainer:
        trainer.train()
        rows = trainer.state["history"]
    train_row = next(r for r in rows if "eval_step" not in r)
    eval_row = next(r for r in rows if "eval_step" in r)
    assert train_row["repetition_rate"] == 1.0 and eval_row["eval/repetition_rate"] == 1.0
    assert train_row["reward"] == (0.0 if reject else 1.0)
    assert eval_row["eval/accuracy"] == (0.0 if reject else 1.0)


def _advantage_reference(s, q, mask, rewards, a, tau=1.0, clip=3.0, eps=0.05):
    """SPEC §3 written out in float64 with o = r - mean(r) (the advantage variant)."""
    s, q, a = s.double(), q.double(), a.double()
    o = rewards.double() - rewards.double().mean()
    total = 0.0
    for i in range(s.shape[0]):
        m = mask[i].double()
        n = max(1.0, float(m.sum()))
        for k in range(q.shape[1]):
            d = q[i, k] - s[i]
            sup = float((d.detach().clamp(-clip, clip) * m).sum()) / n
            sigma = (1.0 if sup > 0 else -1.0) if abs(sup) > eps else 0.0
            gate = torch.log(torch.tensor(2.0, dtype=torch.float64)) - torch.nn.functional.softplus(-d**2 / (2 * tau))
            total = total + a[i, k] * o[i] * sigma * (gate * m).sum() / n
    return total / s.shape[0]


def test_advantage_outcome_matches_reference_and_silences_uniform_batches():
    g = torch.Generator().manual_seed(0)
    b, k, t = 4, 2, 7
    s = (torch.randn(b, t, generator=g, dtype=torch.float64) * 3 - 4).requires_grad_()
    q = torch.randn(b, k, t, generator=g, dtype=torch.float64) * 3 - 4
    mask = torch.rand(b, t, generator=g) > 0.2
    a = torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), -1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    loss, _ = sgsd_gated_loss(s, q, mask, rewards, a, outcome_baseline=float(rewards.mean()))
    ref = _advantage_reference(s, q, mask, rewards, a)
    assert float(loss) == pytest.approx(float(ref), rel=1e-12, abs=1e-15)
    (g1,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    # All rollouts failed: the paper's sign pushes every one away; the advantage variant leaves them alone.
    zeros = torch.zeros(b)
    exact, _ = sgsd_gated_loss(s, q, mask, zeros, a)
    advantage, _ = sgsd_gated_loss(s, q, mask, zeros, a, outcome_baseline=0.0)
    assert float(exact) != 0.0 and float(advantage) == 0.0
    # A mixed batch: the one success weighs 0.75, each failure 0.25 (the paper: 1 and 1).
    rewards4 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    per_row = [sgsd_gated_loss(s[i:i + 1], q[i:i + 1], mask[i:i + 1], rewards4[i:i + 1], a[i:i + 1])[0]
               for i in range(b)]
    weights = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64)
    expected = sum(w * float(l) * (1 if i == 0 else -1) for i, (w, l) in enumerate(zip(weights, per_row))) / b
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(ValueError, match="outcome_baseline"):
        sgsd_gated_loss(s, q, mask, zeros, a, outcome_baseline=float("nan"))
