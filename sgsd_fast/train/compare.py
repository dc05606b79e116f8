"""Side-by-side comparison of training methods on the same problems, seeds and budget.

    plan = comparison_plan(["base", "grpo", "sgsd"], main_seeds=[0, 1, 2], other_seeds=[0])
    results = run_comparison(plan, out_dir, overrides={"max_steps": 20})
    write_report(results, out_dir)        # learning.md, learning.json, learning.png

Each arm is a set of config overrides on one shared base config, so every arm sees the same
training problems (in the same order for one seed), the same held-out problems, and the same
budget: steps, rollouts per step, completion tokens. The held-out set does not depend on the
training seed (`eval_seed`), and greedy evaluation of the untrained model is deterministic, so
the base model is evaluated once and that evaluation is the "before" of every arm.

Every run is a separate `sgsd-fast train` process (clean peak-memory numbers, and a crash in one
arm does not lose the others) with its own run directory. The comparison is resumable: a run
with a `summary.json` is finished and skipped; an unfinished one resumes from its latest
checkpoint.

Statistics: each run's after-vs-base paired bootstrap 95 % CI, clustered by computation key, and
the exact McNemar test (`sgsd_fast.train.stats`). An arm with several seeds also gets a pooled
CI: all seeds' per-problem differences resampled together by problem cluster, so the pooled
interval reflects both seed-to-seed variation and problem sampling.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgsd_fast.train.evaluate import eval_records_path, read_records, record_clusters
from sgsd_fast.train.metrics import METRICS_FILE, read_metrics
from sgsd_fast.train.stats import paired_comparison
from sgsd_fast.train.trainer import SUMMARY_FILE

__all__ = ["ARMS", "Run", "comparison_plan", "run_comparison", "write_report"]

#: The arms: config overrides on the shared base config. The GRPO arm keeps the rollouts per step
#: of the others (prompts_per_step x num_generations) by sampling groups of 4 from a quarter of
#: the prompts; `comparison_plan` fills that in from the base config.
ARMS: dict[str, dict[str, Any]] = {
    "base": {},
    "grpo": {"method": "grpo"},
    "opsd": {"method": "opsd"},
    "sampled_rkl": {"method": "sampled_rkl"},
    "sgsd": {"method": "sgsd"},
    "sgsd_random": {"method": "sgsd", "retrieval": "random"},
    "sgsd_exact": {"method": "sgsd", "sgsd_outcome": "sign"},
    "sgsd_advantage": {"method": "sgsd", "sgsd_outcome": "advantage"},
}
GRPO_GROUP = 4
BASE_RECORDS = "base/records.jsonl"


@dataclass
class Run:
    """One training run of the comparison: an arm at a seed, and where it lives."""

    arm: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.arm}-seed{self.seed}"


def comparison_plan(arms: Sequence[str], *, main_arm: str = "sgsd", main_seeds: Sequence[int] = (0, 1, 2),
                    other_seeds: Sequence[int] = (0,), base: Mapping[str, Any] | None = None) -> list[Run]:
    """The training runs for `arms` ("base" needs none: it is the shared before-evaluation).

    `main_arm` runs at every seed of `main_seeds`, the other arms at `other_seeds`. `base` is the
    shared config (for the GRPO arm's equal-rollout budget)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--methods: unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    if not arms:
        raise ValueError("--methods: name at least one arm")
    base = dict(base or {})
    runs = []
    for arm in arms:
        if arm == "base":
            continue
        overrides = dict(ARMS[arm])
        if arm == "grpo":
            rollouts = int(base.get("prompts_per_step", 8)) * int(base.get("num_generations", 1))
            if rollouts % GRPO_GROUP:
                raise ValueError(f"the GRPO arm needs rollouts per step ({rollouts}) divisible by {GRPO_GROUP}")
            overrides |= {"num_generations": GRPO_GROUP, "prompts_per_step": rollouts // GRPO_GROUP}
        for seed in (main_seeds if arm == main_arm else other_seeds):
            runs.append(Run(arm, int(seed), overrides | {"seed": int(seed)}))
    return runs


def _cli_args(values: Mapping[str, Any]) -> list[str]:
    args = []
    for key, value in values.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif value is None:
            value = "none"
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        args += [f"--{key}", str(value)]
    return args


def _run_command(argv: list[str], log_path: Path) -> int:
    env = dict(os.environ)
    with log_path.open("a") as log:
        return subprocess.call([sys.executable, "-m", "sgsd_fast.commands", *argv], stdout=log,
                               stderr=subprocess.STDOUT, env=env)


def run_comparison(runs: Sequence[Run], out_dir: Path, *, config: str | None = None,
                   overrides: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
                   runner: Callable[[list[str], Path], int] = _run_command) -> dict[str, Any]:
    """Run the base evaluation and every run (skipping finished ones); returns the raw results.

    `config` (a YAML path) and `overrides` form the shared base config of every run. `runner`
    executes one `sgsd-fast` command line (tests pass an in-process one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shared = (["--config", config] if config else []) + _cli_args(dict(overrides or {}))
    base_records = out_dir / BASE_RECORDS
    if not base_records.is_file():
        base_records.parent.mkdir(parents=True, exist_ok=True)
        log("[compare] base: evaluating the untrained model once (the 'before' of every arm)")
        t0 = time.perf_counter()
        rc = runner(["eval", *shared, "--records", str(base_records) + ".tmp",
                     "--output", str(out_dir / "base" / "metrics.json")], out_dir / "base" / "log.txt")
        if rc != 0:
            raise RuntimeError(f"base evaluation failed (exit {rc}); see {out_dir / 'base' / 'log.txt'}")
        os.replace(str(base_records) + ".tmp", base_records)
        (out_dir / "base" / "wall.json").write_text(json.dumps({"wall_time_s": time.perf_counter() - t0}))
    results: dict[str, Any] = {"base": read_records(base_records), "runs": []}
    for i, run in enumerate(runs):
        run_dir = out_dir / run.name
        summary_path = run_dir / SUMMARY_FILE
        if summary_path.is_file():
            log(f"[compare] {i + 1}/{len(runs)} {run.name}: finished earlier, skipped")
        else:
            argv = ["train", *shared, *_cli_args(run.overrides), "--output_dir", str(run_dir),
                    "--eval_at_start", "false", "--progress", "false"]
            if any(run_dir.glob("checkpoint-*")):
                argv += ["--resume", str(run_dir)]
            log(f"[compare] {i + 1}/{len(runs)} {run.name}: training ({' '.join(_cli_args(run.overrides))})")
            run_dir.mkdir(parents=True, exist_ok=True)
            rc = runner(argv, run_dir / "log.txt")
            if rc != 0 or not summary_path.is_file():
                raise RuntimeError(f"run {run.name} failed (exit {rc}); see {run_dir / 'log.txt'}")
        summary = json.loads(summary_path.read_text())
        step = summary["steps"]
        records = read_records(eval_records_path(run_dir, step))
        history = read_metrics(run_dir / METRICS_FILE)
        results["runs"].append({"arm": run.arm, "seed": run.seed, "overrides": run.overrides, "summary": summary,
                                "records": records, "history": history})
        log(f"[compare] {run.name}: accuracy after {sum(r['correct'] for r in records) / len(records):.3f}")
    return results


def _check_same_problems(base: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]], name: str) -> None:
    if [r["id"] for r in base] != [r["id"] for r in records]:
        raise ValueError(f"run {name} was evaluated on other problems than the base evaluation; "
                         "runs of one comparison must share eval_dataset, eval_seed and num_eval_problems")


def summarize(results: Mapping[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """Per-run and per-arm rows: accuracy before/after with paired 95 % CIs and McNemar p."""
    base = results["base"]
    clusters = record_clusters(base)
    before = [float(r["correct"]) for r in base]
    n = len(base)
    rows = [{"arm": "base", "seed": None, "before": sum(before) / n, "after": sum(before) / n, "delta": 0.0,
             "ci_low": 0.0, "ci_high": 0.0, "p_mcnemar": 1.0, "fixed": 0, "broken": 0,
             "format_rate": sum(r["extracted"] is not None for r in base) / n,
             "repetition_rate": sum(bool(r["looping"]) for r in base) / n, "wall_time_s": None,
             "peak_memory_mb": None}]
    arms: dict[str, list[dict[str, Any]]] = {}
    for run in results["runs"]:
        name = f"{run['arm']}-seed{run['seed']}"
        _check_same_problems(base, run["records"], name)
        after = [float(r["correct"]) for r in run["records"]]
        cmp = paired_comparison(before, after, clusters=clusters, seed=seed)
        row = {"arm": run["arm"], "seed": run["seed"], **cmp.to_dict(),
               "format_rate": sum(r["extracted"] is not None for r in run["records"]) / n,
               "repetition_rate": sum(bool(r["looping"]) for r in run["records"]) / n,
               "wall_time_s": run["summary"]["wall_time_s"], "peak_memory_mb": run["summary"]["peak_memory_mb"],
               "mean_reward": run["summary"].get("mean_reward")}
        rows.append(row)
        arms.setdefault(run["arm"], []).append({"row": row, "after": after})
    pooled = []
    for arm, items in arms.items():
        if len(items) < 2:
            continue
        cmp = paired_comparison(before * len(items), [x for it in items for x in it["after"]],
                                clusters=(clusters or list(range(n))) * len(items), seed=seed)
        pooled.append({"arm": arm, "seeds": [it["row"]["seed"] for it in items], **cmp.to_dict()})
    return {"num_problems": n, "rows": rows, "pooled": pooled}


def _fmt_ci(row: Mapping[str, Any]) -> str:
    return f"{row['delta']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def markdown_table(summary: Mapping[str, Any], *, machine: str = "") -> str:
    lines = [f"Held-out greedy accuracy on {summary['num_problems']} problems (one per distinct computation); "
             "change vs the untrained model with a paired 95 % bootstrap CI clustered by computation, exact "
             "McNemar p." + (f" Machine: {machine}." if machine else ""), "",
             "| arm | seed | accuracy before → after | change [95 % CI] | fixed / broken | McNemar p | format rate "
             "| repetition rate | train wall time | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        wall = f"{r['wall_time_s'] / 60:.1f} min" if r["wall_time_s"] else "—"
        mem = f"{r['peak_memory_mb'] / 1024:.1f} GB" if r["peak_memory_mb"] else "—"
        seed = "—" if r["seed"] is None else str(r["seed"])
        change = "—" if r["arm"] == "base" else _fmt_ci(r)
        fb = "—" if r["arm"] == "base" else f"{r['fixed']} / {r['broken']}"
        p = "—" if r["arm"] == "base" else f"{r['p_mcnemar']:.3g}"
        lines.append(f"| {r['arm']} | {seed} | {r['before']:.3f} → {r['after']:.3f} | {change} | {fb} | {p} | "
                     f"{r['format_rate']:.3f} | {r['repetition_rate']:.3f} | {wall} | {mem} |")
    if summary["pooled"]:
        lines += ["", "Pooled over seeds (per-problem differences of all seeds resampled together by computation):",
                  "", "| arm | seeds | mean accuracy after | change [95 % CI] |", "|---|---|---|---|"]
        for p in summary["pooled"]:
            lines.append(f"| {p['arm']} | {', '.join(map(str, p['seeds']))} | {p['after']:.3f} | {_fmt_ci(p)} |")
    return "\n".join(lines) + "\n"


def plot_comparison(results: Mapping[str, Any], summary: Mapping[str, Any], path: Path) -> Path:
    """Two panels: held-out accuracy at each evaluation (step 0 = base), and the rollout reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_acc = summary["rows"][0]["after"]
    fig, (ax_acc, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    colors: dict[str, Any] = {}
    for run in results["runs"]:
        color = colors.setdefault(run["arm"], f"C{len(colors)}")
        label = run["arm"] if sum(r["arm"] == run["arm"] for r in results["runs"]) == 1 or run["seed"] == min(
            r["seed"] for r in results["runs"] if r["arm"] == run["arm"]) else None
        evals = [(0, base_acc)] + [(r["eval_step"], r["eval/accuracy"]) for r in run["history"] if "eval_step" in r]
        ax_acc.plot(*zip(*evals), marker="o", color=color, label=label, alpha=0.8)
        train = [(r["step"], r["reward"]) for r in run["history"] if "eval_step" not in r]
        if train:
            steps, rewards = zip(*train)
            window = 5
            smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
                      for i in range(len(rewards))]
            ax_rew.plot(steps, smooth, color=color, label=label, alpha=0.8)
    ax_acc.axhline(base_acc, color="gray", linestyle=":", label="base")
    ax_acc.set(xlabel="step", ylabel="held-out greedy accuracy", title=f"{summary['num_problems']} held-out problems")
    ax_rew.set(xlabel="step", ylabel="rollout reward (5-step mean)", title="training rollouts")
    ax_acc.legend(fontsize=8)
    ax_rew.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, Any], out_dir: Path, *, name: str = "learning", machine: str = "",
                 seed: int = 0) -> dict[str, Path]:
    """learning.md (the table), learning.json (rows + per-run settings) and learning.png (curves)."""
    out_dir = Path(out_dir)
    summary = summarize(results, seed=seed)
    md = out_dir / f"{name}.md"
    md.write_text(markdown_table(summary, machine=machine))
    js = out_dir / f"{name}.json"
    runs = [{"arm": r["arm"], "seed": r["seed"], "overrides": r["overrides"]} for r in results["runs"]]
    js.write_text(json.dumps({**summary, "machine": machine, "runs": runs}, indent=2) + "\n")
    png = plot_comparison(results, summary, out_dir / f"{name}.png")
    return {"markdown": md, "json": js, "plot": png}
