"""Rollout engines behind one protocol: `hf` (transformers generate, tested) and `vllm` (optional, CUDA).

    engine: RolloutEngine = HFRolloutEngine(model, tokenizer, max_new_tokens=96)
    engine.sync_weights(model)                # no-op for HF; pushes the policy into vLLM's copy
    batch = engine.generate(prompts, seed=0)  # RolloutBatch: exact completion ids, texts, truncation
"""
from __future__ import annotations

from sgsd_fast.rollout.base import RolloutBatch, RolloutEngine, generate_groups, group_seed
from sgsd_fast.rollout.hf import HFRolloutEngine
from sgsd_fast.rollout.vllm import VLLMRolloutEngine, VLLMServerEngine

__all__ = ["HFRolloutEngine", "RolloutBatch", "RolloutEngine", "VLLMRolloutEngine", "VLLMServerEngine", "generate_groups", "group_seed"]
