"""Wave-aware split choice on synthetic GEMM-time staircases (no GPU needed)."""
import math

import pytest

from tw.schedule import profile, split


def staircase(wave_rows: int, per_wave_ms: float = 1.0):
    """A GEMM whose time is set by full waves: ceil(M / wave_rows) waves of equal cost."""
    return lambda m: math.ceil(m / wave_rows) * per_wave_ms


def test_candidates_are_on_the_grid_within_the_window():
    c = split.candidates(4096)
    assert all(s % 64 == 0 for s in c) and min(c) >= 0.4 * 4096 and max(c) <= 0.6 * 4096
    assert split.candidates(100) == [50]  # no grid point in the window: fall back to half


def test_wave_split_avoids_a_partial_wave():
    # T = 4352 = 17 waves of 256 rows; halves of 2176 cost 9 + 9 = 18 waves, 2048 + 2304 cost 8 + 9 = 17.
    g = staircase(256)
    s = split.choose(4352, g)
    assert g(s) + g(4352 - s) == 17
    assert g(split.naive(4352)) + g(4352 - split.naive(4352)) == 18


def test_smooth_cost_gives_the_middle():
    assert split.choose(4096, lambda m: 0.01 * m) == 2048


class DriftingProfile(profile.GemmProfile):
    """A GemmProfile whose 'GPU' slows down the longer it runs (clocks falling under load): each timing
    costs 1% more than the one before. The true cost is linear in M, so the true best split is T/2."""

    def __init__(self, rounds=4):
        self.ms, self.rounds, self.warm_s, self.calls = {}, rounds, 0.0, 0

    def _warm_up(self, m):
        pass

    def _time(self, m):
        self.calls += 1
        return 0.01 * m * (1.0 + 0.01 * self.calls)


def test_one_after_another_profiling_is_biased_by_drift():
    # Measured lazily in choose()'s order, the first pair measured looks cheapest: the window's edge wins.
    p = DriftingProfile(rounds=1)
    assert split.choose(4096, p) == min(split.candidates(4096))


def test_prefetched_profile_cancels_a_linear_drift():
    p = DriftingProfile(rounds=4)
    c = split.candidates(4096)
    assert split.wave_split(4096, p) == 2048
    assert set(p.ms) == set(c) | {4096 - x for x in c}  # every point measured in one batch
    assert p.calls == 4 * len(p.ms)                      # each point once per round


def test_ranked_orders_by_predicted_cost_and_shortlist_starts_with_the_rule():
    g = lambda m: 1.0 + 0.001 * m + (0.3 if m % 256 else 0.0)  # noqa: E731  (a staircase: 256-multiples cheap)
    order = split.ranked(4096, g)
    assert sorted(order) == split.candidates(4096)
    costs = [g(s) + g(4096 - s) for s in order]
    assert costs == sorted(costs)
    assert order[0] == split.choose(4096, g) == 2048
    p = DriftingProfile(rounds=4)
    top = split.wave_shortlist(4096, p, 3)
    assert len(top) == 3 and top[0] == split.wave_split(4096, p)
    with pytest.raises(ValueError, match="at least 1"):
        split.wave_shortlist(4096, p, 0)
