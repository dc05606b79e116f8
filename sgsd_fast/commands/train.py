"""`sgsd-fast train`: train with SGSD / OPSD / sampled-token RKL / GRPO.

    sgsd-fast train                                   # the embedded CPU job (SmolLM2-135M, built-in task)
    sgsd-fast train --config configs/paper_qwen3_1p7b.yaml --dataset dapo.parquet
    sgsd-fast train --max_steps 10 --use_peft true    # any config field as --field value
    sgsd-fast train --resume auto --output_dir runs/x # continue the latest checkpoint of a run
    torchrun --nproc_per_node 4 -m sgsd_fast.commands train --config c.yaml   # data parallel, 4 processes

Precedence: field defaults < the resumed checkpoint's config < --config YAML < command line.
A bad value, file, bank or checkpoint ends the command with one line naming it (status 2);
--debug shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug
from sgsd_fast.config import add_config_arguments, config_from_args, read_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgsd-fast train", allow_abbrev=False,
        description="Train a policy with skill-conditioned gated self-distillation (SGSD) or a baseline. "
                    "With no arguments: SmolLM2-135M-Instruct on the built-in arithmetic task, on CPU.",
        epilog=DEBUG_HELP)
    parser.add_argument("--config", metavar="FILE", help="YAML file of config fields.")
    parser.add_argument("--resume", "--resume_from_checkpoint", metavar="PATH|auto",
                        help="Continue from a checkpoint folder, a run folder (its latest checkpoint), or 'auto' "
                             "(latest checkpoint of --output_dir, else of the newest run under runs/).")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, debug = split_debug(argv)
    ns = build_parser().parse_args(args)
    return run_command("sgsd-fast train", lambda: _train(ns), debug=debug)


def _train(ns: argparse.Namespace) -> int:
    from sgsd_fast.train.checkpoint import read_checkpoint_config, resolve_resume
    from sgsd_fast.train.trainer import Trainer

    checkpoint = base = None
    if ns.resume:
        output_dir = getattr(ns, "output_dir", None) or (read_yaml(ns.config).get("output_dir")
                                                         if ns.config else None)
        checkpoint = resolve_resume(ns.resume, output_dir, log=lambda line: print(line, file=sys.stderr))
        base = read_checkpoint_config(checkpoint)
        base["output_dir"] = output_dir or str(checkpoint.parent)
        if (checkpoint / "skill_bank.db").is_file():  # the bank as it was at that step, not the source
            base["skill_bank"] = str(checkpoint / "skill_bank.db")
    cfg = config_from_args(ns, base)
    with Trainer(cfg, resume=checkpoint) as trainer:  # under torchrun: one process per rank, rank 0 reports
        if checkpoint is not None:
            trainer.log(f"resuming from {checkpoint} (step {trainer.state.get('step', 0)})")
        trainer.log(f"run directory: {Path(trainer.run_dir)}")
        summary = trainer.train()
    return 130 if summary["interrupted"] else 0
