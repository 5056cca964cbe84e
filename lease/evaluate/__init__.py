"""Evaluation of a pretrained LEASE model (paper §4, tables A.2–A.4; DESIGN.md "Evaluation").

Protocols, each a function on tensors plus a `main(argv)` command (`python -m lease.evaluate.<name>`):

- `features`      mean-pooled (or [CLS]) encoder features of the full unmasked sequence, cached as .npy
- `knn`           weighted k-NN on cosine similarity (k = 20, T = 0.07), top-1/top-5
- `linear_probe`  BatchNorm(affine=False) + linear head, LARS, 90 epochs, on cached features
- `fewshot`       5/10/13/25 shots per class, LARS lr 1.0, batch 16, 10 epochs, averaged over seeds
- `finetune`      full fine-tuning on online-tokenized views (table A.3), top-1/top-5, resumable
- `generate`      MaskGIT decoding from all-[MASK] (presets mage: 20 steps + greedy fill, maskgit: 12), grids, FID/IS
- `fid`           FID / IS through torch-fidelity with local Inception weights
- `report`        Markdown report with the paper's numbers beside ours

`register(subparsers)` adds them as `lease eval <protocol>`; `python -m lease.evaluate <protocol> ...`
runs them without the `lease` entry point. Submodules are imported lazily so that importing the package
stays cheap.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any, TypeVar

from lease.cli_help import show_defaults
from lease.typed_config import apply_overrides, from_dict, load_yaml

T = TypeVar("T")

PROTOCOLS = {
    "features": "encoder features of a packed split, saved as .npy",
    "knn": "weighted k-NN top-1/top-5 on cached features",
    "linear-probe": "linear probe (BN + linear, LARS) on cached features",
    "fewshot": "few-shot linear probes (5/10/13/25 shots per class), averaged over seeds",
    "finetune": "full fine-tuning on online-tokenized RandAug views (table A.3), checkpoint/resume",
    "generate": "MaskGIT generation, reconstruction/inpainting/outpainting grids, FID/IS",
    "fid": "FID / IS of an image folder against the validation images",
    "report": "Markdown report of a run's evaluation beside the paper's numbers",
}


def _module_for(protocol: str):
    return importlib.import_module(f"lease.evaluate.{protocol.replace('-', '_')}")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:1 (default: the GPU when there "
                                                       "is one, else the CPU)")


def add_config_flag(parser: argparse.ArgumentParser, flag: str, cls: type, help_text: str,
                    value_type: type) -> None:
    """A flag for one field of the protocol's config `cls`, left None when absent so that `--config`'s value
    (or the field's default, which the help shows) applies (`config_from_args`)."""
    field = flag.removeprefix("--").replace("-", "_")
    default = {f.name: f.default for f in dataclasses.fields(cls)}[field]
    parser.add_argument(flag, type=value_type, default=None, help=f"{help_text} (default: {default}, or --config's)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` (YAML mapping of the protocol's config fields) and `key=value` overrides, the syntax
    of `lease run` and `lease train`."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file with this protocol's config fields")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a config field, e.g. k=10 temperature=0.05")


def config_from_args(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """Build config dataclass `cls` from `--config`, then `fixed` values from flags, then `key=value` overrides."""
    data = load_yaml(args.config) if args.config else {}
    data.update({k: v for k, v in fixed.items() if v is not None})
    return from_dict(cls, apply_overrides(data, args.overrides))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval <protocol>` commands to a `lease` parser (each calls its module's `run(args)`)."""
    eval_parser = subparsers.add_parser("eval", help="evaluation protocols (k-NN, linear probe, generation, ...)")
    _add_protocols(eval_parser.add_subparsers(dest="protocol", required=True))


def _add_protocols(group: argparse._SubParsersAction) -> None:
    for protocol, help_text in PROTOCOLS.items():
        module = _module_for(protocol)
        p = group.add_parser(protocol, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease eval")
    _add_protocols(parser.add_subparsers(dest="protocol", required=True))
    args = show_defaults(parser).parse_args(argv)
    return args.func(args)


def command_main(prog: str, add_arguments, run, argv: list[str] | None) -> int:
    """`main(argv)` body shared by the protocol modules: logging, argparse, run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    return run(show_defaults(parser).parse_args(argv))
