"""Token arrays (`lease.synthetic.planted_tokens`) written as real packed shards (the pack stage's
sample format)."""
from pathlib import Path

import webdataset as wds


def write_shards(out: Path, vq, disc, labels, per_shard: int, prefix: str = "train") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(labels), per_shard):
        with wds.TarWriter(str(out / f"{prefix}-{start // per_shard:06d}.tar")) as sink:
            for i in range(start, min(start + per_shard, len(labels))):
                sink.write({"__key__": f"{prefix}{i:07d}", "vq.npy": vq[i], "disc.npy": disc[i],
                            "cls": str(int(labels[i]))})
    return out
