"""Smoke test of `sgsd-fast bench`: the CLI runs a preset end to end at tiny shapes and writes results."""
import json

import pytest
import torch

from sgsd_fast.bench import e2e
from sgsd_fast.commands import main


def test_bench_cli_dryrun_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    # The GPU preset shrunk to tiny CPU shapes: the same code path the GPU check runs.
    monkeypatch.setenv("SGSD_BENCH_DRYRUN", "1")
    assert main(["bench", "--preset", "gpu", "--only", "logprobs,sgsd_loss", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "logprobs" in out and "sgsd_loss" in out

    result = json.loads((tmp_path / "gpu.json").read_text())
    by_case = {(r["bench"], r["n"], r["impl"]): r for r in result["records"]}
    for (bench, _, impl), rec in by_case.items():
        if impl in ("ours", "naive"):
            assert rec["status"] == "ok", rec
            assert rec["time_ms"] > 0 and rec["peak_mib"] >= 0
        if impl == "ours":
            assert rec["rel_diff_vs_naive"] < 1e-4, rec
    assert all(r["status"] in ("ok", "skipped") for r in result["records"] if r["impl"] == "cce")
    assert (tmp_path / "gpu.md").exists() and (tmp_path / "gpu.png").exists()


def test_e2e_steps_agree():
    # The fused step (one student pass) and the naive step (one student pass per teacher) are the same loss.
    cfg = e2e.E2EConfig("tiny-llama", k=2, prompt_len=8, teacher_extra=8, vocab_size=1000)
    recs = {r["impl"]: r for r in e2e.run_e2e(cfg, torch.device("cpu"), t=16, budget_bytes=None,
                                               t_range=(16, 16), multiple=16, repeat=1)}
    assert recs["ours"]["status"] == "ok" and recs["naive"]["status"] == "ok", recs
    assert abs(recs["ours"]["loss"] - recs["naive"]["loss"]) <= 1e-4 * max(1.0, abs(recs["naive"]["loss"]))
    assert recs["ours"]["loss"] != 0.0


class _FakeStepBench:
    # fits() of a step whose memory grows with T: only the bisection logic is under test here.
    def __init__(self, limit: int):
        self.limit, self.probed = limit, []

    def fits(self, t: int, budget_bytes: int) -> bool:
        self.probed.append(t)
        return t <= self.limit


def test_max_rollout_bisection():
    fake = _FakeStepBench(limit=700)
    assert e2e.max_rollout(fake, 1, lo=64, hi=4096, multiple=64) == {"max_t": 640, "capped": False,
                                                                     "probes": len(fake.probed)}
    assert all(t % 64 == 0 for t in fake.probed)
    assert e2e.max_rollout(_FakeStepBench(limit=10), 1, lo=64, hi=4096, multiple=64)["max_t"] == 0
    assert e2e.max_rollout(_FakeStepBench(limit=10**6), 1, lo=64, hi=4096, multiple=64)["capped"]


def test_gemm_units_floor_and_executed():
    """Floor units (what any implementation must do) vs what ours executes: the store-free backward
    adds one recompute; the CPU eager forward of a frozen weight does not; the divergence, whose
    gradient is formed in its forward, executes the floor."""
    from sgsd_fast.bench.kernels import KernelSpec
    from sgsd_fast.bench.runner import PEAK_BF16_TFLOPS

    unit = 2.0 * 64 * 100 * 8
    trained, frozen = KernelSpec("logprobs", 64, 8, 100), KernelSpec("logprobs", 64, 8, 100, frozen_weight=True)
    assert trained.gemm_flops() == 3 * unit and frozen.gemm_flops() == 2 * unit
    assert trained.executed_flops("ours", "cpu") == 4 * unit == trained.executed_flops("ours", "cuda")
    assert frozen.executed_flops("ours", "cpu") == 2 * unit and frozen.executed_flops("ours", "cuda") == 3 * unit
    assert trained.executed_flops("naive", "cpu") == 3 * unit
    sgsd, div = KernelSpec("sgsd_loss", 64, 8, 100, k=8), KernelSpec("divergence", 64, 8, 100, k=4)
    assert sgsd.executed_flops("ours", "cuda") == (3 + 8 + 1) * unit
    assert div.executed_flops("ours", "cpu") == div.gemm_flops() == (3 + 4) * unit
    with pytest.raises(ValueError, match="frozen_weight"):
        KernelSpec("divergence", 64, 8, 100, frozen_weight=True)
    # first match wins: the Ti and PCIe variants come before their base names
    names = list(PEAK_BF16_TFLOPS)
    assert names.index("RTX 3090 Ti") < names.index("RTX 3090") and names.index("H100 PCIe") < names.index("H100")
