"""File names that WebDataset or a naive key would mangle, through the whole tokenization flow.

A dotted name (`photo.v2.png`), a '%' and a space in names, an empty `dup.jpg` beside a good `dup.png`,
two different images of one name and two identical copies of one: the Prefect `tokenize` flow runs from
the manifest to the packed shards, and the shards hold every readable image once, under keys that decode
back to the image's path.
"""
import io
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

# Prefect's home (results, cache records) in a temp dir, set before Prefect is imported; no network.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lease-prefect-home-")
import flows  # noqa: E402,F401  (the project's Prefect defaults: analytics and telemetry off)

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.lease_flow import tokenize_flow  # noqa: E402
from lease.data import read_shard  # noqa: E402
from pipeline.manifest import split_key  # noqa: E402
from pipeline.pack import iter_packed  # noqa: E402

TINY = [  # the demo preset's tiny random-weight models at test sizes
    "features.num_images=8", "features.patches_per_image=16", "features.num_workers=0", "kmeans.k=8",
    "kmeans.iters=2", "tokenize.num_workers=0", "tokenize.images_per_shard=4", "pack.samples_per_shard=4",
    "data.num_workers=0",
]
CLASSES = ("cat", "dog")


def _image(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24 + seed % 3 * 4, 28, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _odd_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """An ImageFolder with train/ and val/; returns (paths of the distinct readable images, expected
    manifest status prefix of the files that must be left out)."""
    copy = _image(90, "PNG")
    files = {
        "train/cat/c0.png": _image(0, "PNG"), "train/cat/c1.jpg": _image(1, "JPEG"),
        "train/cat/photo.v2.png": _image(2, "PNG"), "train/cat/a%b.png": _image(3, "PNG"),
        "train/cat/café au lait.png": _image(4, "PNG"),
        "train/dog/d0.png": _image(5, "PNG"), "train/dog/d1.jpg": _image(6, "JPEG"),
        "train/dog/dup.jpg": b"", "train/dog/dup.png": _image(7, "PNG"),
        "train/dog/pair.jpg": _image(8, "JPEG"), "train/dog/pair.png": _image(9, "PNG"),
        "train/dog/copy.jpeg": copy, "train/dog/copy.png": copy,
        "val/cat/v.0.png": _image(10, "PNG"), "val/cat/v1.png": _image(11, "PNG"),
        "val/dog/v2.png": _image(12, "PNG"), "val/dog/v3.jpg": _image(13, "JPEG"),
    }
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    left_out = {"train/dog/dup.jpg": "empty file",
                "train/dog/copy.png": f"duplicate of {(root / 'train/dog/copy.jpeg').absolute()}"}
    return set(files) - set(left_out), left_out


def _path_of(key: str, paths: set[str]) -> str:
    """The image path a packed key names: its name plus, for a qualified key, the suffix it carries."""
    name, qualifier = split_key(key)
    if qualifier is not None:
        return f"{name}.{qualifier}" if qualifier else name
    matches = [p for p in paths if str(PurePosixPath(p).with_suffix("")) == name]
    assert len(matches) == 1, (key, matches)
    return matches[0]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    readable, left_out = _odd_folder(root / "images")
    artifacts = root / "artifacts"
    with prefect_test_harness(server_startup_timeout=120):
        tokenize_flow(config="demo", overrides=[*TINY, f"data.source={root / 'images'}", f"artifacts={artifacts}"])
    yield {"root": root / "images", "readable": readable, "left_out": left_out,
           "record": json.loads((artifacts / "runs" / "latest.json").read_text())}
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


def test_shards_hold_every_readable_image_once_under_keys_that_name_it(tokenized):
    record = tokenized["record"]
    assert {row["name"]: row["status"] for row in record["stages"]}["pack"] == "ran"
    pack_dir = Path(record["artifacts"]["pack"])
    shards = sorted(pack_dir.glob("*/shard-*.tar"))
    samples = list(iter_packed(shards))  # WebDataset's own tar reader splits keys from extensions
    paths = [_path_of(s["__key__"], tokenized["readable"]) for s in samples]
    assert sorted(paths) == sorted(tokenized["readable"])
    assert [s["cls"] for s in samples] == [CLASSES.index(PurePosixPath(p).parts[1]) for p in paths]
    # the trainer's reader sees the same keys
    assert [k for shard in shards for k in read_shard(shard)[0]] == [s["__key__"] for s in samples]
    index = pq.read_table(pack_dir / "index.parquet").to_pylist()
    assert [row["key"] for row in index] == [s["__key__"] for s in samples]


def test_left_out_files_are_named_with_their_reason(tokenized):
    manifest = Path(tokenized["record"]["artifacts"]["manifest"]) / "manifest.parquet"
    rows = {Path(r["location"]).relative_to(tokenized["root"]).as_posix(): r
            for r in pq.read_table(manifest).to_pylist()}
    for path, reason in tokenized["left_out"].items():
        assert rows[path]["status"].startswith(reason), rows[path]
        assert _path_of(rows[path]["key"], set(rows)) == path
    assert rows["train/dog/dup.png"]["key"] == "train/dog/dup"  # the good file keeps the plain key
    assert rows["train/cat/photo.v2.png"]["key"] == "train/cat/photo%2Ev2"
