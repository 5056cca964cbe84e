"""Shards in a seeded global shuffle order (issue 26): demo-sized token files in class runs (as the manifest
lists an ImageFolder) packed by the real pack stage, streamed by `StreamingBatches`: batches hold the
classes a uniform draw would, epochs deal the shards anew and read each once, resume is exact."""
from pathlib import Path

import numpy as np
import pytest
import torch

import test_train as trainer
from lease.data import StreamingBatches, read_shard
from lease.synthetic import planted_codebook, planted_tokens
from lease.train import train
from pipeline.pack import pack
from planted import write_shards

CLASSES, SEQ_LEN, BATCH = 10, 16, 32
CPU = torch.device("cpu")


def pack_demo(root: Path, per_class: int, per_shard: int) -> list[Path]:
    """Token files of `per_class` images of each class, class after class, packed into shards. vq[:, 0]
    is the sample's number, so a batch tells which samples it holds."""
    n = CLASSES * per_class
    rng = np.random.default_rng(0)
    vq = rng.integers(0, 64, (n, SEQ_LEN)).astype(np.uint16)
    vq[:, 0] = np.arange(n)
    labels = np.repeat(np.arange(CLASSES), per_class)
    (root / "tok").mkdir(parents=True)
    for number, rows in enumerate(np.array_split(np.arange(n), 3)):
        np.savez(root / "tok" / f"shard-{number:06d}.npz", labels=labels[rows], vq=vq[rows],
                 disc=rng.integers(0, 32, (len(rows), SEQ_LEN)).astype(np.uint16),
                 keys=np.array([f"c{labels[i]:02d}/img{i:04d}" for i in rows]))
    pack({"train": root / "tok"}, root / "out", vocab_gen=n, codebook_size=32, samples_per_shard=per_shard,
         progress=False)
    return sorted((root / "out" / "train").glob("*.tar"))


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    """640 samples in 8 full shards: they deal evenly to 2 ranks × 2 workers, 5 batches each."""
    return pack_demo(tmp_path_factory.mktemp("even"), per_class=64, per_shard=80)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """400 samples in 7 shards, the last one short."""
    return pack_demo(tmp_path_factory.mktemp("uneven"), per_class=40, per_shard=64)


def stream(shards, **kw) -> StreamingBatches:
    args = dict(batch_size=BATCH, device=CPU, seed=5, buffer=BATCH, num_workers=2)
    return StreamingBatches(shards, **{**args, **kw})


def take(batches: StreamingBatches, start: int, count: int) -> list:
    data = batches.iterate(start)
    return [next(data) for _ in range(count)]


def test_streamed_batches_hold_the_classes_of_a_uniform_draw(uneven):
    """With a sample buffer as small against these 400 samples as 2,048 is against ImageNet, every batch of
    an epoch holds >= 0.8 x the distinct classes that BATCH uniform draws hold on average."""
    uniform = CLASSES * (1 - (1 - 1 / CLASSES) ** BATCH)  # 9.66 of 10 classes for 32 draws
    batches = stream(uneven)
    held = [len(b.labels.unique()) for b in take(batches, 0, batches.steps_per_epoch)]
    assert min(held) >= 0.8 * uniform, held


def test_an_epoch_deals_every_shard_once_to_the_ranks_in_a_new_order(even):
    ranks = [stream(even, rank=r, world_size=2) for r in range(2)]
    shares = {epoch: [r.stream(epoch).share() for r in ranks] for epoch in range(2)}
    for epoch, (first, second) in shares.items():
        assert sorted(first + second) == sorted(map(str, even)) and len(first) == len(second) == 4
    assert shares[0] != shares[1]
    # Two ranks, two workers each: the epoch's batches hold every sample exactly once.
    assert ranks[0].steps_per_epoch == 640 // (2 * BATCH)
    seen = torch.cat([b.vq[:, 0] for r in ranks for b in take(r, 0, r.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(640))


def test_a_worker_interleaves_several_shards(even):
    """Without a sample shuffle, a worker's first batch takes samples of `interleave` shards in turn."""
    shard_of = {int(k): i for i, p in enumerate(even) for k in read_shard(p)[1][:, 0]}

    def shards_of_first_batch(interleave: int) -> list[int]:
        first = take(stream(even, buffer=1, num_workers=0, interleave=interleave), 0, 1)[0]
        return [shard_of[k] for k in first.vq[:, 0].tolist()]

    assert len(set(shards_of_first_batch(1))) == 1
    four = shards_of_first_batch(4)
    assert len(set(four[:4])) == 4 and four == four[:4] * (BATCH // 4)


@pytest.mark.parametrize("shards", ["even", "uneven"])
def test_resume_yields_the_batches_of_a_straight_run(shards, request):
    """Also on shards that do not deal evenly (7 shards, the last short, to 2 ranks × 2 workers): every rank
    yields steps_per_epoch full batches an epoch, so a resume inside the second epoch lands where a
    straight run is."""
    shards = request.getfixturevalue(shards)
    for rank in range(2):
        batches = stream(shards, rank=rank, world_size=2)
        steps = batches.steps_per_epoch
        straight = take(batches, 0, 2 * steps + 2)
        resumed = take(batches, steps + 3, steps - 1)
        assert all(b.vq.shape == (BATCH, SEQ_LEN) for b in straight)
        for a, b in zip(straight[steps + 3 :], resumed):
            assert torch.equal(a.vq, b.vq) and torch.equal(a.disc, b.disc) and torch.equal(a.labels, b.labels)


def test_a_streamed_training_run_resumes_to_a_straight_runs_weights(tmp_path):
    """Through the trainer, with loader workers, stopped inside the first epoch and resumed past the second's
    start: the loaders of the epochs take no number from the global torch stream the masks draw from."""
    vq, disc, labels = planted_tokens(768, trainer.CLASSES, trainer.GRID ** 2, trainer.CONCEPTS, trainer.SYNONYMS,
                                      seed=0, concentration=trainer.CONCENTRATION)
    write_shards(tmp_path / "train", vq, disc, labels, per_shard=256)
    np.save(tmp_path / "codebook.npy", planted_codebook(trainer.CONCEPTS, 16, seed=1))
    config = lambda: trainer.tiny_cfg(tmp_path, **{"data.gpu_resident": "off", "data.num_workers": 2,  # noqa: E731
                                                   "max_steps": 16})
    assert train(config(), tmp_path / "straight")["steps"] == 16  # 12 steps an epoch
    train(config(), tmp_path / "split", stop_after=7)
    assert train(config(), tmp_path / "split", resume=True)["steps"] == 16
    trainer.assert_same_state(tmp_path / "straight", tmp_path / "split")
