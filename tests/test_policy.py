"""tw/schedule/policy.py: flag > tuned choice > default for tokenweave's split, CTA budgets and SM targets."""
import pytest

from tw.schedule.policy import Decision, Flags, Policy
from tw.schedule.split import SplitRule
from tw.schedule.tuned import TunedChoice

SMS = 132
TUNED = {4096: TunedChoice(1792, 32, 8, sm_target_attn=120, sm_target_mlp=None),
         8192: TunedChoice(None, 16, 16, split=False)}


def policy(**flags) -> Policy:
    return Policy(Flags(**flags), SplitRule("naive"), default_ctas=8, sm_count=SMS, tuned=TUNED)


def test_nothing_given_takes_the_tuned_choice_else_the_defaults():
    p = policy()
    assert p.decide(4096) == Decision(1792, "tuned", 32, 8, 120, None)
    assert p.decide(8192) == Decision(None, "tuned-unsplit")
    assert p.decide(2048) == Decision(1024, "naive", 8, 8, None, None)        # not tuned: the rule, p2p's 8 CTAs
    assert p.decide(1000) == Decision(None, "below-threshold")
    assert p.by_rule(2048) and not p.by_rule(4096) and not p.by_rule(1000)


def test_flags_win_over_the_tuned_choice():
    assert policy(split="naive").decide(4096) == Decision(2048, "naive", 8, 8, None, None)
    # A CTA flag sets the whole tuned choice aside: its split was the fastest at its own budgets.
    assert policy(ctas=16).decide(4096) == Decision(2048, "naive", 16, 16, None, None)
    assert policy(ctas_mlp=4).decide(4096) == Decision(2048, "naive", 8, 4, None, None)
    assert policy(sm_target="left").decide(4096) == Decision(1792, "tuned", 32, 8, SMS - 32, SMS - 8)
    assert policy(sm_target="off").decide(4096) == Decision(1792, "tuned", 32, 8, None, None)
    assert policy(sm_target="left", ctas=16, ctas_mlp=24).decide(2048) == Decision(1024, "naive", 16, 24,
                                                                                  SMS - 16, SMS - 24)
    assert policy(min_split_tokens=4096).decide(2048) == Decision(None, "below-threshold")
    assert policy(min_split_tokens=8192).decide(4096).split_at == 1792   # a tuned choice splits anyway


def test_a_named_tuned_file_stands_beside_a_cta_flag():
    assert policy(ctas=16, tuned_file="x.json").decide(4096) == Decision(1792, "tuned", 32, 8, 120, None)


def test_a_forced_choice_overrides_everything():
    forced = TunedChoice(1000, 4, 2, sm_target_attn=7, extra={"source": "forced"})
    for p in (policy(), policy(split="naive", ctas=16, sm_target="left")):
        assert p.decide(4096, forced) == Decision(1000, "forced", 4, 2, 7, None)
        assert p.decide(100, TunedChoice(None, 4, 2, split=False)) == Decision(None, "tuned-unsplit")


def test_bad_flags_are_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        Flags(split="half")
    with pytest.raises(ValueError, match="sm_target must be one of"):
        Flags(sm_target="tuned-ish")


def test_the_split_rule_remembers_its_answers():
    calls = []

    class Comm:
        def bcast(self, value, root):
            calls.append(value)
            return value

    class World:
        tp_rank, tp_comm = 0, Comm()

    rule = SplitRule("wave", lambda m: -(-m // 128), World())   # a staircase of 128-row tiles
    assert rule(4352) == rule(4352) and len(calls) == 1 and rule.source == "wave"
    assert rule.shortlist(4352, 3)[0] == rule(4352)
    assert SplitRule("naive")(4097) == 2048 and SplitRule("naive").shortlist(4097, 3) == [2048]
    with pytest.raises(ValueError, match="needs a GEMM profile"):
        SplitRule("wave")
