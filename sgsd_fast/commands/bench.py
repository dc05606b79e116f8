"""`sgsd-fast bench`: fused kernels and the SGSD step vs naive and peers, side by side.

    sgsd-fast bench --preset cpu-small [--out DIR]

Runs a preset (see `sgsd_fast.bench.presets`), prints the tables and writes `<preset>.json`,
`<preset>.md` and, when a kernel was run at several N, `<preset>.png` (time and memory vs N).
The JSON is rewritten after every case, so an interrupted run keeps what it measured;
`sgsd-fast bench --render DIR/<preset>.json` turns such a file into the tables and plot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sgsd_fast.commands.errors import DEBUG_HELP, run_command, split_debug


def _parser() -> argparse.ArgumentParser:
    from sgsd_fast.bench.presets import PRESETS

    p = argparse.ArgumentParser(prog="sgsd-fast bench", description=__doc__.split("\n\n")[0], epilog=DEBUG_HELP)
    p.add_argument("--preset", default="cpu-small", choices=list(PRESETS),
                   help="what to run (default: cpu-small, under 3 minutes on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory (default: bench-results)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the preset's; the CPU presets use 1, since OpenMP threads "
                        "contending for cores busy with other jobs slowed 2-thread runs by up to 10x)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="do not run anything: print and write the tables/plot of an earlier results file")
    p.add_argument("--only", default=None,
                   help="comma-separated benches to keep: logprobs, teacher_logprobs, sgsd_loss, divergence, e2e")
    return p


def main(argv: list[str] | None = None) -> int:
    argv, debug = split_debug(argv)
    args = _parser().parse_args(argv)
    return run_command("sgsd-fast bench", lambda: _bench(args), debug=debug)


def _bench(args: argparse.Namespace) -> int:
    import torch

    # liger's Triton kernels can only run on CPU tensors through the interpreter, chosen before triton loads.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from sgsd_fast.bench import report

    if args.render is not None:
        try:
            result = json.loads(args.render.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--render: {str(args.render)!r} is not a results JSON file ({err})") from err
    else:
        result = _run(args.preset, args.only, args.threads, args.out)
        if result is None:
            return 2
    report.print_tables(result)
    for path in report.write_all(result, args.out):
        print(f"wrote {path}")
    return 0


def _run(name: str, only: str | None, threads: int | None, out: Path) -> dict | None:
    """Run preset `name` (restricted to `only`), checkpointing its JSON into `out`; None if it cannot run here."""
    from dataclasses import replace

    from sgsd_fast.bench import report, runner
    from sgsd_fast.bench.presets import get_preset

    preset = get_preset(name)
    if only:
        keep = set(only.split(","))
        preset = replace(preset, kernels=[(s, i) for s, i in preset.kernels if s.bench in keep],
                         e2e=preset.e2e if "e2e" in keep else [])
    if threads is not None:
        preset = replace(preset, threads=threads)
    start = time.perf_counter()
    try:
        result = runner.run_preset(
            preset,
            progress=lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True),
            checkpoint=lambda partial: report.write_json(partial, out),
        )
    except runner.PresetUnavailable as err:
        print(f"sgsd-fast bench: {err}", file=sys.stderr)
        return None
    result["seconds"] = time.perf_counter() - start
    return result
