"""Compile the Triton log-prob kernels ahead of time for each GPU architecture, no GPU needed.

For every architecture of `sgsd_fast.ops.triton.configs.TABLE`, every operand dtype and every tile
configuration listed for it, both kernels (the online-softmax forward and the dz recompute) are
compiled by Triton for that target (`triton.compile` with a `GPUTarget`, Triton's bundled ptxas)
and the shared memory the compiled kernel needs is compared with the architecture's per-block
limit. Prints one JSON object per line; exits non-zero if any compile fails or does not fit.

    python -m benchmarks.triton_aot               # everything (~1-2 min on 2 cores)
    python -m benchmarks.triton_aot --first-only  # the configuration each arch launches with

Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions it compiles).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _signature(kernel, constexprs: dict, dtype: str) -> dict:
    ptr = f"*{dtype}"
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            # targets are int64; per-row statistics and gradients fp32; dz in the input dtype for
            # half inputs (every table architecture is sm80+: `lowp_dz`), else fp32
            types[name] = ("*i64" if name == "tgt_ptr" else ptr if name in ("h_ptr", "w_ptr", "dz_ptr") else "*fp32")
        elif name == "inv_temp":
            types[name] = "fp32"
        else:
            types[name] = "i64"
    return types


def compile_all(first_only: bool) -> list[dict]:
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sgsd_fast.ops.triton import configs, logprobs

    out = []
    for arch, classes in sorted(configs.TABLE.items()):
        for cls, entries in classes.items():
            dtype = "bf16" if cls == "half" else "fp32"
            for rank, cfg in enumerate(entries[:1] if first_only else entries):
                for kernel, extra in ((logprobs._forward_kernel, {"WITH_ENTROPY": True}),
                                      (logprobs._dlogits_kernel, {"GROUP_N": cfg.group_n})):
                    precision = configs.arch_dot_precision(arch, torch.bfloat16 if cls == "half" else torch.float32)
                    constexprs = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                                      ACC_DTYPE=tl.float32, DOT_PRECISION=precision,
                                      UPCAST_OPERANDS=False, **extra)
                    rec = dict(arch=f"sm_{arch}", dtype=dtype, kernel=kernel.fn.__name__, rank=rank,
                               precision=precision,
                               tile=[cfg.block_n, cfg.block_v, cfg.block_h], num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages, limit=configs.SHARED_MEMORY_LIMIT[arch])
                    t0 = time.perf_counter()
                    try:
                        src = ASTSource(kernel, _signature(kernel, constexprs, dtype), constexprs)
                        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                        rec.update(shared=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]),
                                   ok=compiled.metadata.shared <= rec["limit"])
                    except Exception as err:  # noqa: BLE001 - reported per configuration
                        rec.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
                    rec["seconds"] = round(time.perf_counter() - t0, 2)
                    out.append(rec)
                    print(json.dumps(rec), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-only", action="store_true", help="only the configuration each arch launches with")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_aot: unset TRITON_INTERPRET (the interpreter cannot compile for a GPU)", file=sys.stderr)
        return 2
    return 0 if all(r["ok"] for r in compile_all(args.first_only)) else 1


if __name__ == "__main__":
    sys.exit(main())
