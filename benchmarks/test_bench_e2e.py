"""One SGSD optimizer step (K teachers, student pass, loss, AdamW) on a tiny random Llama: ours vs naive."""
import pytest
import torch

from sgsd_fast.bench import e2e, measure

CFG = e2e.E2EConfig("tiny-llama", k=8)
T = 64


@pytest.mark.parametrize("impl", ["ours", "naive"])
def test_e2e_step(benchmark, impl):
    device = torch.device("cpu")  # the Qwen3-1.7B step on a GPU is the gpu-e2e preset
    bench = e2e.StepBench(CFG, impl, device)
    batch = bench.batch(T)
    fn = lambda: bench.call(batch)  # noqa: E731
    benchmark.group = f"e2e step tiny-llama K={CFG.k} T={T}"
    benchmark.extra_info["peak_mib"] = measure.peak_mib(fn, device)
    benchmark.pedantic(fn, rounds=2, warmup_rounds=1)
