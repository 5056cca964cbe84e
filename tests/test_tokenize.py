"""Fused tokenize stage: shard contents against the modules run by hand, resume equality, feature sample."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lease.io import file_digest
from lease.tokenizers import load_vqgan
from lease.tokenizers.dinov2 import load_dinov2
from lease.tokenizers.vqgan_maskgit import MaskGITVQGAN, MaskGITVQGANConfig
from pipeline import tokenize as tok
from pipeline.assign import nearest_centroid
from pipeline.demo_data import make_demo_dataset
from lease.images import both_crops, decode_rgb, pil_to_tensor, read_bytes
from pipeline.manifest import build_manifest, read_manifest

DINO_SIZE = 32  # patch 2 → the same 16x16 grid as the f4 VQGAN at 64 px
K = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A demo manifest, a tiny MaskGIT VQGAN and HF DINOv2 in their real formats, and a codebook."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("tokenize")
    make_demo_dataset(root / "images", num_classes=3, train_per_class=4, val_per_class=2, image_size=40, seed=0)
    build_manifest(root / "images", root / "manifest.parquet", num_workers=0)
    torch.manual_seed(0)
    vq = MaskGITVQGAN(MaskGITVQGANConfig(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8, embed_dim=8,
                                         n_embed=32, resolution=64))
    torch.save({"state_dict": vq.state_dict()}, root / "vqgan.ckpt")
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                    patch_size=2, image_size=DINO_SIZE))
    dino.save_pretrained(root / "dinov2")
    # Centroids drawn from real patch features (as k-means would start), so many ids get used.
    tok.sample_features(root / "manifest.parquet", root / "features.npy", dinov2_kind="hf", dinov2_path=root / "dinov2",
                        layer=-2, num_images=K // 2, patches_per_image=2, dino_size=DINO_SIZE, num_workers=0,
                        device="cpu", out_dtype="float32")
    np.save(root / "centroids.npy", np.load(root / "features.npy"))
    return root


def _run(assets, out, **kw):
    args = dict(vqgan_kind="maskgit", vqgan_checkpoint=assets / "vqgan.ckpt", dinov2_kind="hf",
                dinov2_path=assets / "dinov2", layer=-2, dino_size=DINO_SIZE, batch_size=3, num_workers=0,
                images_per_shard=5, device="cpu")
    args.update(kw)
    return tok.tokenize(assets / "manifest.parquet", assets / "centroids.npy", out, **args)


def _digests(folder):
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = _run(assets, out)
    return out, summary


def test_shards_hold_the_tokens_of_every_usable_image(assets, full_run):
    out, summary = full_run
    assert summary.num_images == {"train": 12, "val": 6} and summary.num_shards == {"train": 3, "val": 2}
    assert summary.shards_written == 5 and summary.shards_skipped == 0 and summary.vq_codes == 32
    assert summary.disc_codes == K
    train = tok.read_shards(out / "train")
    rows = read_manifest(assets / "manifest.parquet", split="train").to_pylist()
    assert train["keys"].tolist() == [r["key"] for r in rows]
    assert train["labels"].tolist() == [r["label"] for r in rows] and train["labels"].dtype == np.int64
    assert train["vq"].dtype == np.uint16 and train["vq"].shape == (12, 256) and train["vq"].max() < 32
    assert train["disc"].dtype == np.uint16 and train["disc"].shape == (12, 256) and train["disc"].max() < K
    assert len(np.unique(train["vq"])) > 1 and len(np.unique(train["disc"])) > 1

    # The same tokens, computed by hand image by image from the tokenizers and the assignment.
    vqgan = load_vqgan("maskgit", assets / "vqgan.ckpt", None, "cpu")
    dino = load_dinov2("hf", assets / "dinov2", "cpu", -2, image_size=DINO_SIZE)
    centroids = torch.from_numpy(np.load(assets / "centroids.npy"))
    for i in (0, 6, 11):
        img64, img32 = both_crops(pil_to_tensor(decode_rgb(read_bytes(rows[i]["location"]))), (64, DINO_SIZE))
        codes = vqgan.encode(img64[None].float() / 255).flatten(1)[0]
        disc = nearest_centroid(dino(img32[None].float() / 255), centroids)[0]
        assert np.array_equal(train["vq"][i], codes.numpy()) and np.array_equal(train["disc"][i], disc.numpy())


def test_interrupted_run_resumes_to_identical_bytes(assets, full_run, tmp_path, monkeypatch):
    reference, _ = full_run
    out = tmp_path / "resumed"
    first = _run(assets, out, max_shards=1)
    assert first.shards_written == 2 and sorted(_digests(out)) == ["train/shard-000000.npz", "val/shard-000000.npz"]

    calls = {"n": 0}
    real_call = tok.FusedTokenizer.__call__

    def crash_on_third_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real_call(self, *args)

    monkeypatch.setattr(tok.FusedTokenizer, "__call__", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        _run(assets, out)
    monkeypatch.undo()
    # Batches 1-2 (6 of the 7 pending train images) completed train shard 1 only; nothing half-written is left behind.
    assert sorted(_digests(out)) == ["train/shard-000000.npz", "train/shard-000001.npz", "val/shard-000000.npz"]

    last = _run(assets, out, batch_size=5)  # another batch size: shard contents do not depend on it
    assert last.shards_skipped == 3 and last.shards_written == 2
    assert _digests(out) == _digests(reference)


def test_misaligned_grids_and_codebooks_are_rejected(assets, tmp_path):
    with pytest.raises(ValueError, match="position-aligned"):
        _run(assets, tmp_path / "a", dino_size=16)
    np.save(tmp_path / "wrong.npy", np.zeros((K, 7), np.float32))
    with pytest.raises(ValueError, match="D=32 but the codebook has D=7"):
        tok.tokenize(assets / "manifest.parquet", tmp_path / "wrong.npy", tmp_path / "b", vqgan_kind="maskgit",
                     vqgan_checkpoint=assets / "vqgan.ckpt", dinov2_path=assets / "dinov2", dino_size=DINO_SIZE,
                     num_workers=0, device="cpu")
    with pytest.raises(ValueError, match="images_per_shard"):
        _run(assets, tmp_path / "c", images_per_shard=0)


def test_feature_sample_is_seeded_and_batch_size_free(assets, tmp_path):
    common = dict(dinov2_kind="hf", dinov2_path=assets / "dinov2", layer=-2, num_images=6, patches_per_image=5,
                  dino_size=DINO_SIZE, num_workers=0, device="cpu", out_dtype="float32")
    summary = tok.sample_features(assets / "manifest.parquet", tmp_path / "a.npy", seed=1, batch_size=4, **common)
    tok.sample_features(assets / "manifest.parquet", tmp_path / "b.npy", seed=1, batch_size=5, **common)
    tok.sample_features(assets / "manifest.parquet", tmp_path / "c.npy", seed=2, batch_size=4, **common)
    tok.sample_features(assets / "manifest.parquet", tmp_path / "d.npy", seed=1, batch_size=4, **common)
    a, b, c, d = (np.load(tmp_path / f"{n}.npy") for n in "abcd")
    assert summary.num_images == 6 and a.shape == (30, 32) and a.dtype == np.float32
    assert np.array_equal(a, d) and not np.allclose(a, c, atol=1e-3)
    # Another batch size picks the same patches; only float rounding of the batched matmuls differs.
    assert np.allclose(a, b, atol=1e-5)

    # Each sampled vector is one of its image's 256 patch features.
    rows = read_manifest(assets / "manifest.parquet", split="train").to_pylist()
    first = rows[int(tok.sample_rows(len(rows), 6, seed=1)[0])]
    img = both_crops(pil_to_tensor(decode_rgb(read_bytes(first["location"]))), (DINO_SIZE,))[0]
    feats = load_dinov2("hf", assets / "dinov2", "cpu", -2, image_size=DINO_SIZE)(img[None].float() / 255)[0]
    error = (torch.from_numpy(a[:5])[:, None] - feats[None]).abs().amax(dim=-1).min(dim=1).values
    assert error.max() < 1e-5

    half = tok.sample_features(assets / "manifest.parquet", tmp_path / "h.npy", seed=1, batch_size=4,
                               **{**common, "out_dtype": "float16", "num_images": 100})
    assert half.num_images == 12 and np.load(tmp_path / "h.npy").dtype == np.float16
    with pytest.raises(ValueError, match="patches_per_image"):
        tok.sample_features(assets / "manifest.parquet", tmp_path / "x.npy", seed=1, **{**common,
                                                                                       "patches_per_image": 300})


def test_feature_sample_parts_concatenate_to_the_whole_sample(assets, tmp_path):
    """Parts of the feature sample (the partitioned stage's tasks) pick the same images and patches as
    one pass: their files, concatenated in order, are the whole file (batch 4 in both: same rounding)."""
    common = dict(dinov2_kind="hf", dinov2_path=assets / "dinov2", layer=-2, num_images=7, patches_per_image=5,
                  dino_size=DINO_SIZE, num_workers=0, device="cpu", out_dtype="float32", seed=3, batch_size=4)
    manifest = assets / "manifest.parquet"
    tok.sample_features(manifest, tmp_path / "whole.npy", **common)
    parts = tok.feature_sample_parts(manifest, num_images=7, seed=3, count=3)
    assert [p["images"] for p in parts] == [[0, 2], [2, 5], [5, 7]]
    for i, part in enumerate(parts):
        tok.sample_features(manifest, tmp_path / f"part{i}.npy", part=tuple(part["images"]), **common)
    tok.concatenate_feature_parts([tmp_path / f"part{i}.npy" for i in range(3)], tmp_path / "joined.npy")
    assert file_digest(tmp_path / "joined.npy") == file_digest(tmp_path / "whole.npy")
    assert len({p["rows"] for p in parts}) == 3


def test_tokenize_parts_are_whole_shards_and_merge_to_the_single_run(assets, full_run, tmp_path):
    full_run, _ = full_run
    manifest = assets / "manifest.parquet"
    parts = tok.partition_shards(manifest, images_per_shard=5, count=3)
    assert len(parts) == 3 and len({p["rows"] for p in parts}) == 3
    listed = [(split, j) for p in parts for split, shards in p["shards"].items() for j in shards]
    assert len(listed) == len(set(listed))  # no shard twice
    for i, part in enumerate(parts):
        _run(assets, tmp_path / f"part{i}", shards=part["shards"])
    tok.merge_partitions([tmp_path / f"part{i}" for i in range(3)], tmp_path / "merged")
    whole = sorted(p.relative_to(full_run) for p in full_run.glob("*/shard-*.npz"))
    assert sorted(p.relative_to(tmp_path / "merged") for p in (tmp_path / "merged").glob("*/shard-*.npz")) == whole
    for rel in whole:
        assert file_digest(tmp_path / "merged" / rel) == file_digest(full_run / rel)


def test_padding_a_short_batch_leaves_its_tokens_unchanged(assets):
    """The compiled path pads a short last batch to the compiled size; the real rows' tokens must not move."""
    model = tok.load_fused_tokenizer(vqgan_kind="maskgit", vqgan_checkpoint=assets / "vqgan.ckpt", vqgan_config=None,
                                     dinov2_kind="hf", dinov2_path=assets / "dinov2", layer=-2,
                                     centroids=assets / "centroids.npy", dino_size=DINO_SIZE, dtype="fp32",
                                     device=torch.device("cpu"), compile="off")
    gen = torch.Generator().manual_seed(0)
    img_vq = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=gen)
    img_dino = torch.randint(0, 256, (3, 3, DINO_SIZE, DINO_SIZE), dtype=torch.uint8, generator=gen)
    plain = model(img_vq, img_dino)
    model.pad_to = 8
    padded = model(img_vq, img_dino)
    for a, b in zip(plain, padded):
        assert b.shape[0] == 3 and torch.equal(a, b)
    assert tok.pad_batch(img_vq, 8).shape[0] == 8 and tok.pad_batch(img_vq, 2) is img_vq
