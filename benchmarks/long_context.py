"""Peak memory of one SGSD step vs rollout length at Qwen3-1.7B width, ours vs the reference approach.

The model is Qwen3-1.7B's shape with its real embedding / lm_head (V=151,936, H=2048, tied) and
2 of its 28 decoder layers, random fp32 weights, full fine-tuning with AdamW, K=8 teachers
(`sgsd_fast.bench.e2e`: ours = one student pass + `teacher_logprobs` + `sgsd_loss`; naive = the
public reference code's way, K student passes and full log-softmaxes). Measured: peak memory
(weights + optimizer state + the step's extra peak, profiler-counted) and step time at each T of
--lengths. From those points: a least-squares line peak(T) = a + b T per implementation and the
longest T within each budget by that line, never beyond EXTRAPOLATION_CAP x the largest measured T
(a line through nearly flat points, as ours is while the step's peak is the weight gradient and
the optimizer update rather than activations, would otherwise claim millions of tokens).

    python -m benchmarks.long_context --lengths 256 512 1024 --out benchmarks/results/long_context
    python -m benchmarks.long_context --render benchmarks/results/long_context/long_context.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sgsd_fast.bench.e2e import E2EConfig, StepBench


EXTRAPOLATION_CAP = 8


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of the least-squares line through (T, MiB) points."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mp = sum(p for _, p in points) / n
    b = sum((t - mt) * (p - mp) for t, p in points) / sum((t - mt) ** 2 for t, _ in points)
    return mp - b * mt, b


def summarize(records: list[dict], budgets_gib: list[float]) -> tuple[dict, str]:
    """(fits per implementation, the markdown tables) of measured records."""
    largest = max(r["t"] for r in records)
    cap = EXTRAPOLATION_CAP * largest
    fits = {}
    for impl in dict.fromkeys(r["impl"] for r in records):
        a, slope = fit([(r["t"], r["peak_mib"]) for r in records if r["impl"] == impl])
        max_t = {}
        for g in budgets_gib:
            t = (g * 1024 - a) / slope if slope > 0 else float("inf")
            max_t[str(g)] = f"> {cap:,} (cap)" if t > cap else f"{int(t):,}" if t > 0 else "0"
        fits[impl] = {"static_mib": round(a, 1), "mib_per_token": round(slope, 4), "max_t": max_t}
    lines = ["| impl | T | peak MiB | step s | loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['t']} | {r['peak_mib']:.0f} | {r['step_s']:.1f} | {r['loss']:.6g} |"
              for r in records]
    lines += ["", f"Line fit over T = {sorted({r['t'] for r in records})}; longest T within a budget by the line, "
              f"capped at {EXTRAPOLATION_CAP}x the largest measured T ({largest}): beyond the measured range.", "",
              "| impl | static MiB (fit) | MiB per rollout token (fit) | "
              + " | ".join(f"longest T in {g:g} GiB" for g in budgets_gib) + " |",
              "|---|---|---|" + "---|" * len(budgets_gib)]
    for impl, f in fits.items():
        lines.append(f"| {impl} | {f['static_mib']:.0f} | {f['mib_per_token']:.3f} | "
                     + " | ".join(f["max_t"][str(g)] for g in budgets_gib) + " |")
    return fits, "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--budgets_gib", type=float, nargs="+", default=[16.0, 24.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("long-context-out"))
    parser.add_argument("--render", type=Path, help="only re-tabulate an earlier long_context.json (into its folder)")
    args = parser.parse_args()
    if args.render is not None:
        result = json.loads(args.render.read_text())
        args.out = args.render.parent
    else:
        config, records = _measure(args)
        result = {"config": config, "records": records}
    result["fits"], table = summarize(result["records"], args.budgets_gib)
    (args.out / "long_context.json").write_text(json.dumps(result, indent=1))
    (args.out / "long_context.md").write_text(table)
    print(table)
    return 0


def _measure(args) -> tuple[dict, list[dict]]:
    """(the step's config, one record per implementation and length), JSON written after each."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = E2EConfig("qwen3-1.7b", k=8, layers=2, prompt_len=64, teacher_extra=128, dtype="float32")
    device = torch.device("cpu")
    records = []
    for impl in ("ours", "naive"):
        bench = StepBench(cfg, impl, device)
        for t in args.lengths:
            b = bench.batch(t)
            t0 = time.perf_counter()
            loss = bench.call(b)
            seconds = time.perf_counter() - t0
            peak = bench.peak_mib(b)
            rec = dict(impl=impl, t=t, peak_mib=round(peak, 1), step_s=round(seconds, 1), loss=loss)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            (args.out / "long_context.json").write_text(json.dumps({"config": cfg.__dict__, "records": records},
                                                                   indent=1))
        del bench
    return cfg.__dict__, records


if __name__ == "__main__":
    raise SystemExit(main())
