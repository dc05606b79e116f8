"""Teacher input assembly, the SPEC §3 token mask, teacher scores and teacher weight modes (tiny model)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.ops import IGNORE_INDEX
from sgsd_fast.train.batch import TokenMasker, completion_targets, pack
from sgsd_fast.train.teachers import TeacherParams, TeacherPool, retrieve_contexts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def model(tok):
    return tiny_random_model(tok, hidden_size=32, layers=2, seed=3)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def unpadded_logprobs(model, prompt, completion):
    """Reference: the model's own logits on the unpadded sequence (no padding, default positions)."""
    seq = torch.tensor([prompt + completion])
    logits = model(input_ids=seq).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(completion)])


def test_pack_layout_positions_and_targets(tok):
    prompts = [[5, 6, 7], [8]]
    completions = [[9, 10], [11, 12, 13]]
    b = pack(prompts, completions, pad_id=0)
    assert b.start == 3 and b.input_ids.shape == (2, 6)
    # identical completion ids, all starting at the same column
    assert b.input_ids[0, 3:5].tolist() == [9, 10] and b.input_ids[1, 3:6].tolist() == [11, 12, 13]
    assert b.targets.tolist() == [[9, 10, IGNORE_INDEX], [11, 12, 13]]
    # positions count real tokens only: continuous from the prompt, no pad gap
    assert b.position_ids[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert b.position_ids[1, 2:6].tolist() == [0, 1, 2, 3]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert torch.equal(completion_targets(completions, 3), b.targets)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        pack([[1]], [[2], [3]], pad_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        pack([[]], [[2]], pad_id=0)
    with pytest.raises(ValueError, match="length"):
        pack([[1]], [[2, 3]], pad_id=0, length=1)


def test_teacher_scores_equal_unpadded_forward(tok, model):
    """Left padding + continuous positions must reproduce the unpadded model exactly: [B, K, T] scores."""
    completions = [ids(tok, "12+3"), ids(tok, "7")]
    teacher_prompts = [[ids(tok, "note A: add.\nQ: 9+3="), ids(tok, "Q: 9+3=")],
                       [ids(tok, "long note B about subtraction.\nQ: 9-2="), ids(tok, "9-2=")]]
    pool = TeacherPool(model, tok, micro_batch_size=1)
    out = pool.score(teacher_prompts, completions, length=5)
    assert out.shape == (2, 2, 5) and out.dtype == torch.float32
    for bi in range(2):
        for k in range(2):
            ref = unpadded_logprobs(model, teacher_prompts[bi][k], completions[bi])
            n = len(completions[bi])
            torch.testing.assert_close(out[bi, k, :n].double(), ref, atol=1e-4, rtol=1e-4)
            assert torch.all(out[bi, k, n:] == 0)
    # micro-batching does not change the numbers
    torch.testing.assert_close(TeacherPool(model, tok, micro_batch_size=8).score(teacher_prompts, completions, 5),
                               out, atol=1e-5, rtol=1e-5)


def test_teacher_scores_go_through_the_benchmarked_op(tok, model, monkeypatch):
    """TeacherPool.score is ops.teacher_logprobs fed a generator of K [mb, T, H] teacher states per micro-batch."""
    from sgsd_fast.train import teachers as teachers_module

    calls = []
    real = teachers_module.teacher_logprobs

    def spy(hidden, weight, targets, **kw):
        assert not isinstance(hidden, torch.Tensor)  # lazily produced, one teacher alive at a time
        out = real(hidden, weight, targets, **kw)
        calls.append(tuple(out.shape))
        return out

    monkeypatch.setattr(teachers_module, "teacher_logprobs", spy)
    completions = [ids(tok, "12"), ids(tok, "7"), ids(tok, "345")]
    prompts = [[ids(tok, "A: 1+1="), ids(tok, "B: 1+1=")] for _ in completions]
    out = TeacherPool(model, tok, micro_batch_size=2).score(prompts, completions, length=3)
    assert calls == [(2, 2, 3), (1, 2, 3)] and out.shape == (3, 2, 3)


def test_token_mask_rules(tok):
    tok = tiny_tokenizer()
    tok.add_tokens(["<think>", "</think>", "\n\n", "<|tool|>", "ab"])
    masker = TokenMasker(tok)
    idx = tok.convert_tokens_to_ids
    completion = [idx("x"), idx("<think>"), idx("\n"), idx("\n\n"), idx("ab"), idx("</think>"), idx("<|tool|>"),
                  idx("7"), tok.eos_token_id]
    mask = masker.mask([completion, completion[:2]], length=10)
    assert mask[0].tolist() == [True, False, False, False, True, False, False, True, False, False]
    assert mask[1].tolist() == [True, False] + [False] * 8  # padding never counts
    # OPSD keeps the EOS token
    assert TokenMasker(tok, keep_eos=True).mask([completion], 9)[0, -1]
    with pytest.raises(ValueError, match="more than length"):
        masker.mask([completion], 3)


def test_retrieve_contexts_pads_with_zero_weight():
    ctx = lambda w: SimpleNamespace(weight=w)  # noqa: E731
    retriever = SimpleNamespace(retrieve=lambda q, pid: {"a": [ctx(0.7), ctx(0.3)], "b": [ctx(1.0)]}[pid])
    problems = [SimpleNamespace(question="qa", id="a"), SimpleNamespace(question="qb", id="b")]
    contexts, weights = retrieve_contexts(retriever, problems, 3)
    # K=3 asked, at most 2 available: 2 teachers (a third would be a wasted pass with weight 0)
    assert [len(c) for c in contexts] == [2, 2]
    torch.testing.assert_close(weights, torch.tensor([[0.7, 0.3], [1.0, 0.0]]))
    empty = SimpleNamespace(retrieve=lambda q, pid: [])
    with pytest.raises(ValueError, match="no teacher context"):
        retrieve_contexts(empty, problems[:1], 2)


def test_frozen_and_ema_full_weights(model):
    frozen = TeacherParams(model, "frozen")
    ema = TeacherParams(model, "ema", ema_decay=0.5)
    p0 = next(model.parameters()).detach().clone()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    ema.update()
    with frozen.scoring_model() as m:
        torch.testing.assert_close(next(m.parameters()), p0)
    with ema.scoring_model() as m:
        torch.testing.assert_close(next(m.parameters()), p0 + 0.5)
    with TeacherParams(model, "live").scoring_model() as m:
        assert m is model


def test_lora_frozen_and_ema_teachers(tok, model):
    from peft import get_peft_model

    from sgsd_fast.models import LoraSettings

    base_logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    peft_model = get_peft_model(model, LoraSettings(r=4, alpha=8).to_peft())
    adapters = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for p in adapters:
            p.add_(0.05)  # a non-trivial adapter (lora_B starts at 0)
    frozen = TeacherParams(peft_model, "frozen")
    with frozen.scoring_model() as m:
        torch.testing.assert_close(m(input_ids=torch.tensor([[5, 6, 7]])).logits, base_logits)
    assert frozen.state_dict() == {}
    ema = TeacherParams(peft_model, "ema", ema_decay=0.9)
    before = [p.detach().clone() for p in adapters]
    with torch.no_grad():
        for p in adapters:
            p.add_(1.0)
    ema.update()
    with ema.scoring_model():
        for p, b in zip(adapters, before):
            torch.testing.assert_close(p, b + 0.1)  # EMA swapped in for the teacher pass
    for p, b in zip(adapters, before):
        torch.testing.assert_close(p, b + 1.0)  # and the student's weights restored after it
    state = ema.state_dict()
    ema2 = TeacherParams(peft_model, "ema")
    ema2.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in ema2.state_dict().items())
