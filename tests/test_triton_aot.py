"""Every tile configuration of the architecture table compiles ahead of time for its GPU and fits its
shared memory (benchmarks/triton_aot.py, in a subprocess: the suite runs Triton in interpreter mode,
which cannot compile). Needs no GPU: Triton compiles for a named target with its bundled ptxas."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _ptxas_present() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_present(), reason="this triton build ships no ptxas (no CUDA backend)")
def test_every_table_configuration_compiles_for_its_architecture():
    from sgsd_fast.ops.triton import configs

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.triton_aot"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    expected = 2 * sum(len(entries) for arch in configs.TABLE.values() for entries in arch.values())
    assert len(records) == expected, proc.stderr[-2000:]
    bad = [r for r in records if not r["ok"]]
    assert not bad and proc.returncode == 0, bad
    assert {r["arch"] for r in records} == {"sm_80", "sm_86", "sm_89", "sm_90"}
    assert all(0 < r["shared"] <= r["limit"] and r["cubin_bytes"] > 0 for r in records)
