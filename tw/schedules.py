"""The strategies: how one forward pass orders compute and communication.

A strategy is built once per model (`make`), then for each batch:

    plan = strategy.prepare(batch)       # host work: metadata to the device (outside any timing)
    out = strategy.forward(plan, stream) # launches only; returns the final normed hidden states [T, H]

| name        | per row-parallel GEMM                                                     |
|-------------|---------------------------------------------------------------------------|
| nccl        | GEMM -> NCCL all-reduce (all tokens) -> fused add + RMSNorm (all tokens)   |
| nocomm      | the same with the all-reduce removed (upper bound; output not the model's) |
| fused       | GEMM into the registered buffer -> fused AR + add + RMSNorm (1/TP of rows) |

`finegrained` and `tokenweave` (split batches, two streams) slot in as further classes with the same
two methods.
"""
from __future__ import annotations

from dataclasses import dataclass

from .batch import Batch
from .comm.nocomm import NoComm
from .layers import attention_block, mlp_block
from .model import Model

STRATEGIES = ("nccl", "nocomm", "fused")


def make_comm(kind: str, model: Model, world):
    """A transport for the model's hidden size and max tokens: 'nccl', 'p2p' or 'none'."""
    hidden, max_tokens = model.cfg.hidden, model.max_tokens
    if kind == "none":
        return NoComm(world, hidden, max_tokens, model.dtype)
    if not world.is_gpu:
        from .comm.cpu import CpuComm
        return CpuComm(world, hidden, max_tokens, model.dtype)
    if kind == "nccl":
        from .comm.nccl import NcclComm
        return NcclComm(world, hidden, max_tokens, model.dtype)
    if kind == "p2p":
        from .comm.p2p import make_p2p_or_nccl
        return make_p2p_or_nccl(world, hidden, max_tokens)
    raise ValueError(f"unknown transport {kind!r}; expected nccl, p2p or none")


@dataclass
class Plan:
    batch: Batch
    parts: list  # device-side Parts (one for sequential schedules)


class Sequential:
    """Layer after layer on one stream; each row-parallel GEMM feeds comm.ar_add_norm."""

    def __init__(self, name: str, model: Model, comm, sharded: bool, ctas: int | None = None):
        self.name, self.model, self.comm, self.sharded, self.ctas = name, model, comm, sharded, ctas

    def prepare(self, batch: Batch, ids=None) -> Plan:
        self.model.load_prefix(batch)
        return Plan(batch, [self.model.part(batch, ids)])

    def forward(self, plan: Plan, stream=None):
        m, comm, (part,) = self.model, self.comm, plan.parts
        r, eps = part.rows, m.cfg.eps
        x, residual = m.ws.x, m.ws.residual
        m.embed(part, stream)
        for i, w in enumerate(m.layers):
            y = comm.staging(part.offset + part.num_tokens)[r]
            attention_block(m, w, x[r], part, y, stream)
            comm.ar_add_norm(r.start, r.stop, residual, w.post_norm, eps, x, stream, self.sharded, self.ctas)
            mlp_block(m, w, x[r], part, y, stream)
            comm.ar_add_norm(r.start, r.stop, residual, m.norm_weight_after(i), eps, x, stream, self.sharded,
                             self.ctas)
        return x[r]


def make(name: str, model: Model, world, transport: str = "p2p", ctas: int | None = None):
    """Build strategy `name` for `model`. transport: what `fused` uses (p2p, or nccl = RS + norm + AG)."""
    if name == "nccl":
        return Sequential(name, model, make_comm("nccl", model, world), sharded=False)
    if name == "nocomm":
        return Sequential(name, model, make_comm("none", model, world), sharded=False)
    if name == "fused":
        return Sequential(name, model, make_comm(transport, model, world), sharded=True, ctas=ctas)
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
