"""Tuned choices for tokenweave: what experiments/tune.py measured best, per setting and token count.

A choice is only valid for the setting it was measured in, so the key holds everything that changes
the answer: the model, TP, the emulated shard size (--shard-as-tp), the number of layers (the last
layer's unoverlapped norm weighs 1/layers), the transport, the prefill sequence length (attention
cost) and the GPU. One JSON file per key under experiments/tuned/:

    {"key": {"model": ..., "tp": ..., ...}, "tokens": {"4096": {TunedChoice fields}, ...}}

`load(key)` returns the choices for exactly that key; when the directory holds choices for a
different key with the same model and GPU, `mismatch(key)` says which fields differ, so a run never
silently uses another setting's choice.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

TUNED_DIR = Path(__file__).resolve().parents[2] / "experiments" / "tuned"


@dataclass(frozen=True)
class TuningKey:
    model: str
    tp: int
    shard_as_tp: int | None   # None: the real shards of TP = tp
    layers: int
    transport: str            # "p2p" or "nccl"
    seq_len: int              # tokens per prefill sequence of the tuned batches
    gpu: str                  # World.gpu_tag, e.g. "NVIDIA_H200"

    def __post_init__(self):
        if self.shard_as_tp == self.tp:  # the same setting, spelled two ways
            object.__setattr__(self, "shard_as_tp", None)

    @property
    def tag(self) -> str:
        shard = f"-shard{self.shard_as_tp}" if self.shard_as_tp else ""
        return (f"{self.model}-tp{self.tp}{shard}-L{self.layers}-{self.transport}-seq{self.seq_len}-{self.gpu}")

    @property
    def path(self) -> Path:
        return TUNED_DIR / f"tokenweave-{self.tag}.json"


@dataclass(frozen=True)
class TunedChoice:
    """One token count's tuned tokenweave setting. `split_at` is the split point to run (the fastest
    point timed end to end) and `split` False means: do not split (the unsplit fused path was faster).
    `wave_split` is the wave rule's own pick, kept to report how far the rule is from the search."""
    split_at: int | None
    ctas_attn: int
    ctas_mlp: int
    split: bool = True
    wave_split: int | None = None
    median_ms: float | None = None       # tokenweave at split_at (the search's best)
    wave_ms: float | None = None         # tokenweave at wave_split
    unsplit_ms: float | None = None
    search: str = "exhaustive"           # or "shortlist"
    sm_target_attn: int | None = None    # cuBLAS SM-count target of the GEMMs beside the ctas_attn comm
    sm_target_mlp: int | None = None     # ... beside the ctas_mlp comm (None: no target)
    extra: dict = field(default_factory=dict)  # everything else tune.py recorded

    def __post_init__(self):
        if self.split and (self.split_at is None or self.split_at <= 0):
            raise ValueError(f"a split choice needs split_at > 0, got {self.split_at}")
        if self.ctas_attn < 1 or self.ctas_mlp < 1:
            raise ValueError(f"CTA budgets must be >= 1, got {self.ctas_attn}/{self.ctas_mlp}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TunedChoice":
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        return cls(**known, extra={**d.get("extra", {}), **{k: v for k, v in d.items() if k not in names}})


def save(key: TuningKey, tokens: int, choice: TunedChoice) -> Path:
    """Merge one token count's choice into the key's file (tune.py calls it after each token count,
    so a run killed by a time limit keeps what it finished)."""
    path = key.path
    data = json.loads(path.read_text()) if path.exists() else {"key": asdict(key), "tokens": {}}
    data["tokens"][str(tokens)] = choice.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def load(key: TuningKey) -> dict[int, TunedChoice]:
    """{tokens: choice} tuned for exactly this key, or {}."""
    if not key.path.exists():
        return {}
    data = json.loads(key.path.read_text())
    if data.get("key") != asdict(key):
        raise ValueError(f"{key.path} holds choices for {data.get('key')}, not {asdict(key)}")
    return {int(t): TunedChoice.from_json(c) for t, c in data["tokens"].items()}


def mismatch(key: TuningKey) -> str | None:
    """When no file matches `key` but files of the same model and GPU exist: a sentence naming the
    fields that differ (the user may want to tune this setting or run the tuned one). Else None."""
    if key.path.exists():
        return None
    want = asdict(key)
    near = []
    for path in sorted(TUNED_DIR.glob("tokenweave-*.json")):
        try:
            have = json.loads(path.read_text()).get("key") or {}
        except (OSError, ValueError):
            continue
        if have.get("model") == key.model and have.get("gpu") == key.gpu:
            diff = [f"{k}={have.get(k)!r} (this run: {v!r})" for k, v in want.items() if have.get(k) != v]
            near.append(f"{path.name}: " + ", ".join(diff))
    if not near:
        return None
    return ("no tuned choices for this setting; tuned files of the same model and GPU differ in: "
            + "; ".join(near))
