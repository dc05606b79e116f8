"""`sgsd-fast eval`: held-out accuracy (greedy), avg@k (sampling) and format rate of a model or checkpoint.

    sgsd-fast eval                                        # the base SmolLM2 on the built-in eval split
    sgsd-fast eval --checkpoint runs/x/checkpoint-30      # a trained checkpoint (full or LoRA)
    sgsd-fast eval --model Qwen/Qwen3-1.7B --eval_dataset aime24.jsonl --eval_samples 12 --output r.json

Settings are TrainConfig fields (model, eval_dataset, num_eval_problems, eval_samples, ...); with
--checkpoint the checkpoint's own config is the base, so the model is rebuilt exactly as trained.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug
from sgsd_fast.config import add_config_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgsd-fast eval", allow_abbrev=False,
                                     description="Evaluate a model or a training checkpoint on held-out problems.",
                                     epilog=DEBUG_HELP)
    parser.add_argument("--checkpoint", metavar="DIR", help="A checkpoint-<step> folder written by `sgsd-fast train`.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of config fields.")
    parser.add_argument("--output", metavar="FILE", help="Also write the metrics as JSON to FILE.")
    parser.add_argument("--records", metavar="FILE", help="Also write one JSON line per problem (id, computation "
                        "key, correct, looping, completion) to FILE: the input of a paired comparison.")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, debug = split_debug(argv)
    ns = build_parser().parse_args(args)
    return run_command("sgsd-fast eval", lambda: _evaluate(ns), debug=debug)


def _evaluate(ns: argparse.Namespace) -> int:
    from sgsd_fast.train.checkpoint import load_model_weights, read_weights_checkpoint
    from sgsd_fast.train.evaluate import evaluate, write_records
    from sgsd_fast.train.setup import build_model, build_verifier, load_eval_problems

    base = read_weights_checkpoint(ns.checkpoint) if ns.checkpoint else None
    if hasattr(ns, "max_new_tokens") and not hasattr(ns, "eval_max_new_tokens"):
        ns.eval_max_new_tokens = None  # here --max_new_tokens means the evaluation length
    cfg = config_from_args(ns, base)
    problems = load_eval_problems(cfg)  # before the model: a bad or empty dataset fails in a second
    if not problems:
        raise ValueError(f"config field 'eval_dataset': {cfg.eval_dataset!r} gave no evaluation problems")
    model, tokenizer = build_model(cfg)
    if ns.checkpoint:
        load_model_weights(model, Path(ns.checkpoint) / "model")
    with build_verifier(cfg) as verifier:
        result = evaluate(model, tokenizer, problems, verifier,
                          max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, samples=cfg.eval_samples,
                          temperature=cfg.eval_temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                          batch_size=cfg.generation_batch_size, seed=cfg.seed,
                          chat_template=cfg.student_chat_template, thinking=cfg.student_thinking,
                          fmt=cfg.answer_format, reject_repetition=cfg.reject_repetition,
                          share_prefix=cfg.prefix_sharing())
    metrics = result.metrics
    source = ns.checkpoint or cfg.model
    print(f"model: {source}  ({len(problems)} problems from {cfg.eval_dataset!r})")
    for key, value in metrics.items():
        print(f"  {key:<24} {value:.4f}")
    if ns.records:
        write_records(ns.records, result.records)
    if ns.output:
        Path(ns.output).write_text(json.dumps({"model": source, **metrics}, indent=1))
    return 0
