"""Write the generated tables into README.md and docs/results.md, or check that they are current.

    python -m experiments.report            # rewrite every generated block
    python -m experiments.report --check    # exit 1 naming every block that differs from its files

A block sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->`; its text is BLOCKS[NAME]()
(experiments/record.py, record_parts.py, summary.py, fidelity.py), computed from the result files the table names.
tests/test_report.py runs the check and keeps hand-typed result numbers out of the prose around them.
"""
from __future__ import annotations

import argparse
import re
import sys

from experiments import decomposition, fidelity, record, record_parts, summary
from experiments.index import ROOT

DOCS = ("README.md", "docs/results.md")
BLOCKS = {
    "headline": fidelity.baseline_table,
    "reproduce": summary.reproduce_table,
    "status": summary.status_block,
    "targets": summary.targets_table,
    "e2e": record.e2e_table,
    "paid": record.paid_table,
    "spread": record.spread_table,
    "interference": record_parts.interference_table,
    "kernels": record_parts.kernels_table,
    "sm-rate": record_parts.sm_rate_table,
    "kernel-history": record_parts.kernel_history_table,
    "sm-share": record_parts.sm_share_table,
    "wave": record_parts.wave_table,
    "split-rules": record_parts.split_rules_table,
    "mlp-split": record_parts.mlp_split_table,
    "overhead": record_parts.overhead_table,
    "moe": record_parts.moe_table,
    "host": record_parts.host_table,
    "mixtral": record.mixtral_table,
    "attention": record_parts.attention_table,
    "emulated": record.emulated_table,
    "emulated-ctas": record.emulated_ctas_table,
    "decomposition": decomposition.decomposition_table,
    "levers": decomposition.levers_table,
    "checks": record.checks_table,
}
BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)


def blocks(text: str) -> dict[str, str]:
    """{name: the block's current text} of one document."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def render(text: str) -> str:
    """The document with every block's text regenerated from its files."""
    def fill(m):
        if m.group(2) not in BLOCKS:
            raise KeyError(f"unknown generated block {m.group(2)!r} (experiments/report.py BLOCKS)")
        return m.group(1) + BLOCKS[m.group(2)]() + "\n" + m.group(4)
    return BLOCK.sub(fill, text)


def stale() -> list[str]:
    """'doc: block' for every block whose text differs from what its files give."""
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        fresh = blocks(render(text))
        out += [f"{doc}: {name}" for name, body in blocks(text).items() if body != fresh[name]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated block is stale")
    args = p.parse_args(argv)
    if args.check:
        found = stale()
        for line in found:
            print(f"stale generated block {line}: run python -m experiments.report", file=sys.stderr)
        return 1 if found else 0
    for doc in DOCS:
        path = ROOT / doc
        path.write_text(render(path.read_text()))
        print(f"wrote {doc} ({len(blocks(path.read_text()))} generated blocks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
