"""Packing token files into WebDataset shards: round trip, index, determinism, resume, bad inputs."""
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lease.data import npy_header, read_shard
from lease.io import file_digest
from pipeline import pack as pk

SEQ_LEN, VOCAB_GEN, CODEBOOK = 16, 64, 32


def write_token_files(root: Path, split: str, sizes: list[int], seed: int, start: int = 0) -> dict[str, np.ndarray]:
    """Tokenize-stage outputs `shard-XXXXXX.npz` of the given sizes; returns everything concatenated."""
    rng = np.random.default_rng(seed)
    out_dir = root / split
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for number, n in enumerate(sizes):
        part = {"keys": np.array([f"{split}/img{start + len(parts) * 100 + i:05d}" for i in range(n)]),
                "vq": rng.integers(0, VOCAB_GEN, (n, SEQ_LEN)).astype(np.uint16),
                "disc": rng.integers(0, CODEBOOK, (n, SEQ_LEN)).astype(np.uint16),
                "labels": rng.integers(0, 5, n).astype(np.int64)}
        np.savez(out_dir / f"shard-{number:06d}.npz", **part)
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture
def tokens(tmp_path):
    expected = {"train": write_token_files(tmp_path / "tok", "train", [7, 12, 5], seed=0),
                "val": write_token_files(tmp_path / "tok", "val", [6], seed=1)}
    return {split: tmp_path / "tok" / split for split in expected}, expected


def run_pack(dirs, out: Path, **kw):
    args = dict(vocab_gen=VOCAB_GEN, codebook_size=CODEBOOK, samples_per_shard=8, progress=False)
    return pk.pack(dirs, out, **{**args, **kw})


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): file_digest(p) for p in sorted(out.glob("*/*.tar"))}


def test_round_trip_index_and_stats(tokens, tmp_path):
    dirs, expected = tokens
    summary = run_pack(dirs, tmp_path / "out")
    out = tmp_path / "out"
    assert summary["splits"] == {"train": {"samples": 24, "shards": 3}, "val": {"samples": 6, "shards": 1}}
    assert sorted(digests(out)) == ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar",
                                    "val/shard-000000.tar"]
    index = pq.read_table(out / "index.parquet").to_pydict()
    for split, data in expected.items():
        samples = list(pk.iter_packed(sorted((out / split).glob("*.tar"))))
        keys = [s["__key__"] for s in samples]
        assert sorted(keys) == sorted(data["keys"].tolist())  # every sample once, in the permuted order
        row = {k: i for i, k in enumerate(data["keys"].tolist())}
        order = [row[k] for k in keys]
        for name in ("vq", "disc"):
            got = np.stack([s[name] for s in samples])
            assert got.dtype == np.uint16
            np.testing.assert_array_equal(got, data[name][order])
        assert [s["cls"] for s in samples] == data["labels"][order].tolist()
        rows = [i for i, s in enumerate(index["split"]) if s == split]
        assert [index["key"][i] for i in rows] == keys
        assert [index["label"][i] for i in rows] == data["labels"][order].tolist()
        assert [(index["shard"][i], index["position"][i]) for i in rows] == [
            (f"{split}/shard-{j // 8:06d}.tar", j % 8) for j in range(len(rows))]
    # The trainer's own reader sees the same samples.
    train = [s["__key__"] for s in pk.iter_packed(sorted((out / "train").glob("*.tar")))]
    keys, vq, disc, labels = read_shard(out / "train" / "shard-000001.tar")
    assert keys == train[8:16]
    row = [expected["train"]["keys"].tolist().index(k) for k in keys]
    np.testing.assert_array_equal(vq, expected["train"]["vq"][row])
    np.testing.assert_array_equal(labels, expected["train"]["labels"][row])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_images"] == 30 and stats["num_tokens"] == 30 * SEQ_LEN
    assert sum(stats["histograms"]["disc"]) == 30 * SEQ_LEN and len(stats["histograms"]["gen"]) == VOCAB_GEN
    assert (out / "token_usage.png").stat().st_size > 0
    assert not list(out.rglob(".*.tmp"))


def test_same_inputs_give_identical_bytes(tokens, tmp_path):
    dirs, _ = tokens
    run_pack(dirs, tmp_path / "a")
    run_pack(dirs, tmp_path / "b", num_workers=2)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert file_digest(tmp_path / "a" / "index.parquet") == file_digest(tmp_path / "b" / "index.parquet")


def packed_keys(out: Path, split: str) -> list[str]:
    return [s["__key__"] for s in pk.iter_packed(sorted((out / split).glob("*.tar")))]


def test_permutation_is_seeded_and_depends_on_the_set_of_samples_only(tokens, tmp_path):
    """The same samples cut into other token files, in another order, pack to the same bytes; another seed
    gives another order of the same samples; neither is the input order."""
    dirs, expected = tokens
    run_pack(dirs, tmp_path / "a")
    train = expected["train"]
    flipped = np.arange(len(train["keys"]))[::-1]
    (tmp_path / "recut" / "train").mkdir(parents=True)
    for number, rows in enumerate(np.array_split(flipped, [3, 13])):
        np.savez(tmp_path / "recut" / "train" / f"shard-{number:06d}.npz", **{k: v[rows] for k, v in train.items()})
    run_pack({**dirs, "train": tmp_path / "recut" / "train"}, tmp_path / "recut-out")
    assert digests(tmp_path / "recut-out") == digests(tmp_path / "a")
    assert file_digest(tmp_path / "recut-out" / "index.parquet") == file_digest(tmp_path / "a" / "index.parquet")
    run_pack(dirs, tmp_path / "seed1", seed=1)
    first, other = packed_keys(tmp_path / "a", "train"), packed_keys(tmp_path / "seed1", "train")
    assert sorted(first) == sorted(other) == train["keys"].tolist()
    assert len({tuple(first), tuple(other), tuple(train["keys"].tolist())}) == 3
    assert digests(tmp_path / "seed1") != digests(tmp_path / "a")


def test_index_maps_every_key_to_its_shard_and_position(tokens, tmp_path):
    dirs, expected = tokens
    run_pack(dirs, tmp_path / "out", samples_per_shard=5)
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(k for data in expected.values() for k in data["keys"].tolist())
    shards = {name: read_shard(tmp_path / "out" / name) for name in {r["shard"] for r in index}}
    for r in index:
        keys, vq, _, labels = shards[r["shard"]]
        data = expected[r["split"]]
        row = data["keys"].tolist().index(r["key"])
        assert keys[r["position"]] == r["key"] and labels[r["position"]] == r["label"] == data["labels"][row]
        np.testing.assert_array_equal(vq[r["position"]], data["vq"][row])


def test_interrupted_run_resumes_to_identical_output(tokens, tmp_path, monkeypatch):
    dirs, _ = tokens
    run_pack(dirs, tmp_path / "clean")
    real_write, calls = pk.write_shard, []

    def dying_write(path, chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(path)
        real_write(path, chunk)

    monkeypatch.setattr(pk, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_pack(dirs, tmp_path / "resumed")
    assert len(list((tmp_path / "resumed").glob("*/*.tar"))) == 2
    assert not (tmp_path / "resumed" / "index.parquet").exists()
    monkeypatch.setattr(pk, "write_shard", real_write)
    summary = run_pack(dirs, tmp_path / "resumed")
    assert (summary["reused"], summary["written"]) == (2, 2)
    assert digests(tmp_path / "resumed") == digests(tmp_path / "clean")
    # A rerun over a complete output rewrites nothing.
    assert run_pack(dirs, tmp_path / "resumed")["written"] == 0


def test_resume_with_other_settings_is_refused(tokens, tmp_path):
    dirs, _ = tokens
    run_pack(dirs, tmp_path / "out")
    with pytest.raises(ValueError, match="fresh output directory"):
        run_pack(dirs, tmp_path / "out", samples_per_shard=5)


def test_manifest_keys_of_odd_file_names_pack_and_read_back(tmp_path):
    """Keys as the manifest writes them (escaped, some qualified) pass the key check and come back from
    WebDataset's reader and the trainer's reader unchanged."""
    from pipeline.manifest import manifest_key

    names = [("cls/photo.v2", None), ("cls/a%b", None), ("cls/dup", "png"), ("cls/dup", "jpg"),
             ("dir.v1/café au lait", None), ("cls/.x.y", ""), ("000001", "train/shard-0.tar"), ("x#y", None)]
    keys = np.array([manifest_key(name, qualifier) for name, qualifier in names])
    rng = np.random.default_rng(0)
    np.savez((tmp_path / "shard-000000.npz"), keys=keys, labels=np.arange(len(keys), dtype=np.int64),
             vq=rng.integers(0, VOCAB_GEN, (len(keys), SEQ_LEN)).astype(np.uint16),
             disc=rng.integers(0, CODEBOOK, (len(keys), SEQ_LEN)).astype(np.uint16))
    run_pack({"train": tmp_path}, tmp_path / "out", samples_per_shard=len(keys))
    shard = tmp_path / "out" / "train" / "shard-000000.tar"
    packed = list(pk.iter_packed([shard]))
    assert sorted(s["__key__"] for s in packed) == sorted(keys.tolist())
    assert read_shard(shard)[0] == [s["__key__"] for s in packed]
    assert [s["cls"] for s in packed] == [keys.tolist().index(s["__key__"]) for s in packed]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(keys=np.array([k + ".jpg" for k in d["keys"]])), "contains '.'"),
    (lambda d: d.update(keys=np.array([d["keys"][0]] * len(d["keys"]))), "duplicate sample keys"),
    (lambda d: d.update(vq=d["vq"].astype(np.int32)), "expected uint16"),
    (lambda d: d.update(disc=d["disc"][:, :4]), "must be aligned"),
    (lambda d: d.update(disc=d["disc"] + CODEBOOK), "disc tokens span"),
    (lambda d: d.pop("labels"), "lacks"),
])
def test_bad_token_files_are_rejected(tmp_path, change, message):
    write_token_files(tmp_path / "tok", "train", [6], seed=2)
    path = tmp_path / "tok" / "train" / "shard-000000.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message):
        run_pack({"train": tmp_path / "tok" / "train"}, tmp_path / "out")


def test_keys_repeated_across_splits_are_rejected(tmp_path):
    write_token_files(tmp_path / "tok", "train", [4], seed=3)
    (tmp_path / "tok" / "val").mkdir()
    (tmp_path / "tok" / "val" / "shard-000000.npz").write_bytes(
        (tmp_path / "tok" / "train" / "shard-000000.npz").read_bytes())
    with pytest.raises(ValueError, match="duplicate sample keys"):
        run_pack({"train": tmp_path / "tok" / "train", "val": tmp_path / "tok" / "val"}, tmp_path / "out")


def test_missing_inputs_say_what_to_run(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenize stage"):
        run_pack({"train": tmp_path / "empty"}, tmp_path / "out")


def test_cli(tokens, tmp_path):
    dirs, _ = tokens
    argv = ["--out", str(tmp_path / "cli"), "--vocab-gen", str(VOCAB_GEN), "--codebook-size", str(CODEBOOK),
            "--samples-per-shard", "8"]
    for split, d in dirs.items():
        argv += ["--tokens", f"{split}={d}"]
    assert pk.main(argv) == 0
    run_pack(dirs, tmp_path / "api")
    assert digests(tmp_path / "cli") == digests(tmp_path / "api")
    with pytest.raises(SystemExit):
        pk.main(["--out", str(tmp_path / "x"), "--vocab-gen", "4", "--codebook-size", "4", "--tokens", "nodir"])


def test_npy_header_matches_numpy():
    row = np.arange(SEQ_LEN, dtype=np.uint16)
    buf = io.BytesIO()
    np.save(buf, row)
    assert npy_header(row.dtype, SEQ_LEN) + row.tobytes() == buf.getvalue()
