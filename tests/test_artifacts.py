"""The artifact cache: hits, misses after a change, and never a hit on a missing or damaged output."""
import json
import os
import time

import pytest

from pipeline.artifacts import RECORD_NAME, ArtifactStore, StageSpec, input_digest, pending_items, quick_file_digest


def spec(config=None, upstream=None, inputs=None, stage="demo", code="v1") -> StageSpec:
    return StageSpec(stage=stage, config=config or {"n": 3}, code_version=code, upstream=upstream or {},
                     inputs=inputs or {})


class CountingBuild:
    """A stage that writes a small and a large output and counts its runs."""

    def __init__(self, big_bytes: int = 5 << 20):
        self.calls, self.big_bytes = 0, big_bytes

    def __call__(self, out):
        self.calls += 1
        (out / "small.json").write_text(json.dumps({"call": self.calls}))
        (out / "shards").mkdir()
        (out / "shards" / "big.bin").write_bytes(os.urandom(self.big_bytes))
        return {"rows": 3}


def test_second_run_is_a_hit_with_the_recorded_result(tmp_path):
    store, build = ArtifactStore(tmp_path), CountingBuild()
    first = store.run(spec(), build)
    second = store.run(spec(), build)
    assert (first.status, second.status, build.calls) == ("ran", "cached", 1)
    assert second.result == {"rows": 3} and second.key == first.key
    record = json.loads((tmp_path / "demo" / first.key / RECORD_NAME).read_text())
    assert record["outputs"]["shards/big.bin"]["size"] == 5 << 20
    assert set(record) >= {"stage", "code_version", "config", "upstream", "inputs", "outputs", "seconds"}
    assert not list((tmp_path / "demo").glob("*.partial*"))  # published by rename


@pytest.mark.parametrize("change", [
    {"config": {"n": 4}}, {"upstream": {"manifest": "abc"}}, {"inputs": {"ckpt": "d1"}}, {"code": "v2"},
])
def test_any_change_of_what_determines_the_output_is_a_miss(tmp_path, change):
    store, build = ArtifactStore(tmp_path), CountingBuild(big_bytes=10)
    base = store.run(spec(), build)
    changed = store.run(spec(**change), build)
    assert changed.status == "ran" and changed.key != base.key and build.calls == 2


@pytest.mark.parametrize("damage", ["delete_dir", "delete_file", "truncate", "flip_small", "flip_big_same_mtime",
                                    "delete_record"])
def test_missing_or_damaged_output_recomputes(tmp_path, damage):
    store, build = ArtifactStore(tmp_path), CountingBuild()
    key = store.run(spec(), build).key
    root = tmp_path / "demo" / key
    big = root / "shards" / "big.bin"
    if damage == "delete_dir":
        import shutil
        shutil.rmtree(root)
    elif damage == "delete_file":
        big.unlink()
    elif damage == "truncate":
        big.write_bytes(big.read_bytes()[:-1])
    elif damage == "flip_small":
        (root / "small.json").write_text(json.dumps({"call": 9}))  # same size, other content
    elif damage == "flip_big_same_mtime":
        stat = big.stat()
        data = bytearray(big.read_bytes())
        data[123] ^= 0xFF
        big.write_bytes(bytes(data))
        os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only a full verify can see this
        assert store.run(spec(), build).status == "cached"
        assert store.run(spec(), build, verify=True).status == "ran"
        return
    elif damage == "delete_record":
        (root / RECORD_NAME).unlink()
    record, reason = store.check(spec())
    assert record is None and reason != "hit"
    assert store.run(spec(), build).status == "ran" and build.calls == 2
    assert store.run(spec(), build).status == "cached"


def test_failed_build_publishes_nothing_and_the_rerun_resumes_in_the_partial_dir(tmp_path):
    store = ArtifactStore(tmp_path)
    written = []

    def build(out):
        todo = pending_items(range(4), out, lambda i: f"shard-{i}.npy")
        for i in todo:
            (out / f"shard-{i}.npy").write_bytes(b"x" * (i + 1))
            written.append(i)
            if i == 1 and len(written) == 2:
                raise KeyboardInterrupt  # killed after two shards
        return {"shards": 4}

    with pytest.raises(KeyboardInterrupt):
        store.run(spec(), build)
    assert store.check(spec())[0] is None
    assert store.run(spec(), build).status == "ran"
    assert written == [0, 1, 2, 3]  # shards 0 and 1 were not redone
    assert store.run(spec(), build).status == "cached"


def test_forced_run_starts_fresh_and_replaces_the_artifact(tmp_path):
    store, build = ArtifactStore(tmp_path), CountingBuild(big_bytes=10)
    key = store.run(spec(), build).key
    assert store.run(spec(), build, force=True).status == "ran"
    assert json.loads((tmp_path / "demo" / key / "small.json").read_text()) == {"call": 2}


def test_input_digests_change_with_content_or_metadata(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"a" * (3 << 20))  # > 2 MiB: head/tail digest
    before = quick_file_digest(ckpt)
    data = bytearray(ckpt.read_bytes())
    data[-5] = ord("b")
    ckpt.write_bytes(bytes(data))
    assert quick_file_digest(ckpt) != before
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"1")
    tree = input_digest(tmp_path / "images", content=False)
    (images / "b.jpg").write_bytes(b"2")
    assert input_digest(tmp_path / "images", content=False) != tree
    with pytest.raises(FileNotFoundError, match="does not exist"):
        input_digest(tmp_path / "nope")


def test_atomic_writes_get_the_umask_mode_not_0600(tmp_path):
    import os
    import stat

    from lease.io import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


# ------------------------------------------------------------------------ one writer per key


def test_a_second_run_waits_for_the_builder_and_then_uses_its_artifact(tmp_path, caplog):
    import threading

    store, started, release = ArtifactStore(tmp_path), threading.Event(), threading.Event()
    calls = []

    def slow_build(out):
        calls.append(1)
        for i in range(4):
            (out / f"shard-{i}").write_bytes(b"x" * 10)
            if i == 2:
                started.set()
                release.wait(10)  # the second run arrives while shards are being written
        return {"shards": 4}

    first: dict = {}
    builder = threading.Thread(target=lambda: first.update(outcome=store.run(spec(), slow_build)))
    builder.start()
    assert started.wait(10)
    second: dict = {}
    waiter = threading.Thread(target=lambda: second.update(outcome=store.run(spec(), slow_build)))
    waiter.start()
    time.sleep(0.5)
    assert "waiting for pid" in caplog.text and waiter.is_alive()  # it says for whom, and waits
    release.set()
    builder.join(10), waiter.join(10)
    assert (first["outcome"].status, second["outcome"].status, len(calls)) == ("ran", "cached", 1)
    record, _ = store.check(spec())
    assert sorted(record.outputs) == [f"shard-{i}" for i in range(4)]
    assert not store.partials("demo", first["outcome"].key)


def test_no_wait_fails_at_once_naming_the_holder(tmp_path):
    from pipeline.artifacts import ArtifactLocked, KeyLock

    store = ArtifactStore(tmp_path)
    with KeyLock(tmp_path / "demo", spec().key).held(wait=True):
        with pytest.raises(ArtifactLocked, match=rf"being built by pid {os.getpid()} on .*--no-wait"):
            store.run(spec(), CountingBuild(big_bytes=10), wait=False)
    assert store.run(spec(), CountingBuild(big_bytes=10), wait=False).status == "ran"  # released


def test_partials_of_dead_runs_are_resumed_from_and_the_rest_cleaned(tmp_path):
    store = ArtifactStore(tmp_path)
    key, stage_dir = spec().key, tmp_path / "demo"
    old, newer = stage_dir / f"{key}.partial-1-aaaaaa", stage_dir / f"{key}.partial"  # also the old layout
    for directory, shards in ((old, [0]), (newer, [0, 1])):
        directory.mkdir(parents=True)
        for i in shards:
            (directory / f"shard-{i}.npy").write_bytes(b"done")
    os.utime(old, ns=(1, 1))
    written = []

    def build(out):
        for i in pending_items(range(3), out, lambda i: f"shard-{i}.npy"):
            (out / f"shard-{i}.npy").write_bytes(b"done")
            written.append(i)
        return {}

    assert store.run(spec(), build).status == "ran"
    assert written == [2]  # resumed from the newest partial
    assert sorted(p.name for p in stage_dir.iterdir()) == [".locks", key]


def test_publish_never_replaces_a_complete_artifact_unless_forced(tmp_path):
    store, build = ArtifactStore(tmp_path), CountingBuild(big_bytes=10)
    key = store.run(spec(), build).key
    stray = store.claim_work_dir(spec(), fresh=False)  # a writer that found no artifact a moment ago
    (stray / "small.json").write_text("fragment")
    store.publish(stray, spec(), force=False)
    assert store.is_complete(spec()) and not stray.exists()
    assert json.loads((tmp_path / "demo" / key / "small.json").read_text()) == {"call": 1}


def test_verify_sees_an_input_rewritten_with_the_same_size_and_mtime(tmp_path):
    ckpt = tmp_path / "inputs" / "model.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"a" * (5 << 20))  # over 2 MiB: the key digests its first and last MiB only
    store, build = ArtifactStore(tmp_path / "artifacts"), CountingBuild(big_bytes=10)

    def with_input():
        return StageSpec(stage="demo", config={}, code_version="v1", inputs={"ckpt": input_digest(ckpt)},
                         input_paths={"ckpt": str(ckpt)})

    assert store.run(with_input(), build).status == "ran"
    stat = ckpt.stat()
    ckpt.write_bytes(b"a" * (2 << 20) + b"b" + b"a" * ((3 << 20) - 1))  # one byte in the middle
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.run(with_input(), build).status == "cached"  # size and mtime unchanged: the cheap key holds
    record, reason = store.check(with_input(), verify=True)
    assert record is None and "changed content" in reason
    assert store.run(with_input(), build, verify=True).status == "ran"
