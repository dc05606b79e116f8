"""benchmarks/gpu_check.sh keeps its total time limit and always leaves its summary.

The script's GPU stages cannot run here; what can be checked without a GPU is the bookkeeping a
15-minute device lease depends on: a stage never gets more than what is left of the total
(SGSD_GPU_CHECK_SECONDS), stages past the total are reported as skipped failures rather than run,
the summary `gpu_check.md` is written either way, and the exit status says that stages failed.
The full dry run (SGSD_BENCH_DRYRUN=1, ~70 s) is exercised by hand, not here.
"""
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, **env):
    full = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def test_total_limit_caps_and_skips_stages(tmp_path):
    proc = _run(tmp_path, SGSD_BENCH_DRYRUN="1", SGSD_GPU_CHECK_SECONDS="3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    # The first stage's own limit (80 s) is cut to what is left of the 3 s total.
    assert re.search(r"== cuda tests \(collect only\) \(limit [1-3]s\)", log), log
    summary = (tmp_path / "gpu_check.md").read_text()
    for name in ("bench gpu-e2e", "tile sweep", "plan vs gpu-e2e"):
        assert f"FAILED: {name} (no time left)" in summary, summary


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(torch.cuda.is_available())"]).returncode,
                    reason="CUDA present: the script would run for real")
def test_refuses_without_cuda(tmp_path):
    proc = _run(tmp_path, SGSD_BENCH_DRYRUN="0")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
