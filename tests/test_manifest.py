"""Manifest stage and demo data: discovery, decode checks of bad files, splits, labels, determinism."""
from __future__ import annotations

import io
import logging
import os
import pathlib
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lease.io import file_digest
from pipeline.demo_data import class_styles, make_demo_dataset
from pipeline.images import read_bytes
from pipeline.manifest import build_manifest, manifest_classes, read_manifest

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> pathlib.Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=NUM_CLASSES, train_per_class=6,
                             val_per_class=3, image_size=40, seed=1)


def _jpeg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tree_with_bad_files(root: pathlib.Path, monkeypatch) -> dict[str, str]:
    """An ImageFolder with one bad file of each kind; returns file name → expected reason prefix."""
    good = _jpeg()
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("zebra", "ant"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{cls}{i}.jpg").write_bytes(good)
    bad = root / "train" / "ant"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    huffman = good.find(b"\xff\xc4") + 4  # zero the first Huffman table: the scan cannot be decoded
    (bad / "corrupt.jpg").write_bytes(good[:huffman] + b"\x00" * 30 + good[huffman + 30:])
    (bad / "notes.txt").write_text("not an image\n")
    locked = bad / "locked.jpg"
    locked.write_bytes(good)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads mode-000 files: make the read fail as it does for other users
        real = pathlib.Path.read_bytes
        monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(self))) if self.name == "locked.jpg" else real(self))
    return {"empty.jpg": "empty file", "truncated.jpg": "truncated", "corrupt.jpg": "corrupt",
            "notes.txt": "not an image", "locked.jpg": "unreadable: permission denied"}


def test_demo_dataset_is_deterministic_and_varied(tmp_path, demo_root):
    again = make_demo_dataset(tmp_path / "again", num_classes=NUM_CLASSES, train_per_class=6, val_per_class=3,
                              image_size=40, seed=1)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob("*.jpg"))
    assert len(files) == NUM_CLASSES * 9
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    assert all((demo_root / f).read_bytes() == (again / f).read_bytes() for f in files)
    other = make_demo_dataset(tmp_path / "other", num_classes=NUM_CLASSES, train_per_class=6, val_per_class=3,
                              image_size=40, seed=2)
    assert (other / files[0]).read_bytes() != (demo_root / files[0]).read_bytes()
    sizes = {Image.open(demo_root / f).size for f in files}
    assert len(sizes) > 10 and any(w != h for w, h in sizes)  # the resize + crop path sees varied shapes
    assert len({s.name for s in class_styles(40)}) == 40  # class folder names stay distinct


def test_demo_classes_are_visible(demo_root):
    """A hue histogram of the saturated (object) pixels, nearest class mean from train, separates val."""
    def histogram(path):
        hsv = np.asarray(Image.open(path).convert("HSV")).reshape(-1, 3).astype(int)
        saturated = hsv[:, 1] > 128
        return np.bincount(hsv[saturated, 0] // 16, minlength=16) / max(1, saturated.sum())

    classes = sorted(p.name for p in (demo_root / "train").iterdir())
    means = np.stack([np.mean([histogram(p) for p in (demo_root / "train" / c).glob("*.jpg")], 0) for c in classes])
    val = [(histogram(p), i) for i, c in enumerate(classes) for p in (demo_root / "val" / c).glob("*.jpg")]
    correct = sum(int(np.argmin(((means - h) ** 2).sum(1)) == i) for h, i in val)
    assert correct / len(val) >= 0.9


def test_imagefolder_manifest_records_bad_files(tmp_path, monkeypatch, caplog):
    expected = _tree_with_bad_files(tmp_path / "src", monkeypatch)
    summary = build_manifest(tmp_path / "src", tmp_path / "m.parquet", num_workers=0)

    assert summary.kind == "imagefolder"
    assert summary.num_images == 10 + len(expected) and summary.num_ok == 10 and summary.num_bad == len(expected)
    assert summary.split_counts == {"train": 6, "val": 4}
    assert summary.class_names == ["ant", "zebra"]
    reasons = {pathlib.Path(loc).name: reason for loc, reason in summary.bad}
    assert reasons.keys() == expected.keys()
    for name, prefix in expected.items():
        assert reasons[name].startswith(prefix), (name, reasons[name])
        assert any(name in rec.getMessage() and rec.levelno == logging.WARNING for rec in caplog.records)

    table = pq.read_table(tmp_path / "m.parquet")
    assert table.column_names == ["key", "location", "label", "class_name", "split", "bytes", "status", "width",
                                  "height"]
    rows = table.to_pylist()
    assert [(r["split"], r["key"]) for r in rows] == sorted(((r["split"], r["key"]) for r in rows),
                                                            key=lambda t: (t[0] != "train", t[1]))
    good = [r for r in rows if r["status"] == "ok"]
    assert all(r["label"] == ["ant", "zebra"].index(r["class_name"]) for r in rows)
    assert all((r["width"], r["height"]) == (40, 30) for r in good)
    assert {r["key"] for r in good if r["split"] == "val"} == {f"val/{c}/{c}{i}" for c in ("ant", "zebra")
                                                              for i in range(2)}
    empty = next(r for r in rows if r["key"].endswith("/empty"))
    assert empty["bytes"] == 0 and empty["width"] == 0

    usable = read_manifest(tmp_path / "m.parquet")
    assert usable.num_rows == 10 and set(usable["status"].to_pylist()) == {"ok"}
    assert read_manifest(tmp_path / "m.parquet", split="val").num_rows == 4
    assert read_manifest(tmp_path / "m.parquet", only_ok=False).num_rows == 15
    assert manifest_classes(tmp_path / "m.parquet") == ["ant", "zebra"]


def test_quick_check_finds_the_same_bad_files_except_damage_inside_an_intact_jpeg(tmp_path, monkeypatch):
    """quick reads headers and end markers: every kind of bad file is still named, except the JPEG whose
    Huffman table is damaged while its end marker is intact; tokenize then stops on it, naming it."""
    from pipeline.images import UndecodableImage, make_loader

    expected = _tree_with_bad_files(tmp_path / "src", monkeypatch)
    full = build_manifest(tmp_path / "src", tmp_path / "full.parquet", num_workers=0)
    quick = build_manifest(tmp_path / "src", tmp_path / "quick.parquet", num_workers=0, check="quick")
    full_reasons = {pathlib.Path(loc).name: reason for loc, reason in full.bad}
    quick_reasons = {pathlib.Path(loc).name: reason for loc, reason in quick.bad}
    assert quick_reasons == {name: full_reasons[name] for name in expected if name != "corrupt.jpg"}
    assert quick.num_ok == full.num_ok + 1
    ok_rows = read_manifest(tmp_path / "quick.parquet").to_pylist()
    assert {(r["width"], r["height"]) for r in ok_rows} == {(40, 30)}  # sizes from the header alone

    corrupt = [r["location"] for r in ok_rows if r["key"].endswith("/corrupt")]
    with pytest.raises(UndecodableImage, match=r"corrupt\.jpg cannot be decoded.*data\.check=full"):
        list(make_loader(corrupt, batch_size=1, num_workers=0, pin_memory=False, sizes=(32,)))
    with pytest.raises(ValueError, match="check must be one of"):
        build_manifest(tmp_path / "src", tmp_path / "x.parquet", num_workers=0, check="deep")


def test_quick_check_passes_trailing_padding_and_checks_jpegs_without_an_end_marker(tmp_path):
    from pipeline.manifest import check_image_bytes

    good = _jpeg()
    assert check_image_bytes(good + b"\x00" * 16, "quick").status == "ok"
    # bytes after the end marker (an appended trailer): no quick verdict, the full decode passes it
    assert check_image_bytes(good + b"TRAILER", "quick").status == "ok"
    assert check_image_bytes(good[: len(good) - 40], "quick").status.startswith("truncated")


def test_manifest_is_deterministic_across_worker_counts(tmp_path, demo_root):
    build_manifest(demo_root, tmp_path / "a.parquet", num_workers=0)
    build_manifest(demo_root, tmp_path / "b.parquet", num_workers=2)
    assert file_digest(tmp_path / "a.parquet") == file_digest(tmp_path / "b.parquet")
    rows = read_manifest(tmp_path / "a.parquet").to_pylist()
    assert len(rows) == NUM_CLASSES * 9 and {r["label"] for r in rows} == set(range(NUM_CLASSES))


def test_flat_tree_holds_out_a_stable_seeded_val_fraction(tmp_path, demo_root):
    flat = tmp_path / "flat"
    for path in (demo_root / "train").rglob("*.jpg"):
        (flat / path.parent.name).mkdir(parents=True, exist_ok=True)
        (flat / path.parent.name / path.name).write_bytes(path.read_bytes())
    first = build_manifest(flat, tmp_path / "a.parquet", val_fraction=0.5, seed=3, num_workers=0)
    assert 0 < first.split_counts["val"] < NUM_CLASSES * 6
    split_of = {r["key"]: r["split"] for r in read_manifest(tmp_path / "a.parquet").to_pylist()}
    (flat / "c000_extra").mkdir()
    (flat / "c000_extra" / "new.jpg").write_bytes(_jpeg())
    build_manifest(flat, tmp_path / "b.parquet", val_fraction=0.5, seed=3, num_workers=0)
    after = {r["key"]: r["split"] for r in read_manifest(tmp_path / "b.parquet").to_pylist()}
    assert all(after[k] == s for k, s in split_of.items())  # adding files moves no existing image
    build_manifest(flat, tmp_path / "c.parquet", val_fraction=0.5, seed=4, num_workers=0)
    reseeded = {r["key"]: r["split"] for r in read_manifest(tmp_path / "c.parquet").to_pylist()}
    assert any(reseeded[k] != s for k, s in split_of.items())
    none_held = build_manifest(flat, tmp_path / "d.parquet", val_fraction=0.0, num_workers=0)
    assert none_held.split_counts["val"] == 0


def test_list_file_with_int_labels_names_and_spaces(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a b.jpg").write_bytes(_jpeg())
    (tmp_path / "img" / "c.jpg").write_bytes(_jpeg((0, 0, 255)))
    (tmp_path / "ints.txt").write_text("# comment\nimg/a b.jpg 7\n\nimg/c.jpg 2\nimg/missing.jpg 2\n")
    summary = build_manifest(tmp_path / "ints.txt", tmp_path / "ints.parquet", num_workers=0)
    assert summary.kind == "list" and summary.num_ok == 2
    rows = {r["key"]: r for r in read_manifest(tmp_path / "ints.parquet", only_ok=False).to_pylist()}
    assert rows["img/a b"]["label"] == 7 and rows["img/c"]["label"] == 2
    assert rows["img/missing"]["status"].startswith("unreadable")

    (tmp_path / "names.txt").write_text("img/c.jpg dog\nimg/a b.jpg cat\n")
    build_manifest(tmp_path / "names.txt", tmp_path / "names.parquet", num_workers=0)
    rows = {r["key"]: r for r in read_manifest(tmp_path / "names.parquet").to_pylist()}
    assert (rows["img/a b"]["label"], rows["img/c"]["label"]) == (0, 1)

    (tmp_path / "mixed.txt").write_text("img/c.jpg 3\nimg/a b.jpg cat\n")
    with pytest.raises(ValueError, match="mix of integer labels and class names"):
        build_manifest(tmp_path / "mixed.txt", tmp_path / "mixed.parquet", num_workers=0)


def _write_tar(path: pathlib.Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    good = _jpeg()
    _write_tar(tmp_path / "wds" / "train" / "shard-000.tar", {
        "s1.jpg": good, "s1.cls": b"1", "s2.jpg": good[:300], "s2.cls": b"0", "s3.cls": b"0",
        "s0.jpg": good, "s0.cls": b"0"})
    _write_tar(tmp_path / "wds" / "val" / "shard-000.tar", {"v1.jpeg": good, "v1.cls": b"1"})
    summary = build_manifest(tmp_path / "wds", tmp_path / "w.parquet", num_workers=2)
    assert summary.kind == "webdataset"
    assert summary.split_counts == {"train": 2, "val": 1} and summary.num_bad == 2
    rows = read_manifest(tmp_path / "w.parquet", only_ok=False).to_pylist()
    assert [(r["split"], r["key"], r["label"]) for r in rows] == [
        ("train", "s0", 0), ("train", "s1", 1), ("train", "s2", 0), ("train", "s3", 0), ("val", "v1", 1)]
    status = {r["key"]: r["status"] for r in rows}
    assert status["s2"].startswith("truncated") and status["s3"].startswith("no image member")
    location = rows[1]["location"]
    assert location.endswith("shard-000.tar::s1.jpg") and read_bytes(location) == good


def test_bad_sources_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_manifest(tmp_path / "nowhere", tmp_path / "m.parquet")
    (tmp_path / "noclasses").mkdir()
    (tmp_path / "noclasses" / "a.jpg").write_bytes(_jpeg())
    with pytest.raises(ValueError, match="no class folders"):
        build_manifest(tmp_path / "noclasses", tmp_path / "m.parquet", num_workers=0)
    with pytest.raises(ValueError, match="val_fraction"):
        build_manifest(tmp_path / "noclasses", tmp_path / "m.parquet", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="build it"):
        read_manifest(tmp_path / "absent.parquet")
    assert not (tmp_path / "m.parquet").exists()
