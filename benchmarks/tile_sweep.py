"""Time every tile configuration this GPU's architecture lists (configs.TABLE) on linear_logprobs.

For each operand dtype (bf16, fp32) and each listed configuration: the forward and the dz-recompute
backward kernels plus their GEMMs (`logprobs_forward` / `logprobs_backward` with `config=`), median
of a few calls after a warm-up, at N=8192, H=2048, V=151936; outputs are cross-checked against the
configuration the op launches with (max |diff| of log-probs and of dX). Then the launched one with
GROUP_N = 1, with the other backward workspace order (row chunks instead of vocabulary slabs) and,
for fp32, with IEEE dots instead of tf32x3: what each of those choices buys. Prints a markdown
table. The fastest row per dtype is the measured answer to configs.py's "first entry by reasoning".

    python -m benchmarks.tile_sweep > tile-sweep.md

Without CUDA (SGSD_BENCH_DRYRUN=1 in gpu_check.sh) it runs tiny shapes through the Triton
interpreter on CPU, with the sm_90 list, to exercise the code; those times mean nothing.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgsd_fast.ops.linear_logprobs import DEFAULT_WORKSPACE_BYTES, _triton_blocks, _triton_chunk_rows  # noqa: E402
from sgsd_fast.ops.triton import configs, logprobs  # noqa: E402 - after the interpreter switch


def _time(fn, device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n, h, v = (8192, 2048, 151936) if cuda else (48, 40, 300)
    arch = configs.architecture(device) if cuda else 90
    if arch not in configs.TABLE:
        print(f"tile_sweep: no configurations listed for this architecture ({arch})", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if cuda else "CPU (interpreter, dry run)"
    print(f"## Tile sweep: linear_logprobs fwd+bwd kernels, N={n}, H={h}, V={v}, sm_{arch}, {name}\n")
    print("Each listed configuration as the op launches it (the backward's workspace order and dot precision "
          "as `linear_logprobs` chooses them), then the launched one with one choice changed: GROUP_N = 1 "
          "(no grouped launch), the other backward order, IEEE fp32 dots.\n")
    print("| dtype | BLOCK_N x BLOCK_V x BLOCK_H | warps | stages | GROUP_N | backward order | dot | ms "
          "| max abs diff logp / dX vs launched | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    g = torch.Generator(device=device).manual_seed(0)
    budget = DEFAULT_WORKSPACE_BYTES["cuda"] if cuda else 16 * v * 4  # dry run: several blocks
    for dtype, cls in ((torch.bfloat16, "half"), (torch.float32, "fp32")):
        x = torch.randn(n, h, generator=g, device=device).to(dtype)
        w = (torch.randn(v, h, generator=g, device=device) * (3 / h**0.5)).to(dtype)
        t = torch.randint(0, v, (n,), generator=g, device=device)
        grad = torch.randn(n, generator=g, device=device)
        lowp = logprobs.lowp_dz(w)
        chosen = _triton_blocks(n, v, dtype, budget, device, lowp)
        rows_only = (_triton_chunk_rows(v, dtype, budget, device, lowp), v)
        precision = configs.dot_precision(device, dtype)

        def run(cfg, blocks, dot):
            logp, lse, _ = logprobs.logprobs_forward(x, w, t, 1.0, False, config=cfg, precision=dot)
            dx, _ = logprobs.logprobs_backward(x, w, t, grad, lse, 1.0, True, True, *blocks, config=cfg, precision=dot)
            return logp, dx

        launched = configs.tile_config(device, dtype) if cuda else configs.TABLE[arch][cls][0]
        ref = run(launched, chosen, precision)
        variants = [(cfg, chosen, precision) for cfg in configs.TABLE[arch][cls]]
        variants.append((dataclasses.replace(launched, group_n=1), chosen, precision))
        if rows_only != chosen:
            variants.append((launched, rows_only, precision))
        if precision != "ieee":
            variants.append((launched, chosen, "ieee"))
        for cfg, blocks, dot in variants:
            order = "row chunks" if blocks[1] == v else "vocab slabs"
            order += f" {blocks[0]} x {blocks[1]}"
            try:
                ms = _time(lambda: run(cfg, blocks, dot), device, repeat=3 if cuda else 1)
                out = run(cfg, blocks, dot)
                diff = f"{(out[0] - ref[0]).abs().max().item():.1e} / {(out[1].float() - ref[1].float()).abs().max().item():.1e}"
                status = "ok (launched)" if (cfg, blocks, dot) == (launched, chosen, precision) else "ok"
            except Exception as err:  # noqa: BLE001 - a failing configuration is a result
                ms, diff, status, ok = float("nan"), "", f"failed: {type(err).__name__}: {str(err)[:120]}", False
            print(f"| {str(dtype).removeprefix('torch.')} | {cfg.block_n} x {cfg.block_v} x {cfg.block_h} | "
                  f"{cfg.num_warps} | {cfg.num_stages} | {cfg.group_n} | {order} | {dot} | {ms:.1f} | {diff} | {status} |",
                  flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
