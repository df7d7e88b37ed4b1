"""experiments/throughput.py and what it is made of: the scheduler (tw/serve/engine.py, pure), the
vocab-parallel LM head (tw/serve/lm_head.py), the workloads, a CPU serving run checked token for token
against the float64 reference, its user errors, and the throughput figures."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ERR_OUT, ROOT, fake_world, gpus, help_text, run_mpi, usage_error
from experiments import throughput
from tw.serve import engine, lm_head
from tw.serve.engine import FirstFit, Request, Scheduler

CPU_ONLY = pytest.mark.skipif(gpus() > 0, reason="checks the CPU path (a GPU is present)")


def requests(lengths):
    """Requests from (prompt_len, output_len) pairs; prompt token j of request i is 1000 * i + j."""
    return [Request(i, np.arange(p, dtype=np.int32) + 1000 * i, o) for i, (p, o) in enumerate(lengths)]


def run(sched, on_step=None):
    """Schedule and commit until done; step i ends at time i + 1 and request i's k-th token is 100 * i + k."""
    steps = []
    while (step := sched.schedule()) is not None:
        if on_step:
            on_step(sched, step)
        sched.commit(step, [100 * r.rid + len(r.output) for r in step.producers], step.index + 1.0)
        steps.append(step)
    return steps


MIXED = [(150, 4), (10, 6), (64, 1), (33, 3), (200, 2), (5, 9), (90, 5), (1, 1)]


def test_budget_decodes_first_and_every_request_finishes_with_its_tokens():
    reqs = requests(MIXED)
    sched = Scheduler(reqs, chunk=64, kv_capacity=400, max_seqs=4)

    def check(sched, step):
        assert 1 <= step.num_tokens <= 64
        assert len({id(r) for r in step.requests}) == len(step.requests)       # a request once per step
        kinds = [r.prefilled == r.prompt_len for r in step.requests]          # decoding before this step
        assert kinds == sorted(kinds, reverse=True), "decodes come first"
        assert sum(kinds) == step.decode_tokens
        decoding = [r for r in sched.running if r.prefilled == r.prompt_len]
        assert step.decode_tokens == min(len(decoding), 64), "every running decode gets its token"
        assert all(s.new == 1 for s in step.batch.seqs[:step.decode_tokens])
        assert len(sched.running) <= 4

    steps = run(sched, check)
    assert sched.done and len(sched.finished) == len(reqs)
    for r in reqs:
        assert r.output == [100 * r.rid + k for k in range(r.output_len)], r
        assert r.kv_start is None and r.finish_time == r.token_times[-1]
    assert sched.kv.free_list == [(0, 400)]                                    # every slot given back
    assert sum(s.prefill_tokens for s in steps) == sum(p for p, _ in MIXED)
    assert sum(s.decode_tokens for s in steps) == sum(o - 1 for _, o in MIXED)
    assert engine.dry_run(requests(MIXED), 64, 400, 4) == [s.num_tokens for s in steps]


def test_chunked_prefill_continues_with_the_right_prefix_then_decodes():
    (r,) = reqs = requests([(150, 3)])
    steps = run(Scheduler(reqs, chunk=64, kv_capacity=200))
    seqs = [(s.batch.seqs[0].new, s.batch.seqs[0].prefix, s.batch.seqs[0].kv_start) for s in steps]
    assert seqs == [(64, 0, 0), (64, 64, 0), (22, 128, 0), (1, 150, 0), (1, 151, 0)]
    assert [s.produce_rows.tolist() for s in steps] == [[], [], [21], [0], [0]]
    assert steps[1].ids.tolist() == list(range(64, 128))                       # the prompt's next part
    assert steps[3].ids.tolist() == [0] and steps[4].ids.tolist() == [1]       # the tokens it generated
    assert steps[2].batch.pos.tolist() == list(range(128, 150))
    assert r.token_times == [3.0, 4.0, 5.0]
    assert r.ttft == 3.0 and r.tpot == 1.0


def test_a_long_prompt_is_cut_at_the_budget_and_shares_the_step():
    reqs = requests([(10, 3), (100, 2)])
    steps = run(Scheduler(reqs, chunk=32, kv_capacity=200))
    first = [(s.new, s.prefix) for s in steps[0].batch.seqs]
    assert first == [(10, 0), (22, 0)]                                         # request 1 cut after 22 tokens
    second = [(s.new, s.prefix) for s in steps[1].batch.seqs]
    assert second == [(1, 10), (31, 22)]                                       # decode first, then the rest
    assert steps[0].produce_rows.tolist() == [9] and steps[1].produce_rows.tolist() == [0]


def test_admission_waits_for_cache_slots_and_slots_never_overlap():
    reqs = requests([(50, 10)] * 5)                                            # 60 slots each, 130 in all
    seen_waiting = []

    def check(sched, step):
        ranges = sorted((r.kv_start, r.kv_start + r.kv_need) for r in sched.running)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), ranges
        assert all(0 <= lo and hi <= 130 for lo, hi in ranges)
        assert len(sched.running) <= 2
        seen_waiting.append(len(sched.waiting))

    run(Scheduler(reqs, chunk=256, kv_capacity=130), check)
    assert max(seen_waiting) == 3 and all(len(r.output) == 10 for r in reqs)
    # FCFS: a request never starts before an earlier one
    firsts = [r.token_times[0] for r in reqs]
    assert firsts == sorted(firsts)


def test_first_fit_allocator_merges_neighbours():
    kv = FirstFit(100)
    a, b, c = kv.alloc(30), kv.alloc(30), kv.alloc(30)
    assert (a, b, c) == (0, 30, 60) and kv.alloc(20) is None and kv.free_slots == 10
    kv.free(a, 30)
    assert kv.alloc(35) is None                                                # 40 free, not contiguous
    kv.free(b, 30)
    assert kv.free_list == [(0, 60), (90, 10)] and kv.alloc(35) == 0
    with pytest.raises(ValueError, match="double free"):
        kv.free(90, 5)


def test_a_request_that_can_never_fit_is_refused_and_ttft_tpot_come_from_step_times():
    with pytest.raises(ValueError, match="more KV slots"):
        Scheduler(requests([(100, 28)]), chunk=64, kv_capacity=127)
    reqs = requests([(8, 4), (8, 1)])
    run(Scheduler(reqs, chunk=9, kv_capacity=64))
    # step 1: request 0's prompt; 2: its decode + request 1's prompt; 3, 4: request 0's decodes
    assert [r.token_times for r in reqs] == [[1.0, 2.0, 3.0, 4.0], [2.0]]
    s = engine.summary(reqs)
    assert s["ttft_ms_median"] == 1500.0 and s["tpot_ms_median"] == 1000.0
    assert s["makespan_s"] == 4.0 and s["total_tokens_per_s"] == (16 + 5) / 4.0


def test_argmax_across_ranks_breaks_ties_by_the_lowest_index():
    values = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0]])                     # [ranks, rows]
    indices = np.array([[4, 7, 1], [504, 600, 505]])
    assert lm_head.pick(values, indices).tolist() == [504, 7, 1]
    with pytest.raises(FloatingPointError):
        lm_head.pick(np.array([[np.nan], [np.nan]]), np.array([[0], [9]]))
    assert lm_head.slice_rows(128256, 2, 1) == (64128, 128256, 64128)
    assert lm_head.slice_rows(1000, 3, 2) == (672, 1000, 336)


def test_wave_rule_reads_the_profile_at_64_row_multiples_and_splits_once_per_size():
    from types import SimpleNamespace

    from experiments.throughput import Ceil64Profile
    from tw.schedule import split
    seen, calls = [], []

    class Profile:  # a staircase of 128-row tiles
        def __call__(self, m):
            seen.append(m)
            return -(-m // 128)

        def prefetch(self, ms):
            seen.extend(ms)

    prof = Ceil64Profile(Profile(), cap=2048)
    s = split.wave_shortlist(1500, prof, 1)[0]
    assert all(m % 64 == 0 and m <= 2048 for m in seen) and 0 < s < 1500
    assert prof(1) == 1 and prof(4000) == 16                                  # 64 rows; capped at 2048

    class Comm:  # one rank: the broadcast hands the pick back, and counts
        def bcast(self, value, root):
            calls.append(value)
            return value

    rule = split.SplitRule("wave", prof, SimpleNamespace(tp_rank=0, tp_comm=Comm()))
    assert [rule(1500), rule(1500)] == [s, s] and len(calls) == 1 and rule.source == "wave"
    assert split.SplitRule("naive")(11) == 5 and split.SplitRule("naive").profile is None


@pytest.mark.parametrize("ranks", [2, 3])
def test_lm_head_matches_one_rank_argmax(ranks):
    proc = run_mpi(ranks, ["-m", "tests.mpi_throughput"], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"PASS lm_head on {ranks} ranks" in proc.stdout


def test_sharegpt_like_table_is_reproduced_by_its_script(tmp_path):
    from experiments import workloads
    out = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, "-m", "experiments.workloads.make_sharegpt_like", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == workloads.TABLE.read_bytes()
    pairs = workloads.table()
    assert len(pairs) == 1000 and all(8 <= p <= 2048 and 8 <= o <= 1024 for p, o in pairs)
    w = workloads.sharegpt_like(5, 1000, seed=0)
    assert [(r.prompt_len, r.output_len) for r in w.requests] == pairs[:5]


@CPU_ONLY
def test_cpu_serving_run_generates_the_reference_tokens(tmp_path):
    out = tmp_path / "rows.jsonl"
    strategies = ["nccl", "fused", "tokenweave", "finegrained2"]
    proc = run_mpi(2, ["-m", "experiments.throughput", "--model", "tiny", "--requests", "6", "--input-len", "40",
                       "--output-len", "5", "--chunk", "64", "--check", "--strategies", *strategies,
                       "--min-split-tokens", "32", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["strategy"] for r in rows] == strategies
    for r in rows:
        assert r["check_tokens_equal"] is True and r["correct"] is True, r
        assert r["check_logits_rel_err"] <= 1e-5 and r["check_requests"] == 4
        assert r["requests_done"] == 6 and r["output_tokens"] == 30 and r["prompt_tokens"] == 240
        for k in ("total_tokens_per_s", "output_tokens_per_s", "requests_per_s", "step_ms_median", "step_ms_p99",
                  "host_ms_median", "gpu_ms_median", "host_over_gpu", "ttft_ms_median", "ttft_ms_p99",
                  "tpot_ms_median", "tpot_ms_p99", "speedup_vs_nccl"):
            assert r[k] is not None and r[k] > 0, k
        assert r["chunk"] == 64 and r["kv_tokens"] == 8192 and r["gpu"].startswith("none") and r["steps"] >= 5
    tw = next(r for r in rows if r["strategy"] == "tokenweave")
    assert tw["split_steps"] > 0 and "naive" in tw["split_sources"]       # some steps were split
    assert "mean nothing" in proc.stdout and "requests" in proc.stdout


@pytest.mark.parametrize("args,msg", [
    (["--chunk", "0"], "--chunk must be >= 2 (the TP degree: a step has at least one token per rank), got [0]"),
    (["--min-split-tokens", "1"], "--min-split-tokens must be >= 2 (two halves), got 1"),
    (["--input-len", "9000"], "--input-len 9000 + --output-len 8 = 9008 KV slots per request, more than the KV "
                              "capacity of 8192 tokens (--kv-tokens): such a request could never be admitted"),
    (["--kv-tokens", "40", "--input-len", "40"], "--input-len 40 + --output-len 8 = 48 KV slots per request, more "
                                                 "than the KV capacity of 40 tokens (--kv-tokens): such a request "
                                                 "could never be admitted"),
    (["--requests", "0"], "--requests must be >= 1, got 0"),
    (["--workload", "sharegpt-like", "--requests", "1001"], "--requests 1001: the sharegpt-like table has 1000 rows"),
    (["--max-steps", "3"], "random-in48-out8 at --chunk 128 takes more than --max-steps 3 steps"),
    (["--check", "--check-requests", "0"], "--check with --check-requests 0 would check nothing; give at least 1 "
                                           "(default: 4)"),
    (["--ctas", "0"], "--ctas must be >= 1, got 0"),
])
def test_user_errors(args, msg):
    """Each mistake is one UsageError naming its flag, before anything is built (in this process, on the
    CPU world of `mpiexec -n 2`)."""
    assert usage_error(throughput.main, [*args, "--out", ERR_OUT]) == msg


def test_help_shows_defaults_and_columns(monkeypatch, capsys):
    out = help_text("throughput", monkeypatch, capsys)
    assert "usage: python -m experiments.throughput" in out and "(default:" in out
    for col in ("tok/s", "vs_nccl", "step_ms", "host%", "ttft", "tpot", "check_tokens_equal"):
        assert col in out, col


def test_the_cpu_table_shows_no_share_paid_and_fits_long_names(capsys):
    from tw.model import config
    rows = [{"chunk": 128, "workload": w, "strategy": s, "total_tokens_per_s": 4506.0, "output_tokens_per_s": 347.0,
             "speedup_vs_nccl": 1.0, "comm_paid": 1.17, "step_ms_median": 7.17, "host_over_gpu": 0.017,
             "ttft_ms_median": 48.1, "tpot_ms_median": 6.45, "correct": True}
            for w, s in (("random-in48-out4", "nccl"), ("sharegpt-like-with-a-long-name", "finegrained16"))]
    throughput.print_table(fake_world(), rows, config.get("tiny"))
    head, *lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith((" chunk", "   128"))]
    assert [line.split() for line in lines] == [
        ["128", w, s, "4,506", "347", "1.000x", "-", "7.17", "1.7%", "48.1", "6.45", "ok"]
        for w, s in (("random-in48-out4", "nccl"), ("sharegpt-like-with-a-long-name", "finegrained16"))]
    for col in ("tok/s", "paid", "check"):   # right-aligned: each ends where its title ends
        end = head.index(f" {col}") + len(col) + 1
        assert all(line[end - 1] != " " and (len(line) == end or line[end] == " ") for line in lines), (col, lines)


GPU_META = {"device": "gpu", "gpu": "NVIDIA H200", "model": "llama3-70b", "layers": 4, "tp": 2, "world_size": 2,
            "requests": 1000}


def _rows_file(path, meta, chunks=(1024, 2048)):
    rows = []
    for c in chunks:
        for w in ("random-in1024-out128", "sharegpt-like"):
            for s, f in (("nccl", 1.0), ("nocomm", 1.08), ("tokenweave", 1.05)):
                rows.append({**meta, "chunk": c, "workload": w, "strategy": s, "total_tokens_per_s": 1e4 * f})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_figures_draw_gpu_rows_and_refuse_cpu_only_files(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments import figures_throughput as ft
    gpu = _rows_file(tmp_path / "throughput-gpu.jsonl", GPU_META)
    rel = ft.relative([json.loads(line) for line in gpu.read_text().splitlines()])
    assert rel[2048, "sharegpt-like"] == {"nccl": 1.0, "nocomm": 1.08, "tokenweave": 1.05}
    out = tmp_path / "figs"
    assert ft.main([str(gpu), "--out-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {f"{n}.{e}" for n in ("throughput_vs_nccl", "throughput_chunk")
                                               for e in ("png", "pdf")}
    cpu = _rows_file(tmp_path / "throughput-cpu.jsonl", {**GPU_META, "device": "cpu", "gpu": "none (CPU fallback)"})
    with pytest.raises(ValueError, match="only CPU-fallback rows"):
        ft.fig_throughput([cpu], out)
    one = _rows_file(tmp_path / "one-chunk.jsonl", GPU_META, chunks=(2048,))
    assert ft.fig_chunk([one], out / "one") == []                                # one chunk size: nothing to draw
    assert ft.main([]) == 1 and ft.main([str(cpu), "--out-dir", str(out)]) == 1
