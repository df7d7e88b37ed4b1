"""The request sets of experiments/throughput.py: N requests, all submitted at t = 0 (offline serving).

- random: every request has `input_len` prompt tokens and generates exactly `output_len` tokens
  (ignore_eos); prompt token ids uniform in [0, vocab) from numpy.random.default_rng(seed).
- sharegpt-like: the (prompt_len, output_len) pairs of the first N rows of sharegpt_like.csv, a
  SYNTHETIC long-tailed table made by make_sharegpt_like.py (its docstring states the distribution;
  it is not ShareGPT data); prompt ids drawn as for random.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tw.serve.engine import Request

KINDS = ("random", "sharegpt-like")
TABLE = Path(__file__).resolve().parent / "sharegpt_like.csv"


@dataclass
class Workload:
    name: str                  # what result rows call it, e.g. "random-in1024-out128", "sharegpt-like"
    kind: str
    input_len: int | None      # random: the fixed lengths; sharegpt-like: None (per request)
    output_len: int | None
    requests: list

    @property
    def kv_need_max(self) -> int:
        return max(r.kv_need for r in self.requests)

    @property
    def kv_need_total(self) -> int:
        return sum(r.kv_need for r in self.requests)


def random(n: int, input_len: int, output_len: int, vocab: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    reqs = [Request(i, rng.integers(0, vocab, input_len, dtype=np.int32), output_len) for i in range(n)]
    return Workload(f"random-in{input_len}-out{output_len}", "random", input_len, output_len, reqs)


def table(path: Path = TABLE) -> list[tuple[int, int]]:
    with open(path, newline="") as f:
        return [(int(r["prompt_len"]), int(r["output_len"])) for r in csv.DictReader(f)]


def sharegpt_like(n: int, vocab: int, seed: int, path: Path = TABLE) -> Workload:
    pairs = table(path)
    if n > len(pairs):
        raise ValueError(f"the sharegpt-like table {path.name} has {len(pairs)} requests, {n} asked for")
    rng = np.random.default_rng(seed)
    reqs = [Request(i, rng.integers(0, vocab, p, dtype=np.int32), o) for i, (p, o) in enumerate(pairs[:n])]
    return Workload("sharegpt-like", "sharegpt-like", None, None, reqs)
