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
