"""`sgsd-fast compare`: several methods on the same problems, seeds and budget, one table.

    sgsd-fast compare --out runs/compare                         # every arm, embedded default job
    sgsd-fast compare --methods base sgsd grpo --main_seeds 0 1 2 --out runs/c --max_steps 10
    sgsd-fast compare --out runs/compare                         # again: finished runs are skipped

Writes <out>/learning.md (table: accuracy before -> after with paired 95 % CIs, McNemar p,
format and repetition rates, wall time, peak memory), learning.json and learning.png, and one
run directory per (arm, seed). Any TrainConfig field after the options is the shared base config
of every arm (`--config FILE` as in `sgsd-fast train`).
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug
from sgsd_fast.config import ConfigError, add_config_arguments, config_from_args
from sgsd_fast.train.compare import ARMS, comparison_plan, run_comparison, write_report

DEFAULT_ARMS = ("base", "grpo", "opsd", "sampled_rkl", "sgsd", "sgsd_random")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgsd-fast compare", allow_abbrev=False,
                                     description="Train several methods at equal budget and compare held-out "
                                                 "accuracy with paired confidence intervals.",
                                     epilog=DEBUG_HELP)
    parser.add_argument("--out", metavar="DIR", required=True, help="Comparison folder (resumable).")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM",
                        help=f"Arms to run, from {sorted(ARMS)} (default: {' '.join(DEFAULT_ARMS)}).")
    parser.add_argument("--main_arm", default="sgsd", help="The arm run at every --main_seeds seed (default sgsd).")
    parser.add_argument("--main_seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED",
                        help="Seeds of the main arm (default 0 1 2).")
    parser.add_argument("--other_seeds", nargs="+", type=int, default=[0], metavar="SEED",
                        help="Seeds of every other arm (default 0).")
    parser.add_argument("--machine", default=f"{platform.machine()} CPU", help="Machine name for the table.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of shared config fields.")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, debug = split_debug(argv)
    ns = build_parser().parse_args(args)
    return run_command("sgsd-fast compare", lambda: _compare(ns), debug=debug)


def _compare(ns: argparse.Namespace) -> int:
    names = {"out", "methods", "main_arm", "main_seeds", "other_seeds", "machine", "config"}
    overrides = {k: v for k, v in vars(ns).items() if k not in names}
    cfg = config_from_args(ns)  # validates the shared config before any run starts
    if ns.main_arm not in ns.methods:
        raise ConfigError(f"--main_arm {ns.main_arm!r} is not among --methods {ns.methods}")
    runs = comparison_plan(ns.methods, main_arm=ns.main_arm, main_seeds=ns.main_seeds,
                           other_seeds=ns.other_seeds, base=cfg.to_dict())
    out = Path(ns.out)
    results = run_comparison(runs, out, config=ns.config, overrides=overrides)
    paths = write_report(results, out, machine=ns.machine)
    print(paths["markdown"].read_text())
    print(f"table: {paths['markdown']}  json: {paths['json']}  plot: {paths['plot']}")
    return 0
