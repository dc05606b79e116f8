"""The update step: gradient accumulation equals the full-batch gradient for every objective, clipping,
schedule, optimizers."""
from __future__ import annotations

import copy

import pytest
import torch

from sgsd_fast.config import TrainConfig
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.batch import TokenMasker
from sgsd_fast.train.objectives import get_objective
from sgsd_fast.train.objectives.grpo import GRPOPayload
from sgsd_fast.train.objectives.opsd import OPSDPayload
from sgsd_fast.train.objectives.sampled_rkl import SampledRKLPayload
from sgsd_fast.train.objectives.sgsd import SGSDPayload
from sgsd_fast.train.step import StepInputs, build_optimizer, build_scheduler, lr_factor, update_step
from sgsd_fast.train.teachers import TeacherPool


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_random_model(tok, hidden_size=32, layers=2, seed=7)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("Q: 2+2="), enc("Q: 13-4=?"), enc("Q: 5*3"), enc("Q: 1+1=")]
    completions = [enc("4") + [tok.eos_token_id], enc("nine, so 9"), enc("15\n"), enc("2 or 3")]
    length = max(map(len, completions))
    mask = TokenMasker(tok).mask(completions, length)
    teacher_prompts = [[enc("Hint: add. ") + p, enc("Hint: check. ") + p] for p in prompts]
    pool = TeacherPool(model, tok)
    return dict(tok=tok, model=model, prompts=prompts, completions=completions, length=length, mask=mask,
                teacher_logp=pool.score(teacher_prompts, completions, length),
                single_logp=pool.score([[tp[0]] for tp in teacher_prompts], completions, length),
                hidden=pool.hidden([tp[0] for tp in teacher_prompts], completions, length))


class GradCapture(torch.optim.SGD):
    """An optimizer whose step records the (accumulated, clipped) gradients it is handed."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def payload(setup, method: str):
    return {"sgsd": lambda: SGSDPayload(teacher_logp=setup["teacher_logp"],
                                        teacher_weights=torch.tensor([[0.6, 0.4]] * 4)),
            "sampled_rkl": lambda: SampledRKLPayload(teacher_logp=setup["single_logp"][:, 0]),
            "opsd": lambda: OPSDPayload(teacher_hidden=setup["hidden"][0], teacher_head=setup["hidden"][1]),
            "grpo": lambda: GRPOPayload(advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))}[method]()


def sgd_delta(setup, method: str, micro: int, max_grad_norm: float = 0.0) -> list[torch.Tensor]:
    """The gradients one update step hands to the optimizer, and the step's result."""
    model = copy.deepcopy(setup["model"])
    cfg = TrainConfig(method=method, micro_batch_size=micro, max_grad_norm=max_grad_norm, deadzone=0.0,
                      warmup_steps=0, learning_rate=1.0, num_generations=2)
    opt = GradCapture(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, cfg)
    mask = setup["mask"] if method == "sgsd" else setup["mask"] | torch.tensor(
        [[j < len(c) for j in range(setup["length"])] for c in setup["completions"]])
    inp = StepInputs(prompt_ids=setup["prompts"], completion_ids=setup["completions"], mask=mask,
                     rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), payload=payload(setup, method))
    result = update_step(model, opt, sched, get_objective(method)(cfg), inp, cfg, pad_id=setup["tok"].pad_token_id)
    assert not result.skipped and result.grad_norm > 0
    return opt.grads, result


@pytest.mark.parametrize("method", ["sgsd", "sampled_rkl", "opsd", "grpo"])
def test_accumulated_gradient_equals_full_batch(setup, method):
    full, r_full = sgd_delta(setup, method, micro=4)
    accumulated, r_acc = sgd_delta(setup, method, micro=1)
    assert r_full.loss == pytest.approx(r_acc.loss, rel=1e-5, abs=1e-7)
    for a, b in zip(full, accumulated):
        # fp32 sums in a different order: compare relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(a.abs().max()))
    assert any(d.abs().max() > 0 for d in full)


def test_grad_norm_clipping(setup):
    free, r = sgd_delta(setup, "sgsd", micro=2)
    clipped, rc = sgd_delta(setup, "sgsd", micro=2, max_grad_norm=r.grad_norm / 10)
    assert rc.grad_norm == pytest.approx(r.grad_norm, rel=1e-5)  # the pre-clip norm is reported
    norm = torch.sqrt(sum((d**2).sum() for d in clipped))
    assert norm == pytest.approx(r.grad_norm / 10, rel=1e-3)
    for a, b in zip(free, clipped):
        torch.testing.assert_close(a / 10, b, rtol=1e-4, atol=1e-6 * float(a.abs().max()))


def test_lr_schedule():
    cfg = TrainConfig(warmup_steps=3, max_steps=13, lr_scheduler_type="linear")
    assert [lr_factor(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(8, cfg) == pytest.approx(0.5) and lr_factor(13, cfg) == 0.0
    cos = TrainConfig(warmup_steps=0, max_steps=10, lr_scheduler_type="cosine")
    assert lr_factor(0, cos) == 1.0 and lr_factor(5, cos) == pytest.approx(0.5) and lr_factor(10, cos) == 0.0
    assert lr_factor(100, TrainConfig(warmup_steps=0)) == 1.0


def test_optimizer_choice(setup):
    params = list(copy.deepcopy(setup["model"]).parameters())
    assert type(build_optimizer(params, TrainConfig(optim="adamw_torch"), torch.device("cpu"))) is torch.optim.AdamW
    import bitsandbytes as bnb

    assert isinstance(build_optimizer(params, TrainConfig(), torch.device("cpu")), bnb.optim.AdamW8bit)
    frozen = [torch.nn.Parameter(torch.zeros(2), requires_grad=False)]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, TrainConfig(), torch.device("cpu"))


def test_non_finite_teacher_scores_skip_the_step(setup):
    model = copy.deepcopy(setup["model"])
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(micro_batch_size=2, deadzone=0.0, warmup_steps=0, optim="adamw_torch")
    opt = build_optimizer(model.parameters(), cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    bad = setup["teacher_logp"].clone()
    bad[1, 0, 0] = float("nan")
    inp = StepInputs(prompt_ids=setup["prompts"], completion_ids=setup["completions"], mask=setup["mask"],
                     rewards=torch.zeros(4),
                     payload=SGSDPayload(teacher_logp=bad, teacher_weights=torch.tensor([[0.5, 0.5]] * 4)))
    result = update_step(model, opt, sched, get_objective(cfg.method)(cfg), inp, cfg,
                         pad_id=setup["tok"].pad_token_id)
    assert result.skipped and result.loss != result.loss  # NaN
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sched.last_epoch == 1  # the schedule still advances: it is a function of the step index
