"""`lease bench NAME ...`: one sub-command per harness; a harness's module is imported only when it runs.

COMMANDS maps a name to (module, the functions adding its arguments and running it, help). The
tokenize and precompute harnesses keep their own parser (one module, two entry points).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lease.cli_help import show_defaults

COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("benchmarks.train", "add_train_arguments", "run_train_cli", "training steps/s, memory and MFU"),
    "numerics": ("benchmarks.numerics", "add_arguments", "run_cli",
                 "loss curves with and without a model switch, against a seed change"),
    "ddp": ("benchmarks.ddp", "add_arguments", "run_cli",
            "torchrun with N processes against one process at the same global batch"),
    "kernels": ("benchmarks.kernels", "add_arguments", "run_cli",
                "attention and linear kernels alone (SDPA, lease.kernels_attention, torchao fp8) against floors"),
    "table": ("benchmarks.train", "add_table_arguments", "run_table_cli",
              "Markdown table of the recorded results (as in the README)"),
    "generate": ("benchmarks.generate", "add_arguments", "run", "MaskGIT generation + VQGAN decoding images/s"),
    "condgen": ("benchmarks.condgen", "add_arguments", "run",
                "class-conditional decoder fine-tuning and generation images/s against pretraining / unconditional"),
    "authors": ("benchmarks.authors", "add_arguments", "run_cli",
                "the authors' MAGE training step (a clone of LTH14/mage given by --repo) beside our mage_online"),
    "knn": ("benchmarks.knn", "add_arguments", "run", "k-NN over ImageNet-sized random features"),
    "eval": ("benchmarks.evaluation", "add_arguments", "run",
             "online linear probe and fine-tuning images/s, a robustness set's k-NN (ViT-B, synthetic JPEGs)"),
    "kmeans": ("benchmarks.codebook", "add_kmeans_arguments", "run_kmeans", "k-means K x D on synthetic vectors"),
    "assign": ("benchmarks.codebook", "add_assign_arguments", "run_assign",
               "nearest-centroid assignment on synthetic vectors"),
}
# (module, the first argument its own parser takes, help)
OWN_PARSER: dict[str, tuple[str, str, str]] = {
    "tokenize": ("benchmarks.precompute", "bench", "VQGAN, DINOv2 and JPEG-to-shards tokenize throughput"),
    "precompute": ("benchmarks.precompute", "precompute",
                   "the whole tokenization sub-flow on synthetic JPEGs, ImageNet-1K estimate"),
}


def add_placeholders(subparsers: argparse._SubParsersAction) -> None:
    """List `bench` in a parent parser's help; `main` parses what follows it."""
    subparsers.add_parser("bench", help=f"GPU benchmarks written to benchmarks/results/ ({', '.join(names())})",
                          add_help=False)


def names() -> list[str]:
    return [*COMMANDS, *OWN_PARSER]


def build_parser(name: str) -> argparse.ArgumentParser:
    module, add, run, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"lease bench {name}", description=help_text)
    loaded = importlib.import_module(module)
    getattr(loaded, add)(parser)
    parser.set_defaults(func=getattr(loaded, run))
    return show_defaults(parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in names():
        raise SystemExit(f"usage: lease bench {{{','.join(names())}}} [--help]")
    name, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if name in OWN_PARSER:
        module, first, _ = OWN_PARSER[name]
        return importlib.import_module(module).main([first, *rest])
    args = build_parser(name).parse_args(rest)
    return args.func(args)
