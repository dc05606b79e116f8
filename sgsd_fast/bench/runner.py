"""Runs a preset: every kernel shape with each implementation, then the end-to-end steps.

Every implementation of a shape runs in the same process on the same inputs, timed interleaved
(`measure.time_interleaved`), so ratios compare like with like. Failures are results too: an implementation that is
unavailable, skipped by the memory guard, out of memory or broken gets a record saying so.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from sgsd_fast.bench import e2e, kernels, measure
from sgsd_fast.bench.presets import Preset


class PresetUnavailable(RuntimeError):
    """The preset cannot run on this machine (e.g. a GPU preset without CUDA)."""


# Dense bf16 tensor-core peak (TFLOP/s) by card name, for the fraction of the GEMM floor.
# First match wins, so the PCIe variant precedes the plain "H100" (SXM).
# Consumer cards: the "FP16/BF16 tensor with FP32 accumulate" dense rate of NVIDIA's Ampere / Ada
# whitepapers (the rate with fp16 accumulation is twice that, and is not what these kernels use).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 4090": 165.2,
                    "RTX 3090 Ti": 80.0, "RTX 3090": 71.0}


def cpu_model() -> str:
    """The CPU's model name as lscpu/proc report it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ops_fingerprint() -> str:
    """Short hash of the installed ops' sources (Python and C++), naming the code version measured."""
    import hashlib

    import sgsd_fast

    root = Path(sgsd_fast.__file__).parent
    files = sorted(root.glob("ops/**/*.py")) + sorted(root.glob("csrc/*"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:12]


def describe(device: torch.device) -> dict:
    """The machine a result was measured on, and when, with which ops code."""
    info = {"device": device.type, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "ops_fingerprint": ops_fingerprint(), "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info["gpu"] = name
        info["peak_bf16_tflops"] = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return info


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _failure(err: BaseException) -> dict:
    if isinstance(err, kernels.Unavailable):
        return {"status": "skipped", "reason": str(err)}
    return measure.failure(err)


def run_kernel_spec(spec: kernels.KernelSpec, impls: tuple[str, ...], device: torch.device, preset: Preset,
                    peak_tflops: float | None) -> list[dict]:
    """One record per implementation of `spec`, with time, peak memory and agreement with naive.

    All implementations share one set of inputs; each is built and warmed up once (that call's
    output is kept for the cross-check), then they are timed interleaved and their peaks taken.
    """
    x = kernels.make_inputs(spec, device)
    recs = {impl: {**spec.label(), "impl": impl, "device": device.type, "status": "ok"} for impl in impls}
    fns, outputs = {}, {}
    for impl in impls:
        try:
            if impl == "naive" and preset.naive_guard_bytes and spec.naive_bytes() > preset.naive_guard_bytes:
                raise kernels.Unavailable(f"memory guard: needs ~{spec.naive_bytes() / 2**30:.1f} GiB")
            fn = kernels.build(spec, impl, device, x)
            outputs[impl] = fn()
            fns[impl] = fn
        except Exception as err:  # noqa: BLE001 - unavailable, OOM or broken: a result, not the end of the preset
            recs[impl].update(_failure(err))
        measure.free_memory(device)
    for impl, timing in measure.time_interleaved(fns, device, repeat=preset.repeat,
                                                 max_seconds=preset.max_seconds).items():
        if isinstance(timing, dict):
            recs[impl].update(timing)
            continue
        ms, n = timing
        recs[impl].update(time_ms=ms, repeats=n, tflops=spec.gemm_flops() / (ms * 1e-3) / 1e12)
        if peak_tflops:
            recs[impl]["floor_frac"] = recs[impl]["tflops"] / peak_tflops
            # executed-FLOP utilization: the recompute a store-free backward adds counts as work done
            recs[impl]["exec_frac"] = spec.executed_flops(impl, device.type) / (ms * 1e-3) / 1e12 / peak_tflops
        try:
            recs[impl]["peak_mib"] = measure.peak_mib(fns[impl], device)
        except Exception as err:  # noqa: BLE001 - as above
            recs[impl].update(_failure(err))
        measure.free_memory(device)
    if "naive" in outputs:
        for impl, out in outputs.items():
            if impl not in ("naive", "floor"):  # the floor computes no log-probs
                recs[impl]["rel_diff_vs_naive"] = _rel_diff(out, outputs["naive"])
    return list(recs.values())


def run_preset(preset: Preset, progress: Callable[[str], None] = lambda _: None,
               checkpoint: Callable[[dict], None] = lambda _: None) -> dict:
    """All records of `preset` plus the machine description, as one JSON-able dict.

    `checkpoint` receives the partial result (with "complete": False) after every case, so a
    run stopped by a time limit still leaves the cases it finished.
    """
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise PresetUnavailable(f"preset {preset.name!r} needs a CUDA device "
                                "(SGSD_BENCH_DRYRUN=1 runs it on CPU at tiny sizes)")
    if preset.threads is not None:
        torch.set_num_threads(preset.threads)
    device = torch.device(preset.device)
    result = {"preset": preset.name, "machine": describe(device), "records": [], "complete": False}
    for spec, impls in preset.kernels:
        kind = f" {spec.kind}" if spec.bench == "divergence" else ""
        progress(f"{spec.bench}{kind} N={spec.n} H={spec.h} V={spec.v} K={spec.k}")
        result["records"] += run_kernel_spec(spec, impls, device, preset, result["machine"].get("peak_bf16_tflops"))
        checkpoint(result)
    for plan in preset.e2e:
        progress(f"e2e step {plan.cfg.model} K={plan.cfg.k} T={plan.t}")
        result["records"] += e2e.run_e2e(plan.cfg, device, t=plan.t, budget_bytes=plan.budget_bytes,
                                         t_range=plan.t_range, multiple=plan.multiple,
                                         repeat=min(preset.repeat, 2), max_seconds=preset.max_seconds)
        checkpoint(result)
    result["complete"] = True
    return result
