"""Tile configurations of the log-prob kernels by GPU architecture, and how one is chosen.

A configuration is the logit tile (BLOCK_N rows x BLOCK_V vocabulary entries), the K step
(BLOCK_H) of its `tl.dot` loop, the launch's warps and software-pipeline stages, and the launch
order of the backward's tile grid (GROUP_N: programs run GROUP_N row blocks across all vocabulary
tiles before moving on, so the hidden-state blocks and weight tiles that resident programs share
stay in L2 instead of every wave walking all row blocks of one vocabulary tile). Pipelining
keeps `num_stages` copies of the two operand tiles in shared memory, which is what bounds a
configuration on consumer cards: 99 KiB per block on sm_86 / sm_89 (RTX 3090 / 4090) against
163 KiB on sm_80 (A100) and 227 KiB on sm_90 (H100 / H200).

`TABLE` lists, per architecture and operand class, the configurations in order of preference.
`tests/test_triton_aot.py` compiles every entry ahead of time for its architecture (Triton needs
no GPU for that) and checks that its shared memory fits the limit below; the interpreter tests run
the kernels with each entry's tile shape. Which entry is *fastest* is a GPU measurement: the
`gpu_check.sh` tile sweep (`benchmarks/tile_sweep.py`) times each at the check shape (and the
launched one with GROUP_N = 1 and with IEEE fp32 dots, to price those two choices). Until it has
run, the first entry is a choice by reasoning (bigger tiles on cards with more shared memory, bf16
tiles twice as wide in K as fp32 ones at the same bytes), not a measured optimum.

fp32 operands are multiplied with `"tf32x3"` dots on sm80+ (`dot_precision`): each operand split
into a TF32 high part and a TF32 remainder, three tensor-core products (hi*hi + hi*lo + lo*hi),
fp32 accumulation. The dropped lo*lo term and the two remainders' roundings leave at most about
3 x 2^-22 = 12 u (u = 2^-24) of |a||b| per product, against the K u of a K-term fp32 sum: the
tests' float64-derived bound counts it as 16 extra terms of the logit's dot product
(tests/test_linear_logprobs.py, TF32X3_EXTRA_TERMS). IEEE fp32 dots run on the FMA units at a
fraction of the tensor-core rate. `SGSD_TRITON_FP32_DOT=ieee` restores them. bf16 /
fp16 products are exact in fp32 and not affected.

Under the interpreter (CPU tests) and for float64, `DEFAULT` is used: the 64 x 64 x 32 tile the
kernels were validated with, whose tl.dot shapes the interpreter runs quickly.
"""
from __future__ import annotations

from dataclasses import dataclass

import os

import torch


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    group_n: int = 8

    def shared_bytes(self, elem_bytes: int) -> int:
        """Shared memory of the pipelined operand tiles (what the compiler reports, give or take
        its epilogue scratch): stages x (BLOCK_N + BLOCK_V) x BLOCK_H elements."""
        return self.num_stages * (self.block_n + self.block_v) * self.block_h * elem_bytes

    def launch(self) -> dict:
        """The constexpr and launch keywords of a kernel call."""
        return dict(BLOCK_N=self.block_n, BLOCK_V=self.block_v, BLOCK_H=self.block_h, num_warps=self.num_warps,
                    num_stages=self.num_stages)


DEFAULT = TileConfig(64, 64, 32, 4, 2)

# Max dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (compute capability major * 10 + minor) -> {"half" (bf16 / fp16 operands) | "fp32": [configs]}.
TABLE: dict[int, dict[str, list[TileConfig]]] = {
    90: {"half": [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 64, 64, 4, 3), DEFAULT],
         "fp32": [TileConfig(128, 64, 32, 8, 3), TileConfig(64, 64, 32, 4, 3), DEFAULT]},
    80: {"half": [TileConfig(128, 128, 32, 8, 3), TileConfig(128, 64, 64, 4, 3), DEFAULT],
         "fp32": [TileConfig(64, 128, 32, 8, 3), TileConfig(64, 64, 32, 4, 3), DEFAULT]},
    86: {"half": [TileConfig(64, 128, 64, 4, 3), TileConfig(128, 64, 32, 4, 3), DEFAULT],
         "fp32": [TileConfig(64, 64, 32, 4, 3), DEFAULT]},
}
TABLE[89] = TABLE[86]  # Ada's consumer parts share Ampere consumer's 99 KiB limit


def architecture(device: torch.device) -> int:
    """The TABLE key for a CUDA device (0 when no listed architecture is at or below it)."""
    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor
    # Closest known architecture at or below this one (sm_87 -> 86, sm_120 -> 90, ...).
    known = [a for a in TABLE if a <= arch]
    return max(known) if known else 0


FP32_DOT_CHOICES = ("tf32x3", "ieee")


def dot_precision(device: torch.device, dtype: torch.dtype) -> str:
    """`tl.dot` input precision for `dtype` operands on `device` (`arch_dot_precision` of its
    architecture; "ieee" off CUDA: the interpreter, whose dots are IEEE anyway)."""
    return arch_dot_precision(architecture(device) if device.type == "cuda" else 0, dtype)


def arch_dot_precision(arch: int, dtype: torch.dtype) -> str:
    """`tl.dot` input precision on TABLE architecture `arch` (0: none listed): "tf32x3" for fp32 on
    sm80+ (unless SGSD_TRITON_FP32_DOT=ieee), else "ieee" (half products are exact; fp64). Also what
    the ahead-of-time compile check builds for each architecture."""
    if dtype != torch.float32 or arch < 80:
        return "ieee"
    choice = os.environ.get("SGSD_TRITON_FP32_DOT", "tf32x3")
    if choice not in FP32_DOT_CHOICES:
        raise ValueError(f"SGSD_TRITON_FP32_DOT: expected one of {FP32_DOT_CHOICES}, got {choice!r}")
    return choice


def operand_class(dtype: torch.dtype) -> str | None:
    """"half" or "fp32"; None for float64 (no tensor-core dot: the default tile)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "half"
    return "fp32" if dtype == torch.float32 else None


def tile_config(device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The configuration the kernels launch with for `dtype` operands on `device`."""
    cls = operand_class(dtype)
    if device.type != "cuda" or cls is None:
        return DEFAULT
    arch = architecture(device)
    return TABLE[arch][cls][0] if arch in TABLE else DEFAULT
