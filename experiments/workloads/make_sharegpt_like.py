"""Write sharegpt_like.csv: a SYNTHETIC table of (prompt_len, output_len) pairs for
experiments/throughput.py --workload sharegpt-like. It is not ShareGPT data and was not fitted to it:
nothing is downloaded. It only has the shape such chat traces are known for (lengths spread over two
orders of magnitude, long-tailed, prompts mostly shorter than the fixed-length random workloads), so
that continuous batching sees requests of very different sizes arrive and finish at different times.

Distribution (independent draws, numpy.random.default_rng(SEED)):
    prompt_len ~ round(LogNormal(ln 256, sigma 1.0)), clipped to [8, 2048]   (median 256 tokens)
    output_len ~ round(LogNormal(ln 128, sigma 0.8)), clipped to [8, 1024]   (median 128 tokens)
ROWS rows. Deterministic: rerunning it reproduces the committed file byte for byte (tests check this).

    python -m experiments.workloads.make_sharegpt_like            # rewrites sharegpt_like.csv
    python -m experiments.workloads.make_sharegpt_like --out /tmp/t.csv
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

SEED = 250511329                 # the paper's arXiv number
ROWS = 1000
PROMPT = (256, 1.0, 8, 2048)     # median, sigma, min, max
OUTPUT = (128, 0.8, 8, 1024)
PATH = Path(__file__).resolve().parent / "sharegpt_like.csv"


def table(rows: int = ROWS, seed: int = SEED) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)

    def draw(median, sigma, lo, hi):
        return np.clip(np.rint(rng.lognormal(math.log(median), sigma, rows)), lo, hi).astype(int)

    prompt, output = draw(*PROMPT), draw(*OUTPUT)
    return list(zip(prompt.tolist(), output.tolist()))


def text(pairs) -> str:
    return "prompt_len,output_len\n" + "".join(f"{p},{o}\n" for p, o in pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.workloads.make_sharegpt_like", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(PATH), help="where to write the table (default: %(default)s)")
    args = p.parse_args(argv)
    Path(args.out).write_text(text(table()))
    print(f"wrote {args.out} ({ROWS} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
