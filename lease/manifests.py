"""Reading a manifest (the parquet the pipeline's manifest stage writes, columns in
data_manifests/README.md): the usable rows of a split, and the class names by label. Building one is
`pipeline.manifest`."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

OK = "ok"  # the status of a usable image
SPLIT_ORDER = ("train", "val")


def read_manifest(path: str | Path, split: str | None = None, only_ok: bool = True) -> pa.Table:
    """The manifest's rows (in file order), optionally one split, by default only usable images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (build it with `lease manifest SOURCE --out PATH`)")
    if split is not None and split not in SPLIT_ORDER:
        raise ValueError(f"split must be one of {SPLIT_ORDER}, got {split!r}")
    table = pq.read_table(path)
    mask = None
    if only_ok:
        mask = pc.equal(table["status"], OK)
    if split is not None:
        in_split = pc.equal(table["split"], split)
        mask = in_split if mask is None else pc.and_(mask, in_split)
    return table if mask is None else table.filter(mask)


def manifest_classes(path: str | Path) -> list[str]:
    """Class names by label id, as stored in the manifest's metadata."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"lease.classes", b"[]"))
