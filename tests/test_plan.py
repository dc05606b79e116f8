"""`sgsd-fast plan`: the memory model's pieces against real objects, its monotonicity, the rollout search,
bad inputs and the command line.

The activation count is checked against autograd itself: the tensors a real (tiny) transformers
model saves for backward, found by walking its graph, must add up to `saved_bytes_per_token` exactly.
Nothing here downloads anything or needs a GPU.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sgsd_fast.commands import main
from sgsd_fast.config import ConfigError
from sgsd_fast.models import LoraSettings, apply_lora, decoder, tiny_random_model
from sgsd_fast.train.plan import (
    GiB,
    estimate,
    largest_rollout,
    lora_targets,
    lora_tensors,
    model_tensors,
    optimizer_state_bytes,
    outside_saved_bytes_per_token,
    plan_settings,
    saved_bytes_per_token,
    weight_bytes,
)
from sgsd_fast.train.shapes import BUILTIN_SHAPES, resolve_model_shape, shape_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN3_1P7B = BUILTIN_SHAPES["Qwen/Qwen3-1.7B"]


def _tiny(model_type: str, layers: int = 2, tied: bool = True):
    """A tiny random model of `model_type` (GQA: 4 query heads, 2 kv heads) in fp32, train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, intermediate_size=176,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, max_position_embeddings=512, tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def _unique_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_param_count_and_bytes_match_the_real_model(model_type, tied):
    model = _tiny(model_type, tied=tied)
    shape = shape_from_config(model.config, model_type)
    params = list(model.parameters())  # tied weights appear once
    assert shape.param_count() == sum(p.numel() for p in params)
    assert weight_bytes(shape, 4, None) == _unique_bytes(params)
    assert sorted(model_tensors(shape)) == sorted(p.numel() for p in params)


def test_builtin_table_param_counts():
    """The published totals (exact for these checkpoints)."""
    expected = {"meta-llama/Llama-3.1-8B": 8_030_261_248, "Qwen/Qwen2.5-7B": 7_615_616_512,
                "HuggingFaceTB/SmolLM2-135M": 134_515_008, "HuggingFaceTB/SmolLM2-360M": 361_821_120,
                "Qwen/Qwen3-8B": 8_190_735_360}
    assert {name: BUILTIN_SHAPES[name].param_count() for name in expected} == expected
    assert resolve_model_shape("smollm2") is BUILTIN_SHAPES["HuggingFaceTB/SmolLM2-135M"]
    assert resolve_model_shape("qwen3-1.7b-instruct") is QWEN3_1P7B  # case, owner and suffix optional


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,down_proj"])
def test_lora_tensors_match_peft(targets):
    model = tiny_random_model(hidden_size=64, layers=2)
    settings = plan_settings({"lora_r": 4, "lora_target_modules": targets})
    names = lora_targets(settings.cfg)
    lora = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=targets if targets == "all-linear"
                                          else tuple(names)))
    trainable = sorted(p.numel() for p in lora.parameters() if p.requires_grad)
    assert sorted(lora_tensors(shape_from_config(model.config), 4, names)) == trainable


def _saved_bytes(model, batch: int, length: int) -> int:
    """Bytes autograd keeps for the backward of one decoder forward (padded batch), parameters and scalars
    excluded."""
    ids = torch.randint(0, 300, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding: transformers passes SDPA a mask, as in training
    out = decoder(model)(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False).last_hidden_state
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, seen, stack = {}, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                values = getattr(node, attr)
                for t in values if isinstance(values, (tuple, list)) else [values]:
                    # 0-dim tensors are saved Python scalars (peft's LoRA scaling), not activations
                    if isinstance(t, torch.Tensor) and t.dim() and t.untyped_storage().data_ptr() not in params:
                        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(saved.values())


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
def test_saved_activations_match_autograd(model_type, dtype, lora):
    batch, length, r = 2, 24, 4
    totals = []
    for layers in (1, 2):
        model = _tiny(model_type, layers).to(dtype)
        if lora:
            model = apply_lora(model, LoraSettings(r=r, alpha=8))
        totals.append(_saved_bytes(model, batch, length))
    shape = shape_from_config(_tiny(model_type).config)
    a = torch.finfo(dtype).bits // 8
    per_token = saved_bytes_per_token(shape, a, trains_weights=not lora, lora=lora_targets(plan_settings({}).cfg)
                                      if lora else (), lora_r=r)
    mask = batch * length * length * a  # SDPA's float mask, saved by every layer
    assert totals[1] - totals[0] == per_token * batch * length + mask
    outside = outside_saved_bytes_per_token(shape, a, trains_weights=not lora) * batch * length
    if lora:  # frozen embeddings: the first block's input norm has no input needing a gradient, so saves nothing
        outside -= (4 * shape.hidden_size + 4) * batch * length
    assert totals[0] - (per_token * batch * length + mask) == outside


def test_qlora_weights_and_activations_match_a_4bit_model(tmp_path):
    """NF4 base (bitsandbytes, on CPU, bf16 compute as on a GPU): the packed weights + absmax bytes, and
    the saved activations of LoRA on its residual stream, which is fp32 whatever the compute dtype:
    prepare_model_for_kbit_training upcasts the embeddings (and norms, lm_head), so are the KV cache."""
    pytest.importorskip("bitsandbytes")
    from sgsd_fast.models import load_model_and_tokenizer, tiny_tokenizer

    totals, r = [], 4
    for layers in (1, 2):
        _tiny("llama", layers).save_pretrained(tmp_path / str(layers))
        tiny_tokenizer().save_pretrained(tmp_path / str(layers))
        model, _ = load_model_and_tokenizer(str(tmp_path / str(layers)), dtype="bfloat16", device="cpu",
                                            load_in_4bit=True, lora=LoraSettings(r=r, alpha=8), local_files_only=True)
        totals.append(_saved_bytes(model.train(), 2, 24))
    cache = decoder(model)(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=True).past_key_values
    assert cache.layers[0].keys.dtype == torch.float32  # 4 bytes per KV element, as the plan counts
    frozen = [p for p in model.parameters() if not p.requires_grad]
    states = [t for p in frozen if getattr(p, "quant_state", None) is not None
              for t in (p.quant_state.absmax, p.quant_state.state2.absmax)]
    shape = shape_from_config(model.config)
    assert weight_bytes(shape, 4, "4bit") == _unique_bytes(frozen + states)
    per_token = saved_bytes_per_token(shape, 4, trains_weights=False, lora=lora_targets(plan_settings({}).cfg),
                                      lora_r=r, quant="4bit")
    assert totals[1] - totals[0] == per_token * 2 * 24 + 2 * 24 * 24 * 4


def test_optimizer_state_bytes():
    assert optimizer_state_bytes([10, 5000], 4, "adamw_torch") == 8 * 5010
    # bitsandbytes: fp32 states below 4096 elements; uint8 states + fp32 absmax per 256 + maps above
    assert optimizer_state_bytes([10], 4, "adamw_8bit") == 80
    assert optimizer_state_bytes([5000], 4, "adamw_8bit") == 2 * (5000 + 4 * 20 + 1024)


def test_memory_grows_with_the_rollout_and_quantization_saves_it():
    settings = plan_settings({"model": "Qwen/Qwen3-8B"})
    plans = [estimate(BUILTIN_SHAPES["Qwen/Qwen3-8B"], settings, max_new_tokens=t) for t in (64, 512, 4096)]
    for name in ("generation", "evaluation", "teachers", "update"):
        assert plans[0].phases[name] < plans[1].phases[name] < plans[2].phases[name]
    s = BUILTIN_SHAPES["Qwen/Qwen3-8B"]
    assert weight_bytes(s, 1, "4bit") < weight_bytes(s, 1, "8bit") < weight_bytes(s, 2, None)
    with_ckpt = estimate(QWEN3_1P7B, plan_settings({"gradient_checkpointing": True, "max_new_tokens": 2048}))
    without = estimate(QWEN3_1P7B, plan_settings({"gradient_checkpointing": False, "max_new_tokens": 2048}))
    assert with_ckpt.phases["update"] < without.phases["update"]
    key = "activations_without_checkpointing"
    assert with_ckpt.details[key] == without.details[key]
    full = estimate(QWEN3_1P7B, plan_settings({"use_peft": False, "teacher_params": "frozen"}))
    names = {c.name: c.bytes for c in full.components}
    assert names["teacher copy"] == names["base weights"]  # a frozen teacher without LoRA is a full copy
    assert full.details["head_grad_bytes"] > 0 == estimate(QWEN3_1P7B, plan_settings({})).details["head_grad_bytes"]
    long = estimate(QWEN3_1P7B, plan_settings({"max_new_tokens": 8192}))
    assert long.details["fused_loss_bytes"] < long.details["naive_logits_bytes"] / 20


def test_largest_rollout_is_the_edge_of_the_estimate():
    settings = plan_settings({"model": "Qwen/Qwen3-1.7B", "gradient_checkpointing": True, "micro_batch_size": 4},
                             gpu_memory_gb=24)
    longest, capped = largest_rollout(QWEN3_1P7B, settings)
    assert not capped and longest > 1
    assert estimate(QWEN3_1P7B, settings, max_new_tokens=longest).fits
    assert not estimate(QWEN3_1P7B, settings, max_new_tokens=longest + 1).fits
    big = plan_settings({"model": "Qwen/Qwen3-1.7B"}, gpu_memory_gb=1e6)
    assert largest_rollout(QWEN3_1P7B, big) == (QWEN3_1P7B.max_positions - 3 * 256, True)
    assert largest_rollout(QWEN3_1P7B, plan_settings({}, gpu_memory_gb=1)) == (0, False)


@pytest.mark.parametrize("values,plan,named", [
    ({"lora_r": 0}, {}, "'lora_r'"),
    ({"optim": "sgd"}, {}, "'optim'"),
    ({"max_completion_length": "many"}, {}, "'max_new_tokens'"),
    ({"lora_target_modules": "qproj"}, {}, "'lora_target_modules'"),
    ({"load_in_4bit": True, "use_peft": False}, {}, "'load_in_4bit'"),
    ({"load_in_4bit": True, "load_in_8bit": True}, {}, "'load_in_8bit'"),
    ({"attn_implementation": "eager"}, {}, "'attn_implementation'"),
    ({}, {"gpu_memory_gb": -1}, "--gpu_memory_gb"),
    ({}, {"prompt_length": 0}, "--prompt_length"),
])
def test_bad_settings_name_the_argument(values, plan, named):
    with pytest.raises(ConfigError, match=named):
        plan_settings(values, **plan)


def test_model_resolution_errors_name_model(tmp_path, monkeypatch):
    import transformers

    def offline(*args, **kwargs):  # what an uncached id gives without a network, without trying one
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    for model in ("no-such-owner/no-such-model", str(tmp_path / "missing.json"), str(tmp_path)):
        with pytest.raises(ConfigError, match="--model"):
            resolve_model_shape(model)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ConfigError, match="--model.*model_type 'gpt2'"):
        resolve_model_shape(str(tmp_path))


def test_config_json_and_folder_resolve_like_the_model(tmp_path):
    model = _tiny("qwen3", tied=False)
    model.config.save_pretrained(tmp_path)
    from_folder = resolve_model_shape(str(tmp_path))
    assert from_folder == dataclasses.replace(resolve_model_shape(str(tmp_path / "config.json")), name=str(tmp_path))
    assert from_folder.param_count() == sum(p.numel() for p in model.parameters())


def test_cli_plans_qwen3_1p7b(capsys):
    assert main(["plan", "--model", "Qwen/Qwen3-1.7B", "--gpu_memory_gb", "24", "--max_new_tokens", "1024",
                 "--load_in_4bit", "--gradient_checkpointing", "true", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["hidden_size"] == 2048 and out["details"]["quant"] == "4bit"
    assert out["fits"] is (out["total_bytes"] <= 24 * GiB)
    assert out["largest_max_new_tokens"] > 1024
    assert main(["plan", "--model", "Qwen/Qwen3-1.7B", "--max_completion_length", "512"]) == 0
    text = capsys.readouterr().out
    assert "KV cache" in text and "largest rollout that fits: max_new_tokens =" in text


def test_cli_reads_a_training_yaml_and_reports_one_line_errors(tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: Qwen/Qwen3-1.7B\ndataset: not-here.parquet\nmax_new_tokens: 256\n")
    assert main(["plan", "--config", str(yaml_file), "--json"]) == 0  # dataset does not matter to memory
    assert json.loads(capsys.readouterr().out)["details"]["max_new_tokens"] == 256
    assert main(["plan", "--model", "./missing-folder"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'model'" in err  # TrainConfig's own check of the field


def test_cli_refuses_a_misspelt_yaml_field(tmp_path, capsys):
    # plan keeps only memory fields; a misspelt one must be an error, as in `sgsd-fast train`
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: Qwen/Qwen3-1.7B\nmax_new_token: 256\n")
    assert main(["plan", "--config", str(yaml_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown config field 'max_new_token' (did you mean 'max_new_tokens'?)" in err and str(yaml_file) in err
