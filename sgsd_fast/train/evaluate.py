"""Held-out evaluation: greedy accuracy, avg@k with sampling, format and repetition rates.

* accuracy: one greedy completion per problem, verified (the number to compare before/after);
* avg@k: mean correctness over k sampled completions per problem (the paper's avg@12 metric);
* format_rate: fraction of greedy completions with a parsable final answer -- separates "cannot
  solve" from "does not follow the format";
* repetition_rate: fraction of greedy completions that loop (`sgsd_fast.verify.repetition`);
  with ``reject_repetition`` a looping completion counts as wrong even when its last number is
  right, so a gain made of loops is not reported as a gain.

Besides the metrics, `evaluate` returns one record per problem (id, computation key, correct,
looping, completion), which is what a paired before/after comparison needs
(`sgsd_fast.train.stats.paired_comparison`).
"""
from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sgsd_fast.prompts import AnswerFormat, student_prompts
from sgsd_fast.rollout import HFRolloutEngine
from sgsd_fast.verify.repetition import gate_repetitive


EVAL_DIR = "eval"  # a run directory's per-problem records: eval/step-<step>.jsonl


def eval_records_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"step-{step}.jsonl"


def write_records(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """One JSON line per problem, written atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(dict(r)) + "\n" for r in records))
    tmp.replace(path)
    return path


def read_records(path: str | Path) -> list[dict[str, Any]] | None:
    """The records of `write_records`, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_clusters(records: Sequence[Mapping[str, Any]]) -> list[Hashable] | None:
    """The records' computation keys as bootstrap clusters, or None (one cluster per problem) unless
    every record has one (the built-in task has them; file datasets do not)."""
    keys = [r.get("key") for r in records]
    return keys if all(k is not None for k in keys) else None


@dataclass
class EvalResult:
    """Flat ``eval/...`` metrics and one record per problem (greedy completions), in problem order."""

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)


def evaluate(model: nn.Module, tokenizer: Any, problems: Sequence[Any], verifier: Any, *, max_new_tokens: int,
             samples: int = 0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, batch_size: int = 16,
             seed: int = 0, chat_template: bool = True, thinking: bool | None = None,
             fmt: str | AnswerFormat = "boxed", reject_repetition: bool = False,
             share_prefix: bool = True) -> EvalResult:
    """Evaluate `model` on `problems` (greedy, plus avg@k when `samples` > 0); `share_prefix` as in
    `HFRolloutEngine`."""
    if not problems:
        raise ValueError("evaluation needs at least one problem")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    prompts = student_prompts(tokenizer, [p.question for p in problems], chat_template=chat_template,
                              thinking=thinking, fmt=fmt)
    answers = [p.answer for p in problems]
    was_training = model.training
    model.eval()
    try:
        engine = HFRolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, batch_size=batch_size, share_prefix=share_prefix)
        greedy = engine.generate(prompts, greedy=True)
        result = verifier.score(greedy.completion_texts, answers)
        gated, loops = gate_repetitive(greedy.completion_texts, result.rewards)
        rewards = gated if reject_repetition else [float(r) for r in result.rewards]
        n = len(problems)
        metrics = {
            "eval/accuracy": sum(rewards) / n,
            "eval/format_rate": sum(x is not None for x in result.extracted) / n,
            "eval/repetition_rate": sum(loops) / n,
            "eval/completion_length": sum(len(c) for c in greedy.completion_ids) / n,
            "eval/truncation_rate": sum(greedy.truncated) / n,
            "eval/verifier_timeouts": float(result.timeouts),
            "eval/num_problems": float(n),
        }
        records = [{"id": p.id, "key": getattr(p, "key", None), "correct": r, "looping": loop,
                    "extracted": x, "answer": p.answer, "completion": text}
                   for p, r, loop, x, text in zip(problems, rewards, loops, result.extracted,
                                                  greedy.completion_texts)]
        if samples:
            sampled = engine.generate(prompts * samples, seed=seed)
            scored = verifier.score(sampled.completion_texts, answers * samples)
            sampled_rewards = (gate_repetitive(sampled.completion_texts, scored.rewards)[0] if reject_repetition
                               else scored.rewards)
            metrics["eval/avg_at_k"] = sum(sampled_rewards) / len(sampled_rewards)
            metrics["eval/k"] = float(samples)
            metrics["eval/verifier_timeouts"] += scored.timeouts
            for i, record in enumerate(records):
                record["avg_at_k"] = sum(sampled_rewards[i::n]) / samples
    finally:
        model.train(was_training)
    return EvalResult(metrics, records)
