"""Peak memory of one SGSD step vs rollout length at Qwen3-1.7B width, ours vs the reference approach.

The model is Qwen3-1.7B's shape with its real embedding / lm_head (V=151,936, H=2048, tied) and
2 of its 28 decoder layers, random fp32 weights, full fine-tuning with AdamW, K=8 teachers
(`sgsd_fast.bench.e2e`: ours = one student pass + `teacher_logprobs` + `sgsd_loss`; naive = the
public reference code's way, K student passes and full log-softmaxes). Measured: peak memory
(weights + optimizer state + the step's extra peak, profiler-counted) and step time at each T of
--lengths. From those points, per implementation: a least-squares line peak(T) = a + b T (the
growth per token over the whole range), and the longest T within each budget, found on the
measured points where a budget falls inside them, and beyond the largest measured T by the slope
of the last measured segment, never beyond EXTRAPOLATION_CAP x the largest measured T.

Why the last segment and not the line: the step's peak is the largest of several moments (the
weight gradient and optimizer update, the activations, the logits), each growing at its own rate
with T, so the peak grows piecewise, faster once a faster-growing term takes over. Ours is flat
(+0.008 MiB per token) while the update's peak dominates, then grows at the activations' rate; a
line through all points would understate that growth. A term that takes over later still (e.g.
attention's quadratic parts) would grow faster again, so a longest T past the measured range is an
upper estimate, and labelled as beyond the measurements.

    python -m benchmarks.long_context --lengths 256 512 1024 --out benchmarks/results/long_context
    python -m benchmarks.long_context --lengths 2048 4096 --impls ours --append \
        --out benchmarks/results/long_context     # more points, added to the records already there
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


def last_slope(points: list[tuple[int, float]]) -> float:
    """MiB per token of the last measured segment of (T, MiB) points by increasing T."""
    (t0, p0), (t1, p1) = points[-2], points[-1]
    return (p1 - p0) / (t1 - t0)


def longest_t(points: list[tuple[int, float]], budget_mib: float) -> float:
    """The longest T whose peak fits `budget_mib` (0 if none): interpolated between the measured
    points that bracket it, else extrapolated from the largest one by the last segment's slope
    (inf if that segment is flat). `points` are (T, MiB) by increasing T, at least two."""
    if points[0][1] > budget_mib:
        return 0
    for (t0, p0), (t1, p1) in zip(points, points[1:]):
        if p1 > budget_mib:
            return t0 + (budget_mib - p0) * (t1 - t0) / (p1 - p0)
    slope, (t1, p1) = last_slope(points), points[-1]
    return t1 + (budget_mib - p1) / slope if slope > 0 else float("inf")


def summarize(records: list[dict], budgets_gib: list[float]) -> tuple[dict, str]:
    """(fits per implementation, the markdown tables) of measured records; each implementation's
    extrapolation is capped by its own largest measured T."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    records = sorted(records, key=lambda r: (impls.index(r["impl"]), r["t"]))
    fits = {}
    for impl in impls:
        points = [(r["t"], r["peak_mib"]) for r in records if r["impl"] == impl]
        a, slope = fit(points)
        largest = points[-1][0]
        cap = EXTRAPOLATION_CAP * largest
        max_t = {}
        for g in budgets_gib:
            t = longest_t(points, g * 1024)
            max_t[str(g)] = (f"> {cap:,} (cap)" if t > cap else f"{int(t):,} (beyond measured)" if t > largest
                             else f"{int(t):,}" if t > 0 else f"< {points[0][0]:,}")
        fits[impl] = {"static_mib": round(a, 1), "mib_per_token": round(slope, 4),
                      "mib_per_token_last": round(last_slope(points), 4), "max_t": max_t, "measured_t": [t for t, _ in points]}
    lines = ["| impl | T | peak MiB | step s | loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['t']} | {r['peak_mib']:.0f} | {r['step_s']:.1f} | {r['loss']:.6g} |"
              for r in records]
    lines += ["", "Per implementation: a least-squares line over its measured T, the slope of its last measured "
              "segment, and the longest T within a budget: interpolated inside the measured range, else by the "
              f"last segment's slope, capped at {EXTRAPOLATION_CAP}x the largest measured T.", "",
              "| impl | measured T | static MiB (line) | MiB per rollout token (line) | MiB per token (last segment) | "
              + " | ".join(f"longest T in {g:g} GiB" for g in budgets_gib) + " |",
              "|---|---|---|---|---|" + "---|" * len(budgets_gib)]
    for impl, f in fits.items():
        lines.append(f"| {impl} | {', '.join(map(str, f['measured_t']))} | {f['static_mib']:.0f} | "
                     f"{f['mib_per_token']:.3f} | {f['mib_per_token_last']:.3f} | "
                     + " | ".join(f["max_t"][str(g)] for g in budgets_gib) + " |")
    return fits, "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--budgets_gib", type=float, nargs="+", default=[16.0, 24.0])
    parser.add_argument("--impls", nargs="+", choices=["ours", "naive"], default=["ours", "naive"])
    parser.add_argument("--append", action="store_true",
                        help="add the new records to --out's long_context.json (same config) instead of replacing it")
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
    if args.append:
        earlier = json.loads((args.out / "long_context.json").read_text())
        if earlier["config"] != cfg.__dict__:
            raise SystemExit(f"--append: {args.out / 'long_context.json'} was measured with another config")
        records = earlier["records"]
    for impl in args.impls:
        bench = StepBench(cfg, impl, device)
        for t in args.lengths:
            b = bench.batch(t)
            t0 = time.perf_counter()
            loss = bench.call(b)
            seconds = time.perf_counter() - t0
            peak = bench.peak_mib(b)
            rec = dict(impl=impl, t=t, peak_mib=round(peak, 1), step_s=round(seconds, 1), loss=loss)
            records = [r for r in records if (r["impl"], r["t"]) != (impl, t)] + [rec]
            print(json.dumps(rec), flush=True)
            (args.out / "long_context.json").write_text(json.dumps({"config": cfg.__dict__, "records": records},
                                                                   indent=1))
        del bench
    return cfg.__dict__, records


if __name__ == "__main__":
    raise SystemExit(main())
