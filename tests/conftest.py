import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct GGUF, loaded once per test session (~25 s).

    Shared by every test that needs the real model; tests must not modify its weights in place
    (deep-copy it first if a test trains it).
    """
    from sgsd_fast.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2", dtype="float32", device="cpu")
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for the requesting test module, restored afterwards.

    Tests with tiny shapes or short decodes are latency-bound: on a 2-core machine shared with
    other jobs, OpenMP barrier waits on a descheduled peer made them 8-100x slower with 2 threads.
    Modules that exercise the parallel paths on purpose do not request it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=[
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
    pytest.param("cpu", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton runs CPU tensors only under TRITON_INTERPRET=1 (set above when CUDA is absent)")),
])
def triton_device(request):
    """The device of a Triton kernel test: CUDA tensors (marked `cuda`) where a GPU is present, else
    CPU tensors through the interpreter. Exactly one of the two runs on any host, so the same test
    body checks the compiled kernels on a GPU and the same math on a CPU-only machine."""
    return torch.device(request.param)
