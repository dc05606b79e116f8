"""The `sgsd-fast` command: one entry point, one sub-command per module of this package.

Each sub-command module exposes `main(argv) -> int` and does the wiring only (arguments -> the
library); this file routes, importing the chosen module alone, so `sgsd-fast --help` stays fast.
Every command reports a user error as one line and status 2 (`commands.errors`); ``--debug``,
before or after the command name, adds the traceback.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("sgsd_fast.commands.train",
              "Train with SGSD / OPSD / sampled-token RKL / GRPO (default: embedded SmolLM2 job)."),
    "eval": ("sgsd_fast.commands.eval", "Evaluate a model or checkpoint on held-out problems."),
    "export": ("sgsd_fast.commands.export", "Write a checkpoint as an adapter or a merged Hugging Face model."),
    "compare": ("sgsd_fast.commands.compare", "Train several methods at equal budget; paired accuracy table."),
    "skills": ("sgsd_fast.commands.skills", "Build, inspect, import/export and diff skill banks."),
    "bench": ("sgsd_fast.commands.bench", "Run a benchmark preset: fused kernels vs naive vs peers."),
    "plan": ("sgsd_fast.commands.plan", "Expected peak GPU memory by component; the longest rollout that fits."),
}


def _usage() -> str:
    lines = ["usage: sgsd-fast [--debug] <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `sgsd-fast <command> --help` for a command's options.",
              "--debug: print an error's traceback, not only its one-line message."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    if debug:  # the command itself reads it, wherever it stands
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from sgsd_fast import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sgsd-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest + ["--debug"] if debug else rest) or 0)
