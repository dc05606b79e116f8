"""Greedy base accuracy of a model on the built-in eval problems, per difficulty level.

Used to pick the trainer's default difficulty (base accuracy well away from 0% and 100% gives
the verifier signal something to work with).

    python scripts/base_accuracy.py --model smollm2 --per-level 40 --levels 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import time

from sgsd_fast.data import generate_problems
from sgsd_fast.models import load_model_and_tokenizer
from sgsd_fast.prompts import render_prompt, student_messages
from sgsd_fast.rollout import HFRolloutEngine
from sgsd_fast.verify import Verifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--per-level", type=int, default=40)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--show", type=int, default=1, help="completions to print per level")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device)
    engine = HFRolloutEngine(model, tokenizer, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"model={args.model} device={next(model.parameters()).device} max_new_tokens={args.max_new_tokens}")
    print(f"{'level':>5} {'n':>4} {'accuracy':>9} {'answered':>8} {'truncated':>9} {'tok/s':>7}")
    with Verifier(answer_phrase=True) as verifier:  # SmolLM2 never writes a box
        for level in args.levels:
            problems = generate_problems(args.per_level, seed=args.seed, split="eval", levels=(level,))
            prompts = [render_prompt(tokenizer, student_messages(p.question)) for p in problems]
            start = time.perf_counter()
            batch = engine.generate(prompts, greedy=True)
            result = verifier.score(batch.completion_texts, [p.answer for p in problems])
            answered = sum(e is not None for e in result.extracted) / len(problems)
            truncated = sum(batch.truncated) / len(problems)
            print(
                f"{level:>5} {len(problems):>4} {result.accuracy:>9.1%} {answered:>8.0%} {truncated:>9.0%} "
                f"{batch.tokens_per_second:>7.0f}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            for problem, text in list(zip(problems, batch.completion_texts))[: args.show]:
                print(f"      Q: {problem.question}  gold={problem.answer}\n      A: {text!r}")


if __name__ == "__main__":
    main()
