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


def choose(num_tokens: int, gemm_ms, grid: int = GRID, window: float = WINDOW) -> int:
    """The split point minimizing gemm_ms(s) + gemm_ms(T - s) over the candidates."""
    half = num_tokens / 2
    return min(candidates(num_tokens, grid, window),
               key=lambda s: (round(gemm_ms(s) + gemm_ms(num_tokens - s), 6), abs(s - half)))


class GemmProfile:
    """Measured time (ms) of one layer's four GEMMs at M rows (median of `iters`, random inputs),
    measured on demand and cached."""

    def __init__(self, model, path: Path | None = None, iters: int = 10):
        from .results import gpu_info
        self.model, self.iters = model, iters
        gpu = gpu_info()["gpu"].replace(" ", "_")
        # "method" is part of the key: profiles taken another way (e.g. on zero inputs) are re-measured.
        self.key = {"gpu": gpu, "model": model.cfg.name, "tp": model.shard.tp, "method": "random-inputs-median"}
        self.path = path or TUNED_DIR / f"gemm-profile-{model.cfg.name}-tp{model.shard.tp}-{gpu}.json"
        self.ms = {}
        self._filled = False
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if all(data.get(k) == v for k, v in self.key.items()):
                self.ms = {int(m): t for m, t in data["gemm_ms"].items()}

    def __call__(self, m: int) -> float:
        if m not in self.ms:
            self.ms[m] = self._measure(m)
        return self.ms[m]

    def _measure(self, m: int) -> float:
        import cupy as cp
        from . import bench
        from .layers import layer_gemms
        if not self._filled:
            fill_random(self.model.ws, ("x", "attn", "act"))
            self._filled = True
        stream = cp.cuda.Stream(non_blocking=True)
        gemms, _ = layer_gemms(self.model, m, stream)
        return float(np.median(bench.time_gpu(gemms, self.iters, 3, stream)))

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
        s = choose(num_tokens, profile) if world.tp_rank == 0 else None
        return world.tp_comm.bcast(s, root=0)

    wave.profile = profile
    return wave


def load_tuned(model_name: str, tp: int, gpu: str) -> dict:
    """experiments/tune.py's choices {tokens: {split_at, ctas_attn, ctas_mlp, ...}} for this setting, or {}."""
    path = TUNED_DIR / f"tokenweave-{model_name}-tp{tp}-{gpu.replace(' ', '_')}.json"
    if not path.exists():
        return {}
    return {int(t): v for t, v in json.loads(path.read_text()).get("tokens", {}).items()}
