"""Named benchmark presets: which kernel shapes, implementations and end-to-end steps to run.

cpu-small    the quick side-by-side comparison (~1.5 minutes on this 2-core machine): every op at small
             shapes, plus a tiny-Llama SGSD step and its longest rollout under a 160 MiB budget.
cpu-scaling  scaling in N (512 -> 8k), V (32k, 49k, 152k) and K (1 -> 8) on CPU, and the longest
             tiny-Llama rollout under 512 MiB.
cpu-floor    on 2 threads: log-probs fwd+bwd at the SmolLM2 shape (N=4096, H=576, V=49152) and at
             Qwen3 width (N=512, H=2048, V=151936), with a trained and a frozen (LoRA) weight,
             against the GEMM floor (3 GEMMs; 2 when frozen), naive and Cut Cross-Entropy
             (torch_compile); the divergences (FKL, RKL, JSD; K = 1, 4) at N=512 against naive.
gpu          the check shape N=16384, H=2048, V=151936 in bf16 (+ N scaling 1k -> 64k for log-probs).
gpu-e2e      a Qwen3-1.7B-shaped SGSD step (K=8, random weights, bf16) and the longest rollout
             that fits 24 GiB.

SGSD_BENCH_DRYRUN=1 shrinks the GPU presets to tiny shapes so their code paths run on a CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from sgsd_fast.bench.e2e import E2EConfig, GiB
from sgsd_fast.bench.kernels import KernelSpec

ALL = ("ours", "naive", "cce", "liger")


@dataclass(frozen=True)
class E2EPlan:
    """An end-to-end step to time at rollout length t, and the bisection range for max T."""

    cfg: E2EConfig
    t: int
    budget_bytes: int | None
    t_range: tuple[int, int]
    multiple: int


@dataclass(frozen=True)
class Preset:
    name: str
    device: str  # "cpu" | "cuda"
    kernels: list[tuple[KernelSpec, tuple[str, ...]]] = field(default_factory=list)
    e2e: list[E2EPlan] = field(default_factory=list)
    repeat: int = 5
    max_seconds: float = 5.0  # per implementation and shape, timed calls only
    # Naive cases whose N x V tensors would exceed this are skipped (the CPU is shared; CUDA catches OOM).
    naive_guard_bytes: int | None = None
    # torch CPU threads (None: torch's choice). The CPU presets use 1: on a machine shared with
    # other jobs, OpenMP threads contending for busy cores slowed 2-thread runs by up to 10x.
    threads: int | None = None


def _cpu_small() -> Preset:
    h, v = 128, 32000
    kernels = [(KernelSpec("logprobs", n, h, v), ALL[:3]) for n in (256, 1024)]
    kernels.append((KernelSpec("teacher_logprobs", 512, h, v, k=8), ALL[:2]))
    kernels += [(KernelSpec("sgsd_loss", 512, h, v, k=k), ALL[:2]) for k in (1, 4, 8)]
    kernels += [(KernelSpec("divergence", 256, h, v, k=k, kind=kind), ALL[:2]) for kind in ("jsd", "fkl")
                for k in (1, 4)]
    # liger's Triton kernels run through the interpreter on CPU (~1000x slower): a tiny shape only.
    kernels.append((KernelSpec("divergence", 64, 64, 4096, k=1, kind="jsd"), ("ours", "naive", "liger")))
    e2e = [E2EPlan(E2EConfig("tiny-llama", k=8), t=128, budget_bytes=160 * 2**20, t_range=(64, 512),
                   multiple=64)]
    return Preset("cpu-small", "cpu", kernels, e2e, repeat=2, max_seconds=1.0, naive_guard_bytes=2 * GiB,
                  threads=1)


def _cpu_scaling() -> Preset:
    h, v = 128, 32000
    kernels = [(KernelSpec("logprobs", n, h, v), ALL[:3]) for n in (512, 1024, 2048, 4096, 8192)]
    kernels += [(KernelSpec("logprobs", 1024, h, vv), ALL[:3]) for vv in (49152, 151936)]
    kernels += [(KernelSpec("sgsd_loss", 1024, h, v, k=k), ALL[:2]) for k in (1, 2, 4, 8)]
    kernels += [(KernelSpec("sgsd_loss", n, h, v, k=8), ALL[:2]) for n in (512, 2048)]
    kernels += [(KernelSpec("divergence", n, h, v, k=k, kind="jsd"), ALL[:2]) for k in (1, 4)
                for n in (256, 1024, 4096)]
    e2e = [E2EPlan(E2EConfig("tiny-llama", k=8), t=512, budget_bytes=512 * 2**20, t_range=(256, 4096),
                   multiple=128)]
    return Preset("cpu-scaling", "cpu", kernels, e2e, repeat=2, max_seconds=3.0, naive_guard_bytes=6 * GiB,
                  threads=1)


def _cpu_floor() -> Preset:
    h, v = 576, 49152  # SmolLM2's width and vocabulary
    lp = ("ours", "floor", "naive", "cce")
    kernels = [(KernelSpec("logprobs", 4096, h, v, frozen_weight=frozen), lp) for frozen in (False, True)]
    # Qwen3 width and vocabulary; N = 512 keeps naive's N x V tensors (~1.2 GiB) on the shared machine.
    kernels += [(KernelSpec("logprobs", 512, 2048, 151936, frozen_weight=frozen), lp) for frozen in (False, True)]
    kernels += [(KernelSpec("divergence", 512, h, v, k=k, kind=kind), ALL[:2]) for kind in ("fkl", "rkl", "jsd")
                for k in (1, 4)]
    return Preset("cpu-floor", "cpu", kernels, repeat=3, max_seconds=30.0, naive_guard_bytes=4 * GiB, threads=2)


def _gpu() -> Preset:
    h, v, n = 2048, 151936, 16384
    spec = lambda bench, n=n, **kw: KernelSpec(bench, n, h, v, dtype="bfloat16", **kw)  # noqa: E731
    kernels = [(spec("logprobs"), ALL[:3])]
    kernels += [(spec("logprobs", n=m), ALL[:3]) for m in (1024, 4096, 65536)]
    kernels.append((spec("teacher_logprobs", k=8), ALL[:2]))
    kernels.append((spec("sgsd_loss", k=8), ALL[:2]))
    kernels += [(spec("divergence", k=1, kind="jsd"), ("ours", "naive", "liger")),
                (spec("divergence", k=4, kind="jsd"), ALL[:2])]
    return Preset("gpu", "cuda", kernels, repeat=5, max_seconds=2.0)  # ms-scale calls: 5 rounds take well under 2 s; the cap keeps gpu_check.sh inside 5 minutes


def _gpu_e2e() -> Preset:
    cfg = E2EConfig("qwen3-1.7b", k=8, dtype="bfloat16", grad_ckpt=True, teacher_extra=256, prompt_len=128)
    plan = E2EPlan(cfg, t=1024, budget_bytes=24 * GiB, t_range=(256, 32768), multiple=256)
    return Preset("gpu-e2e", "cuda", e2e=[plan], repeat=2, max_seconds=5.0)


def _dryrun(p: Preset) -> Preset:
    """The same benches at tiny shapes on CPU (fp32), to exercise a GPU preset's code without a GPU."""
    kernels = [(replace(s, n=max(16, s.n // 128), h=32, v=1000, dtype="float32"), impls) for s, impls in p.kernels]
    e2e = [replace(e, cfg=replace(e.cfg, model="tiny-llama", dtype="float32", vocab_size=1000), t=64,
                   budget_bytes=64 * 2**20, t_range=(64, 128), multiple=64) for e in p.e2e]
    return replace(p, device="cpu", kernels=kernels, e2e=e2e, repeat=1, max_seconds=1.0)


PRESETS = {"cpu-small": _cpu_small, "cpu-scaling": _cpu_scaling, "cpu-floor": _cpu_floor, "gpu": _gpu, "gpu-e2e": _gpu_e2e}


def get_preset(name: str) -> Preset:
    """The preset `name`; GPU presets are shrunk to CPU tiny shapes when SGSD_BENCH_DRYRUN=1."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]()
    if preset.device == "cuda" and os.environ.get("SGSD_BENCH_DRYRUN") == "1":
        preset = _dryrun(preset)
    return preset
