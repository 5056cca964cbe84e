"""Content-addressed stage artifacts: `artifacts/<stage>/<key>/` with a completion record.

What "cached" means (DESIGN.md, end of "The data path"):

- The **key** of a stage run is a digest of exactly what determines its output: the stage name, the
  stage's normalised config, the **code version** (sha256 over the stage's source files), the keys of its
  upstream artifacts, and digests of its external inputs (data trees, checkpoints).
- A run writes into `artifacts/<stage>/<key>.partial/`, then writes `record.json` there (stage, key, code
  version, config, upstream keys, input digests, every output file with size/mtime/sha256, timings) and
  renames the directory to `artifacts/<stage>/<key>/`. One rename publishes a complete artifact; an
  interrupted run leaves only the `.partial` directory, which the next run of the same key continues in
  (stages that write shards skip the ones already there, see `pending_items`).
- A **hit** needs the record and every recorded output with its recorded size; a file's sha256 is checked
  again when the file is small (≤ `SMALL_FILE_BYTES`), when its mtime differs from the recorded one, or
  always with `verify=True`. Anything missing or different is a miss (with the reason logged) and the
  stage recomputes: never a silent hit.

Input digests, and why they are honest but cheap:
- a file: its size, mtime and the sha256 of its first and last MiB (`quick_file_digest`); files up to
  2 MiB are hashed whole. Editing a file changes its mtime, so a changed checkpoint is never a hit; copying
  it elsewhere (new mtime) costs one recompute, never a wrong result.
- a directory of model files (`content=True`): the quick digest of every file in it.
- a data tree (`content=False`, e.g. an ImageFolder of 1.28M JPEGs): every file's relative path, size and
  mtime, without reading the images.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import stat as stat_module
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from lease.io import atomic_write_json, file_digest, json_digest

log = logging.getLogger(__name__)

RECORD_NAME = "record.json"
PARTIAL_SUFFIX = ".partial"
KEY_LENGTH = 20  # hex digits of the sha256 used as directory name (80 bits)
SMALL_FILE_BYTES = 4 << 20  # outputs up to this size are re-hashed on every lookup
_WINDOW = 1 << 20


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


def module_files(module: str) -> list[Path]:
    """Source files of an importable module; every .py file below it for a package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cannot find module {module!r} to digest its code")
    origin = Path(spec.origin)
    if origin.name == "__init__.py":
        return sorted(origin.parent.rglob("*.py"))
    return [origin]


def code_version(modules: Sequence[str]) -> str:
    """The code version of a stage: sha256 over the contents of its modules' source files."""
    h = hashlib.sha256()
    for module in sorted(set(modules)):
        for path in module_files(module):
            h.update(f"{module}:{path.name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:KEY_LENGTH]


# ------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class StageSpec:
    """Everything that determines one stage's output; its digest is the artifact key."""

    stage: str
    config: dict[str, Any]
    code_version: str
    upstream: dict[str, str] = field(default_factory=dict)  # upstream stage name -> artifact key
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> input digest

    @property
    def key(self) -> str:
        return json_digest(dataclasses.asdict(self))[:KEY_LENGTH]


@dataclass
class Record:
    """The completion record `record.json` of one artifact."""

    stage: str
    key: str
    code_version: str
    config: dict[str, Any]
    upstream: dict[str, str]
    inputs: dict[str, str]
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


class ArtifactStore:
    """The `artifacts/` tree: lookup, atomic build and run-or-reuse of stage artifacts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}{PARTIAL_SUFFIX}"

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
        return (None, reason) if reason else (record, "hit")

    def is_complete(self, spec: StageSpec, verify: bool = False) -> bool:
        return self.check(spec, verify)[0] is not None

    @contextlib.contextmanager
    def building(self, spec: StageSpec, fresh: bool = False) -> Iterator[Path]:
        """Yield the `.partial` work directory of `spec`; publish it when the block succeeds.

        The work directory survives failures so that a rerun of the same key resumes in it; `fresh=True`
        (a forced rerun) starts from an empty one.
        """
        partial = self.partial_path(spec.stage, spec.key)
        if fresh and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        yield partial
        self._publish(partial, self.path(spec.stage, spec.key))

    def _publish(self, partial: Path, final: Path) -> None:
        if final.exists():  # a damaged or unrecorded earlier artifact of this key: replace it whole
            trash = final.with_name(f".{final.name}.trash-{os.getpid()}")
            os.replace(final, trash)
            shutil.rmtree(trash)
        os.replace(partial, final)

    def run(self, spec: StageSpec, build: Callable[[Path], dict[str, Any] | None], *, force: bool = False,
            verify: bool = False) -> StageOutcome:
        """Reuse the artifact of `spec` if it is intact (and not forced), else build it with `build(dir)`.

        `build` writes its outputs into the directory it is given and returns a JSON-able summary that
        goes into the record. Paths in the summary should be relative to that directory.
        """
        t0 = time.perf_counter()
        if not force:
            record, reason = self.check(spec, verify)
            if record is not None:
                log.info("%s: cached (%s)", spec.stage, spec.key)
                return StageOutcome(spec.stage, "cached", spec.key, time.perf_counter() - t0,
                                    str(self.path(spec.stage, spec.key)), record.result)
            log.info("%s: running (%s: %s)", spec.stage, spec.key, reason)
        else:
            log.info("%s: running (%s: forced)", spec.stage, spec.key)
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        final = self.path(spec.stage, spec.key)
        with self.building(spec, fresh=force) as work:
            result = _relocated(build(work) or {}, work, final)
            seconds = time.perf_counter() - t0
            record = Record(stage=spec.stage, key=spec.key, code_version=spec.code_version, config=spec.config,
                            upstream=dict(spec.upstream), inputs=dict(spec.inputs),
                            outputs=describe_outputs(work), result=result, started_at=started, seconds=seconds)
            atomic_write_json(work / RECORD_NAME, dataclasses.asdict(record))  # last: marks completion
        return StageOutcome(spec.stage, "ran", spec.key, time.perf_counter() - t0, str(final), result)


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
