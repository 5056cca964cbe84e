"""Pack per-shard token files into WebDataset tar shards.

Input: for each split, a directory of `shard-XXXXXX.npz` files from the tokenize stage, each holding
`keys` str [n], `vq` uint16 [n, L], `disc` uint16 [n, L] and `labels` int64 [n]. Output, in `out_dir`:

    <split>/shard-000000.tar ...   one sample per image: <key>.vq.npy, <key>.disc.npy, <key>.cls
    index.parquet                  key, split, shard, position (in its shard), label
    stats.json, token_usage.png    codebook statistics (`pipeline.stats`)
    plan.json                      what the shards were cut from (checked when a run resumes)

Each split's samples are written in a seeded permutation of the whole split (`seed`), so a shard, and a
batch streamed from a few shards, holds classes in their overall proportions instead of the long runs
of one class that sorted inputs come in. The permutation is drawn over the samples sorted by key, so the
output depends on the set of samples only, not on how the tokenize stage cut or ordered its files. A
split is held in memory while it is permuted (2 × 2 bytes per token: 1.3 GB for ImageNet-1K); the
permuted rows are cut into shards of `samples_per_shard`, all full but the last. Each shard is written
to a temporary file and renamed, so an existing shard is complete; a rerun keeps existing shards and
writes the missing ones. Tar members carry a fixed mtime, owner and mode, so the same inputs give
byte-identical shards.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from lease.cli_help import first_paragraph, show_defaults
from lease.data import write_shard as write_token_shard
from lease.io import atomic_path, atomic_write_json
from pipeline.stats import JointCounter, write_statistics

log = logging.getLogger(__name__)

INPUT_GLOB = "shard-*.npz"
SHARD_NAME = "shard-{:06d}.tar"
TOKEN_KEYS = ("keys", "vq", "disc", "labels")


@dataclass
class TokenChunk:
    """Aligned rows of token data: one input file, or one output shard's worth."""

    keys: np.ndarray  # str [n]
    vq: np.ndarray  # uint16 [n, L]
    disc: np.ndarray  # uint16 [n, L]
    labels: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: list["TokenChunk"]) -> "TokenChunk":
        return TokenChunk(*(np.concatenate([getattr(p, f) for p in parts]) for f in TOKEN_KEYS))

    def slice(self, start: int, stop: int) -> "TokenChunk":
        return TokenChunk(*(getattr(self, f)[start:stop] for f in TOKEN_KEYS))

    def take(self, rows: np.ndarray) -> "TokenChunk":
        return TokenChunk(*(getattr(self, f)[rows] for f in TOKEN_KEYS))


# ------------------------------------------------------------------------------------------ inputs


def input_files(token_dir: str | Path) -> list[Path]:
    token_dir = Path(token_dir)
    files = sorted(token_dir.glob(INPUT_GLOB))
    if not files:
        raise FileNotFoundError(f"no token files ({INPUT_GLOB}) in {token_dir}: run the tokenize stage first")
    return files


def read_token_file(path: Path, seq_len: int | None = None) -> TokenChunk:
    """Load and validate one tokenize output file (keys, vq, disc, labels)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in TOKEN_KEYS if k not in data.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}: expected a tokenize output with {', '.join(TOKEN_KEYS)}")
        chunk = TokenChunk(keys=data["keys"].astype(str), vq=data["vq"], disc=data["disc"], labels=data["labels"])
    n = len(chunk.keys)
    for name, dtype in (("vq", np.uint16), ("disc", np.uint16)):
        array = getattr(chunk, name)
        if array.dtype != dtype or array.ndim != 2 or array.shape[0] != n:
            raise ValueError(f"{path}: {name} is {array.dtype} {array.shape}, expected uint16 [{n}, L]")
    if chunk.vq.shape != chunk.disc.shape:
        raise ValueError(f"{path}: vq {chunk.vq.shape} and disc {chunk.disc.shape} differ (must be aligned)")
    if seq_len is not None and chunk.vq.shape[1] != seq_len:
        raise ValueError(f"{path}: sequences have length {chunk.vq.shape[1]}, earlier files {seq_len}")
    if chunk.labels.shape != (n,) or not np.issubdtype(chunk.labels.dtype, np.integer):
        raise ValueError(f"{path}: labels are {chunk.labels.dtype} {chunk.labels.shape}, expected int64 [{n}]")
    chunk.labels = chunk.labels.astype(np.int64)
    return chunk


def count_rows(path: Path) -> int:
    with np.load(path, allow_pickle=False) as data:
        if "labels" not in data.files:
            raise ValueError(f"{path} lacks 'labels': expected a tokenize output with {', '.join(TOKEN_KEYS)}")
        return len(data["labels"])


def check_keys(keys: np.ndarray, seen: set[str], where: str) -> None:
    """WebDataset splits member names at the first dot: keys must be non-empty, dot-free and unique.
    Manifest keys always are (`pipeline.manifest`, Keys); this guards token files made by other means."""
    bad = [str(k) for k in keys if not k or "." in k]
    if bad:
        raise ValueError(f"{where}: key {bad[0]!r} is empty or contains '.', which WebDataset reads as the start "
                         "of the extension: escape the names as the manifest does (pipeline.manifest.escape_key "
                         "writes '.' as %2E)")
    before = len(seen)
    seen.update(keys.tolist())
    if len(seen) - before != len(keys):
        repeated = [str(k) for k, c in zip(*np.unique(keys, return_counts=True)) if c > 1]
        raise ValueError(f"{where}: duplicate sample keys (e.g. {(repeated or ['<seen in another split>'])[0]!r}); "
                         "every image needs a unique key")


def read_split(files: Iterable[Path]) -> TokenChunk:
    """Every row of a split's token files, in one chunk (the permutation draws from all of them)."""
    parts: list[TokenChunk] = []
    for path in files:
        parts.append(read_token_file(path, parts[0].vq.shape[1] if parts else None))
    return TokenChunk.concat(parts)


def permuted(rows: TokenChunk, seed: int, split: str) -> TokenChunk:
    """`rows` in the split's seeded permutation. Sorting by key first makes it a function of the set of
    samples (keys are unique); the split's name enters the seed so that splits are permuted independently."""
    by_key = np.argsort(rows.keys, kind="stable")
    order = np.random.default_rng([seed, *split.encode()]).permutation(len(by_key))
    return rows.take(by_key[order])


# ----------------------------------------------------------------------------------------- writing


def write_shard(path: Path, chunk: TokenChunk) -> None:
    """One tar shard, atomically, in the format the trainer reads (`lease.data.write_shard`)."""
    write_token_shard(path, chunk.keys.tolist(), chunk.vq, chunk.disc, chunk.labels.tolist())


class ShardWriterPool:
    """Writes shards inline (workers <= 1) or in worker processes, with a bounded number in flight."""

    def __init__(self, num_workers: int):
        self.pool = ProcessPoolExecutor(num_workers) if num_workers > 1 else None
        self.limit = 2 * max(num_workers, 1)
        self.pending: deque[Future] = deque()

    def submit(self, path: Path, chunk: TokenChunk) -> None:
        if self.pool is None:
            write_shard(path, chunk)
            return
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(write_shard, path, chunk))

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)


# -------------------------------------------------------------------------------------------- pack


def make_plan(token_dirs: Mapping[str, Path], samples_per_shard: int, vocab_gen: int, codebook_size: int,
              seed: int) -> dict[str, Any]:
    """What the shards are cut from: a resumed run must find the same plan in the output directory."""
    splits = {split: [[p.name, p.stat().st_size, count_rows(p)] for p in input_files(d)]
              for split, d in token_dirs.items()}
    return {"samples_per_shard": samples_per_shard, "vocab_gen": vocab_gen, "codebook_size": codebook_size,
            "seed": seed, "splits": splits}


def check_or_write_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    path = out_dir / "plan.json"
    if path.is_file():
        if json.loads(path.read_text()) != plan:
            raise ValueError(f"{out_dir} holds shards packed from other inputs or settings (see {path}): "
                             "use a fresh output directory")
        return
    atomic_write_json(path, plan)


def pack(token_dirs: Mapping[str, str | Path], out_dir: str | Path, *, vocab_gen: int, codebook_size: int,
         samples_per_shard: int, seed: int = 0, num_workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Pack the tokenize outputs of each split into WebDataset shards, index and statistics in `out_dir`.

    `token_dirs` maps a split name (train, val, ...) to its directory of `shard-*.npz` files.
    `vocab_gen`/`codebook_size` are the two vocabularies (for range checks and utilisation); `seed` draws
    each split's permutation (module docstring).
    Returns a summary (samples and shards per split, shards written and reused, seconds).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    if not token_dirs:
        raise ValueError("no splits given: pass at least one split=directory of token files")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = {split: Path(d) for split, d in sorted(token_dirs.items())}
    plan = make_plan(dirs, samples_per_shard, vocab_gen, codebook_size, seed)
    check_or_write_plan(out_dir, plan)
    total = sum(rows for files in plan["splits"].values() for _, _, rows in files)
    counter = JointCounter(vocab_gen, codebook_size)
    index: dict[str, list] = {"key": [], "split": [], "shard": [], "position": [], "label": []}
    summary: dict[str, Any] = {"splits": {}, "written": 0, "reused": 0, "samples_per_shard": samples_per_shard}
    seen: set[str] = set()
    writer = ShardWriterPool(num_workers)
    bar = tqdm(total=total, unit="img", unit_scale=True, desc="pack", disable=None if progress else True)
    try:
        for split, token_dir in dirs.items():
            (out_dir / split).mkdir(exist_ok=True)
            rows = permuted(read_split(input_files(token_dir)), seed, split)
            check_keys(rows.keys, seen, str(token_dir))
            shards = 0
            for number, start in enumerate(range(0, len(rows), samples_per_shard)):
                chunk = rows.slice(start, start + samples_per_shard)
                relative = f"{split}/{SHARD_NAME.format(number)}"
                counter.update(chunk.vq, chunk.disc)
                index["key"].append(chunk.keys)
                index["split"].append(np.full(len(chunk), split))
                index["shard"].append(np.full(len(chunk), relative))
                index["position"].append(np.arange(len(chunk), dtype=np.int32))
                index["label"].append(chunk.labels)
                if (out_dir / relative).is_file():
                    summary["reused"] += 1
                else:
                    writer.submit(out_dir / relative, chunk)
                    summary["written"] += 1
                shards += 1
                bar.update(len(chunk))
            summary["splits"][split] = {"samples": sum(r for _, _, r in plan["splits"][split]), "shards": shards}
    finally:
        writer.close()
        bar.close()
    write_index(out_dir / "index.parquet", index)
    write_statistics(counter, out_dir, extra={"splits": summary["splits"]})
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("packed %d images into %s: %d shards written, %d already there (%.1f s)", total, out_dir,
             summary["written"], summary["reused"], summary["seconds"])
    return summary


def write_index(path: Path, columns: dict[str, list]) -> None:
    table = pa.table({
        "key": pa.array(np.concatenate(columns["key"]).tolist(), pa.string()),
        "split": pa.array(np.concatenate(columns["split"]).tolist(), pa.string()),
        "shard": pa.array(np.concatenate(columns["shard"]).tolist(), pa.string()),
        "position": pa.array(np.concatenate(columns["position"]), pa.int32()),
        "label": pa.array(np.concatenate(columns["label"]), pa.int64()),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# ----------------------------------------------------------------------------------------- reading


def iter_packed(shard_paths: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Samples of packed shards, in order, read back through WebDataset's own tar reader:
    dicts with `__key__`, `vq` and `disc` (uint16 [L]) and `cls` (int)."""
    urls = [str(p) for p in shard_paths]
    if not urls:
        return
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield {"__key__": sample["__key__"], "vq": np.load(io.BytesIO(sample["vq.npy"])),
               "disc": np.load(io.BytesIO(sample["disc.npy"])), "cls": int(sample["cls"])}


# --------------------------------------------------------------------------------------------- CLI


def _split_dir(text: str) -> tuple[str, Path]:
    split, sep, directory = text.partition("=")
    if not sep or not split or not directory:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SPLIT=DIR, e.g. train=artifacts/tokenize/<key>/train")
    return split, Path(directory)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="lease pack", description=first_paragraph(__doc__))
    parser.add_argument("--tokens", type=_split_dir, action="append", required=True,
                        help="SPLIT=DIR of shard-*.npz token files; repeat per split")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--vocab-gen", type=int, required=True, help="VQGAN codebook size (1024 for MAGE's)")
    parser.add_argument("--codebook-size", type=int, required=True, help="k-means codebook size K")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of each split's sample permutation")
    parser.add_argument("--num-workers", type=int, default=1, help="processes writing shards")
    args = show_defaults(parser).parse_args(argv)
    splits = dict(args.tokens)
    if len(splits) != len(args.tokens):
        parser.error("each split may be given once")
    pack(splits, args.out, vocab_gen=args.vocab_gen, codebook_size=args.codebook_size,
         samples_per_shard=args.samples_per_shard, seed=args.seed, num_workers=args.num_workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
