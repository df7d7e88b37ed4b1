"""experiments/results/INDEX.md: every result file, what wrote it, on what, and which claims cite it.

    python -m experiments.index            # rewrite experiments/results/INDEX.md
    python -m experiments.index --check    # exit 1 if INDEX.md is stale or a cited file is missing

Everything in the index comes from the files themselves: each JSON-lines row carries the writer's
metadata (experiment, model, tp, world_size, gpu, commit, timestamp; tw/measure/results.py), each trace
its run's metadata (`otherData` of its Chrome JSON). "Cited by" is found by name in the documents
(README, docs/, experiments/NOTES.md, the notebooks) and in the figures' file lists.

Layout of experiments/results/ (the rule for archive/ is RULE below, printed in the index's header):
    *.jsonl, traces-*/   current result files, named by their writer (or its --out)
    logs/                console logs of device runs (scripts/gpu-check writes its log there)
    archive/             superseded runs, each with the newer run that replaces it (SUPERSEDED)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tw.measure.results import read

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
INDEX = RESULTS / "INDEX.md"
LOGS, ARCHIVE = "logs", "archive"
CITING = ("README.md", "docs/*.md", "experiments/NOTES.md", "notebooks/*.ipynb")  # where claims are made

RULE = ("A run is superseded, and moved to `archive/`, only when a newer run of the same configuration "
        "replaces it: same experiment, model, TP (or emulated TP), shard size, GPU and depth, and the newer "
        "file measures every point (strategy, kernel or mode, at each token count) the older one did; and "
        "no README, docs page or figure quotes the older file (experiments/NOTES.md may, as history, by its "
        "`archive/` path). A run that measured something no later run repeats stays current, however old. "
        "tests/test_index.py checks every archived run against its replacement's rows.")

SUPERSEDED = {  # archive/<file>: (the current file that replaces it, why)
    "interference-llama3-70b-tp2-H200-method1.jsonl": (
        "interference-llama3-70b-tp2-H200.jsonl", "first timing method (NOTES: interference measured, method fixed)"),
    "latency-llama3-70b-tp2-H200-issue2-acceptance.jsonl": (
        "latency-llama3-70b-tp2-H200-e2e-tuned.jsonl", "one timing round, an earlier kernel build"),
    "latency-llama3-70b-shard-as-tp8-on-tp2-H200.jsonl": (
        "latency-llama3-70b-shard-as-tp8-on-tp2-H200-tuned.jsonl", "one timing round, an earlier kernel build"),
    "moe-block-mixtral-8x22b-tp1-gather-overlap-H200.jsonl": (
        "moe-block-mixtral-8x22b-tp1-row-copies-H200.jsonl", "before the warp-per-row gather and un-permute"),
    "moe-block-mixtral-8x22b-tp8-shards-gather-overlap-H200.jsonl": (
        "moe-block-mixtral-8x22b-tp8-shards-gather-timed-H200.jsonl", "before the warp-per-row row copies"),
    "moe-block-mixtral-8x22b-tp8-shards-row-copies-H200.jsonl": (
        "moe-block-mixtral-8x22b-tp8-shards-gather-timed-H200.jsonl", "before the gather was timed alone"),
    "tune-llama3-70b-tp2-H200.jsonl": (
        "tune-llama3-70b-tp2-H200-warm-profile.jsonl", "one timing round, before the GEMM profile was taken warm"),
    "tune-llama3-70b-tp2-H200-roundrobin.jsonl": (
        "tune-llama3-70b-tp2-H200-warm-profile.jsonl", "before the GEMM profile was taken warm"),
}

# A result file's name as the documents write it: optionally under experiments/results/, logs/ or archive/.
CITED_NAME = re.compile(r"(?<![\w.*{}/<>-])((?:experiments/results/)?(?:(?:logs|archive|traces-[\w.-]+)/)?"
                        r"[A-Za-z][\w.+-]*\.(?:jsonl|log))\b")
CITED_DIR = re.compile(r"(?<![\w.-])(traces-[\w-]+)/")


def result_files() -> list[str]:
    """Every result file and log under experiments/results/ (relative paths), INDEX.md and the CPU
    runs .gitignore keeps out excepted."""
    return sorted(str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*")
                  if p.is_file() and p != INDEX and "-cpu-" not in p.name and not p.name.endswith("-cpu.jsonl")
                  and "__pycache__" not in p.parts)


def _citing_texts() -> dict[str, str]:
    texts = {}
    for pattern in CITING:
        for p in sorted(ROOT.glob(pattern)):
            texts[str(p.relative_to(ROOT))] = p.read_text()
    return texts


def cited_names(text: str) -> list[str]:
    """The result files a document names, as paths relative to experiments/results/."""
    return [m.group(1).removeprefix("experiments/results/") for m in CITED_NAME.finditer(text)]


def citations() -> dict[str, list[str]]:
    """{path under experiments/results/: [what cites it]}: documents by path, figures as `figure NAME`."""
    from experiments.figures import FIGURE_FILES
    cited: dict[str, list[str]] = {}
    files = result_files()
    for doc, text in _citing_texts().items():
        names = set(cited_names(text))
        dirs = {m.group(1) for m in CITED_DIR.finditer(text)}
        for f in files:
            if f in names or f.split("/")[0] in dirs:
                cited.setdefault(f, []).append(doc)
    for fig, names in FIGURE_FILES.items():
        for n in names:
            cited.setdefault(n, []).append(f"figure {fig}")
    return cited


def missing_citations(texts: dict[str, str] | None = None) -> list[str]:
    """'doc: name' for every result file a document names that is not there (a moved or renamed file)."""
    texts = _citing_texts() if texts is None else texts
    return [f"{doc}: {n}" for doc, text in texts.items() for n in cited_names(text) if not (RESULTS / n).is_file()]


def _meta(path: Path) -> list[dict]:
    """The rows (JSON lines) or the trace's run metadata, as a list of dicts."""
    if path.suffix == ".jsonl":
        return read(path)
    if path.suffix in (".json", ".csv") and path.parent.name.startswith("traces-"):
        js = path.with_suffix(".json")
        return [json.loads(js.read_text()).get("otherData", {})] if js.is_file() else [{}]
    return []


def _values(rows, key) -> list:
    return sorted({r[key] for r in rows if r.get(key) is not None}, key=str)


def experiment(name: str, rows: list[dict]) -> str:
    """The writing experiment: the rows' `experiment` column, else the writer's file-name prefix."""
    found = _values(rows, "experiment")
    return found[0] if found else name.split("-")[0]


def setting(name: str, rows: list[dict]) -> tuple:
    """What must match for one run to replace another (RULE)."""
    return (experiment(name, rows), tuple(_values(rows, "model")), tuple(_values(rows, "tp")),
            tuple(_values(rows, "world_size")), tuple(_values(rows, "emulated_tp")),
            tuple(_values(rows, "shard_as_tp") or _values(rows, "shard_tp")), tuple(_values(rows, "gpu")),
            tuple(_values(rows, "layers")))


def points(rows: list[dict]) -> set:
    """(what was measured, tokens) of every row: a strategy, a kernel, a MoE mode or a tune kind."""
    return {(r.get("strategy") or r.get("kernel") or r.get("mode") or r.get("kind"), r.get("tokens")) for r in rows}


def _tp(rows) -> str:
    emu = _values(rows, "emulated_tp")
    if emu:
        return "EMULATED " + ", ".join(map(str, emu))
    tp = ", ".join(map(str, _values(rows, "tp"))) or "-"
    shards = _values(rows, "shard_as_tp") or _values(rows, "shard_tp")
    shards = [s for s in shards if str(s) != tp]
    return tp + (f" (shards of TP={', '.join(map(str, shards))})" if shards else "")


def _gpu(rows) -> str:
    gpus = [g for g in _values(rows, "gpu")]
    if not gpus:
        return "-"
    if any(str(g).startswith("none") for g in gpus):
        return "CPU"
    n = _values(rows, "world_size")
    shared = any(r.get("shared_gpu") for r in rows)
    count = f"{n[0]} ranks on 1x" if shared and n else (f"{n[0]}x" if n else "")
    return f"{count} {', '.join(gpus)}".strip()


def _commit(rows) -> str:
    commits = ", ".join(c[:7] + ("-dirty" if c.endswith("-dirty") else "") for c in _values(rows, "commit"))
    return (commits or "-") + (" (corrected: commit_note)" if _values(rows, "commit_note") else "")


def entry(rel: str, cited: dict) -> dict:
    path = RESULTS / rel
    rows = _meta(path)
    name = path.name
    if rel.startswith(ARCHIVE + "/"):
        newer, why = SUPERSEDED.get(name, ("?", "not in experiments/index.py SUPERSEDED"))
        status = f"superseded by `{newer}`: {why}"
    else:
        status = "current"
    exp = experiment(name, rows) if rows else "-"
    stamps = _values(rows, "timestamp")
    return {"file": rel, "script": f"experiments/{exp}.py" if (ROOT / "experiments" / f"{exp}.py").is_file() else exp,
            "model": ", ".join(_values(rows, "model")) or "-", "tp": _tp(rows), "gpu": _gpu(rows),
            "commit": _commit(rows), "date": stamps[0][:10] if stamps else "-",
            "rows": str(len(rows)) if path.suffix == ".jsonl" else "-", "status": status,
            "cited": ", ".join(cited.get(rel, [])) or "-"}


def render() -> str:
    cited = citations()
    files = result_files()
    results = [f for f in files if not f.startswith(LOGS + "/")]
    logs = [f for f in files if f.startswith(LOGS + "/")]
    lines = ["# experiments/results: every result file, what wrote it, and what cites it", "",
             "Generated by `python -m experiments.index` from the files' own metadata (every JSON-lines row "
             "carries its writer's metadata; a trace carries its run's in its JSON's `otherData`); do not edit "
             "by hand. `python -m experiments.index --check` (run by tests/test_index.py) fails when this file "
             "is stale, when a committed file is missing here, or when a document cites a file that is not there.",
             "",
             "- `*.jsonl`, `traces-*/`: result files, named by the script that wrote them (or its `--out`); "
             "CPU-fallback runs carry `-cpu-` and are not committed.",
             "- `logs/`: console logs of device runs (`scripts/gpu-check` names its log and writes it there).",
             "- `archive/`: superseded runs. " + RULE,
             "- TP: the tensor-parallel degree the rows ran at; EMULATED N: one process played one rank of TP=N "
             "(docs/design.md#emulation); shards of TP=N: weight shards sized as at TP=N.",
             "- Cited by: the documents that name the file, and the figures drawn from it "
             "(`experiments/figures.py` FIGURE_FILES).",
             "", "## Result files", "",
             "| file | script | model | TP | GPU | commit | date | rows | status | cited by |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in results:
        e = entry(f, cited)
        lines.append(f"| `{e['file']}` | {e['script']} | {e['model']} | {e['tp']} | {e['gpu']} | {e['commit']} | "
                     f"{e['date']} | {e['rows']} | {e['status']} | {e['cited']} |")
    lines += ["", "## Logs", "", "| file | cited by |", "|---|---|"]
    lines += [f"| `{f}` | {', '.join(cited.get(f, [])) or '-'} |" for f in logs]
    return "\n".join(lines) + "\n"


def problems() -> list[str]:
    """What --check reports: a stale index, a cited file that is not there, a log outside logs/, an
    archived run its replacement does not replace (RULE)."""
    out = []
    if not INDEX.is_file() or INDEX.read_text() != render():
        out.append("experiments/results/INDEX.md is stale: run python -m experiments.index")
    out += [f"cited but missing: {m}" for m in missing_citations()]
    files = result_files()
    out += [f"log outside logs/: {f}" for f in files if f.endswith(".log") and not f.startswith(LOGS + "/")]
    out += [f"not a log in logs/: {f}" for f in files if f.startswith(LOGS + "/") and not f.endswith(".log")]
    archived = {f.split("/", 1)[1] for f in files if f.startswith(ARCHIVE + "/")}
    out += [f"archive/{n} is not in SUPERSEDED (experiments/index.py)" for n in sorted(archived - set(SUPERSEDED))]
    out += [f"SUPERSEDED names {n}, which is not in archive/" for n in sorted(set(SUPERSEDED) - archived)]
    cited = citations()
    for old in sorted(archived & set(SUPERSEDED)):
        new = SUPERSEDED[old][0]
        if not (RESULTS / new).is_file():
            out.append(f"archive/{old}: its replacement {new} is not a current file")
            continue
        out += [f"archive/{old}: {why}" for why in not_replaced(old, read(RESULTS / ARCHIVE / old), new, read(RESULTS / new))]
        quoted = [c for c in cited.get(f"{ARCHIVE}/{old}", []) if c != "experiments/NOTES.md"]
        if quoted:
            out.append(f"archive/{old} is superseded but quoted by {', '.join(quoted)}")
    return out


def not_replaced(old: str, old_rows: list[dict], new: str, new_rows: list[dict]) -> list[str]:
    """Why run `new` does not replace run `old` under RULE (empty: it does)."""
    out = []
    if setting(old, old_rows) != setting(new, new_rows):
        out.append(f"not the configuration of {new}: {setting(old, old_rows)} vs {setting(new, new_rows)}")
    if min(_values(old_rows, "timestamp")) >= min(_values(new_rows, "timestamp")):
        out.append(f"not older than {new}")
    if not points(old_rows) <= points(new_rows):
        out.append(f"{new} does not measure {sorted(points(old_rows) - points(new_rows), key=str)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if INDEX.md is stale or a "
                                                        "citation, log or archived run is out of place")
    args = p.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    INDEX.write_text(render())
    print(f"wrote {INDEX.relative_to(ROOT)} ({len(result_files())} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
