"""The CUDA driver API through cuda.bindings (cuda-python): one binding and one error style for every
caller (CUDA graphs, the copy-engine transport, the multimem transport).

Nothing here imports cuda.bindings until a call needs it: importing tw never touches a GPU, and the
multimem transport refuses (rule: no multicast on the lab machines) before any driver import.
"""
from __future__ import annotations


def api():
    """The cuda.bindings driver module."""
    from cuda.bindings import driver
    return driver


def check(result, what: str = "CUDA driver call"):
    """cuda.bindings returns (CUresult, *values): raise with the error's name unless CUDA_SUCCESS; return
    the one value, the values as a list, or None."""
    err, *vals = result
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"{what} failed: {name} ({int(err)})")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals
