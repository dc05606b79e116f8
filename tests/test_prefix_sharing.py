"""Shared prompt prefixes run once (`share_prompt_prefix`): the same hidden states, teacher scores,
completions and gradients as the plain ``[left pad][prompt][completion]`` layout, in float64.

The tiny model's weights are scaled up so its attention is far from uniform: with default-init
weights every key gets nearly the same weight, and a prefix attended at the wrong positions (or
not at all) would hardly change the output.
"""
from __future__ import annotations

import pytest
import torch

from sgsd_fast.config import TrainConfig
from sgsd_fast.models import enable_checkpointing, apply_lora, shared_prefix_length, tiny_random_model, tiny_tokenizer
from sgsd_fast.rollout import HFRolloutEngine
from sgsd_fast.train.batch import TokenMasker, forward_hidden, pack
from sgsd_fast.train.objectives import get_objective
from sgsd_fast.train.objectives.sgsd import SGSDPayload
from sgsd_fast.train.step import StepInputs, build_scheduler, update_step
from sgsd_fast.train.teachers import TeacherPool

pytestmark = pytest.mark.usefixtures("one_thread")


def spread_model(seed: int = 3, scale: float = 6.0) -> torch.nn.Module:
    """A float64 tiny Llama whose query and key projections are `scale` x the default init (peaked
    attention; scaling the MLP too makes activations so large that float64 sums cancel at 1e-8)."""
    model = tiny_random_model(tiny_tokenizer(), hidden_size=32, layers=2, seed=seed).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]) == 3
    # Each row keeps its last token: [1, 2] and [1, 2, 3] share at most 1.
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[5, 2, 3], [1, 2, 3]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one row: nothing to share
    assert shared_prefix_length([]) == 0


def test_pack_moves_the_prefix_out_and_keeps_positions(tok):
    system = ids(tok, "System: be brief. User: ")
    prompts = [system + ids(tok, "2+2?"), system + ids(tok, "13-4 = ?")]
    completions = [ids(tok, "4"), ids(tok, "9!")]
    plain = pack(prompts, completions, pad_id=tok.pad_token_id)
    shared = pack(prompts, completions, pad_id=tok.pad_token_id, share_prefix=True)
    assert plain.prefix_ids is None
    assert shared.prefix_ids.tolist() == system
    assert shared.attention_mask.shape[1] == len(system) + shared.input_ids.shape[1]
    assert torch.equal(shared.targets, plain.targets)
    # Every real token keeps the position it has in the plain layout.
    for row in range(2):
        plain_pos = plain.position_ids[row][plain.attention_mask[row].bool()]
        rest_pos = shared.position_ids[row][shared.attention_mask[row, len(system):].bool()]
        assert torch.equal(torch.cat([torch.arange(len(system)), rest_pos]), plain_pos)


def test_forward_hidden_matches_the_plain_layout(tok):
    model = spread_model()
    g = torch.Generator().manual_seed(11)
    vocab = model.config.vocab_size
    prefix = torch.randint(3, vocab, (9,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 5, 2, 8)]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 6, 1, 4)]
    with torch.no_grad():
        plain = forward_hidden(model, pack(prompts, completions, pad_id=0, length=6))
        shared_batch = pack(prompts, completions, pad_id=0, length=6, share_prefix=True)
        assert shared_batch.prefix_ids.numel() == 9
        shared = forward_hidden(model, shared_batch)
        valid = pack(prompts, completions, pad_id=0, length=6).targets >= 0
        # float64 end to end: only summation order differs.
        torch.testing.assert_close(shared[valid], plain[valid], rtol=0, atol=1e-10)
        # The check can fail: the same rows without their prefix give other states.
        alone = forward_hidden(model, pack([p[9:] for p in prompts], completions, pad_id=0, length=6))
        assert (alone[valid] - plain[valid]).abs().max() > 1e-2


@pytest.mark.parametrize("params", ["live", "frozen"])
def test_teacher_scores_match(tok, params):
    model = spread_model()
    if params == "frozen":
        model = apply_lora(model, {"r": 4, "alpha": 8})
        with torch.no_grad():  # a non-zero adapter, so "frozen" (adapter disabled) is a different model
            g = torch.Generator().manual_seed(0)
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.5, generator=g)
    preamble = ids(tok, "Notes: add carefully, check the sign. ")
    questions = [ids(tok, "Q: 2+2="), ids(tok, "Q: 13-4=?"), ids(tok, "Q: 5*3"), ids(tok, "Q: 1+1=")]
    teacher_prompts = [[preamble + ids(tok, "Hint: add. ") + q, preamble + ids(tok, "Hint: mind the carry. ") + q]
                       for q in questions]
    completions = [ids(tok, "4") + [tok.eos_token_id], ids(tok, "nine, so 9"), ids(tok, "15"), ids(tok, "2 or 3")]
    length = max(map(len, completions))
    scores = {share: TeacherPool(model, tok, params=params, share_prefix=share, micro_batch_size=3)
              .score(teacher_prompts, completions, length) for share in (False, True)}
    torch.testing.assert_close(scores[True], scores[False], rtol=0, atol=1e-10)
    assert scores[True].abs().sum() > 0


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_matches(tok, greedy):
    model = spread_model(seed=5, scale=4.0)
    prompts = ["<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnd 13-4, then?<|im_end|>\n",
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n5*3<|im_end|>\n"]
    out = {share: HFRolloutEngine(model, tok, max_new_tokens=12, temperature=0.9, share_prefix=share)
           .generate(prompts, seed=4, greedy=greedy) for share in (False, True)}
    assert out[True].completion_ids == out[False].completion_ids
    assert out[True].truncated == out[False].truncated
    assert any(len(c) > 1 for c in out[True].completion_ids)


def _grads(tok, *, share: bool, checkpointing: bool) -> tuple[float, list[torch.Tensor]]:
    model = spread_model()
    if checkpointing:
        enable_checkpointing(model)
    model = apply_lora(model, {"r": 4, "alpha": 8}, gradient_checkpointing=checkpointing)
    with torch.no_grad():  # seeded adapters (peft draws lora_A from the global RNG), lora_B non-zero
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5, generator=g)
    system = ids(tok, "System: show the work. ")
    prompts = [system + ids(tok, q) for q in ("2+2=", "13-4=?", "5*3", "1+1=")]
    completions = [ids(tok, "4") + [tok.eos_token_id], ids(tok, "nine, so 9"), ids(tok, "15"), ids(tok, "2 or 3")]
    length = max(map(len, completions))
    pool = TeacherPool(model, tok, share_prefix=False)
    teacher_logp = pool.score([[ids(tok, "Hint: add. ") + p, ids(tok, "Hint: check. ") + p] for p in prompts],
                              completions, length)
    cfg = TrainConfig(method="sgsd", micro_batch_size=2, max_grad_norm=0.0, deadzone=0.0, warmup_steps=0,
                      share_prompt_prefix=share, gradient_checkpointing=checkpointing)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    captured: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda o, *_: captured.extend(p.grad.clone() for g in o.param_groups
                                                             for p in g["params"]))
    inp = StepInputs(prompt_ids=prompts, completion_ids=completions, mask=TokenMasker(tok).mask(completions, length),
                     rewards=torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64),
                     payload=SGSDPayload(teacher_logp=teacher_logp, teacher_weights=torch.tensor([[0.7, 0.3]] * 4)))
    result = update_step(model, opt, build_scheduler(opt, cfg), get_objective("sgsd")(cfg), inp, cfg,
                         pad_id=tok.pad_token_id)
    assert not result.skipped
    return result.loss, captured


@pytest.mark.parametrize("checkpointing", [False, True])
def test_student_update_matches(tok, checkpointing):
    """The student's loss and LoRA gradients (which flow through the prefix's cache) are those of the
    plain layout; with gradient checkpointing the prefix is not shared (transformers would drop the
    cache inside checkpointed layers) and the result is still right."""
    loss_plain, grads_plain = _grads(tok, share=False, checkpointing=False)
    loss_shared, grads_shared = _grads(tok, share=True, checkpointing=checkpointing)
    assert loss_shared == pytest.approx(loss_plain, rel=1e-9, abs=1e-12)
    assert len(grads_shared) == len(grads_plain) > 0
    assert max(float(g.abs().max()) for g in grads_plain) > 0
    for a, b in zip(grads_shared, grads_plain):
        # transformers' RMSNorm computes in float32 even for float64 inputs, and the shared layout sums
        # the rows' gradients before the prefix's norm backward instead of after: the two differ by
        # float32 rounding (measured: 1e-7 of the largest entry, in the first layer only).
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * float(b.abs().max()))


def test_which_passes_share_the_prefix():
    assert TrainConfig().prefix_sharing() and TrainConfig().prefix_sharing(student=True)
    checkpointed = TrainConfig(gradient_checkpointing=True)
    assert checkpointed.prefix_sharing() and not checkpointed.prefix_sharing(student=True)
    # Under FSDP every forward is a collective; whether a batch has a prefix depends on the rank's prompts.
    fsdp = TrainConfig(data_parallel="fsdp")
    assert not fsdp.prefix_sharing() and not fsdp.prefix_sharing(student=True)
    assert not TrainConfig(share_prompt_prefix=False).prefix_sharing()
