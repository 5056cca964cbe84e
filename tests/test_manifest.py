"""Manifest stage and demo data: discovery, decode checks of bad files, splits, labels, determinism, keys
that any file name can carry, shared names resolved by content."""
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
from lease.images import read_bytes
from pipeline.manifest import (build_manifest, escape_key, manifest_classes, manifest_key, read_manifest, split_key,
                               unescape_key)

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
    from lease.images import UndecodableImage, make_loader

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
    # plain names key as their paths without suffix, unescaped
    assert {r["key"] for r in rows} == {p.relative_to(demo_root).with_suffix("").as_posix()
                                        for p in demo_root.rglob("*.jpg")}


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
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_manifest(tmp_path / "empty", tmp_path / "m.parquet", num_workers=0)
    with pytest.raises(ValueError, match="val_fraction"):
        build_manifest(tmp_path / "empty", tmp_path / "m.parquet", val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="build it"):
        read_manifest(tmp_path / "absent.parquet")
    assert not (tmp_path / "m.parquet").exists()


# -------------------------------------------------------------------------------------------- keys

ODD_NAMES = ["cls/photo.v2", "a%b", "a%2Eb", "100%", "x#y", "café au lait", "日本/写真.1", ".leading", "..",
             "trailing.", "dir.with.dots/img", "%25", "#", "tab\tand\nnewline", ""]


def test_escaped_keys_hold_no_dot_and_round_trip():
    escaped = [escape_key(name) for name in ODD_NAMES]
    assert not any("." in key or "#" in key for key in escaped)
    assert len(set(escaped)) == len(ODD_NAMES)  # reversible, so distinct names stay distinct
    assert [unescape_key(key) for key in escaped] == ODD_NAMES
    assert escape_key("cls/photo.v2") == "cls/photo%2Ev2" and escape_key("a%b") == "a%25b"
    assert escape_key("plain/name_01") == "plain/name_01"  # ordinary names keep their keys
    for name in ODD_NAMES:
        for qualifier in (None, "", "png", "train/shard-0.tar", "j#p.g"):
            key = manifest_key(name, qualifier)
            assert "." not in key and split_key(key) == (name, qualifier)
    for not_escaped in ("a.b", "a#b", "a%41", "a%2e", "50%"):
        with pytest.raises(ValueError, match="not an escaped manifest name"):
            unescape_key(not_escaped)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _rows_by_file(manifest: pathlib.Path, root: pathlib.Path) -> dict[str, dict]:
    return {pathlib.Path(r["location"]).relative_to(root).as_posix(): r
            for r in read_manifest(manifest, only_ok=False).to_pylist()}


def test_shared_names_are_resolved_by_content_never_by_order(tmp_path):
    src = tmp_path / "src"
    copy = _png(3)
    files = {
        "c/dup.jpg": b"", "c/dup.png": _png(1),  # the bad file sorts first ...
        "c/solo": _png(2), "c/solo.png": b"not an image",  # ... and here last: the readable one wins both
        "c/copy.jpeg": copy, "c/copy.png": copy,  # identical bytes: one image
        "c/pair.jpg": _jpeg(), "c/pair.png": _png(4),  # different images of one name: both stay
        "c/photo.v2.png": _png(5), "c/photo.v2.jpg": _png(6), "c/photo.png": _png(7),
        "c/a%b.png": _png(8), "c/a%25b.png": _png(9), "c/x#y.png": _png(10), "c/ordinary.png": _png(11),
    }
    for relative, data in files.items():
        (src / relative).parent.mkdir(parents=True, exist_ok=True)
        (src / relative).write_bytes(data)
    build_manifest(src, tmp_path / "m.parquet", num_workers=0)
    rows = _rows_by_file(tmp_path / "m.parquet", src)
    keys = {path: row["key"] for path, row in rows.items()}
    assert keys == {
        "c/dup.jpg": "c/dup#jpg", "c/dup.png": "c/dup", "c/solo": "c/solo", "c/solo.png": "c/solo#png",
        "c/copy.jpeg": "c/copy", "c/copy.png": "c/copy#png", "c/pair.jpg": "c/pair#jpg", "c/pair.png": "c/pair#png",
        "c/photo.v2.png": "c/photo%2Ev2#png", "c/photo.v2.jpg": "c/photo%2Ev2#jpg", "c/photo.png": "c/photo",
        "c/a%b.png": "c/a%25b", "c/a%25b.png": "c/a%2525b", "c/x#y.png": "c/x%23y", "c/ordinary.png": "c/ordinary",
    }
    assert rows["c/dup.jpg"]["status"] == "empty file" and rows["c/dup.png"]["status"] == "ok"
    assert rows["c/solo.png"]["status"].startswith("not an image") and rows["c/solo"]["status"] == "ok"
    assert rows["c/copy.png"]["status"] == f"duplicate of {src.absolute() / 'c/copy.jpeg'} (identical bytes)"
    ok_keys = [row["key"] for row in rows.values() if row["status"] == "ok"]
    assert len(ok_keys) == len(set(ok_keys)) == 12 and not any("." in key for key in ok_keys)
    for path, key in keys.items():  # every key names its file: its path without, or (qualified) with its suffix
        name, qualifier = split_key(key)
        if qualifier is None:
            assert name == pathlib.PurePosixPath(path).with_suffix("").as_posix()
        else:
            assert path == (f"{name}.{qualifier}" if qualifier else name)
    table = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [(r["split"], r["key"]) for r in table] == sorted((r["split"], r["key"]) for r in table)

    build_manifest(src, tmp_path / "again.parquet", num_workers=2)  # parallel checks, same bytes
    assert file_digest(tmp_path / "again.parquet") == file_digest(tmp_path / "m.parquet")


def test_list_file_names_with_dots_and_one_file_listed_twice(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "photo.v2.jpg").write_bytes(_jpeg())
    (tmp_path / "img" / "50% off.jpg").write_bytes(_jpeg((0, 0, 255)))
    (tmp_path / "list.txt").write_text("img/photo.v2.jpg 1\nimg/50% off.jpg 0\nimg/photo.v2.jpg 1\n")
    summary = build_manifest(tmp_path / "list.txt", tmp_path / "m.parquet", num_workers=0)
    rows = read_manifest(tmp_path / "m.parquet", only_ok=False).to_pylist()
    assert summary.num_ok == 2
    assert sorted((r["key"], r["status"]) for r in rows) == [
        ("img/50%25 off", "ok"), ("img/photo%2Ev2", "ok"),
        ("img/photo%2Ev2#jpg", f"duplicate of {(tmp_path / 'img' / 'photo.v2.jpg').absolute()} (identical bytes)")]


def test_tar_sample_keys_are_escaped_and_shared_keys_resolved_by_content(tmp_path):
    good, other = _jpeg(), _jpeg((0, 200, 0))
    _write_tar(tmp_path / "wds" / "train" / "a.tar", {
        "same.jpg": good, "differ.jpg": good, "bad.jpg": good[:300], "dir.v1/s.JPG": good, "dir.v1/s.cls": b"0"})
    _write_tar(tmp_path / "wds" / "val" / "a.tar", {"same.jpg": good, "differ.jpg": other, "bad.jpg": good})
    build_manifest(tmp_path / "wds", tmp_path / "w.parquet", num_workers=0)
    rows = {(r["split"], r["key"]): r for r in read_manifest(tmp_path / "w.parquet", only_ok=False).to_pylist()}
    status = {key: row["status"].split(" (")[0].split(":")[0] for key, row in rows.items()}
    train_tar = (tmp_path / "wds" / "train" / "a.tar").absolute()
    assert status == {
        ("train", "bad#train/a%2Etar"): "truncated", ("train", "differ#train/a%2Etar"): "ok",
        ("train", "dir%2Ev1/s"): "ok", ("train", "same"): "ok",
        ("val", "bad"): "ok", ("val", "differ#val/a%2Etar"): "ok",
        ("val", "same#val/a%2Etar"): f"duplicate of {train_tar}",
    }
    # a member whose extension is upper case is read back under its own name
    assert read_bytes(rows[("train", "dir%2Ev1/s")]["location"]) == good


def test_a_path_that_is_not_utf8_is_a_named_bad_row(tmp_path):
    """Linux allows any bytes in a file name; the manifest's text columns hold UTF-8 only."""
    (tmp_path / "src" / "c").mkdir(parents=True)
    (tmp_path / "src" / "c" / "fine.png").write_bytes(_png(0))
    try:
        with open(os.path.join(os.fsencode(tmp_path / "src" / "c"), b"latin1 caf\xe9.png"), "wb") as fh:
            fh.write(_png(1))
    except OSError as err:  # a file system that refuses such names has nothing to test
        pytest.skip(f"this file system refuses non-UTF-8 names: {err}")
    summary = build_manifest(tmp_path / "src", tmp_path / "m.parquet", num_workers=0)
    assert summary.num_ok == 1
    assert [(pathlib.Path(loc).name, reason) for loc, reason in summary.bad] == [
        ("latin1 caf\\xe9.png", "unreadable: its path is not valid UTF-8 (rename the file)")]


def test_the_committed_example_manifest_is_what_the_manifest_stage_writes(tmp_path, monkeypatch):
    """data_manifests/example.parquet is the manifest of data_manifests/example/, built from the repo root
    (relative locations), byte for byte: the committed example and its README's columns stay true."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    build_manifest("data_manifests/example", tmp_path / "m.parquet", num_workers=0)
    assert (tmp_path / "m.parquet").read_bytes() == (repo / "data_manifests/example.parquet").read_bytes()
    columns = pq.read_schema(repo / "data_manifests/example.parquet").names
    readme = (repo / "data_manifests/README.md").read_text()
    assert all(f"`{name}`" in readme for name in columns), columns


def test_a_named_manifest_is_published_for_committing_and_left_alone_when_unchanged(tmp_path, monkeypatch):
    from lease.typed_config import ConfigError
    from pipeline import stages
    from pipeline.config import load_pipeline_config

    monkeypatch.setattr(stages, "MANIFESTS_DIR", tmp_path / "data_manifests")
    out = tmp_path / "stage"
    build_manifest(pathlib.Path(__file__).resolve().parents[1] / "data_manifests/example", out / "manifest.parquet",
                   num_workers=0)
    stages.publish_manifest(load_pipeline_config("demo"), out)  # no name: nothing written
    assert not (tmp_path / "data_manifests").exists()
    cfg = load_pipeline_config("demo", ["data.manifest_name=mine"])
    stages.publish_manifest(cfg, out)
    published = tmp_path / "data_manifests" / "mine.parquet"
    assert published.read_bytes() == (out / "manifest.parquet").read_bytes()
    mtime = published.stat().st_mtime_ns
    stages.publish_manifest(cfg, out)
    assert published.stat().st_mtime_ns == mtime  # unchanged content: not rewritten
    with pytest.raises(ConfigError, match="data.manifest_name"):
        load_pipeline_config("demo", ["data.manifest_name=../escape"])


def test_a_folder_without_class_folders_is_an_unlabelled_source(demo_root, tmp_path):
    """The self-supervised case: images straight in the folder are all kept, unlabelled (label -1, no
    classes), with the seeded val share."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted((demo_root / "train").rglob("*.jpg"))):
        (flat / f"{i:03d}.jpg").write_bytes(path.read_bytes())
    summary = build_manifest(flat, tmp_path / "m.parquet", val_fraction=0.25, num_workers=0)
    rows = read_manifest(tmp_path / "m.parquet")
    assert summary.num_ok == rows.num_rows == NUM_CLASSES * 6 and summary.class_names == []
    assert set(rows["label"].to_pylist()) == {-1} and set(rows["class_name"].to_pylist()) == {""}
    assert set(rows["split"].to_pylist()) == {"train", "val"}
    # downstream, evaluate skips the label-needing metrics with this reason (pretraining needs no labels)
    import torch

    from pipeline.stages import _unlabelled

    labels = torch.tensor(rows["label"].to_pylist())
    assert "unlabelled" in _unlabelled(labels, labels)
    assert "single class" in _unlabelled(torch.zeros(4, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert _unlabelled(torch.tensor([0, 1]), torch.tensor([1])) is None
    # the fine-tuning stage then skips with that reason too (it stops before it needs a checkpoint)
    from pipeline.config import load_pipeline_config
    from pipeline.stages import build_finetune

    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "manifest.parquet").write_bytes((tmp_path / "m.parquet").read_bytes())
    record = build_finetune(load_pipeline_config("demo"), {"manifest": tmp_path / "stage"}, tmp_path / "out")
    assert record == {"finetune": None, "skipped": _unlabelled(labels, labels)}
