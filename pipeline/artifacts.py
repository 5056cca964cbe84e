"""Content-addressed stage artifacts: `artifacts/<stage>/<key>/` with a completion record.

What "cached" means (DESIGN.md, end of "The data path"):

- The **key** of a stage run is a digest of exactly what determines its output: the stage name, the
  stage's normalised config, its **code** (the project modules its build function imports, with their
  digests, and the versions of the numeric libraries: `pipeline.code_version`), the keys of its upstream
  artifacts, and digests of its external inputs (data trees, checkpoints).
- **One writer per key.** A run that must build takes the key's inter-process lock
  (`artifacts/<stage>/.locks/<key>.lock`, `filelock`; the kernel releases it when the holder dies) and
  names itself in `<key>.holder.json` beside it. A second run on the same key waits, saying for whom, and
  then finds the artifact published (a hit), or fails at once with `wait=False` naming the holder.
- Under the lock, the run builds in a directory of its own, `<key>.partial-<pid>-<nonce>/`. Partial
  directories of earlier runs of the key (their holders are gone, or the lock would be held) are resumed
  from, by a forced run too (unless `restart`): the newest is adopted by rename, the others removed;
  stages that write shards skip the ones already there (`pending_items`). The run then writes
  `record.json` (stage, key, code, config, upstream keys, input digests and content digests, every
  output file with size/mtime/sha256, timings) and renames its directory to `<key>/`. A publish never
  replaces a complete, valid artifact unless forced.
- A **hit** needs the record and every recorded output with its recorded size; a file's sha256 is checked
  again when the file is small (≤ `SMALL_FILE_BYTES`), when its mtime differs from the recorded one, or
  always with `verify=True`, which also re-hashes the external inputs' contents against the record.
  Anything missing or different is a miss (with the reason logged) and the stage recomputes: never a
  silent hit.

Input digests, and why they are honest but cheap:
- a file: its size, mtime and the sha256 of its first and last MiB (`quick_file_digest`); files up to
  2 MiB are hashed whole. Editing a file changes its mtime, so a changed checkpoint is never a hit; copying
  it elsewhere (new mtime) costs one recompute, never a wrong result.
- a directory of model files (`content=True`): the quick digest of every file in it.
- a data tree (`content=False`, e.g. an ImageFolder of 1.28M JPEGs): every file's relative path, size and
  mtime, without reading the images.
- the record also holds each input's full content digest (`content_digest`), which `verify=True` checks:
  an input rewritten with the same size and mtime is a miss there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import stat as stat_module
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from filelock import FileLock, Timeout

from lease.io import atomic_write_json, file_digest, json_digest

log = logging.getLogger(__name__)

RECORD_NAME = "record.json"
PARTIAL_SUFFIX = ".partial"
KEY_LENGTH = 20  # hex digits of the sha256 used as directory name (80 bits)
SMALL_FILE_BYTES = 4 << 20  # outputs up to this size are re-hashed on every lookup
_WINDOW = 1 << 20
HASH_THREADS = 8  # parallel file reads when hashing a directory's contents


# ----------------------------------------------------------------------------------------- digests


def quick_file_digest(path: str | Path) -> str:
    """sha256 over (size, mtime, first MiB, last MiB) of a file; the whole file when it is ≤ 2 MiB."""
    path = Path(path)
    stat = path.stat()
    h = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with path.open("rb") as fh:
        if stat.st_size <= 2 * _WINDOW:
            h.update(fh.read())
        else:
            h.update(fh.read(_WINDOW))
            fh.seek(-_WINDOW, os.SEEK_END)
            h.update(fh.read(_WINDOW))
    return h.hexdigest()


def input_digest(path: str | Path, content: bool = True) -> str:
    """Digest of an external input: a file, a directory of model files, a data tree, or a glob of files.

    `content=True` digests each file with `quick_file_digest`; `content=False` (big data trees) uses only
    each file's relative path, size and mtime.
    """
    if any(ch in str(path) for ch in "*?["):  # a glob of files, e.g. WebDataset tars
        matches = sorted(glob.glob(str(path)))
        if not matches:
            raise FileNotFoundError(f"input pattern {path} matches no file: check the path in the config")
        return json_digest([[m, input_digest(m, content)] for m in matches])
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist: check the path in the config")
    if path.is_file():
        stat = path.stat()
        return quick_file_digest(path) if content else json_digest([path.name, stat.st_size, stat.st_mtime_ns])
    entries = _file_stats_under(path)
    if not entries:
        raise FileNotFoundError(f"input directory {path} holds no files")
    if content:
        entries = [entry + [quick_file_digest(path / entry[0])] for entry in entries]
    return json_digest(entries)


def content_digest(path: str | Path) -> str:
    """sha256 over the whole content of an input (a file, every file of a directory, or a glob's files):
    what `verify` compares, since the cheap key digests trust sizes and mtimes."""
    if any(ch in str(path) for ch in "*?["):
        return json_digest([[m, content_digest(m)] for m in sorted(glob.glob(str(path)))])
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    names = [entry[0] for entry in _file_stats_under(path)]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:  # hashlib releases the GIL on large reads
        digests = list(pool.map(lambda name: file_digest(path / name), names))
    return json_digest(list(zip(names, digests)))


def changed_input(paths: dict[str, str], recorded: dict[str, str]) -> str | None:
    """The reason an external input's content differs from what the artifact was built from, or None."""
    for name, path in paths.items():
        if name not in recorded:
            return f"the record holds no content digest of input {name}"
        if content_digest(path) != recorded[name]:
            return f"input {name} ({path}) changed content since the artifact was built"
    return None


def _file_stats_under(root: Path) -> list[list]:
    """[relative path, size, mtime_ns] of the visible (not dot-named) files below `root`, in path order.

    os.walk + os.stat rather than Path.rglob: ImageNet's 1.3M files take seconds, not minutes.
    Directory links are not followed (as rglob does not).
    """
    entries = []
    for dirpath, _, names in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in names:
            if name.startswith("."):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:  # a dangling link is not a file
                continue
            if stat_module.S_ISREG(st.st_mode):
                entries.append([name if rel_dir == "." else f"{rel_dir}/{name}", st.st_size, st.st_mtime_ns])
    entries.sort(key=lambda entry: entry[0].split("/"))
    return entries


# ------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class StageSpec:
    """Everything that determines one stage's output; its digest is the artifact key."""

    stage: str
    config: dict[str, Any]
    code_version: str
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage name -> artifact key
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> input digest
    code: dict[str, Any] = field(default_factory=dict)  # modules, constants, package versions (code_version)
    input_paths: dict[str, str] = field(default_factory=dict, compare=False)  # input name -> path (not keyed)

    @property
    def key(self) -> str:
        keyed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        return json_digest(keyed)[:KEY_LENGTH]


@dataclass
class Record:
    """The completion record `record.json` of one artifact."""

    stage: str
    key: str
    code_version: str
    code: dict[str, Any]  # what the code version digests: modules, constants, package versions
    config: dict[str, Any]
    upstream: dict[str, str]
    inputs: dict[str, str]
    input_contents: dict[str, str]  # input name -> sha256 of its whole content, checked by verify
    outputs: dict[str, dict[str, Any]]  # relative path -> {"size", "mtime_ns", "sha256"}
    result: dict[str, Any]  # the stage's own summary (counts, metrics, paths relative to the dir)
    started_at: str
    seconds: float

    @classmethod
    def load(cls, path: Path) -> "Record":
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass
class StageOutcome:
    """What the flow reports per stage."""

    name: str
    status: str  # "ran" | "cached" | "failed"
    key: str
    seconds: float
    path: str
    result: dict[str, Any]

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 3), "key": self.key}


# ------------------------------------------------------------------------------------------- store


def describe_outputs(root: Path) -> dict[str, dict[str, Any]]:
    """Size, mtime and sha256 of every file below `root` (the record itself excluded)."""
    return {rel: {"size": size, "mtime_ns": mtime_ns, "sha256": file_digest(root / rel)}
            for rel, size, mtime_ns in _file_stats_under(root) if rel != RECORD_NAME}


def damaged_output(root: Path, outputs: dict[str, dict[str, Any]], verify: bool) -> str | None:
    """The reason the recorded outputs do not match the files under `root`, or None if they all do."""
    for rel, expected in outputs.items():
        path = root / rel
        if not path.is_file():
            return f"output {rel} is missing"
        stat = path.stat()
        if stat.st_size != expected["size"]:
            return f"output {rel} has {stat.st_size} bytes, the record says {expected['size']}"
        rehash = verify or stat.st_size <= SMALL_FILE_BYTES or stat.st_mtime_ns != expected["mtime_ns"]
        if rehash and file_digest(path) != expected["sha256"]:
            return f"output {rel} differs from its recorded sha256"
    return None


class ArtifactStorageError(RuntimeError):
    """The artifacts root cannot take the stage's files (read-only, full, or not ours to write)."""


STORAGE_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM)


def storage_advice(err: OSError, root: Path) -> str:
    """What went wrong with the artifacts root, and what to do, in one sentence."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(root).free / 2**20 if root.exists() else 0.0
        return (f"the disk filled up ({free:.1f} MiB free now); free some space and rerun: work already written is kept "
                "and the stage resumes from it")
    if err.errno == errno.EROFS:
        return "the file system is read-only; cached stages can still be read, but this one must be built: " \
               "rerun with artifacts=<a writable directory>"
    return f"{err.strerror} ({err.filename}); check the permissions of the artifacts directory"


class ArtifactLocked(RuntimeError):
    """Another live run holds the lock of the artifact key (raised with `wait=False`)."""


LOCKS_DIR = ".locks"
WAIT_LOG_SECONDS = 30.0  # a waiting run says again whom it waits for this often


class KeyLock:
    """The one-writer lock of one artifact key, and the note of who holds it."""

    def __init__(self, stage_dir: Path, key: str):
        self.lock_path = stage_dir / LOCKS_DIR / f"{key}.lock"
        self.holder_path = stage_dir / LOCKS_DIR / f"{key}.holder.json"
        self.label = f"{stage_dir.name} {key}"

    def holder(self) -> str:
        """Who holds the lock, in words (from the holder note; it may be gone by the time it is read)."""
        try:
            note = json.loads(self.holder_path.read_text())
        except (OSError, ValueError):
            return "another run (no holder note yet)"
        return f"pid {note['pid']} on {note['host']} since {note['since']} ({note['command']})"

    @contextlib.contextmanager
    def held(self, wait: bool) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise ArtifactLocked(f"{self.label} is being built by {self.holder()}; wait for it, or run "
                                     "again without --no-wait to wait") from None
            self._wait(lock)
        try:
            atomic_write_json(self.holder_path, {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                 "command": " ".join(sys.argv) or sys.executable})
            yield
        finally:
            self.holder_path.unlink(missing_ok=True)
            lock.release()

    def _wait(self, lock: FileLock) -> None:
        while True:
            log.info("%s: waiting for %s to finish building it", self.label, self.holder())
            try:
                lock.acquire(timeout=WAIT_LOG_SECONDS)
                return
            except Timeout:
                continue


class ArtifactStore:
    """The `artifacts/` tree: lookup, locked atomic build and run-or-reuse of stage artifacts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partials(self, stage: str, key: str) -> list[Path]:
        """Work directories of `key` left by runs that did not finish, newest first."""
        found = [p for p in (self.root / stage).glob(f"{key}{PARTIAL_SUFFIX}*") if p.is_dir()]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def check(self, spec: StageSpec, verify: bool = False) -> tuple[Record | None, str]:
        """(record, "hit") when the artifact of `spec` is complete and intact, else (None, why not)."""
        directory = self.path(spec.stage, spec.key)
        record_path = directory / RECORD_NAME
        if not record_path.is_file():
            return None, "no artifact" if not directory.exists() else "no completion record"
        try:
            record = Record.load(record_path)
        except (ValueError, KeyError, TypeError) as err:
            return None, f"unreadable completion record ({err})"
        if record.key != spec.key or record.stage != spec.stage:
            return None, "completion record belongs to another key"
        reason = damaged_output(directory, record.outputs, verify)
        if reason is None and verify:
            reason = changed_input(spec.input_paths, record.input_contents)
        return (None, reason) if reason else (record, "hit")

    def is_complete(self, spec: StageSpec, verify: bool = False) -> bool:
        return self.check(spec, verify)[0] is not None

    def claim_work_dir(self, spec: StageSpec, fresh: bool) -> Path:
        """This run's own work directory for `spec` (call with the key's lock held).

        Earlier runs' partial directories of the key belong to dead runs (a live one would hold the
        lock): the newest is adopted, so the build resumes where that run stopped, and the rest are
        removed; `fresh=True` removes them all.
        """
        stage_dir = self.root / spec.stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        mine = stage_dir / f"{spec.key}{PARTIAL_SUFFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        earlier = self.partials(spec.stage, spec.key)
        if earlier and not fresh:
            log.info("%s: resuming from the partial work of an earlier run (%s)", spec.stage, earlier[0].name)
            os.replace(earlier.pop(0), mine)
        for stale in earlier:
            shutil.rmtree(stale, ignore_errors=True)
        mine.mkdir(exist_ok=True)
        return mine

    def publish(self, work: Path, spec: StageSpec, force: bool) -> None:
        """Rename `work` to the artifact directory. An existing complete, valid artifact stays unless
        `force` (then it is replaced whole); a damaged or unrecorded one is replaced."""
        final = self.path(spec.stage, spec.key)
        if final.exists():
            if not force and self.is_complete(spec):
                log.warning("%s: a complete artifact %s appeared meanwhile; keeping it", spec.stage, spec.key)
                shutil.rmtree(work)
                return
            trash = final.with_name(f".{final.name}.trash-{os.getpid()}")
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(work, final)

    def run(self, spec: StageSpec, build: Callable[[Path], dict[str, Any] | None], *, force: bool = False,
            verify: bool = False, wait: bool = True, restart: bool = False) -> StageOutcome:
        """Reuse the artifact of `spec` if it is intact (and not forced), else build it with `build(dir)`.

        `build` writes its outputs into the directory it is given and returns a JSON-able summary that
        goes into the record. Paths in the summary should be relative to that directory. Building holds
        the key's lock: a run that finds it held waits (`wait=False`: raises `ArtifactLocked`).
        A build continues the partial work an interrupted run of the key left, forced or not (an earlier
        forced rerun that was stopped continues too); `restart=True` discards it and starts from nothing.
        With no partial work a forced run starts from nothing anyway.
        """
        t0 = time.perf_counter()
        hit = self._cached(spec, verify, force, t0)
        if hit is not None:
            return hit
        with self._storage_errors(spec.stage), KeyLock(self.root / spec.stage, spec.key).held(wait):
            hit = self._cached(spec, verify, force, t0, quiet=True)  # built by the run we waited for
            if hit is not None:
                return hit
            log.info("%s: running (%s: %s)", spec.stage, spec.key, "forced" if force else self.check(spec)[1])
            work = self.claim_work_dir(spec, fresh=restart)
            result = self._build_into(work, spec, build, t0)
            self.publish(work, spec, force)
        return StageOutcome(spec.stage, "ran", spec.key, time.perf_counter() - t0,
                            str(self.path(spec.stage, spec.key)), result)

    @contextlib.contextmanager
    def _storage_errors(self, stage: str) -> Iterator[None]:
        """A read-only, full or forbidden artifacts root as one `ArtifactStorageError` saying what to do."""
        try:
            yield
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                raise
            raise ArtifactStorageError(f"{stage}: cannot write under {self.root}: {storage_advice(err, self.root)}"
                                       ) from err

    def _cached(self, spec: StageSpec, verify: bool, force: bool, t0: float,
                quiet: bool = False) -> StageOutcome | None:
        if force:
            return None
        record, reason = self.check(spec, verify)
        if record is None:
            if not quiet:
                log.info("%s: not cached (%s: %s)", spec.stage, spec.key, reason)
            return None
        log.info("%s: cached (%s)", spec.stage, spec.key)
        return StageOutcome(spec.stage, "cached", spec.key, time.perf_counter() - t0,
                            str(self.path(spec.stage, spec.key)), record.result)

    def _build_into(self, work: Path, spec: StageSpec, build: Callable[[Path], dict[str, Any] | None],
                    t0: float) -> dict[str, Any]:
        """Run `build` in `work` and write the completion record there, last; returns the summary."""
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        contents = {name: content_digest(path) for name, path in spec.input_paths.items()}  # as read
        final = self.path(spec.stage, spec.key)
        result = _relocated(build(work) or {}, work, final)
        record = Record(stage=spec.stage, key=spec.key, code_version=spec.code_version, code=spec.code,
                        config=spec.config, upstream=dict(spec.upstream), inputs=dict(spec.inputs),
                        input_contents=contents, outputs=describe_outputs(work), result=result,
                        started_at=started, seconds=time.perf_counter() - t0)
        atomic_write_json(work / RECORD_NAME, dataclasses.asdict(record))  # last: marks completion
        return result


def _relocated(result: dict[str, Any], work: Path, final: Path) -> dict[str, Any]:
    """The stage's summary as plain JSON data, with paths into the work dir pointing at the published dir."""
    text = json.dumps(result, sort_keys=True, default=str)
    return json.loads(text.replace(json.dumps(str(work))[1:-1], json.dumps(str(final))[1:-1]))


# ------------------------------------------------------------------------------ resumable helpers


def pending_items(items: Iterable[Any], out_dir: str | Path, name: Callable[[Any], str]) -> list[Any]:
    """The items whose output file `out_dir/name(item)` does not exist yet (resume at item granularity).

    Stages write each such file atomically (`lease.io.atomic_path`), so an existing file is complete.
    """
    out_dir, items = Path(out_dir), list(items)
    todo = [item for item in items if not (out_dir / name(item)).is_file()]
    if len(todo) < len(items):
        log.info("resuming in %s: %d of %d items already written", out_dir, len(items) - len(todo), len(items))
    return todo
