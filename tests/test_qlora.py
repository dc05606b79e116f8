"""QLoRA: a 4-bit (or 8-bit) bitsandbytes base under a LoRA adapter, on CPU.

One real training step through the `Trainer` on a tiny random model saved as a plain folder (the
path a Hugging Face checkpoint takes): the loss is finite, only the adapter moves, the quantized
base and the unquantized lm_head stay bit-identical, and the frozen teacher is that base with the
adapter disabled (no second copy). The real SmolLM2 GGUF goes through the same code after one
dequantizing detour (`slow`).
"""
from __future__ import annotations

import json

import pytest
import torch

from sgsd_fast.config import ConfigError, TrainConfig
from sgsd_fast.models import LoraSettings, lm_head_weight, load_model_and_tokenizer, tiny_random_model, tiny_tokenizer
from sgsd_fast.train.trainer import Trainer

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("tiny")
    tiny_random_model(tok, hidden_size=64, layers=2, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "bank.json"
    path.write_text(json.dumps({"skills": [{"title": "Add", "principle": "Line up digits.", "when_to_apply": "Sums."}],
                                "mistakes": [{"description": "Carry", "why_it_happens": "Rush.",
                                              "how_to_avoid": "Check."}]}))
    return path


def _quantized_layers(model, cls_name: str) -> int:
    """bitsandbytes layers of that class (peft's LoRA wrappers around them share the class name)."""
    return sum(type(m).__name__ == cls_name and type(m).__module__.startswith("bitsandbytes")
               for m in model.modules())


@pytest.mark.parametrize("bits", [4, 8])
def test_one_qlora_step_moves_only_the_adapter(tiny_dir, bank_file, tmp_path, bits):
    cfg = TrainConfig(model=str(tiny_dir), **{f"load_in_{bits}bit": True}, use_peft=True, lora_r=4, lora_alpha=8,
                      max_steps=1, prompts_per_step=2, max_new_tokens=6, num_teachers=1, micro_batch_size=2,
                      num_train_problems=4, num_eval_problems=2, output_dir=str(tmp_path / "run"),
                      skill_bank=str(bank_file), eval_at_start=False, progress=False, report_to="none",
                      learning_rate=1e-2, warmup_steps=0, deadzone=0.0, sgsd_outcome="sign", verifier_workers=1,
                      teacher_params="frozen", optim="adamw_torch")
    with Trainer(cfg) as trainer:
        model = trainer.model
        assert _quantized_layers(model, "Linear4bit" if bits == 4 else "Linear8bitLt") > 0
        head = lm_head_weight(model)
        assert type(head) is torch.nn.Parameter and head.dtype == torch.float32  # plain weight for the fused ops
        assert trainer.teachers.params._copy is None  # frozen teacher = adapter disabled, not a copy
        before = {n: t.detach().clone() for n, t in model.state_dict().items()}
        row = trainer.train_step(0)
    assert row["loss"] == row["loss"] and abs(row["loss"]) < float("inf")
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]


def test_4bit_layers_keep_one_kernel(tiny_dir):
    """A training pass, then a no-grad eval pass (teachers, generation), then training again all
    compute the same function: on an AVX512-BF16 CPU bitsandbytes would otherwise repack the
    layers into its bf16 CPU kernel at the first eval pass (measured 0.5 % apart per layer)."""
    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="float32", device="cpu", load_in_4bit=True,
                                        lora=LoraSettings(r=4, alpha=8))
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    model.train()
    student = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        teacher = model(input_ids=ids).logits
    model.train()
    again = model(input_ids=ids).logits.detach()
    scale = float(student.abs().max())
    torch.testing.assert_close(teacher, student, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(again, student, rtol=1e-5, atol=1e-5 * scale)


def test_quantization_needs_peft_and_one_width():
    with pytest.raises(ConfigError, match="'load_in_4bit'.*use_peft"):
        TrainConfig(load_in_4bit=True, use_peft=False)
    with pytest.raises(ConfigError, match="'load_in_8bit'.*load_in_4bit"):
        TrainConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="need a LoRA adapter"):
        load_model_and_tokenizer("smollm2", device="cpu", load_in_4bit=True)


@pytest.mark.slow
def test_smollm2_gguf_loads_in_4bit():
    model, tok = load_model_and_tokenizer("smollm2", dtype="float32", device="cpu", load_in_4bit=True,
                                          lora=LoraSettings(r=4, alpha=8))
    assert _quantized_layers(model, "Linear4bit") == 30 * 7  # every projection of the 30 blocks
    assert lm_head_weight(model).shape == (len(tok), 576)
    ids = tok("2 + 3 =", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids).logits).all()
