"""The one results writer: JSON lines, one row per measurement, with the run's metadata in every row.

Rows carry every parameter as a column and units in names (`_us`, `_ms`, `_gbps`, `_tflops`).
Only world rank 0 writes. Figures and notebooks read these files and nothing else.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import subprocess
from pathlib import Path

from tw.runtime import dist

RESULTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "results"


def git_commit() -> str:
    """HEAD's short hash (+ "-dirty"), or $TW_COMMIT where the tree was copied without .git."""
    if os.environ.get("TW_COMMIT"):
        return os.environ["TW_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


# Debug switches read from the environment where they act. The P2P kernels' build options are not here:
# a run reads them once and passes them to its transports, and experiments/common.writer records them
# as the columns p2p_cluster and p2p_runtime_tp.
BUILD_ENV = ("TW_PRIVATE_X",)


def metadata(world=None, **extra) -> dict:
    """What a number depends on: hardware, versions, commit, world shape, plus `extra`."""
    meta = {"timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "commit": git_commit(), **dist.versions()}
    if world is None:
        count = dist.gpu_count()
        if count:
            import cupy as cp
            name, sms = dist.gpu_facts(cp.cuda.Device().id)
            meta.update(gpu=name, sm_count=sms)
        else:
            meta.update(gpu="none", sm_count=0)
    elif world.is_gpu:
        import cupy as cp
        meta.update(gpu=world.gpu_name, sm_count=world.sm_count,
                    gpu_mem_gib=round(cp.cuda.Device().mem_info[1] / 2**30, 1))
    else:
        meta.update({"gpu": "none (CPU fallback: timings not meaningful)", "sm_count": 0})
    if world is not None:
        meta.update({"device": world.device, "world_size": world.size, "tp": world.tp_size,
                     "dp": world.dp_size, "shared_gpu": world.shared_gpu})
        if world.shared_gpu:
            meta["timing_note"] = "TW_SHARE_GPU=1: several ranks on one GPU, timings meaningless"
    knobs = {k: os.environ[k] for k in BUILD_ENV if os.environ.get(k)}
    if knobs:   # environment switches that change what runs (tw/model/model.py)
        meta["build_env"] = knobs
    meta.update(extra)
    return meta


def default_path(experiment: str, tag: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_DIR / f"{experiment}-{tag}-{stamp}.jsonl"


class Writer:
    """Append rows to a JSON-lines file (rank 0 only); each row = metadata + the row's fields."""

    def __init__(self, path, meta: dict, rank: int = 0):
        self.path = Path(path)
        self.meta = meta
        self.rank = rank
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        if self.rank != 0:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({**self.meta, **row}, default=_jsonable) + "\n")


def _jsonable(x):
    try:
        return x.item()
    except AttributeError:
        return str(x)


def read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
