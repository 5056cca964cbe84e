"""Token arrays (`lease.synthetic.planted_tokens`) written as real packed shards (`lease.data.write_token_set`)."""
from pathlib import Path

import torch

from lease.data import TokenSet, write_token_set


def write_shards(out: Path, vq, disc, labels, per_shard: int, prefix: str = "train") -> Path:
    tokens = TokenSet(torch.from_numpy(vq), torch.from_numpy(disc), torch.from_numpy(labels), keys=[])
    write_token_set(out, tokens, per_shard, prefix)
    return out
