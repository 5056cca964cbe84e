"""The README's promises: the two set-up commands first, and a benchmark table that is the records'."""
from pathlib import Path

from benchmarks.train import README_RECORDS, results_table
from benchmarks.records import RESULTS_DIR

REPO = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    first_block = text.split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make demo", "make test"]


def test_the_benchmark_tables_are_generated_from_the_records():
    """The README shows the headline records' rows, benchmarks/README.md every record's."""
    headline, full = results_table(REPO / RESULTS_DIR, README_RECORDS), results_table(REPO / RESULTS_DIR)
    assert headline.count("\n") > 5 and full.count("\n") > headline.count("\n"), "no benchmark records found"
    assert headline in (REPO / "README.md").read_text(), "README table is stale: paste `lease bench table`"
    notes = (REPO / "benchmarks/README.md").read_text()
    assert full in notes, "benchmarks/README.md's table is stale: paste `lease bench table --all`"
