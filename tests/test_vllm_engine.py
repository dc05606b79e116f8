"""The vLLM engines against fake vLLM / TRL objects: constructor arguments, sampling parameters, the
sleep / wake order and the weight-sync calls (full fine-tuning and merged LoRA). No real vLLM runs
here (CUDA only); what this pins is our side of the interface."""
from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from sgsd_fast.models import LoraSettings, apply_lora, tiny_random_model, tiny_tokenizer
from sgsd_fast.rollout import VLLMRolloutEngine, VLLMServerEngine, generate_groups
from sgsd_fast.rollout import vllm as vllm_module

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeModel:
    """vLLM's model as `apply_model` hands it over: records what `load_weights` received."""

    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, weights):
        self.loaded.update({name: t.clone() for name, t in weights})


class FakeLLM:
    instances: list = []

    def __init__(self, **kw):
        self.kw, self.calls, self.model = kw, [], FakeModel()
        FakeLLM.instances.append(self)

    def apply_model(self, fn):
        self.calls.append("apply_model")
        return [fn(self.model)]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def sleep(self, level):
        self.calls.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({','.join(tags)})")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append("generate")
        self.params = params
        return [SimpleNamespace(prompt_token_ids=[1, 2], outputs=[SimpleNamespace(
            token_ids=[5, 6, 7], text=f"out {i}", finish_reason="length" if i == 0 else "stop")])
            for i in range(len(prompts))]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vllm_module, "_check_cuda", lambda: None)  # not torch.cuda itself: peft/bnb read it
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    FakeLLM.instances.clear()
    return module


def test_colocated_engine_arguments_and_sampling(fake_vllm):
    engine = VLLMRolloutEngine("org/model", tiny_tokenizer(), max_new_tokens=8, temperature=0.7, top_k=0,
                               max_model_len=1024, seed=3)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process engine core: weights reachable
    kw = FakeLLM.instances[0].kw
    assert kw["max_model_len"] == 1024 and kw["model"] == "org/model" and kw["seed"] == 3
    assert "distributed_executor_backend" not in kw
    batch = engine.generate(["a", "b"], seed=10)
    assert [p["seed"] for p in engine.llm.params] == [10, 11]  # each request its own seed
    assert engine.llm.params[0]["top_k"] == -1 and engine.llm.params[0]["temperature"] == 0.7
    assert batch.completion_ids == [[5, 6, 7]] * 2 and batch.truncated == [True, False]
    greedy = engine.generate(["a"], greedy=True)
    assert greedy.completion_texts == ["out 0"] and engine.llm.params[0]["temperature"] == 0.0


def test_colocated_engine_under_torchrun_uses_the_external_launcher(fake_vllm):
    VLLMRolloutEngine("org/model", tiny_tokenizer(), max_new_tokens=8, distributed=True)
    assert FakeLLM.instances[0].kw["distributed_executor_backend"] == "external_launcher"


def test_groups_are_one_batched_call_with_a_seed_per_prompt(fake_vllm):
    engine = VLLMRolloutEngine("org/model", tiny_tokenizer(), max_new_tokens=8)
    batch = generate_groups(engine, ["p", "p", "q", "q"], group_size=2, seeds=[100, 200])
    assert engine.llm.calls == ["generate"] and len(batch) == 4
    assert [p["seed"] for p in engine.llm.params] == [100, 101, 200, 201]


def test_full_weight_sync_sends_every_tensor_by_its_hf_name(fake_vllm):
    model = tiny_random_model(hidden_size=32, layers=1, seed=1)
    engine = VLLMRolloutEngine("org/model", tiny_tokenizer(), max_new_tokens=8)
    engine.sync_weights(model)
    loaded = engine.llm.model.loaded
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert engine.llm.calls == ["apply_model", "reset_prefix_cache"]  # stale prefixes dropped


def test_lora_weight_sync_sends_merged_weights_and_keeps_the_adapter(fake_vllm):
    model = apply_lora(tiny_random_model(hidden_size=32, layers=1, seed=1),
                       LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=("q_proj",)))
    with torch.no_grad():  # a non-zero adapter, so merging changes q_proj
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    unmerged = {k: v.clone() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    expected_q = q.base_layer.weight + q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"]
    engine = VLLMRolloutEngine("org/model", tiny_tokenizer(), max_new_tokens=8)
    engine.sync_weights(model)
    loaded = engine.llm.model.loaded
    assert not any("lora_" in k or "base_layer" in k for k in loaded)
    torch.testing.assert_close(loaded["model.layers.0.self_attn.q_proj.weight"], expected_q.detach())
    # training continues on the unmerged adapter
    assert all(torch.equal(unmerged[k], v) for k, v in model.state_dict().items())


def test_sleep_mode_frees_the_gpu_for_the_update_and_wakes_weights_before_kv_cache(fake_vllm):
    model = tiny_random_model(hidden_size=32, layers=1, seed=1)
    engine = VLLMRolloutEngine("org/model", tiny_tokenizer(), max_new_tokens=8, enable_sleep_mode=True)
    assert FakeLLM.instances[0].kw["enable_sleep_mode"] is True
    for _ in range(2):  # what the trainer does every step
        engine.sync_weights(model)
        engine.generate(["a"], seed=0)
    assert engine.llm.calls == ["apply_model", "reset_prefix_cache", "generate", "sleep(2)",
                                "wake_up(weights)", "apply_model", "reset_prefix_cache", "wake_up(kv_cache)",
                                "generate", "sleep(2)"]


class FakeClient:
    def __init__(self, **kw):
        self.kw, self.params, self.calls = kw, {}, []

    def init_communicator(self):
        self.calls.append("init_communicator")

    def update_named_param(self, name, tensor):
        self.params[name] = tensor.clone()

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, **kw):
        self.calls.append(("generate", kw))
        return {"completion_ids": [[5, 6, tiny_tokenizer().eos_token_id], [5, 6]]}


def test_server_engine_pushes_weights_from_rank_zero_only(monkeypatch):
    monkeypatch.setattr(vllm_module, "_check_cuda", lambda: None)
    monkeypatch.setattr(vllm_module, "_import_client", lambda: FakeClient)
    tok, model = tiny_tokenizer(), tiny_random_model(hidden_size=32, layers=1, seed=1)
    main = VLLMServerEngine(tok, max_new_tokens=4, host="h", server_port=9, group_port=10)
    other = VLLMServerEngine(tok, max_new_tokens=4, pushes_weights=False)
    assert main.client.kw["host"] == "h" and main.client.calls == ["init_communicator"] and other.client.calls == []
    main.sync_weights(model)
    other.sync_weights(model)
    assert set(main.client.params) == set(model.state_dict()) and other.client.params == {}
    batch = main.generate(["a", "b"], seed=1)
    assert batch.truncated == [False, True] and batch.completion_ids[1] == [5, 6]
    assert main.client.calls[-1][1]["max_tokens"] == 4
