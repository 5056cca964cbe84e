"""The README's promises: the two set-up commands first, and a benchmark table that is the records'."""
from pathlib import Path

from benchmarks.train import results_table
from benchmarks.records import RESULTS_DIR

REPO = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    first_block = text.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_benchmark_table_is_generated_from_the_records():
    table = results_table(REPO / RESULTS_DIR)
    assert table.count("\n") > 5, "no benchmark records found"
    assert table in (REPO / "README.md").read_text(), "README table is stale: paste `lease bench table`"
