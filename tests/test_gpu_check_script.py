"""scripts/gpu-check: every experiment command it would run on a lab machine parses with that
experiment's own argument parser, so a misspelt flag or a bad choice fails here on the CPU instead of
costing a device call."""
import importlib
import re
import shlex

import pytest

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu-check"
VARS = {"OUT": "/tmp/tw-gpu-check", "ALL": "nccl nocomm fused finegrained4 tokenweave", "TOKENS": "1024 4096",
        "m": "llama3-70b", "t": "2", "c": "2"}   # loop variables and the script's own defaults


def commands():
    """(section line, module, argv) of every `-m experiments.X ...` in the script, continuation lines
    joined and ${NAME:-default} / $NAME expanded."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"-m experiments\.(\w+)(.*?)(?:;;|$|\bdone\b|\n)", line):
            args = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda v: v.group(2), m.group(2))
            args = re.sub(r"\$(\w+)", lambda v: VARS[v.group(1)], args).replace(";", " ")
            out.append((line.strip()[:60], m.group(1), shlex.split(args)))
    return out


def test_the_script_names_experiments():
    assert {mod for _, mod, _ in commands()} >= {"latency", "throughput", "moe", "tune", "kernels", "sm_share"}


@pytest.mark.parametrize("where,module,argv", commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_command_parses(where, module, argv):
    mod = importlib.import_module(f"experiments.{module}")
    args = mod.parse_args(argv)
    assert args is not None, where
