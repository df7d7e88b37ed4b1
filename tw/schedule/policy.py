"""Tokenweave's policy: for a batch of T tokens, the split point, the CTA budgets of the two comms and
the cuBLAS SM-count targets of the GEMMs beside them. Each is decided in `Policy.decide`, and only
there, the same way:

    a flag given explicitly  >  the tuned choice for exactly this setting  >  the default

- split: --split wave / naive > the choice's split_at, or its verdict not to split > the wave rule
  (naive on the CPU); a batch below min_split_tokens runs unsplit unless a choice says otherwise;
- CTA budgets: --ctas / --ctas-mlp > the choice's ctas_attn / ctas_mlp > the transport's own (p2p: 8),
  and ctas_mlp = ctas_attn;
- SM targets: --sm-target left / off > the choice's sm_target_attn / sm_target_mlp > none.

Why a CTA flag sets the whole tuned choice aside (its split too): the tuned split was the fastest at
the tuned budgets, not at others. --tuned-file's choices count as tuned ones, but a file named on the
command line is taken even beside a CTA flag. A forced choice (tune.py's configurations, a test's)
overrides everything, its SM targets included.

TokenWeave.prepare asks `decide` for every batch; experiments/latency.py, throughput.py and tune.py
build the strategy with their flags (tw/schedule/strategies.make) and hand it the tuned choices that
apply (`with_tuned`; experiments/tuned_choices.py reads them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

SPLITS = ("tuned", "wave", "naive")
SM_TARGETS = ("tuned", "left", "off")


@dataclass(frozen=True)
class Flags:
    """The user's word on tokenweave; None and "tuned" mean: not given."""
    split: str = "tuned"            # tuned: the tuned choice, else the wave rule; wave / naive: that rule
    ctas: int | None = None         # CTAs of the comm beside attention
    ctas_mlp: int | None = None     # CTAs of the comm beside the MLP
    sm_target: str = "tuned"        # left: the SMs the comm leaves; off: no target
    min_split_tokens: int = 1024    # smaller batches run unsplit, unless a choice says otherwise
    tuned_file: str | None = None   # the tuned choices come from this file, whatever setting it was tuned for

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.sm_target not in SM_TARGETS:
            raise ValueError(f"sm_target must be one of {SM_TARGETS}, got {self.sm_target!r}")

    @property
    def rule(self) -> str:
        """The split rule where no choice applies: "wave" or "naive"."""
        return "wave" if self.split == "tuned" else self.split

    @property
    def takes_tuned(self) -> bool:
        """Whether tuned choices apply: --split tuned, and no CTA flag (unless --tuned-file named them)."""
        return self.split == "tuned" and (self.tuned_file is not None or (self.ctas is None and self.ctas_mlp is None))


@dataclass(frozen=True)
class Decision:
    """What one batch runs with (TokenWeave.prepare turns it into a Plan)."""
    split_at: int | None            # first token of half B; None: unsplit (the fused kernel alone, every SM)
    source: str                     # tuned, tuned-unsplit, file:<name>, forced, wave, naive, below-threshold
    ctas_attn: int | None = None    # CTAs of the comm beside attention (norm(A, attn), norm(B, MLP))
    ctas_mlp: int | None = None     # ... beside the MLP (norm(B, attn), norm(A, MLP))
    sm_target_attn: int | None = None
    sm_target_mlp: int | None = None


@dataclass(frozen=True)
class Policy:
    """One run's tokenweave policy: its flags, the split rule, the transport's own CTA budget, the GPU's
    SM count (0 on the CPU) and the tuned choices for this exact setting ({tokens: TunedChoice})."""
    flags: Flags
    rule: object                    # tw.schedule.split.SplitRule: T -> split point
    default_ctas: int | None = None
    sm_count: int = 0
    tuned: dict = field(default_factory=dict)

    def with_tuned(self, tuned: dict) -> "Policy":
        return replace(self, tuned=dict(tuned))

    def tuned_choice(self, num_tokens: int):
        """The tuned choice that applies to a batch of num_tokens tokens, or None."""
        return self.tuned.get(num_tokens) if self.flags.takes_tuned else None

    def by_rule(self, num_tokens: int) -> bool:
        """Whether decide(num_tokens) asks the split rule (no choice applies; the batch is large enough)."""
        return num_tokens >= self.flags.min_split_tokens and self.tuned_choice(num_tokens) is None

    def decide(self, num_tokens: int, forced=None) -> Decision:
        """The split, CTA budgets and SM targets of a batch of num_tokens tokens: forced (a TunedChoice)
        > flags > the tuned choice > the defaults (the module docstring's table)."""
        f = self.flags
        tuned = self.tuned_choice(num_tokens) if forced is None else None
        choice = forced if forced is not None else tuned
        if choice is not None and not choice.split:
            return Decision(None, "tuned-unsplit")
        if choice is None and num_tokens < f.min_split_tokens:
            return Decision(None, "below-threshold")
        if choice is not None:
            s, source = int(choice.split_at), choice.extra.get("source", "tuned")
            ca, cm = choice.ctas_attn, choice.ctas_mlp
        else:
            s, source = int(self.rule(num_tokens)), self.rule.source
            ca = f.ctas or self.default_ctas
            cm = f.ctas_mlp or ca
        if forced is not None or (tuned is not None and f.sm_target == "tuned"):
            ta, tm = choice.sm_target_attn, choice.sm_target_mlp
        elif f.sm_target == "left" and (tuned is not None or (self.sm_count and ca and cm)):
            ta, tm = self.sm_count - ca, self.sm_count - cm   # plan the GEMMs for the SMs the comm leaves
        else:
            ta = tm = None
        return Decision(s, source, ca, cm, ta, tm)
