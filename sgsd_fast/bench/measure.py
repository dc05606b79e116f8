"""Wall-clock time and peak memory of callables, on CPU or CUDA.

Time: the implementations of one case are timed *interleaved* (round-robin: a, b, c, a, b, c, ...)
and each gets the median of its calls (CUDA: synchronized around each call). On a shared machine
the load drifts over seconds; interleaving exposes every implementation to the same drift, so
their ratio stays meaningful even when absolute times are noisy.

Peak memory is the extra memory one call needs on top of what is live before it:
- CUDA: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` before the call.
- CPU: torch has no peak counter for its CPU allocator, so the call runs once under
  `torch.profiler` with `profile_memory=True`; every allocation and free of the CPU allocator is
  an event with a signed size, and the peak is the maximum of their running sum. This sees every
  tensor allocated through ATen (also inside C++ extensions that allocate with at::empty) but not
  raw malloc/std::vector buffers of an extension, nor numpy buffers (Triton's interpreter). Frees
  of blocks that existed before the call are not credited (the profiler never saw them
  allocated), e.g. the previous call's gradients: each implementation pays that alike. The
  profiled call is separate from the timed calls, so profiling overhead never enters the times.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def free_memory(device: torch.device) -> None:
    """Drop unreferenced tensors now (and CUDA's cached blocks), so the next case starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, repeat: int = 5,
                     max_seconds: float = 10.0) -> dict[str, tuple[float, int] | dict]:
    """{name: (median ms, timed calls)}, or {name: failure fields} for a call that raised.

    Rounds stop early once `max_seconds` per implementation have elapsed (at least one round
    always runs), so slow naive baselines do not blow a preset's time budget. A call that raises
    drops its implementation from later rounds; only a description of the error is kept, since
    the exception's traceback would keep the failed call's (possibly huge) tensors alive.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, dict] = {}
    start = time.perf_counter()
    for _ in range(max(1, repeat)):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
            except Exception as err:  # noqa: BLE001 - reported per implementation by the caller
                failed[name] = failure(err)
                continue
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds * max(1, len(fns)):
            break
    return {name: failed[name] if name in failed else (statistics.median(times[name]), len(times[name]))
            for name in fns}


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocs = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    allocs.sort()
    live = peak = 0
    for _, size in allocs:
        live += size
        peak = max(peak, live)
    return peak


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Extra peak memory (MiB) allocated by one call of `fn` on `device` (method: module docstring)."""
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device) / 2**20
    return _cpu_peak_bytes(fn) / 2**20


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error on either device (CUDA OOM, or the CPU allocator refusing)."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def failure(err: BaseException) -> dict:
    """The status fields of a record whose call raised `err`."""
    return {"status": "oom" if is_oom(err) else "error", "reason": f"{type(err).__name__}: {err}"[:300]}
