"""A serving engine's scheduler: continuous batching with chunked prefill over a fixed KV cache.

Pure Python + NumPy (no model, no device), so it is tested on its own; experiments/throughput.py runs
each Step it produces through a strategy and hands the generated tokens back with `commit`.

Per step (the policy of vLLM's chunked-prefill scheduler, simplified):
- a token budget of `chunk` tokens;
- running decodes first, one token each, in admission order (they are latency-critical and cheap);
- then prefill chunks, in arrival order: requests already partially prefilled, then waiting requests
  admitted first-come first-served. A prompt longer than what is left of the budget is cut: this step
  processes its next part, the next step continues it with the cached tokens as its prefix
  (tw.model.batch.Seq(new, prefix, kv_start), exactly a chunked-prefill continuation).
A request produces a token when its prefill completes (its last prompt row) and at each decode row; it
needs exactly `output_len` tokens (ignore_eos) and then leaves, freeing its cache slots.

KV cache: each request gets one contiguous slot range of prompt_len + output_len slots at admission
(reserved in full, so a running request can never run out of cache: a request that does not fit
waits instead, and so does every later one, as in first-come first-served admission). Contiguous
because tw's attention reads a sequence's K/V as one slot range [kv_start, kv_start + prefix + new)
(no page table). The allocator is first-fit over a sorted free list with neighbours merged on free:
simple and enough here; it can fragment (a request may wait although the total free space would hold
it), which a paged cache would avoid. `max_seqs` caps the requests running at once (vLLM's
max_num_seqs, 256 by default there).

Times: the caller passes each step's end time to `commit`; a token's time is the end of the step that
produced it. TTFT = first token's time - arrival; TPOT = mean gap between the later tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tw.model.batch import Batch, Seq


@dataclass(eq=False)
class Request:
    rid: int
    prompt: np.ndarray          # [prompt_len] int32 token ids
    output_len: int             # tokens to generate (ignore_eos: exactly this many)
    arrival: float = 0.0
    kv_start: int | None = None  # first cache slot (None: not admitted, or finished)
    prefilled: int = 0          # prompt tokens whose K/V are in the cache
    output: list = field(default_factory=list)
    token_times: list = field(default_factory=list)
    finish_time: float | None = None
    prompt_len: int = field(init=False)   # a plain attribute: the scheduler reads it per request per step

    def __post_init__(self):
        self.prompt = np.asarray(self.prompt, dtype=np.int32)
        if self.prompt.ndim != 1 or len(self.prompt) < 1 or self.output_len < 1:
            raise ValueError(f"request {self.rid}: needs a prompt of >= 1 token and output_len >= 1, got "
                             f"{self.prompt.shape} and {self.output_len}")
        self.prompt_len = len(self.prompt)

    @property
    def kv_need(self) -> int:
        """Slots reserved at admission (the last output token's K/V is never stored, one spare slot)."""
        return self.prompt_len + self.output_len

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


class FirstFit:
    """First-fit allocation of contiguous slot ranges in [0, capacity); free() merges neighbours."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"KV capacity must be >= 1 slot, got {capacity}")
        self.capacity = capacity
        self.free_list = [(0, capacity)]   # sorted, disjoint, non-adjacent (start, length)

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free_list):
            if length >= n:
                self.free_list[i:i + 1] = [(start + n, length - n)] if length > n else []
                return start
        return None

    def free(self, start: int, n: int) -> None:
        blocks = sorted(self.free_list + [(start, n)])
        merged = []
        for s, length in blocks:
            if merged and merged[-1][0] + merged[-1][1] > s:
                raise ValueError(f"double free or overlap at slot {s}")
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self.free_list = merged

    @property
    def free_slots(self) -> int:
        return sum(length for _, length in self.free_list)


@dataclass
class Step:
    """One forward pass: the batch, its token ids, and which rows produce a next token."""
    index: int
    batch: Batch
    ids: np.ndarray             # [T] int32, the batch's input tokens
    requests: list              # the Request of each sequence of the batch
    produce_rows: np.ndarray    # rows of the batch whose output gives a next token (int64, ascending)
    producers: list             # the Request of each of those rows
    decode_tokens: int
    prefill_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens


class Scheduler:
    def __init__(self, requests: list, chunk: int, kv_capacity: int, max_seqs: int = 256):
        if chunk < 1:
            raise ValueError(f"the token budget per step must be >= 1, got {chunk}")
        if max_seqs < 1:
            raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
        too_big = [r.rid for r in requests if r.kv_need > kv_capacity]
        if too_big:
            raise ValueError(f"requests {too_big[:5]} need more KV slots (prompt + output) than the cache "
                             f"holds ({kv_capacity}): they could never be admitted")
        self.chunk, self.max_seqs = chunk, max_seqs
        self.kv = FirstFit(kv_capacity)
        self.waiting = sorted(requests, key=lambda r: (r.arrival, r.rid))   # not admitted yet
        self.running = []          # admitted, in admission order (prefilling or decoding)
        self.finished = []
        self.steps = 0
        self._pending = None       # the step scheduled but not yet committed

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Step | None:
        """The next step (None when every request has finished). Offline serving: every request has
        arrived (arrival times only order the queue)."""
        if self._pending is not None:
            raise RuntimeError("commit() the previous step before scheduling the next")
        # Decodes first, one token each (in bulk: up to max_seqs of them every step).
        dec = [r for r in self.running if r.prefilled == r.prompt_len][:self.chunk]
        seqs = [Seq(1, r.prompt_len + len(r.output) - 1, r.kv_start) for r in dec]
        ids = np.empty(self.chunk, np.int32)
        ids[:len(dec)] = [r.output[-1] for r in dec]
        reqs, producers, rows = list(dec), list(dec), list(range(len(dec)))
        budget, row = self.chunk - len(dec), len(dec)

        def add(r, new, prefix, tokens, produces):
            nonlocal budget, row
            seqs.append(Seq(new, prefix, r.kv_start))
            ids[row:row + new] = tokens
            reqs.append(r)
            row += new
            budget -= new
            if produces:
                rows.append(row - 1)
                producers.append(r)

        def prefill(r):  # the prompt's next part, as much of it as the budget leaves
            n = min(r.prompt_len - r.prefilled, budget)
            add(r, n, r.prefilled, r.prompt[r.prefilled:r.prefilled + n], r.prefilled + n == r.prompt_len)

        for r in self.running:                          # then unfinished prefills, in arrival order
            if budget == 0:
                break
            if r.prefilled < r.prompt_len:
                prefill(r)
        while budget and self.waiting and len(self.running) < self.max_seqs:  # admit, first come first served
            r = self.waiting[0]
            start = self.kv.alloc(r.kv_need)
            if start is None:
                break                                   # waits for a finishing request's slots
            self.waiting.pop(0)
            r.kv_start = start
            self.running.append(r)
            prefill(r)
        if not seqs:
            if self.done:
                return None
            # Unreachable: with nothing running the whole cache is free, and every request fits it.
            raise RuntimeError("nothing could be scheduled although requests remain")
        step = Step(self.steps, Batch(seqs), ids[:row], reqs, np.asarray(rows, dtype=np.int64), producers,
                    len(dec), row - len(dec))
        self._pending = step
        return step

    def commit(self, step: Step, tokens, end_time: float) -> list:
        """Record the step's outcome: tokens[i] is the next token of step.producers[i], produced at
        end_time. Returns the requests that finished in this step (their slots are free again)."""
        if step is not self._pending:
            raise RuntimeError("commit() takes the step schedule() returned last")
        tokens = np.asarray(tokens).reshape(-1)
        if len(tokens) != len(step.producers):
            raise ValueError(f"step {step.index} produces {len(step.producers)} tokens, got {len(tokens)}")
        d = step.decode_tokens                          # decodes come first; the rest are prefill parts
        for r, seq in zip(step.requests[d:], step.batch.seqs[d:]):
            r.prefilled += seq.new
        finished = []
        for r, t in zip(step.producers, tokens):
            r.output.append(int(t))
            r.token_times.append(end_time)
            if len(r.output) == r.output_len:
                r.finish_time = end_time
                self.kv.free(r.kv_start, r.kv_need)
                r.kv_start = None
                finished.append(r)
        if finished:
            gone = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in gone]
            self.finished += finished
        self.steps += 1
        self._pending = None
        return finished


def clone(requests: list) -> list:
    """Fresh copies of requests (no progress), to run the same workload again."""
    return [Request(r.rid, r.prompt, r.output_len, r.arrival) for r in requests]


def dry_run(requests: list, chunk: int, kv_capacity: int, max_seqs: int = 256, max_steps: int | None = None) -> list:
    """The token count of every step the workload takes (tokens 0, step i ending at time i). Scheduling
    never looks at token values, so a real run takes exactly these steps."""
    sched = Scheduler(clone(requests), chunk, kv_capacity, max_seqs)
    sizes = []
    while (step := sched.schedule()) is not None:
        sched.commit(step, np.zeros(len(step.producers), np.int32), float(step.index))
        sizes.append(step.num_tokens)
        if max_steps is not None and len(sizes) > max_steps:
            break
    return sizes


def summary(requests: list, start: float = 0.0) -> dict:
    """Per-request latency percentiles (ms) and throughput over the run's makespan (from `start`)."""
    done = [r for r in requests if r.finish_time is not None]
    if not done:
        return {"requests_done": 0}
    span = max(r.finish_time for r in done) - start
    ttft = np.array([r.ttft for r in done]) * 1e3
    tpot = np.array([r.tpot for r in done if r.tpot is not None]) * 1e3
    prompt = sum(r.prompt_len for r in done)
    output = sum(len(r.output) for r in done)
    out = {"requests_done": len(done), "makespan_s": span, "prompt_tokens": prompt, "output_tokens": output,
           "total_tokens_per_s": (prompt + output) / span if span > 0 else None,
           "output_tokens_per_s": output / span if span > 0 else None,
           "requests_per_s": len(done) / span if span > 0 else None,
           "ttft_ms_median": float(np.median(ttft)), "ttft_ms_p99": float(np.percentile(ttft, 99))}
    if len(tpot):
        out.update(tpot_ms_median=float(np.median(tpot)), tpot_ms_p99=float(np.percentile(tpot, 99)))
    return out
