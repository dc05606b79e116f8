"""Held-out evaluation: greedy accuracy, avg@k with sampling, and the format rate.

* accuracy: one greedy completion per problem, verified (the number to compare before/after);
* avg@k: mean correctness over k sampled completions per problem (the paper's avg@12 metric);
* format_rate: fraction of greedy completions with a parsable final answer (``\\boxed{}`` or an
  ``Answer:`` line) -- separates "cannot solve" from "does not follow the format".
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from sgsd_fast.prompts import student_prompts
from sgsd_fast.rollout import HFRolloutEngine


def evaluate(model: nn.Module, tokenizer: Any, problems: Sequence[Any], verifier: Any, *, max_new_tokens: int,
             samples: int = 0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 16,
             seed: int = 0, chat_template: bool = True, thinking: bool | None = None) -> dict[str, float]:
    """Evaluate `model` on `problems`; returns flat ``eval/...`` metrics."""
    if not problems:
        raise ValueError("evaluation needs at least one problem")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    prompts = student_prompts(tokenizer, [p.question for p in problems], chat_template=chat_template,
                              thinking=thinking)
    answers = [p.answer for p in problems]
    was_training = model.training
    model.eval()
    try:
        engine = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, batch_size=batch_size)
        greedy = engine.generate(prompts, greedy=True)
        result = verifier.score(greedy.completion_texts, answers)
        metrics = {
            "eval/accuracy": sum(result.rewards) / len(problems),
            "eval/format_rate": sum(x is not None for x in result.extracted) / len(problems),
            "eval/completion_length": sum(len(c) for c in greedy.completion_ids) / len(problems),
            "eval/truncation_rate": sum(greedy.truncated) / len(problems),
            "eval/verifier_timeouts": float(result.timeouts),
            "eval/num_problems": float(len(problems)),
        }
        if samples:
            sampled = engine.generate(prompts * samples, seed=seed)
            scored = verifier.score(sampled.completion_texts, answers * samples)
            metrics["eval/avg_at_k"] = sum(scored.rewards) / len(scored.rewards)
            metrics["eval/k"] = float(samples)
            metrics["eval/verifier_timeouts"] += scored.timeouts
    finally:
        model.train(was_training)
    return metrics
