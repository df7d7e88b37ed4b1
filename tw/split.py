"""Where to split a batch into TokenWeave's halves A = [0, s) and B = [s, T).

A GEMM of M rows runs in ceil(tiles / SMs) waves, so its time is a staircase in M, and two GEMMs of
T/2 rows can cost more than one of T rows. The wave-aware split measures the layer's four GEMMs
(QKV, o_proj, gate_up, down of this rank's shard) at the candidate sizes and picks, among split points
on a 64-token grid within +-10% of T/2, the one with the least predicted cost g(s) + g(T - s) (ties:
closest to T/2). Measurements are cached per M in a JSON file keyed by GPU, model and TP
(experiments/tuned/), so a model is tuned once in seconds, not searched end to end.

All ranks must use the same split: rank 0 decides and broadcasts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GRID = 64
WINDOW = 0.10
TUNED_DIR = Path(__file__).resolve().parent.parent / "experiments" / "tuned"


def naive(num_tokens: int) -> int:
    return num_tokens // 2


def candidates(num_tokens: int, grid: int = GRID, window: float = WINDOW) -> list[int]:
    lo, hi = int(num_tokens * (0.5 - window)), int(num_tokens * (0.5 + window))
    c = [s for s in range(-(-lo // grid) * grid, hi + 1, grid) if 0 < s < num_tokens]
    return c or [naive(num_tokens)]


def ranked(num_tokens: int, gemm_ms, grid: int = GRID, window: float = WINDOW) -> list[int]:
    """The candidates, cheapest predicted gemm_ms(s) + gemm_ms(T - s) first (ties: closest to T/2)."""
    half = num_tokens / 2
    return sorted(candidates(num_tokens, grid, window),
                  key=lambda s: (round(gemm_ms(s) + gemm_ms(num_tokens - s), 6), abs(s - half)))


def choose(num_tokens: int, gemm_ms, grid: int = GRID, window: float = WINDOW) -> int:
    """The split point minimizing gemm_ms(s) + gemm_ms(T - s) over the candidates."""
    return ranked(num_tokens, gemm_ms, grid, window)[0]


def wave_split(num_tokens: int, profile, grid: int = GRID, window: float = WINDOW) -> int:
    """choose() on a profile whose points are measured together first (GemmProfile.prefetch)."""
    return wave_shortlist(num_tokens, profile, 1, grid, window)[0]


def wave_shortlist(num_tokens: int, profile, top: int, grid: int = GRID, window: float = WINDOW) -> list[int]:
    """The `top` best-predicted split points, best first (for an end-to-end check: experiments/tune.py)."""
    if top < 1:
        raise ValueError(f"a shortlist needs at least 1 split point, got top={top}")
    c = candidates(num_tokens, grid, window)
    profile.prefetch(sorted(set(c) | {num_tokens - s for s in c}))
    return ranked(num_tokens, profile, grid, window)[:top]


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

    def __init__(self, model, path: Path | None = None, iters: int = 10, rounds: int = 4, warm_s: float = 1.0):
        from .results import gpu_info
        self.model, self.iters, self.rounds, self.warm_s = model, iters, rounds, warm_s
        gpu = gpu_info()["gpu"].replace(" ", "_")
        # "method" is part of the key: profiles taken another way (zero inputs, one M after another)
        # are re-measured.
        self.key = {"gpu": gpu, "model": model.cfg.name, "tp": model.shard.tp,
                    "method": "random-inputs-warm-roundrobin-median"}
        self.path = path or TUNED_DIR / f"gemm-profile-{model.cfg.name}-tp{model.shard.tp}-{gpu}.json"
        self.ms = {}
        self._filled = False
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if all(data.get(k) == v for k, v in self.key.items()):
                self.ms = {int(m): t for m, t in data["gemm_ms"].items()}

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
        from . import bench
        from .layers import layer_gemms
        if not self._filled:
            fill_random(self.model.ws, ("x", "attn", "act"))
            self._stream = cp.cuda.Stream(non_blocking=True)
            self._filled = True
        gemms, _ = layer_gemms(self.model, m, self._stream)
        return float(np.median(bench.time_gpu(gemms, self.iters, 3, self._stream)))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.key, "gemm_ms": {str(k): v for k, v in sorted(self.ms.items())}},
                                        indent=1))


def fill_random(ws, names) -> None:
    """Fill workspace buffers with N(0, 1) bf16: GEMMs timed on a fresh model's zeros run faster than
    on real data (zeros draw less power; 723-893 TFLOP/s was seen in a zero-input profile)."""
    import cupy as cp
    for name in names:
        buf = getattr(ws, name)
        buf[...] = cp.random.standard_normal(buf.shape, dtype=cp.float32).astype(buf.dtype)
    cp.cuda.Device().synchronize()


def split_function(kind: str, model, world, profile: GemmProfile | None = None):
    """T -> split point, identical on every rank. kind: "naive" or "wave" (CPU: wave == naive)."""
    if kind == "naive" or not world.is_gpu:
        return naive
    if kind != "wave":
        raise ValueError(f"split must be naive or wave, got {kind!r}")
    profile = profile or GemmProfile(model)

    def wave(num_tokens: int) -> int:
        s = wave_split(num_tokens, profile) if world.tp_rank == 0 else None
        return world.tp_comm.bcast(s, root=0)

    wave.profile = profile
    return wave


def tuned_tag(model_name: str, tp: int, gpu: str, shard_as_tp: int | None = None) -> str:
    """The key of a tuned setting: model, TP, emulated shard size (--shard-as-tp) and GPU. Choices tuned
    for one shard size do not carry over to another: the GEMM shapes and the comm/compute ratio differ."""
    shard = f"-shard{shard_as_tp}" if shard_as_tp and shard_as_tp != tp else ""
    return f"{model_name}-tp{tp}{shard}-{gpu.replace(' ', '_')}"


def load_tuned(model_name: str, tp: int, gpu: str, shard_as_tp: int | None = None) -> dict:
    """experiments/tune.py's choices {tokens: {split_at, ctas_attn, ctas_mlp, ...}} for this setting, or {}."""
    path = TUNED_DIR / f"tokenweave-{tuned_tag(model_name, tp, gpu, shard_as_tp)}.json"
    if not path.exists():
        return {}
    return {int(t): v for t, v in json.loads(path.read_text()).get("tokens", {}).items()}
