"""Peak memory of one SGSD step vs rollout length at Qwen3-1.7B width, ours vs the reference approach.

The model is Qwen3-1.7B's shape with its real embedding / lm_head (V=151,936, H=2048, tied) and
2 of its 28 decoder layers, random fp32 weights, full fine-tuning with AdamW, K=8 teachers
(`sgsd_fast.bench.e2e`: ours = one student pass + `teacher_logprobs` + `sgsd_loss`; naive = the
public reference code's way, K student passes and full log-softmaxes). Measured: peak memory
(weights + optimizer state + the step's extra peak, profiler-counted) and step time at each T of
--lengths. From those points: a least-squares line peak(T) = a + b T per implementation, the
longest T within each budget by that line (marked as extrapolated beyond the largest measured T).

    python -m benchmarks.long_context --lengths 256 512 1024 --out benchmarks/results/long_context
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sgsd_fast.bench.e2e import E2EConfig, StepBench


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of the least-squares line through (T, MiB) points."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mp = sum(p for _, p in points) / n
    b = sum((t - mt) * (p - mp) for t, p in points) / sum((t - mt) ** 2 for t, _ in points)
    return mp - b * mt, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--budgets_gib", type=float, nargs="+", default=[16.0, 24.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("long-context-out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = E2EConfig("qwen3-1.7b", k=8, layers=2, prompt_len=64, teacher_extra=128, dtype="float32")
    device = torch.device("cpu")
    records, fits = [], {}
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
        a, slope = fit([(r["t"], r["peak_mib"]) for r in records if r["impl"] == impl])
        fits[impl] = {"static_mib": round(a, 1), "mib_per_token": round(slope, 4),
                      "max_t": {str(g): int((g * 1024 - a) / slope) for g in args.budgets_gib}}
    result = {"config": cfg.__dict__, "records": records, "fits": fits, "largest_measured_t": max(args.lengths)}
    (args.out / "long_context.json").write_text(json.dumps(result, indent=1))
    lines = ["| impl | T | peak MiB | step s |", "|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['t']} | {r['peak_mib']:.0f} | {r['step_s']:.1f} |" for r in records]
    lines += ["", "| impl | static MiB (fit) | MiB per rollout token (fit) | "
              + " | ".join(f"longest T in {g:g} GiB (extrapolated)" for g in args.budgets_gib) + " |",
              "|---|---|---|" + "---|" * len(args.budgets_gib)]
    for impl, f in fits.items():
        lines.append(f"| {impl} | {f['static_mib']:.0f} | {f['mib_per_token']:.3f} | "
                     + " | ".join(f"{f['max_t'][str(g)]:,}" for g in args.budgets_gib) + " |")
    (args.out / "long_context.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
