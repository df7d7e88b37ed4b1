"""CUDA graphs that keep per-kernel stream priorities.

TokenWeave runs each half's fused AllReduce + norm on a high-priority stream so that, when a GEMM's
CTAs retire, the comm kernel's CTAs are scheduled first. Stream capture records every kernel node with
the priority of the stream it was captured from, but a graph instantiated with flags 0 (what CuPy's
`Stream.end_capture()` does) replays ALL its kernels at the priority of the stream it is launched
into: the comm kernels lose their priority and wait behind the GEMMs' queued CTAs. The CUDA driver
documents the fix: instantiate with CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY ("use the
priorities from the per-node attributes rather than the priority of the launch stream"; kernel node
priorities "are copied from stream priority during stream capture"). CuPy does not expose that flag,
so capture, instantiation and launch go through the driver API (cuda.bindings, tw/runtime/driver.py).

    g = Graph(lambda: strategy.forward(plan, stream), stream)   # one eager call, then capture
    g()                                                          # replay on `stream`

Everything fn touches must be allocated before capture (tw preallocates all buffers) and stay
allocated while the graph lives: the graph keeps fn (and so whatever its closure holds, e.g. a
prepared plan's device arrays) alive; without that, memory freed to CuPy's pool and reused by the
next plan made replays read stale metadata (an illegal address in experiments/tune.py).
"""
from __future__ import annotations

from tw.runtime import driver


class Graph:
    """CUDA graph of fn() captured on `stream` (work on other streams joins through events); call it to
    replay. node_priority=False instantiates with flags 0 instead (every kernel at the launch stream's
    priority, as CuPy's own graphs): kept to measure what the priorities are worth."""

    def __init__(self, fn, stream, node_priority: bool = True):
        drv = driver.api()
        self.stream, self.fn, self.node_priority = stream, fn, node_priority
        with stream:
            fn()  # one eager call first: compiles/loads kernels, creates handles outside capture
        stream.synchronize()
        self._stream = s = drv.CUstream(stream.ptr)
        driver.check(drv.cuStreamBeginCapture(s, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED),
                     "cuStreamBeginCapture")
        try:
            with stream:
                fn()
        except BaseException:
            err, graph = drv.cuStreamEndCapture(s)
            if int(err) == 0 and graph is not None and int(graph):
                drv.cuGraphDestroy(graph)
            raise
        graph = driver.check(drv.cuStreamEndCapture(s), "cuStreamEndCapture")
        self._exec = None
        try:
            flags = (drv.CUgraphInstantiate_flags.CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
                     if node_priority else 0)
            self._exec = driver.check(drv.cuGraphInstantiate(graph, int(flags)), "cuGraphInstantiate")
        finally:
            drv.cuGraphDestroy(graph)  # the executable graph does not need it
        driver.check(drv.cuGraphUpload(self._exec, s), "cuGraphUpload")
        self._launch = drv.cuGraphLaunch

    def __call__(self):
        driver.check(self._launch(self._exec, self._stream), "cuGraphLaunch")

    def __del__(self):
        if getattr(self, "_exec", None) is not None:
            try:
                driver.api().cuGraphExecDestroy(self._exec)
            except Exception:  # interpreter shutdown: the driver module may be gone
                pass
