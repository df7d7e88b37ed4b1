"""The two-stream schedules' synchronization, checked on the CPU by replaying their event graph."""
import numpy as np
from conftest import run_mpi


def test_tokenweave_and_finegrained_have_no_races():
    proc = run_mpi(2, ["-m", "tests.mpi_sync"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PASS tokenweave" in proc.stdout and "PASS finegrained4" in proc.stdout


class _RegisteredCpuComm:
    """The CPU transport with a registered output, as p2p and ce have: ar_add_norm writes `out` as given,
    so a strategy whose x is bound to output(n) finds its normalized rows there."""

    def __init__(self, inner):
        self.inner, self.name, self.sharded, self.max_tokens = inner, "cpu+out", inner.sharded, inner.max_tokens
        self._out = np.zeros_like(inner.buf)

    def output(self, n):
        return self._out[:n]

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_strategies_bind_x_to_the_transports_registered_output():
    """ws.x is the transport's registered output while a strategy with one runs (no final copy in the
    P2P / CE kernels), the model's own array for one without; the outputs do not depend on it."""
    from types import SimpleNamespace

    from mpi4py import MPI

    from tw.model import config
    from tw.model import batch as batching
    from tw.schedule import strategies as schedules
    from tw.model.model import Model
    world = SimpleNamespace(is_gpu=False, tp_size=1, tp_rank=0, tp_comm=MPI.COMM_SELF, sm_count=0, rank=0)
    model = Model(config.get("tiny", 1), world, 512)
    own = model.ws.x
    b, ids = batching.prefill(300, 100), batching.token_ids(300, 1000, 0)
    plain = {}
    for name in ("fused", "tokenweave"):
        strat = schedules.make(name, model, world, min_split_tokens=64)
        plain[name] = np.array(strat.forward(strat.prepare(b, ids)))
        assert model.ws.x is own
        strat.comm = _RegisteredCpuComm(strat.comm)
        if name == "tokenweave":
            strat.unsplit.comm = strat.comm
        out = strat.forward(strat.prepare(b, ids))
        assert np.shares_memory(out, strat.comm.output(512)) and model.ws.x.base is strat.comm._out
        np.testing.assert_allclose(out, plain[name], rtol=1e-5, atol=1e-5)
        nccl = schedules.make("nccl", model, world)
        nccl.forward(nccl.prepare(b, ids))
        assert model.ws.x is own   # a transport without one: the model's own x again
