"""Loads the compiled extension `sgsd_fast._C` once and explains how to build it when absent."""
from __future__ import annotations

import functools

import torch  # noqa: F401  (libc10 must be loaded before the extension)


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import sgsd_fast._C (which registers torch.ops.sgsd_fast.*) or raise a helpful error."""
    try:
        from sgsd_fast import _C  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "The sgsd_fast C++ extension (sgsd_fast._C) is not built, so backend='cpu' is unavailable. "
            "Build it with torch installed: `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace` in a checkout). "
            "backend='reference' needs no extension."
        ) from err
    return _C
