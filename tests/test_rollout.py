"""HFRolloutEngine against an independent greedy oracle (tiny model) and on the real SmolLM2."""

import copy

import pytest
import torch

from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.prompts import ANSWER_FORMAT, render_prompt, student_messages
from sgsd_fast.rollout import HFRolloutEngine, RolloutBatch

PROMPTS = [
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    "hi",
    "<|im_start|>user\nhello there<|im_end|>\n",
]
MAX_NEW = 8


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def varied(tokenizer):
    """(model, oracle greedy continuation of each prompt); tests set the EOS id they need."""
    model = _varied_model(tokenizer)
    return model, [_oracle_greedy(model, ids, MAX_NEW) for ids in _prompt_ids(tokenizer)]


def _varied_model(tokenizer):
    """A tiny model whose greedy continuations vary from token to token.

    With default init the residual stream is dominated by the tied embedding and the model just
    repeats the last token; scaling the block weights makes the blocks dominate. float64 keeps the
    batched (left-padded) and unbatched forwards from ever flipping an argmax.
    """
    model = tiny_random_model(tokenizer, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.mul_(10)
    return model.double()


@torch.no_grad()
def _oracle_greedy(model, ids, steps):
    """Greedy continuation by full recomputation: no cache, no padding, no generate()."""
    ids = torch.tensor([ids])
    out = []
    for _ in range(steps):
        token = int(model(ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def _prompt_ids(tokenizer):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def test_greedy_matches_oracle_with_eos_padding_and_truncation(tokenizer, varied):
    model, refs = varied
    # Declare as EOS a token the first prompt emits mid-way: its rollout must stop there (EOS
    # kept), the batch's other rollouts keep going, so HF pads the finished one (padding dropped).
    eos = refs[0][3]
    model.generation_config.eos_token_id = eos
    expected = [ref[: ref.index(eos) + 1] if eos in ref else ref for ref in refs]
    expected_truncated = [eos not in ref for ref in refs]
    assert any(expected_truncated) and not all(expected_truncated), "test needs both kinds of rollout"

    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=MAX_NEW, batch_size=2)
    batch = engine.generate(PROMPTS, greedy=True)

    assert isinstance(batch, RolloutBatch) and len(batch) == len(PROMPTS)
    assert batch.prompt_ids == _prompt_ids(tokenizer)
    assert batch.completion_ids == expected
    assert batch.truncated == expected_truncated
    for ids, truncated in zip(batch.completion_ids, batch.truncated):
        assert (ids[-1] == eos) != truncated
        assert len(ids) == MAX_NEW or not truncated
    assert batch.completion_texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    assert batch.num_completion_tokens == sum(map(len, expected))
    assert batch.seconds > 0 and batch.tokens_per_second > 0


def test_any_of_several_eos_ids_ends_a_rollout(tokenizer, varied):
    model, refs = varied
    eos_ids = [refs[1][2], refs[2][4]]
    model.generation_config.eos_token_id = eos_ids
    batch = HFRolloutEngine(model, tokenizer, max_new_tokens=MAX_NEW).generate(PROMPTS, greedy=True)
    for ref, ids in zip(refs, batch.completion_ids):
        stop = next((i for i, t in enumerate(ref) if t in eos_ids), None)
        assert ids == (ref if stop is None else ref[: stop + 1])


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(tokenizer, varied):
    model, _ = varied
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=MAX_NEW, temperature=1.5, top_k=20, top_p=0.95)
    state = torch.get_rng_state()
    first = engine.generate(PROMPTS, seed=123)
    assert torch.equal(torch.get_rng_state(), state), "a seeded generate must not move the global RNG"
    assert engine.generate(PROMPTS, seed=123).completion_ids == first.completion_ids
    assert engine.generate(PROMPTS, seed=124).completion_ids != first.completion_ids


def test_training_model_with_checkpointing_generates_with_kv_cache(tokenizer, varied):
    model, refs = varied
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    expected = [ref[: ref.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ref else ref for ref in refs]

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        batch = HFRolloutEngine(model, tokenizer, max_new_tokens=MAX_NEW, batch_size=8).generate(PROMPTS, greedy=True)
    finally:
        hook.remove()
    assert model.training and model.is_activation_checkpointing, "train mode and checkpointing must be restored"
    assert batch.completion_ids == expected
    assert lengths[0] > 1 and set(lengths[1:]) == {1}, "after the prompt, each step must feed one token (KV cache)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_engine_rejects_bad_settings(tokenizer, kwargs, match):
    args = {"max_new_tokens": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        HFRolloutEngine(tiny_random_model(tokenizer), tokenizer, **args)


def test_generate_rejects_bad_prompts(tokenizer):
    engine = HFRolloutEngine(tiny_random_model(tokenizer), tokenizer, max_new_tokens=2)
    with pytest.raises(TypeError, match="single str"):
        engine.generate("hi")
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.generate(["hi", ""])
    with pytest.raises(TypeError, match="seed"):
        engine.generate(["hi"], seed=1.5)
    assert len(engine.generate([], greedy=True)) == 0


# -- prompts -----------------------------------------------------------------------------------------


def test_student_messages_and_chat_rendering(tokenizer):
    messages = student_messages("  What is 2 + 3?  ")
    assert messages == [{"role": "user", "content": f"What is 2 + 3?\n\n{ANSWER_FORMAT}"}]
    assert "\\boxed{}" in ANSWER_FORMAT
    rendered = render_prompt(tokenizer, messages)
    assert rendered == f"<|im_start|>user\nWhat is 2 + 3?\n\n{ANSWER_FORMAT}<|im_end|>\n<|im_start|>assistant\n"
    plain = render_prompt(tokenizer, messages, chat_template=False)
    assert plain == f"User: What is 2 + 3?\n\n{ANSWER_FORMAT}\n\nAssistant:"


def test_render_prompt_thinking_flag_and_missing_template():
    thinking_tokenizer = tiny_tokenizer()
    # A Qwen3-like template that reads enable_thinking.
    thinking_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_prompt(thinking_tokenizer, messages, thinking=False).endswith("<think></think>")
    assert not render_prompt(thinking_tokenizer, messages, thinking=True).endswith("<think></think>")
    assert render_prompt(thinking_tokenizer, messages) == "system: be brief\nuser: hi\n"

    thinking_tokenizer.chat_template = None
    assert render_prompt(thinking_tokenizer, messages) == "System: be brief\n\nUser: hi\n\nAssistant:"


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ([], ValueError, "non-empty list"),
        ([{"role": "user"}], ValueError, r"messages\[0\]"),
        ([{"role": "tool", "content": "x"}], ValueError, "role"),
        ([{"role": "user", "content": 3}], TypeError, "content"),
    ],
)
def test_render_prompt_rejects_bad_messages(tokenizer, messages, error, match):
    with pytest.raises(error, match=match):
        render_prompt(tokenizer, messages)


def test_render_prompt_and_student_messages_reject_bad_values(tokenizer):
    with pytest.raises(TypeError, match="thinking"):
        render_prompt(tokenizer, student_messages("q"), thinking="on")
    with pytest.raises(ValueError, match="question"):
        student_messages("   ")
    with pytest.raises(TypeError, match="question"):
        student_messages(None)


@pytest.mark.slow
def test_smollm2_rollout(smollm2):
    model, tokenizer = smollm2
    max_new = 16
    prompts = [
        render_prompt(tokenizer, student_messages("What is 4 + 5?")),
        render_prompt(tokenizer, [{"role": "user", "content": "Hi!"}]),  # a short greeting reply
    ]
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new, batch_size=2)
    batch = engine.generate(prompts, greedy=True)

    eos = tokenizer.eos_token_id
    assert batch.prompt_ids == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for ids, text, truncated in zip(batch.completion_ids, batch.completion_texts, batch.truncated):
        assert 0 < len(ids) <= max_new
        assert ids.count(eos) == (0 if truncated else 1)
        assert truncated or ids[-1] == eos
        assert text == tokenizer.decode(ids, skip_special_tokens=True) and "<|im_end|>" not in text
    assert not batch.truncated[1], f"the greeting reply must end within the budget: {batch.completion_texts[1]!r}"
    # The shorter prompt was left-padded in the batch; padding must not change what it generates.
    assert len(batch.prompt_ids[1]) < len(batch.prompt_ids[0])
    assert engine.generate(prompts[1:], greedy=True).completion_ids[0] == batch.completion_ids[1]
