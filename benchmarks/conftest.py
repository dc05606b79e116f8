"""pytest-benchmark suite: `pytest benchmarks/` (not collected by `pytest` / `make test`).

Each benchmark records, next to pytest-benchmark's timings, the extra peak memory of one call in
`extra_info["peak_mib"]` (method: sgsd_fast.bench.measure). Compare implementations with
`pytest benchmarks/ --benchmark-group-by=param:spec`.
"""
import os

import pytest
import torch

# liger's Triton kernels run on CPU tensors only through the interpreter, chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
