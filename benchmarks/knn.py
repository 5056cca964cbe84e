"""`lease bench knn`: the k-NN protocol at ImageNet scale (1.28M bank, 50K queries) on random features."""
from __future__ import annotations

import argparse

import torch

from benchmarks.records import write_record
from lease.evaluate.knn import knn_classify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-train", type=int, default=1_281_167, help="bank size (ImageNet-1K train)")
    parser.add_argument("--num-query", type=int, default=50_000, help="queries (ImageNet-1K val)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")


def run(args: argparse.Namespace) -> int:
    """`lease bench knn`: the k-NN protocol at ImageNet scale on random features made on the GPU."""
    if not torch.cuda.is_available():
        raise SystemExit("lease bench knn measures GPU throughput: no CUDA device found")
    gen = torch.Generator(device="cuda").manual_seed(0)
    train_x = torch.randn(args.num_train, args.dim, generator=gen, device="cuda", dtype=torch.float16)
    query_x = torch.randn(args.num_query, args.dim, generator=gen, device="cuda", dtype=torch.float16)
    train_y = torch.randint(0, args.num_classes, (args.num_train,), generator=gen, device="cuda")
    query_y = torch.randint(0, args.num_classes, (args.num_query,), generator=gen, device="cuda")
    knn_classify(train_x[:4096], train_y[:4096], query_x[:1024], query_y[:1024], device="cuda")  # warm-up
    torch.cuda.synchronize()
    result = knn_classify(train_x, train_y, query_x, query_y, device="cuda")
    write_record(f"knn-{args.num_train}x{args.dim}-q{args.num_query}", {"results": result}, args.out_dir)
    return 0
