"""Manifest stage: an image source → a parquet table with one checked row per image.

Sources:
- an ImageFolder tree, either `root/train/<class>/<img>` + `root/val/<class>/<img>`, or a flat
  `root/<class>/<img>` (then `val_fraction` of it is held out as val by a seeded hash of the image's
  name, so the split is stable when files are added);
- a list file, one image per line: `path[ label]` (paths relative to the list file's folder; the label
  is an integer id or a class name; without labels the class is the parent folder's name);
- WebDataset tars of images (a `.tar` file, a folder of them, or a glob; `train/` and `val/`
  sub-folders give the split, else `val_fraction`); a sample's `cls` member is its integer label.

Every file is checked (in parallel worker processes). A file that cannot be read or decoded stays in
the manifest with `status` = the reason (`empty file`, `not an image`, `truncated`, `corrupt`,
`unreadable`, `duplicate of ...`) and is left out downstream by `read_manifest`. For PNGs and JPEGs,
`truncated` (every byte present is valid, the file ends early) and `corrupt` (a byte present breaks the
format) come from the file's own structure (`lease.images.find_damage`), not from PIL's message.
Nothing about bad data is fatal; the stage logs each bad file with its reason and returns the counts.

Two depths of check (`check`):
- `full` (default): every image is decoded (JPEGs at 1/8 scale: all entropy data is still read).
- `quick`: the header is read, and a JPEG must end with its end-of-image marker (else it gets the full
  check, which names it truncated or passes it); other formats get the full check. Decoding is what a
  JPEG check costs, so this is several times faster; it misses the rare JPEG whose entropy data is
  damaged badly enough to stop a decoder while its end is intact (libjpeg reads most damage as mere
  warnings, so the full check misses most damage too). Tokenize then stops on such a file, naming it.

Keys. A row's key names its sample downstream (tokenize, the WebDataset shards, the index), so every
usable image needs its own, and a key must hold no '.', where WebDataset splits a member name into key
and extension. A key is made from the image's name in its source (an ImageFolder's or list file's path
without its suffix; a tar's sample key), percent-escaped: '%' → `%25`, '.' → `%2E`, '#' → `%23`
(`escape_key`, inverse `unescape_key`), so `cls/photo.v2.png` is keyed `cls/photo%2Ev2`. The original
path stays in `location`. When several source entries share one name (`cls/dup.jpg` beside `cls/dup.png`,
one sample key in two tars), their content decides, never their order:
- when the readable entries are one image (a single one, or copies with identical bytes), the first of
  them (by split, location) keeps the plain key; copies become rows with status `duplicate of
  <location> (identical bytes)`;
- every other entry (one that fails its check, or each of several different images) is keyed by its
  name qualified with what sets it apart, after a raw '#': its suffix for a file (`cls/dup#jpg`), its
  tar's path (below the folder of the source's tars) for a tar sample (`000001#train/shard-0%2Etar`).
So a bad file never takes the key from a readable one, and different images are all kept. A raw '#'
occurs only in qualified keys, so no qualified key equals a plain one (`manifest_key`, inverse
`split_key`). The held-out split is drawn from the unescaped name, so files of one name share a split.

Columns: key, location (a path or `tar_path::member`, relative when the source was given relative), label, class_name, split, bytes, status, width,
height. Class names sorted → label ids (integer labels from list files or tars are kept as given).
Rows are sorted by (split, key, location), so the file is identical for identical inputs.
"""
from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from lease.cli_help import first_paragraph, show_defaults
from lease.io import atomic_path
from lease.manifests import OK, SPLIT_ORDER, manifest_classes, read_manifest  # noqa: F401  (read side, re-exported)
from lease.images import DECODE_ERRORS, JPEG_EOI, JPEG_SOI, TAR_SEPARATOR, read_bytes, to_rgb, undecodable_reason

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
SourceKind = Literal["auto", "imagefolder", "list", "webdataset"]
_FILES_PER_TASK = 64  # images checked per worker task: large enough to amortise the task overhead
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = path up to the basename's first dot
QUALIFIER = "#"  # between a shared name and what sets the entry apart (module doc, Keys)
_KEY_ESCAPES = {"%": "%25", ".": "%2E", QUALIFIER: "%23"}
_ESCAPED_NAME = re.compile(r"(?:[^%.#]|%25|%2E|%23)*")

SCHEMA = pa.schema([
    ("key", pa.string()), ("location", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("split", pa.string()), ("bytes", pa.int64()), ("status", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()),
])


@dataclass
class ManifestSummary:
    """What the manifest stage found; `bad` names every excluded image with its reason."""

    path: Path
    kind: str
    num_images: int
    num_ok: int
    split_counts: dict[str, int]  # usable (status ok) images per split
    class_names: list[str]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)

    @property
    def num_bad(self) -> int:
        return len(self.bad)


@dataclass
class Candidate:
    """An image location found in the source, before checking."""

    name: str  # its name in the source (path without suffix, or tar sample key), unescaped; may be shared
    qualifier: str  # what sets it apart from entries of the same name: a file's suffix, a sample's tar
    location: str
    class_name: str
    split: str
    label: int | None = None  # given by the source (list file / tar `cls`), else from sorted class names
    qualified: bool = False  # its name is shared and the plain key went to another entry (or to none)

    @property
    def key(self) -> str:
        return manifest_key(self.name, self.qualifier if self.qualified else None)


@dataclass
class Check:
    """Outcome of decoding one image."""

    status: str
    nbytes: int
    width: int = 0
    height: int = 0


# -------------------------------------------------------------------------------------------- keys


def escape_key(name: str) -> str:
    """`name` with '%', '.' and '#' percent-escaped: no dot for WebDataset to split at (module doc, Keys)."""
    return "".join(_KEY_ESCAPES.get(ch, ch) for ch in name)


def unescape_key(text: str) -> str:
    """The inverse of `escape_key`; text it cannot have written (a raw '.', '#' or stray '%') is refused."""
    if _ESCAPED_NAME.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not an escaped manifest name (see pipeline.manifest, Keys)")
    return re.sub(r"%(25|2E|23)", lambda match: chr(int(match.group(1), 16)), text)


def manifest_key(name: str, qualifier: str | None = None) -> str:
    """The key of an entry called `name`, qualified (for a shared name) by what sets it apart."""
    return escape_key(name) if qualifier is None else f"{escape_key(name)}{QUALIFIER}{escape_key(qualifier)}"


def split_key(key: str) -> tuple[str, str | None]:
    """The inverse of `manifest_key`: (name, qualifier or None)."""
    name, sep, qualifier = key.partition(QUALIFIER)
    return unescape_key(name), (unescape_key(qualifier) if sep else None)


# ---------------------------------------------------------------------------------------- checking


CHECKS = ("full", "quick")


def quick_jpeg_check(data: bytes) -> Check | None:
    """Header-only verdict for an intact-looking JPEG (SOI ... EOI); None when a full check must decide."""
    if not data.startswith(JPEG_SOI) or not data.rstrip(b"\x00").endswith(JPEG_EOI):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                return None
            width, height = img.size
    except (*DECODE_ERRORS, Image.DecompressionBombError):
        return None
    return Check(OK, len(data), width, height)


def check_image_bytes(data: bytes, check: str = "full") -> Check:
    """Decode `data` fully enough to find corrupt or truncated images (`quick`: see the module doc);
    never raises."""
    if not data:
        return Check("empty file", 0)
    if check == "quick":
        verdict = quick_jpeg_check(data)
        if verdict is not None:
            return verdict
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.format == "JPEG":
                # Entropy decoding still reads every coefficient (so damage is found), but the
                # inverse DCT runs at 1/8 scale: the check costs a fraction of a full decode.
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
            to_rgb(img)
    except Image.DecompressionBombError as err:
        return Check(f"too large: {err}", len(data))
    except DECODE_ERRORS as err:  # PIL's UnidentifiedImageError is an OSError
        return Check(undecodable_reason(data, err), len(data))
    return Check(OK, len(data), width, height)


def check_file(path: str, check: str = "full") -> Check:
    try:
        data = Path(path).read_bytes()
    except PermissionError:
        return Check("unreadable: permission denied", _size_or_zero(path))
    except OSError as err:
        return Check(f"unreadable: {err.strerror or err}", _size_or_zero(path))
    return check_image_bytes(data, check)


def _size_or_zero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _check_files(paths: Sequence[str], check: str) -> list[Check]:
    return [check_file(p, check) for p in paths]


@dataclass
class TarSample:
    """One WebDataset sample as found in a tar: its image member (if any) checked, its `cls` label."""

    key: str
    member: str
    label: int | None
    check: Check


def scan_tar(tar_path: str, check: str = "full") -> list[TarSample]:
    """Group a tar's members by WebDataset key; check each sample's image; read its `cls`."""
    members: dict[str, dict[str, tuple[str, bytes]]] = {}  # key → lower-case extension → (member, bytes)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for info in tar:
                match = _WDS_KEY.match(info.name)
                if not info.isfile() or match is None or Path(info.name).name.startswith("."):
                    continue
                fh = tar.extractfile(info)
                members.setdefault(match.group(1), {})[match.group(2).lower()] = (info.name,
                                                                                  fh.read() if fh else b"")
    except (tarfile.TarError, OSError) as err:
        # A damaged tar: its readable samples before the damage are kept, the damage is one bad row.
        return _tar_samples(members, check) + [TarSample(f"{Path(tar_path).name}:damaged", "", None,
                                                         Check(f"unreadable tar: {err}", 0))]
    return _tar_samples(members, check)


def _tar_samples(members: dict[str, dict[str, tuple[str, bytes]]], check: str) -> list[TarSample]:
    samples = []
    for key, parts in members.items():
        image_ext = next((ext for ext in parts if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS), None)
        label = _parse_cls(parts["cls"][1] if "cls" in parts else None)
        if image_ext is None:
            samples.append(TarSample(key, "", label, Check(f"no image member (has: {', '.join(sorted(parts))})", 0)))
        else:
            member, data = parts[image_ext]  # the member's own name: `S.JPG` is read back as `S.JPG`
            samples.append(TarSample(key, member, label, check_image_bytes(data, check)))
    return samples


def _parse_cls(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


def _parallel_map(fn, tasks: list, num_workers: int, desc: str, unit_count: Sequence[int],
                  unit: str = "img") -> Iterator:
    """Map `fn` over tasks in worker processes (in order), with a progress bar (images/s by default)."""
    bar = tqdm(total=sum(unit_count), desc=desc, unit=unit, dynamic_ncols=True, disable=None)
    try:
        if num_workers <= 0:
            results: Iterable = map(fn, tasks)
            for result, n in zip(results, unit_count):
                bar.update(n)
                yield result
            return
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            for result, n in zip(pool.map(fn, tasks), unit_count):
                bar.update(n)
                yield result
    finally:
        bar.close()


# --------------------------------------------------------------------------------------- discovery


def held_out(name: str, seed: int, val_fraction: float) -> bool:
    """Seeded hash split: the same name lands in the same split whatever else is in the source."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


def _hash_split(name: str, seed: int, val_fraction: float) -> str:
    return "val" if held_out(name, seed, val_fraction) else "train"


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.name.startswith(".") and (p.is_file() or p.is_symlink())
                  and not p.is_dir())


def imagefolder_candidates(root: Path, val_fraction: float, seed: int) -> list[Candidate]:
    """`root/{train,val}/<class>/...` or `root/<class>/...` (then a seeded held-out val fraction); a folder
    with images and no class folders is unlabelled (label -1)."""
    split_dirs = {s: root / s for s in SPLIT_ORDER if (root / s).is_dir()}
    layout = [(d, s) for s, d in split_dirs.items()] or [(root, "train")]
    hold_out = "val" not in split_dirs  # no val/ folder: the val split is a seeded share of train
    candidates = []
    for base, split in layout:
        class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        # no class folders: an unlabelled folder (the self-supervised case), its images all of class ""
        groups = [(d, d.name) for d in class_dirs] or [(base, "")]
        for folder, class_name in groups:
            for path in _visible_files(folder):
                name = path.relative_to(root).with_suffix("").as_posix()
                use_split = _hash_split(name, seed, val_fraction) if hold_out else split
                candidates.append(Candidate(name, path.suffix[1:], str(path), class_name, use_split))
    return candidates


def list_candidates(list_file: Path, val_fraction: float, seed: int) -> list[Candidate]:
    """Lines `path[ label]`; blank lines and `#` comments are skipped."""
    base = list_file.parent
    candidates = []
    for number, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path_text, label_text = _split_list_line(line, base)
        path = Path(path_text) if Path(path_text).is_absolute() else base / path_text
        label = int(label_text) if label_text is not None and _is_int(label_text) else None
        class_name = label_text if label_text is not None else path.parent.name
        if not class_name:
            raise ValueError(f"{list_file}:{number}: no label and no parent folder to name the class: {raw!r}")
        name = Path(path_text).with_suffix("").as_posix().lstrip("/")
        candidates.append(Candidate(name, Path(path_text).suffix[1:], str(path), class_name,
                                    _hash_split(name, seed, val_fraction), label))
    labelled = {c.label is not None for c in candidates}
    if len(labelled) > 1:
        raise ValueError(f"{list_file}: mix of integer labels and class names; use one or the other")
    return candidates


def _split_list_line(line: str, base: Path) -> tuple[str, str | None]:
    """A path may contain spaces: the last token is a label only if the whole line is not a file."""
    parts = line.rsplit(None, 1)
    if len(parts) == 1 or (base / line).exists() or Path(line).exists():
        return line, None
    return parts[0], parts[1]


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def find_tars(source: str) -> list[tuple[Path, str | None]]:
    """(tar path, split or None) for a tar file, a folder of tars (with optional train/ val/) or a glob."""
    path = Path(source)
    if any(ch in source for ch in "*?["):
        tars = [(Path(p), None) for p in sorted(glob.glob(source, recursive=True)) if p.endswith(".tar")]
    elif path.is_file():
        tars = [(path, None)]
    elif any((path / s).is_dir() for s in SPLIT_ORDER):
        tars = [(p, s) for s in SPLIT_ORDER if (path / s).is_dir() for p in sorted((path / s).glob("*.tar"))]
    else:
        tars = [(p, None) for p in sorted(path.glob("*.tar"))]
    if not tars:
        raise ValueError(f"no .tar files found at {source}")
    return tars


def detect_kind(source: str) -> str:
    path = Path(source)
    if any(ch in source for ch in "*?["):
        return "webdataset"
    if path.is_file():
        return "webdataset" if tarfile.is_tarfile(path) else "list"
    if path.is_dir():
        roots = [path] + [path / s for s in SPLIT_ORDER if (path / s).is_dir()]
        has_tars = any(any(r.glob("*.tar")) for r in roots)
        has_class_dirs = any(p.is_dir() for r in roots for p in r.iterdir() if p.name not in SPLIT_ORDER)
        return "webdataset" if has_tars and not has_class_dirs else "imagefolder"
    raise ValueError(f"image source {source} does not exist (give an ImageFolder root, a list file, "
                     f"a .tar, a folder of .tar files or a glob of them)")


# ----------------------------------------------------------------------------------------- the stage


def _checked_file_rows(candidates: list[Candidate], num_workers: int, check: str) -> list[tuple[Candidate, Check]]:
    chunks = [candidates[i:i + _FILES_PER_TASK] for i in range(0, len(candidates), _FILES_PER_TASK)]
    tasks = [[c.location for c in chunk] for chunk in chunks]
    checks = [verdict for result in _parallel_map(functools.partial(_check_files, check=check), tasks, num_workers,
                                                  "manifest", [len(t) for t in tasks]) for verdict in result]
    return list(zip(candidates, checks))


def _checked_tar_rows(source: str, val_fraction: float, seed: int, num_workers: int,
                      check: str) -> list[tuple[Candidate, Check]]:
    tars = find_tars(source)
    sizes = [max(1, p.stat().st_size >> 20) for p, _ in tars]  # progress in MiB of tar, shown as units
    tar_names = _relative_tar_paths([p for p, _ in tars])
    rows = []
    scanned = _parallel_map(functools.partial(scan_tar, check=check), [str(p) for p, _ in tars], num_workers,
                            "manifest (tars)", sizes, unit="MiB")
    for (tar_path, split), tar_name, samples in zip(tars, tar_names, scanned):
        for s in samples:
            location = f"{tar_path}{TAR_SEPARATOR}{s.member}" if s.member else str(tar_path)
            class_name = str(s.label) if s.label is not None else ""
            rows.append((Candidate(s.key, tar_name, location, class_name,
                                   split or _hash_split(s.key, seed, val_fraction), s.label), s.check))
    return rows


def _relative_tar_paths(tars: list[Path]) -> list[str]:
    """Each tar's path below the folder holding them all: it tells apart samples of one key in two tars."""
    absolute = [p.absolute() for p in tars]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    return [p.relative_to(root).as_posix() for p in absolute]


def _assign_labels(rows: list[tuple[Candidate, Check]]) -> list[str]:
    """Fill labels from sorted class names where the source gave none; returns names by label id."""
    given = [c for c, _ in rows if c.label is not None]
    if given:
        names = {}
        for c in given:
            names.setdefault(c.label, c.class_name)
        for c, _ in rows:
            if c.label is None:
                c.label = -1  # a tar sample without `cls`: kept, but unlabelled
        return [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []
    class_names = sorted({c.class_name for c, _ in rows if c.class_name})
    ids = {name: i for i, name in enumerate(class_names)}
    for c, _ in rows:
        c.label = ids.get(c.class_name, -1)
    return class_names


def _refuse_paths_not_utf8(rows: list[tuple[Candidate, Check]]) -> None:
    """A path whose bytes are not UTF-8 (Python holds them as lone surrogates) cannot be stored in the
    manifest's text columns: such an entry stays as a bad row, spelt with its odd bytes as `\\xNN`."""
    for candidate, check in rows:
        texts = (candidate.name, candidate.qualifier, candidate.location, candidate.class_name)
        if all(_is_utf8(text) for text in texts):
            continue
        candidate.name, candidate.qualifier, candidate.location, candidate.class_name = map(_readable_spelling,
                                                                                            texts)
        check.status = "unreadable: its path is not valid UTF-8 (rename the file)"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _readable_spelling(text: str) -> str:
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _settle_shared_names(rows: list[tuple[Candidate, Check]]) -> None:
    """Give entries that share a name distinct keys by their content (module doc, Keys)."""
    by_key: dict[str, list[tuple[Candidate, Check]]] = {}
    for row in rows:
        by_key.setdefault(row[0].key, []).append(row)
    for group in by_key.values():
        if len(group) > 1:
            _settle_one_name(group)


def _settle_one_name(group: list[tuple[Candidate, Check]]) -> None:
    """`group`: rows of one name in (split, location) order. The plain key goes to its image when the
    readable rows are all one image (copies become duplicates); every other row is qualified."""
    digests = {c.location: _content_digest(c.location, k) for c, k in group if k.status == OK}
    readable = [c for c, k in group if k.status == OK]  # less any file that went away since its check
    keeper = readable[0] if readable and len({digests[c.location] for c in readable}) == 1 else None
    for candidate, check in group:
        if candidate is keeper:
            continue
        candidate.qualified = True
        if keeper is not None and check.status == OK:
            check.status = f"duplicate of {keeper.location} (identical bytes)"


def _content_digest(location: str, check: Check) -> str:
    """SHA-256 of the entry's bytes, read again (only entries of shared names are); a file that cannot be
    read now is marked unreadable in `check`."""
    try:
        return hashlib.sha256(read_bytes(location)).hexdigest()
    except OSError as err:
        check.status = f"unreadable: {err.strerror or err}"
        return ""


def _table(rows: list[tuple[Candidate, Check]]) -> pa.Table:
    columns = {
        "key": [c.key for c, _ in rows], "location": [c.location for c, _ in rows],
        "label": [c.label for c, _ in rows], "class_name": [c.class_name for c, _ in rows],
        "split": [c.split for c, _ in rows], "bytes": [k.nbytes for _, k in rows],
        "status": [k.status for _, k in rows], "width": [k.width for _, k in rows],
        "height": [k.height for _, k in rows],
    }
    return pa.table(columns, schema=SCHEMA)


def _sorted_rows(rows: list[tuple[Candidate, Check]]) -> list[tuple[Candidate, Check]]:
    return sorted(rows, key=lambda row: (SPLIT_ORDER.index(row[0].split), row[0].key, row[0].location))


def build_manifest(source: str | Path, out_path: str | Path, *, kind: SourceKind = "auto",
                   val_fraction: float = 0.0, seed: int = 0, num_workers: int | None = None,
                   check: str = "full") -> ManifestSummary:
    """Scan and check every image of `source` (`check`: full or quick, see the module doc); write the
    parquet manifest atomically to `out_path`."""
    source = str(source)
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    kind = detect_kind(source) if kind == "auto" else kind
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    if kind == "imagefolder":
        rows = _checked_file_rows(imagefolder_candidates(Path(source), val_fraction, seed), workers, check)
    elif kind == "list":
        rows = _checked_file_rows(list_candidates(Path(source), val_fraction, seed), workers, check)
    elif kind == "webdataset":
        rows = _checked_tar_rows(source, val_fraction, seed, workers, check)
    else:
        raise ValueError(f"unknown source kind {kind!r} (auto, imagefolder, list, webdataset)")
    if not rows:
        raise ValueError(f"no images found in {source} (kind {kind})")

    _refuse_paths_not_utf8(rows)
    _settle_shared_names(_sorted_rows(rows))
    rows = _sorted_rows(rows)  # again: qualified keys sort elsewhere
    class_names = _assign_labels(rows)
    table = _table(rows).replace_schema_metadata({
        "lease.classes": json.dumps(class_names), "lease.source": source, "lease.kind": kind})
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)

    bad = [(c.location, k.status) for c, k in rows if k.status != OK]
    split_counts = {s: sum(1 for c, k in rows if c.split == s and k.status == OK) for s in SPLIT_ORDER}
    summary = ManifestSummary(Path(out_path), kind, len(rows), len(rows) - len(bad), split_counts, class_names,
                              bad)
    _log_summary(summary)
    return summary


def _log_summary(summary: ManifestSummary) -> None:
    log.info("manifest %s: %d images, %d usable (train %d, val %d), %d classes, %d left out", summary.path,
             summary.num_images, summary.num_ok, summary.split_counts["train"], summary.split_counts["val"],
             len(summary.class_names), summary.num_bad)
    for location, reason in summary.bad:
        log.warning("left out %s: %s", location, reason)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease manifest", description=first_paragraph(__doc__))
    parser.add_argument("source", help="ImageFolder root, list file, .tar / folder of tars / glob of tars")
    parser.add_argument("--out", type=Path, required=True, help="parquet file to write")
    parser.add_argument("--kind", default="auto", choices=["auto", "imagefolder", "list", "webdataset"])
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="held-out val share when the source has no val split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--num-workers", type=int, default=None, help="decode-check processes (default: all cores)")
    parser.add_argument("--check", default="full", choices=CHECKS,
                        help="full: decode every image; quick: headers and JPEG end markers (see the module doc)")
    args = show_defaults(parser).parse_args(argv)
    build_manifest(args.source, args.out, kind=args.kind, val_fraction=args.val_fraction, seed=args.seed,
                   num_workers=args.num_workers, check=args.check)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
