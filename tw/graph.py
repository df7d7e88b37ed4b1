"""CUDA graphs that keep per-kernel stream priorities.

TokenWeave runs each half's fused AllReduce + norm on a high-priority stream so that, when a GEMM's
CTAs retire, the comm kernel's CTAs are scheduled first. Stream capture records every kernel node with
the priority of the stream it was captured from, but a graph instantiated with flags 0 (what CuPy's
`Stream.end_capture()` does) replays ALL its kernels at the priority of the stream it is launched
into: the comm kernels lose their priority and wait behind the GEMMs' queued CTAs. The CUDA driver
documents the fix: instantiate with CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY ("use the
priorities from the per-node attributes rather than the priority of the launch stream"; kernel node
priorities "are copied from stream priority during stream capture"). CuPy does not expose that flag,
so capture, instantiation and launch go through the driver API (libcuda) with ctypes here.

    g = Graph(lambda: strategy.forward(plan, stream), stream)   # one eager call, then capture
    g()                                                          # replay on `stream`

Everything fn touches must be allocated before capture (tw preallocates all buffers) and stay
allocated while the graph lives: the graph keeps fn (and so whatever its closure holds, e.g. a
prepared plan's device arrays) alive; without that, memory freed to CuPy's pool and reused by the
next plan made replays read stale metadata (an illegal address in experiments/tune.py).
"""
from __future__ import annotations

import ctypes

CAPTURE_MODE_RELAXED = 2         # CU_STREAM_CAPTURE_MODE_RELAXED
INSTANTIATE_USE_NODE_PRIORITY = 8  # CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY

_lib = None


def _driver():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libcuda.so.1")
        p, pp = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        for name, args in (("cuStreamBeginCapture_v2", [p, ctypes.c_int]), ("cuStreamEndCapture", [p, pp]),
                           ("cuGraphInstantiateWithFlags", [pp, p, ctypes.c_ulonglong]),
                           ("cuGraphUpload", [p, p]), ("cuGraphLaunch", [p, p]),
                           ("cuGraphExecDestroy", [p]), ("cuGraphDestroy", [p]),
                           ("cuGetErrorString", [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _lib = lib
    return _lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA driver error {rc} ({(msg.value or b'?').decode()})")


class Graph:
    """CUDA graph of fn() captured on `stream` (work on other streams joins through events); call it to
    replay. node_priority=False instantiates with flags 0 instead (every kernel at the launch stream's
    priority, as CuPy's own graphs): kept to measure what the priorities are worth."""

    def __init__(self, fn, stream, node_priority: bool = True):
        lib = _driver()
        self.stream, self.fn, self.node_priority = stream, fn, node_priority
        with stream:
            fn()  # one eager call first: compiles/loads kernels, creates handles outside capture
        stream.synchronize()
        s = ctypes.c_void_p(stream.ptr)
        _check(lib.cuStreamBeginCapture_v2(s, CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            with stream:
                fn()
        except BaseException:
            if lib.cuStreamEndCapture(s, ctypes.byref(graph)) == 0 and graph.value:
                lib.cuGraphDestroy(graph)
            raise
        _check(lib.cuStreamEndCapture(s, ctypes.byref(graph)), "cuStreamEndCapture")
        self._exec = ctypes.c_void_p()
        try:
            flags = INSTANTIATE_USE_NODE_PRIORITY if node_priority else 0
            _check(lib.cuGraphInstantiateWithFlags(ctypes.byref(self._exec), graph, flags), "cuGraphInstantiate")
        finally:
            lib.cuGraphDestroy(graph)  # the executable graph does not need it
        _check(lib.cuGraphUpload(self._exec, s), "cuGraphUpload")

    def __call__(self):
        _check(_driver().cuGraphLaunch(self._exec, ctypes.c_void_p(self.stream.ptr)), "cuGraphLaunch")

    def __del__(self):
        if getattr(self, "_exec", None) and self._exec.value and _lib is not None:
            _lib.cuGraphExecDestroy(self._exec)
