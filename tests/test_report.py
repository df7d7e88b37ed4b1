"""README.md and docs/results.md (experiments/report.py): every generated table equals what its result
files give, no measured number is typed into the prose around the tables, and every row from an
emulated run says EMULATED."""
import re

from conftest import ROOT
from experiments import report

# A measured quantity typed into prose: a ratio (1.05x), a share (7%), a time (0.13 ms) or a decimal (1.092),
# alone or as a range; the same rule as tests/test_notebooks.py.
RESULT_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:\s*-\s*\d+(?:\.\d+)?)?\s*(?:x\b|%|ms\b|us\b)|\b\d+\.\d+\b")


def _docs():
    return {doc: (ROOT / doc).read_text() for doc in report.DOCS}


def test_generated_tables_match_their_result_files():
    assert not report.stale(), "stale tables (run python -m experiments.report): " + ", ".join(report.stale())


def test_every_table_has_one_place():
    placed = [name for text in _docs().values() for name in report.blocks(text)]
    assert sorted(placed) == sorted(report.BLOCKS), "each generated table appears exactly once in README.md or docs/results.md"


def test_a_table_that_disagrees_with_its_files_is_caught():
    text = _docs()["README.md"]
    body = report.blocks(text)["headline"]
    edited = text.replace(body, body.replace("| 2xH200, TP=2 | llama3-70b | 4096 | ", "| 2xH200, TP=2 | llama3-70b | 4096 | 9", 1))
    assert edited != text and report.blocks(report.render(edited))["headline"] == body


def test_no_result_number_is_typed_outside_the_generated_tables():
    for doc, text in _docs().items():
        prose = report.BLOCK.sub("", text)
        prose = re.sub(r"```.*?```", "", prose, flags=re.S)          # code blocks: commands, the citation
        prose = re.sub(r"`[^`]*`|\]\([^)]*\)", "", prose)            # code spans and link targets hold digits
        typed = [m.group(0) for m in RESULT_NUMBER.finditer(prose)]
        assert not typed, f"{doc}: hand-typed result numbers {typed}: generate them (experiments/record.py)"


def test_every_emulated_row_says_emulated():
    for doc, text in _docs().items():
        for body in report.blocks(text).values():
            lines = body.splitlines()
            header = lines[0] if lines else ""
            for line in lines:
                if "-emulated-" in line:
                    assert "EMULATED" in line or "EMULATED" in header, f"{doc}: {line[:120]}"


def test_the_readme_is_short_and_keeps_the_ci_test_command():
    readme = _docs()["README.md"]
    assert len(readme.splitlines()) <= 130
    assert "python -m pytest -q tests" in readme
    assert "python3 -m pytest -q tests" in (ROOT / ".ci" / "run").read_text()
    assert "issue" not in readme.lower() and "two commands" not in readme.lower()
