"""Token data for training and evaluation: packed WebDataset shards → batches on the device, and the
shards' one writer (`write_shard`: the pack stage's output, and synthetic token sets).

Two modes:
- `ResidentBatches`: the whole token set lives on the device (ImageNet-1K is ~1.3 GB as uint16); each
  epoch is a device-side permutation sliced into batches — no loader in the loop, exact resume.
- `StreamingBatches`: webdataset's pipeline on DataLoader workers: the shard order shuffled per epoch and
  dealt to ranks and workers, several shards read at once per worker, a sample shuffle buffer, ready-made
  batches; exact resume. The pack stage writes samples in a global permutation, so a buffer's worth of
  a few shards already holds the classes in their overall proportions.
"""
from __future__ import annotations

import glob
import io
import itertools
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from lease.io import atomic_path

log = logging.getLogger(__name__)
SHARD_MTIME = 0  # fixed tar member mtime: the same tokens give byte-identical shards
INTERLEAVE = 4  # shards a streaming worker reads at once, taking their samples in turn


@dataclass
class TokenSet:
    vq: torch.Tensor  # uint16 [N, L] generative codes
    disc: torch.Tensor  # uint16 [N, L] codebook ids
    labels: torch.Tensor  # int64 [N] (-1 where unknown)
    keys: list[str]

    def __len__(self) -> int:
        return self.vq.shape[0]

    def to(self, device: torch.device | str) -> "TokenSet":
        return TokenSet(self.vq.to(device), self.disc.to(device), self.labels.to(device), self.keys)


@dataclass
class Batch:
    vq: torch.Tensor  # int64 [B, L]
    disc: torch.Tensor | None  # int64 [B, L]; None where no loss reads codebook ids (mage_online)
    labels: torch.Tensor  # int64 [B]


def resolve_shards(spec: str | Path | list) -> list[Path]:
    """Shard paths from a directory (all *.tar inside), a glob, or a list; sorted; error if none."""
    if isinstance(spec, (list, tuple)):
        paths = [Path(p) for p in spec]
    else:
        spec = Path(spec)
        paths = sorted(spec.glob("*.tar")) if spec.is_dir() else sorted(Path(p) for p in glob.glob(str(spec)))
    if not paths:
        raise FileNotFoundError(f"no WebDataset shards (*.tar) found at {spec}: run the pack stage first")
    return paths


def read_shard(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """All samples of one packed shard: keys, vq uint16 [n, L], disc uint16 [n, L], labels int64 [n]."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    keys = list(members)
    try:
        vq = np.stack([np.load(io.BytesIO(members[k]["vq.npy"])) for k in keys])
        disc = np.stack([np.load(io.BytesIO(members[k]["disc.npy"])) for k in keys])
    except KeyError as err:
        raise ValueError(f"shard {path} has a sample without {err.args[0]}: not a LEASE token shard") from err
    labels = np.array([int(members[k].get("cls", b"-1")) for k in keys], dtype=np.int64)
    return keys, vq.astype(np.uint16), disc.astype(np.uint16), labels


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The .npy header of a 1-D array (what np.save writes before the raw bytes)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)})
    return buf.getvalue()


def write_shard(path: str | Path, keys: Sequence[str], vq: np.ndarray, disc: np.ndarray,
                labels: Sequence[int]) -> None:
    """One packed shard, written atomically, that `read_shard` reads back: per sample `<key>.vq.npy`,
    `<key>.disc.npy` (uint16 [L]) and `<key>.cls` (the label as decimal text)."""
    vq = np.ascontiguousarray(vq, dtype="<u2")
    disc = np.ascontiguousarray(disc, dtype="<u2")
    header = npy_header(vq.dtype, vq.shape[1])  # same for every row: build it once
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        with wds.TarWriter(fh, encoder=False, mtime=SHARD_MTIME) as sink:
            for key, vq_row, disc_row, label in zip(keys, vq, disc, labels):
                sink.write({"__key__": key, "vq.npy": header + vq_row.tobytes(),
                            "disc.npy": header + disc_row.tobytes(), "cls": str(int(label)).encode()})


def write_token_set(out_dir: str | Path, tokens: TokenSet, per_shard: int, prefix: str = "shard") -> list[Path]:
    """`tokens` as shards `<prefix>-000000.tar`, ... of `per_shard` samples each; samples without keys
    (a synthetic set) are keyed `<prefix><index>`."""
    keys = tokens.keys or [f"{prefix}{i:07d}" for i in range(len(tokens))]
    paths = []
    for number, start in enumerate(range(0, len(tokens), per_shard)):
        rows = slice(start, start + per_shard)
        paths.append(Path(out_dir) / f"{prefix}-{number:06d}.tar")
        write_shard(paths[-1], keys[rows], tokens.vq[rows].numpy(), tokens.disc[rows].numpy(),
                    tokens.labels[rows].tolist())
    return paths


def read_token_set(shards: str | Path | list) -> TokenSet:
    """Load every sample of the shards into memory (evaluation, resident training)."""
    parts = [read_shard(p) for p in resolve_shards(shards)]
    keys = [k for part in parts for k in part[0]]
    cat = lambda i: torch.from_numpy(np.concatenate([p[i] for p in parts]))  # noqa: E731
    return TokenSet(vq=cat(1), disc=cat(2), labels=cat(3), keys=keys)


def _as_batch(vq: torch.Tensor, disc: torch.Tensor, labels: torch.Tensor) -> Batch:
    # ids are stored as 16-bit (uint16 on disk, int16 views on the device): recover them unsigned
    return Batch(vq=vq.long() & 0xFFFF, disc=disc.long() & 0xFFFF, labels=labels)


class ResidentBatches:
    """Device-resident token set; epoch permutations drawn from (seed, epoch) so any position resumes."""

    def __init__(self, tokens: TokenSet, batch_size: int, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1):
        # CUDA cannot index uint16 tensors; an int16 view keeps the 2 bytes per id
        self.tokens = TokenSet(tokens.vq.view(torch.int16).to(device), tokens.disc.view(torch.int16).to(device),
                               tokens.labels.to(device), tokens.keys)
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(tokens) // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(tokens)} samples are fewer than one global batch of "
                             f"{batch_size * world_size}: lower batch_size")

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(len(self.tokens), device=self.device, generator=gen)
        return order[self.rank :: self.world_size]

    def iterate(self, start_step: int) -> Iterator[Batch]:
        """Batches from global step `start_step` on, forever (epoch after epoch)."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for i in range(offset, self.steps_per_epoch):
                idx = order[i * self.batch_size : (i + 1) * self.batch_size]
                yield _as_batch(self.tokens.vq[idx], self.tokens.disc[idx], self.tokens.labels[idx])
            epoch, offset = epoch + 1, 0


def _stack_npy(records: list[bytes]) -> np.ndarray:
    """Equal-shaped 1-D .npy records as one [n, L] array, the header parsed once (np.load per record costs
    more than the rest of the loader)."""
    head = io.BytesIO(records[0])
    version = np.lib.format.read_magic(head)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read(head)
    raw = np.frombuffer(b"".join(records), np.uint8)
    if raw.size != len(records) * len(records[0]):
        raise ValueError("token arrays of different lengths in one batch: shards of different pack runs?")
    return np.ascontiguousarray(raw.reshape(len(records), -1)[:, head.tell():]).view(dtype)


def _collate(samples: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """webdataset samples → (vq, disc) as int16 views [B, L] (what `_as_batch` reads) and labels int64 [B]."""
    try:
        vq, disc = (_stack_npy([s[name] for s in samples]) for name in ("vq.npy", "disc.npy"))
    except KeyError as err:
        raise ValueError(f"a sample of {samples[0]['__url__']} has no {err.args[0]}: not a LEASE token shard") from err
    labels = np.array([s.get("cls", b"-1") for s in samples]).astype(np.int64)
    return vq.view(np.int16), disc.view(np.int16), labels


class _EpochStream(torch.utils.data.IterableDataset):
    """One epoch of one rank, on the loader's workers, from webdataset's stages: the shard list shuffled by
    (seed, epoch), the same order on every rank, dealt to the ranks and then to the workers; a worker reads
    `interleave` of its shards at once, taking their samples in turn, through a `buffer`-sample shuffle,
    then goes on with shards resampled with replacement, so that no worker runs dry before its rank's epoch
    ends (`StreamingBatches`)."""

    def __init__(self, urls: list[str], batch_size: int, buffer: int, interleave: int, seed: int, epoch: int,
                 rank: int, world_size: int):
        super().__init__()
        self.urls, self.batch_size, self.buffer, self.interleave = urls, batch_size, buffer, interleave
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size

    def _of_rank(self, shards: Iterator[dict]) -> Iterator[dict]:
        return itertools.islice(shards, self.rank, None, self.world_size)

    def share(self) -> list[str]:
        """This rank's and worker's shards of the epoch, in the order they are read."""
        order = wds.SimpleShardList(self.urls, seed=wds.utils.make_seed(self.seed, self.epoch))
        return [shard["url"] for shard in wds.DataPipeline(order, self._of_rank, wds.split_by_worker)]

    def _shuffled(self, samples, seed: int):
        return wds.shuffle(self.buffer, initial=self.buffer, seed=seed)(iter(samples))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = wds.utils.make_seed(self.seed, self.epoch, self.rank, info.id if info else 0)
        share = self.share()
        lanes = min(self.interleave, len(share))
        read = [wds.DataPipeline(wds.SimpleShardList(share[i::lanes]), wds.tarfile_to_samples()) for i in range(lanes)]
        resampled = wds.DataPipeline(wds.ResampledShards(self.urls, seed=seed, deterministic=True),
                                     wds.tarfile_to_samples())
        # the share drains completely before the resampled shards start: each of its samples comes once
        samples = itertools.chain(self._shuffled(wds.RoundRobin(read, longest=True), seed),
                                  self._shuffled(resampled, seed + 1))
        return wds.batched(self.batch_size, collation_fn=_collate, partial=False)(samples)


class StreamingBatches:
    """Streams the shards through DataLoader workers (`_EpochStream`). Every epoch yields exactly
    `steps_per_epoch` batches on every rank, a function of (seed, epoch, rank, world size, workers) alone:
    ranks step together, and a resumed run rebuilds the epoch it stopped in and skips the batches it had
    consumed, so it sees the batches of a straight run. An epoch reads every shard once when the shards
    deal evenly to the world size × workers; a worker dealt one shard more than another has the end of its
    share cut, one dealt fewer is topped up with resampled shards."""

    def __init__(self, shards: list[Path], batch_size: int, device: torch.device, seed: int, buffer: int,
                 num_workers: int, rank: int = 0, world_size: int = 1, steps_per_epoch: int | None = None,
                 interleave: int = INTERLEAVE):
        self.shards, self.batch_size, self.device = shards, batch_size, device
        self.seed, self.buffer, self.num_workers, self.interleave = seed, buffer, num_workers, interleave
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch or self._count_steps()

    def _count_steps(self) -> int:
        # pack fills every shard but the last (in name order): the first and the last give the epoch's size
        full, last = (len(read_shard(p)[0]) for p in (self.shards[0], self.shards[-1]))
        return max(1, (full * (len(self.shards) - 1) + last) // (self.batch_size * self.world_size))

    def stream(self, epoch: int) -> _EpochStream:
        return _EpochStream([str(p) for p in self.shards], self.batch_size, self.buffer, self.interleave,
                            self.seed, epoch, self.rank, self.world_size)

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        # its own generator: DataLoader draws its workers' base seed from it, which would otherwise take a
        # number from the global torch stream (the masks') each epoch and put a resumed run off a straight one's
        loader = wds.WebLoader(self.stream(epoch), batch_size=None, num_workers=self.num_workers,
                               pin_memory=self.device.type == "cuda", generator=torch.Generator())
        for vq, disc, labels in itertools.islice(loader, self.steps_per_epoch):
            yield _as_batch(vq.to(self.device, non_blocking=True), disc.to(self.device, non_blocking=True),
                            labels.to(self.device, non_blocking=True))

    def iterate(self, start_step: int) -> Iterator[Batch]:
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from itertools.islice(self._epoch(epoch), offset, None)
            epoch, offset = epoch + 1, 0


def fits_on_device(shards: list[Path], device: torch.device, fraction: float = 0.25) -> bool:
    """Whether the token set (2 × uint16 per token) takes under `fraction` of free device memory."""
    if device.type != "cuda":
        return True
    per_shard = sum(p.stat().st_size for p in shards)  # tar bytes bound the token bytes from above
    free, _ = torch.cuda.mem_get_info(device)
    return per_shard < fraction * free
