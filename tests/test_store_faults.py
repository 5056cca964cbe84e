"""The artifact store under faults, through real `lease run` processes: two runs on one artifacts root
(one writer per key, whichever run finishes), a read-only root, a full disk. The runs talk to one
`make server`, as after a user's `make server` (test_signals covers the temporary server).

Each two-run case freezes the first run (SIGSTOP) once its tokenize stage has written three shards, so that the
second run provably meets a key that is being built (and a third, with --no-wait, fails naming the
first); then the first either goes on (and the second uses its artifact) or is killed with SIGKILL (and
the second resumes its partial work). Afterwards every
record must match the files on disk and a single, undisturbed run's digests.
"""
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from lease_runs import TIMEOUT, TINY, output_digests, run_to_end, start_run, statuses, wait_until
from pipeline.artifacts import LOCKS_DIR, RECORD_NAME, Record, damaged_output
from pipeline.config import load_pipeline_config
from pipeline.stages import TOKENIZE_STAGES, run_in_process

# one to three tiny tokenization flows per test (up to ~40 s on 2 cores), on one `make server`
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("runs_use_the_server")]

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Output digests of one undisturbed run (in process, no Prefect), by stage."""
    root = tmp_path_factory.mktemp("single")
    cfg = load_pipeline_config("demo", [*TINY, f"artifacts={root}"])
    digests = {outcome.name: (outcome.key, output_digests(Path(outcome.path), root))
               for outcome in run_in_process(cfg, TOKENIZE_STAGES)}
    return {"root": root, "digests": digests}


def tokenize_shards_written(artifacts: Path) -> int:
    return len(list(artifacts.glob("tokenize*/*.partial-*/*/shard-*.npz")))  # the stage's parts build them


def assert_store_matches(artifacts: Path, reference: dict) -> None:
    """Every record against its files (sha256 of each) and the single run; no partial work or holder left."""
    for name, (key, digests) in reference["digests"].items():
        directory = artifacts / name / key
        record = Record.load(directory / RECORD_NAME)
        assert damaged_output(directory, record.outputs, verify=True) is None, name
        assert output_digests(directory, artifacts) == digests, f"{name} differs from a single run"
        assert not list((artifacts / name).glob("*.partial*")), f"{name}: partial work left behind"
        assert not list((artifacts / name / LOCKS_DIR).glob("*.holder.json")), f"{name}: a holder note left"


def freeze_first_run_mid_tokenize(tmp_path: Path):
    artifacts, home = tmp_path / "artifacts", tmp_path / "prefect"
    logs = (tmp_path / "first.log", tmp_path / "second.log")
    first = start_run(artifacts, home, logs[0])
    wait_until(lambda: tokenize_shards_written(artifacts) >= 3, "the first run's third shard", first, logs=logs[:1])
    os.kill(first.pid, signal.SIGSTOP)
    second = start_run(artifacts, home, logs[1])
    waiting = re.compile(rf"tokenize(-part)? \w+: waiting for pid {first.pid} ")
    wait_until(lambda: waiting.search(logs[1].read_text()), "the second run waiting for the first", second,
               logs=logs)
    return artifacts, first, second, logs


def test_the_second_run_waits_for_the_first_and_uses_its_artifacts(tmp_path, reference):
    artifacts, first, second, logs = freeze_first_run_mid_tokenize(tmp_path)
    impatient = start_run(artifacts, tmp_path / "prefect", tmp_path / "no-wait.log", "--no-wait")
    assert impatient.wait(TIMEOUT) == 1  # a third run, told not to wait, fails at once naming the builder
    assert re.search(rf"tokenize(-part)? \w+ is being built by pid {first.pid} on ",
                     (tmp_path / "no-wait.log").read_text())
    os.kill(first.pid, signal.SIGCONT)
    assert (first.wait(TIMEOUT), second.wait(TIMEOUT)) == (0, 0), logs[1].read_text()[-3000:]
    first_text, second_text = (log.read_text() for log in logs)
    # the part the second waited for is the first's; the stage that gathers the parts after it goes to
    # whichever run takes its lock first, and the other one uses it
    assert "tokenize-part: running" in first_text and "tokenize-part: running" not in second_text
    assert "tokenize-part: cached" in second_text
    assert sorted(statuses(log)["tokenize"] for log in logs) == ["cached", "ran"]
    assert_store_matches(artifacts, reference)


def test_the_second_run_takes_over_when_the_first_is_killed(tmp_path, reference):
    artifacts, first, second, logs = freeze_first_run_mid_tokenize(tmp_path)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(TIMEOUT)
    assert second.wait(TIMEOUT) == 0, logs[1].read_text()[-3000:]
    assert re.search(r"tokenize(-part)?: resuming from the partial work of an earlier run", logs[1].read_text())
    assert statuses(logs[1])["tokenize"] == "ran"
    assert_store_matches(artifacts, reference)


def mount(*args: str) -> None:
    """`mount ARGS`, or skip the test with the reason where this machine does not allow it."""
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or 'mount exited ' + str(done.returncode)})")


@pytest.fixture
def mounts():
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", str(point)], capture_output=True)


def test_a_read_only_root_serves_cached_stages_and_fails_a_rebuild_in_one_line(tmp_path, reference, mounts):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mount("--bind", str(reference["root"]), str(read_only))
    mounts.append(read_only)
    mount("-o", "remount,ro,bind", str(read_only))
    code, text = run_to_end(read_only, tmp_path, "cached")
    assert code == 0, text[-3000:]  # all cached: nothing to write but the run record, which is let go
    assert "cannot write the run record" in text and re.search(r"pack\s+cached", text)
    code, text = run_to_end(read_only, tmp_path, "forced", "--force", "pack")
    assert code == 1
    assert "pack: cannot write under" in text and "read-only; cached stages can still be read" in text
    assert re.search(r"tokenize\s+cached", text) and re.search(r"pack\s+failed", text)  # the stage table
    assert "Traceback" not in text


def test_a_full_disk_fails_the_stage_in_one_line_and_leaves_no_torn_file(tmp_path, mounts):
    small = tmp_path / "small"
    small.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small))  # the demo tokenizers need about 11 MB
    mounts.append(small)
    code, text = run_to_end(small / "artifacts", tmp_path, "full")
    assert code == 1
    assert "demo-assets: cannot write under" in text and "the disk filled up" in text
    assert re.search(r"demo-data\s+ran", text) and re.search(r"demo-assets\s+failed", text)
    assert "Traceback" not in text
    files = [p for p in (small / "artifacts" / "demo-assets").rglob("*") if p.is_file()]
    assert all(p.parent.name == LOCKS_DIR for p in files), files  # no half-written checkpoint anywhere
