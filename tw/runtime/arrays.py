"""Array helpers shared by the NumPy and CuPy paths: which array library an array belongs to, a host
copy, and bf16 <-> fp32 on the GPU with integer ops only (CuPy's bfloat16 casts are not used in hot
test code)."""
from __future__ import annotations

import numpy as np


def xp_of(a):
    """numpy for a NumPy array, cupy otherwise (cupy is imported only then)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


def to_host(a) -> np.ndarray:
    """A NumPy array of `a` (a CuPy array is copied to the host; a NumPy array is returned as is)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def f32_from_bf16(x):
    """cupy bf16 -> float32, exact (a bf16 is the top half of a float32)."""
    import cupy as cp
    return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)


def bf16_from_f32(x):
    """cupy float32 -> bf16, rounding to nearest even (finite inputs), as the kernels' __float2bfloat16."""
    import cupy as cp
    bits = x.view(cp.uint32)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits >> 16).astype(cp.uint16).view(cp.dtype("bfloat16"))
