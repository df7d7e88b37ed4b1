"""The measured GEMM-time profile behind the wave-aware split (tw/schedule/split.py): one layer's four GEMMs
(QKV, o_proj, gate_up, down of this rank's shard) timed at M rows on the GPU, cached per M in a JSON
file keyed by GPU, model and TP shard (experiments/tuned/), so a model is profiled once in seconds.

A loaded profile (held=(k_attn, k_mlp), targets=(t_attn, t_mlp)) times the GEMMs as tokenweave runs
them: the attention GEMMs (qkv, o_proj) beside k_attn held SMs with SM-count target t_attn, the MLP
GEMMs (gate_up, down) beside k_mlp held SMs with target t_mlp (tw/bench.hold_sms: the comm kernel's SM
share, without its memory traffic). The unloaded profile has all 132 SMs free.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tw.schedule.tuned import TUNED_DIR


class GemmProfile:
    """Measured time (ms) of one layer's four GEMMs at M rows, cached per M.

    How it measures (`prefetch`): random inputs; the GPU is first kept busy for `warm_s` seconds so
    its clocks settle; then every requested M is timed once per round over `rounds` rounds, in
    ascending order in even rounds and descending in odd ones, and each M keeps its median. With 4
    rounds a drift that is linear in time shifts every M's median by the same amount (the middle two
    of an M's four timings sit at positions that add up to the same total for every M), so it cannot
    favour any split. Measured one M after another instead, the first few points of
    a 4K profile ran at ~770 TFLOP/s and the rest at 660-725 (clocks falling under sustained load), and
    the rule preferred the split whose GEMMs happened to be timed first (1664 of 4096: 4.7% slower end
    to end than the best point; experiments/NOTES.md)."""

    def __init__(self, model, path: Path | None = None, iters: int = 10, rounds: int = 4, warm_s: float = 1.0,
                 held: tuple = (0, 0), targets: tuple = (None, None)):
        self.model, self.iters, self.rounds, self.warm_s = model, iters, rounds, warm_s
        self.held, self.targets = tuple(int(k) for k in held), tuple(targets)
        gpu = model.world.gpu_tag
        # "method" is part of the key: profiles taken another way (zero inputs, one M after another)
        # are re-measured.
        self.key = {"gpu": gpu, "model": model.cfg.name, "tp": model.shard.tp,
                    "method": "random-inputs-warm-roundrobin-median"}
        load = ""
        if self.loaded:
            self.key.update(held=list(self.held), targets=list(self.targets))
            load = f"-held{self.held[0]}-{self.held[1]}-target{self.targets[0]}-{self.targets[1]}"
        self.path = path or TUNED_DIR / f"gemm-profile-{model.cfg.name}-tp{model.shard.tp}{load}-{gpu}.json"
        self.ms = {}
        self._filled = False
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if all(data.get(k) == v for k, v in self.key.items()):
                self.ms = {int(m): t for m, t in data["gemm_ms"].items()}

    @property
    def loaded(self) -> bool:
        return any(self.held) or any(t is not None for t in self.targets)

    def __call__(self, m: int) -> float:
        if m not in self.ms:
            self.prefetch([m])
        return self.ms[m]

    def prefetch(self, ms) -> None:
        """Measure every M of `ms` not yet known, together (see the class docstring)."""
        todo = sorted(set(int(m) for m in ms) - set(self.ms))
        if not todo:
            return
        self._warm_up(max(todo))
        times = {m: [] for m in todo}
        for r in range(self.rounds):
            for m in (todo if r % 2 == 0 else todo[::-1]):
                times[m].append(self._time(m))
        self.ms.update({m: float(np.median(t)) for m, t in times.items()})

    def _warm_up(self, m: int) -> None:
        import time
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.warm_s:
            self._time(m)

    def _time(self, m: int) -> float:
        """Median ms of `iters` runs of the four GEMMs at M = m rows."""
        import cupy as cp
        from tw.measure import bench
        from tw.model.layers import layer_gemms
        if not self._filled:
            fill_random(self.model.ws, ("x", "attn", "act"))
            if self.model.ws.moe is not None:
                fill_random(self.model.ws.moe, ("xs", "act"))
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._filled = True
        if not self.loaded:
            gemms, _ = layer_gemms(self.model, m, self._stream)
            return float(np.median(bench.time_gpu(gemms, self.iters, 3, self._stream)))
        attn, mlp = block_gemms(self.model, m, self._stream)
        return sum(self._time_beside(fn, k, t) for fn, k, t in zip((attn, mlp), self.held, self.targets))

    def _time_beside(self, gemms, held: int, target) -> float:
        """ms of one call of gemms() with `held` SMs held beside it and SM-count target `target`: the
        holder starts first (the GEMMs wait 0.3 ms behind a hold on their stream) and outlasts them."""
        import cupy as cp
        from tw.measure import bench
        if not hasattr(self, "_side"):
            self._side = cp.cuda.Stream(non_blocking=True)
        ev = (cp.cuda.Event(), cp.cuda.Event())

        def sample(us):
            cp.cuda.Device().synchronize()
            if held:
                bench.hold_sms(self._side, held, us)
            bench.hold(self._stream, 300)
            ev[0].record(self._stream)
            for _ in range(self.iters):
                gemms(target)
            ev[1].record(self._stream)
            ev[1].synchronize()
            return cp.cuda.get_elapsed_time(*ev) / self.iters

        rough = sample(0)                           # also the warm-up of this shape
        return float(np.median([sample(300 + 2.5e3 * rough * self.iters) for _ in range(3)]))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.key, "gemm_ms": {str(k): v for k, v in sorted(self.ms.items())}},
                                        indent=1))


def block_gemms(model, num_tokens: int, stream=None):
    """(attention GEMMs, MLP GEMMs) of layer 0 on rows [0, num_tokens), as two launch functions of an
    SM-count target, fn(sm_target=None) (an MoE layer's MLP GEMMs: every expert's at balanced row counts,
    tw/model/layers.mlp_gemms)."""
    from tw import ops
    from tw.model.layers import mlp_gemms
    w, ws, r = model.layers[0], model.ws, slice(0, num_tokens)

    def attn(sm_target=None):
        ops.linear(ws.x[r], w.wqkv, ws.qkv[r], stream, sm_target)
        ops.linear(ws.attn[r], w.wo, ws.residual[r], stream, sm_target)

    return attn, mlp_gemms(model, num_tokens, stream)[0]


def fill_random(ws, names) -> None:
    """Fill workspace buffers with N(0, 1) bf16: GEMMs timed on a fresh model's zeros run faster than
    on real data (zeros draw less power; 723-893 TFLOP/s was seen in a zero-input profile)."""
    import cupy as cp
    for name in names:
        buf = getattr(ws, name)
        buf[...] = cp.random.standard_normal(buf.shape, dtype=cp.float32).astype(buf.dtype)
    cp.cuda.Device().synchronize()
