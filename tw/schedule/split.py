"""Where to split a batch into TokenWeave's halves A = [0, s) and B = [s, T).

A GEMM of M rows runs in ceil(tiles / SMs) waves, so its time is a staircase in M, and two GEMMs of
T/2 rows can cost more than one of T rows. The wave-aware split measures the layer's four GEMMs
(QKV, o_proj, gate_up, down of this rank's shard) at the candidate sizes and picks, among split points
on a 64-token grid within +-10% of T/2, the one with the least predicted cost g(s) + g(T - s) (ties:
closest to T/2). This module is the pure rule: it takes the GEMM cost as a function of M. The
measured profile (a GPU, cached per M in experiments/tuned/) is tw/schedule/profile.py.

All ranks must use the same split: rank 0 decides and broadcasts.
"""
from __future__ import annotations

GRID = 64
WINDOW = 0.10
# Batches below these token counts run unsplit: the paper's thresholds (dense models: 1024; MoE: 2048,
# where microsoft/tokenweave's published Mixtral numbers show the split losing at 1K).
MIN_SPLIT_TOKENS = {"dense": 1024, "moe": 2048}


def min_split_tokens(cfg) -> int:
    return MIN_SPLIT_TOKENS["moe" if cfg.num_experts else "dense"]


def naive(num_tokens: int) -> int:
    """Half the tokens, rounded down (no grid)."""
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
    """The `top` best-predicted split points, best first (for an end-to-end check: experiments/tune.py).
    profile: M -> ms; if it has prefetch(ms) (tw.schedule.profile.GemmProfile), every needed M is measured
    together first."""
    if top < 1:
        raise ValueError(f"a shortlist needs at least 1 split point, got top={top}")
    c = candidates(num_tokens, grid, window)
    if hasattr(profile, "prefetch"):
        profile.prefetch(sorted(set(c) | {num_tokens - s for s in c}))
    return ranked(num_tokens, profile, grid, window)[:top]


class SplitRule:
    """T -> split point, identical on every rank, decided once per T (a wave pick is rank 0's, broadcast:
    one broadcast per batch size, not per batch).

    source: the rule's name in result rows ("naive": T // 2; "wave": the wave-aware pick on `profile`).
    profile: the wave rule's GEMM cost, M -> ms (tw.schedule.profile.GemmProfile or a wrapper of it);
    None for the naive rule. world: what the wave rule broadcasts over (tp_rank, tp_comm)."""

    def __init__(self, source: str, profile=None, world=None):
        if source not in ("naive", "wave"):
            raise ValueError(f"split rule must be naive or wave, got {source!r}")
        if source == "wave" and (profile is None or world is None):
            raise ValueError("the wave rule needs a GEMM profile and the world to broadcast its pick over")
        self.source, self.profile, self.world = source, (profile if source == "wave" else None), world
        self._known = {}   # {T: split point}

    def __call__(self, num_tokens: int) -> int:
        if num_tokens not in self._known:
            self._known[num_tokens] = self.shortlist(num_tokens, 1)[0]
        return self._known[num_tokens]

    def shortlist(self, num_tokens: int, top: int) -> list[int]:
        """The rule's `top` best-predicted split points, best first, identical on every rank (tune.py
        times them end to end); the naive rule has one."""
        if self.profile is None:
            return [naive(num_tokens)]
        s = wave_shortlist(num_tokens, self.profile, top) if self.world.tp_rank == 0 else None
        return self.world.tp_comm.bcast(s, root=0)


def split_rule(kind: str, model, world, profile=None) -> SplitRule:
    """The SplitRule of `kind`, "naive" or "wave". On the CPU there is no profile to measure, so "wave"
    is the naive rule (its source says so). profile: the wave rule's (default: a GemmProfile of model)."""
    if kind not in ("naive", "wave"):
        raise ValueError(f"split must be naive or wave, got {kind!r}")
    if kind == "naive" or not world.is_gpu:
        return SplitRule("naive")
    if profile is None:
        from tw.schedule.profile import GemmProfile
        profile = GemmProfile(model)
    return SplitRule("wave", profile, world)
