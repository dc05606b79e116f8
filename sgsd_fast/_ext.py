"""The C++ CPU kernels (torch.ops.sgsd_fast.*): found prebuilt, compiled once on first use, or absent.

Three tiers, so that every way of installing works:

1. ``sgsd_fast._C``, built by ``setup.py`` when torch was importable in the build environment
   (``pip install --no-build-isolation .``, ``make install``).
2. Otherwise (a plain ``pip install .`` builds in an isolated environment without torch) the
   sources shipped in ``sgsd_fast/csrc`` are compiled on first CPU use with
   `torch.utils.cpp_extension.load` into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
   default ``~/.cache/torch_extensions``), printing one line while it compiles; later processes
   load the cached build (torch rebuilds it when the sources or the torch version change).
3. If that fails too (no C++ compiler, no ninja), `load_extension` returns False and warns once:
   ``backend="auto"`` then runs the naive PyTorch reference on CPU (same results, but it
   materializes the N x V logits), and ``backend="cpu"`` raises with the reason.

GPU users never need the extension: CUDA tensors take the Triton path.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import sys
import warnings

import torch  # noqa: F401  (libc10 must be loaded before the extension)

#: Name of the just-in-time build in torch's extension cache.
JIT_NAME = "sgsd_fast_cpu_ops"
CSRC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

_failure: str | None = None


def _compile() -> None:
    """Build the CPU kernels from sgsd_fast/csrc with torch's JIT builder (cached across processes)."""
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no C++ sources in {CSRC_DIR}")
    if not _cached_build_exists():
        print("sgsd_fast: compiling the C++ CPU kernels once (minutes on a busy machine; cached in "
              "torch's extension cache) ...", file=sys.stderr, flush=True)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    load(JIT_NAME, sources, extra_cflags=["-O3", *openmp, f"-DSGSD_HEADERS={_headers_digest()}"],
         extra_ldflags=openmp, verbose=False)


def _headers_digest() -> str:
    """A digest of csrc/*.h. torch's JIT cache key hashes the .cpp sources and the flags, not the
    headers they include: this flag makes an edited header (a new release's row_math.h) rebuild."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC_DIR, "*.h"))):
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def _cached_build_exists() -> bool:
    """Whether torch's extension cache already holds a build (then `load` only checks and imports it).
    Uses torch's private cache-path helper; if that ever moves, the message is simply always shown."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.isfile(os.path.join(_get_build_directory(JIT_NAME, verbose=False), f"{JIT_NAME}.so"))
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def load_extension() -> bool:
    """Make torch.ops.sgsd_fast.* available; False (with one warning) when the kernels cannot be had."""
    global _failure
    try:
        from sgsd_fast import _C  # noqa: F401
        return True
    except ImportError:
        pass
    try:
        _compile()
        return True
    except Exception as err:  # any build failure (compiler, ninja, headers) means: use the fallback
        _failure = " ".join(str(err).split())[:300] or type(err).__name__
        warnings.warn(f"sgsd_fast: the C++ CPU kernels are unavailable ({_failure}); CPU tensors use the "
                      "pure-PyTorch reference ops instead (same results, more memory: they materialize the "
                      "tokens x vocab logits). Install a C++ compiler, or torch before "
                      "`pip install --no-build-isolation .`, to get the fused CPU kernels.", RuntimeWarning,
                      stacklevel=3)
        return False


def require_extension() -> None:
    """Raise RuntimeError saying why, if the CPU kernels are unavailable (backend='cpu' was asked for)."""
    if not load_extension():
        raise RuntimeError(f"backend='cpu' needs the sgsd_fast C++ CPU kernels, which could not be built "
                           f"({_failure}); use backend='reference' (or 'auto'), or install a C++ compiler")
