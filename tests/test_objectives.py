"""The per-method objectives: the registry matches the config, and GRPO inside the trainer's update step
equals a float64 autograd reference (an equal-reward group contributes no gradient)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from sgsd_fast.config import METHODS, TrainConfig
from sgsd_fast.losses import grpo_advantages
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.batch import TokenMasker
from sgsd_fast.train.objectives import OBJECTIVES, Rollouts, get_objective
from sgsd_fast.train.step import StepInputs, build_scheduler, update_step
from test_trainer_step import GradCapture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_matches_the_config_methods():
    assert tuple(OBJECTIVES) == METHODS
    assert all(cls.name == name for name, cls in OBJECTIVES.items())
    with pytest.raises(ValueError, match="method must be one of"):
        get_objective("ppo")
    assert not get_objective("grpo").needs_teachers and get_objective("grpo").keep_eos
    assert get_objective("sgsd").uses_skill_bank and not get_objective("sgsd").keep_eos


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_random_model(tok, hidden_size=32, layers=2, seed=11)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # Two problems, two rollouts each (adjacent, as the trainer samples them).
    prompts = [enc("Q: 2+2="), enc("Q: 2+2="), enc("Q: 13-4=?"), enc("Q: 13-4=?")]
    completions = [enc("4") + [tok.eos_token_id], enc("five\n"), enc("9, so 9"), enc("8") + [tok.eos_token_id]]
    length = max(map(len, completions))
    mask = TokenMasker(tok, keep_eos=True).mask(completions, length)
    return dict(tok=tok, model=model, prompts=prompts, completions=completions, length=length, mask=mask)


def grpo_step(setup, rows: list[int], rewards: list[float], micro: int):
    """Gradients handed to the optimizer by one GRPO update on `rows`, and the advantages used."""
    model = copy.deepcopy(setup["model"])
    cfg = TrainConfig(method="grpo", num_generations=2, micro_batch_size=micro, max_grad_norm=0.0,
                      warmup_steps=0, learning_rate=1.0)
    objective = get_objective("grpo")(cfg)
    completions = [setup["completions"][i] for i in rows]
    r = torch.tensor(rewards)
    payload = objective.prepare(Rollouts(problems=[SimpleNamespace()] * len(rows), completions=completions,
                                         length=setup["length"], rewards=r))
    opt = GradCapture(model.parameters(), lr=1.0)
    inp = StepInputs(prompt_ids=[setup["prompts"][i] for i in rows], completion_ids=completions,
                     mask=setup["mask"][rows], rewards=r, payload=payload)
    result = update_step(model, opt, build_scheduler(opt, cfg), objective, inp, cfg, pad_id=setup["tok"].pad_token_id)
    assert not result.skipped
    return opt.grads, payload.advantages, result


def reference_grads(setup, rows, advantages):
    """float64, unpadded, the model's own full logits: -sum_i sum_t M_t A_i s_t / sum M, by autograd."""
    model = copy.deepcopy(setup["model"]).double()
    terms, count = [], 0
    for row, a in zip(rows, advantages.double()):
        prompt, completion = setup["prompts"][row], setup["completions"][row]
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]
        logp = torch.log_softmax(logits, -1)
        for j, token in enumerate(completion):
            if setup["mask"][row, j]:
                terms.append(a * logp[len(prompt) - 1 + j, token])
                count += 1
    loss = -torch.stack(terms).sum() / count
    loss.backward()
    return [p.grad for p in model.parameters()], float(loss.detach())


@pytest.mark.parametrize("micro", [4, 1])
def test_grpo_update_equals_float64_reference(setup, micro):
    rows, rewards = [0, 1, 2, 3], [1.0, 0.0, 1.0, 1.0]  # group 2 has equal rewards: A = 0 there
    grads, adv, result = grpo_step(setup, rows, rewards, micro)
    torch.testing.assert_close(adv, grpo_advantages(torch.tensor(rewards), 2))
    assert adv[0] > 0 > adv[1] and torch.equal(adv[2:], torch.zeros(2))
    want, want_loss = reference_grads(setup, rows, adv)
    assert result.loss == pytest.approx(want_loss, rel=1e-4, abs=1e-7)
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert any(g.abs().max() > 0 for g in grads)


def test_grpo_equal_reward_group_contributes_no_gradient(setup):
    grads, adv, result = grpo_step(setup, [2, 3], [1.0, 1.0], micro=2)
    assert torch.equal(adv, torch.zeros(2)) and result.grad_norm == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
