"""Fused ops vs the naive materialized baseline and peers, one pytest-benchmark per (shape, impl).

CPU shapes are small (2 shared cores); on a CUDA machine the shapes are the GPU check's
(H=2048, V=151936, bf16). liger runs only on CUDA here: on CPU its Triton kernels go through the
interpreter, whose times say nothing (the `cpu-small` preset times it once at a tiny shape).
"""
import pytest
import torch

from sgsd_fast.bench import kernels, measure

if torch.cuda.is_available():
    _H, _V, _DT, _NS = 2048, 151936, "bfloat16", (4096, 16384)
else:
    _H, _V, _DT, _NS = 64, 8192, "float32", (256, 1024)

SPECS = [kernels.KernelSpec("logprobs", n, _H, _V, dtype=_DT) for n in _NS]
SPECS.append(kernels.KernelSpec("teacher_logprobs", _NS[0], _H, _V, k=8, dtype=_DT))
SPECS += [kernels.KernelSpec("sgsd_loss", _NS[0], _H, _V, k=k, dtype=_DT) for k in (1, 4, 8)]
SPECS += [kernels.KernelSpec("divergence", _NS[0], _H, _V, k=k, kind=kind, dtype=_DT)
          for kind in ("jsd", "fkl") for k in (1, 4)]
IMPLS = {"logprobs": ("ours", "naive", "cce"), "teacher_logprobs": ("ours", "naive"),
         "sgsd_loss": ("ours", "naive"), "divergence": ("ours", "naive", "liger")}
CASES = [pytest.param(s, i, id=f"{s.bench}-{s.kind if s.bench == 'divergence' else ''}N{s.n}-K{s.k}-{i}")
         for s in SPECS for i in IMPLS[s.bench]]


@pytest.mark.parametrize("spec,impl", CASES)
def test_kernel(benchmark, device, spec, impl):
    if impl == "liger" and device.type != "cuda":
        pytest.skip("liger on CPU runs through the Triton interpreter: its time is meaningless")
    try:
        fn = kernels.build(spec, impl, device)
    except kernels.Unavailable as err:
        pytest.skip(str(err))
    benchmark.group = f"{spec.bench} {spec.kind if spec.bench == 'divergence' else ''} N={spec.n} K={spec.k}"
    benchmark.extra_info["peak_mib"] = measure.peak_mib(fn, device)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
