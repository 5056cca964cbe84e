"""The `lease` command: pipeline stages, the Prefect flow, and the core commands of `lease.cli`.

    lease run --config configs/demo.yaml [key=value ...] [--force STAGE ...]   the whole flow (cached stages)
    lease run --flow tokenize --config demo data.source=/path/to/images          tokenization alone
    lease manifest | demo-data | tokenize | kmeans | pack ... ARGS               one stage, no Prefect
    lease train | import-reference | export | eval ... | bench ...                core commands
    lease bench kmeans | assign | tokenize ...                                    pipeline benchmarks
    lease deploy [--config ...]                                                   serve lease/full-pipeline
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lease.io import CheckpointFileError
from lease.typed_config import ConfigError

log = logging.getLogger("pipeline.cli")

# Stage commands hand their arguments unchanged to the module's own `main(argv)`.
STAGE_COMMANDS = {
    "demo-data": ("pipeline.demo_data", "write the generated demo ImageFolder"),
    "demo-assets": ("lease.tokenizers.tiny", "write tiny random-weight tokenizers in the real formats"),
    "manifest": ("pipeline.manifest", "scan and check an image source into a parquet manifest"),
    "tokenize": ("pipeline.tokenize", "VQGAN codes + DINOv2 codebook ids per image (sharded npz)"),
    "kmeans": ("pipeline.kmeans", "train the discriminative codebook on a feature sample"),
    "pack": ("pipeline.pack", "WebDataset shards + index parquet + stats.json"),
    "deploy": ("flows.deploy", "serve the lease/full-pipeline deployment (needs `make server`)"),
}

# `lease bench <name> ARGS` for the pipeline's benchmarks: (module, its sub-command that runs it, help).
BENCH_COMMANDS = {
    "kmeans": ("pipeline.kmeans", "bench", "k-means K x D on synthetic vectors"),
    "assign": ("pipeline.assign", "bench", "nearest-centroid assignment on synthetic vectors"),
    "tokenize": ("pipeline.bench", "bench", "VQGAN, DINOv2 and JPEG-to-shards tokenize throughput"),
    "precompute": ("pipeline.bench", "precompute",
                   "the whole tokenization sub-flow on synthetic JPEGs, ImageNet-1K estimate"),
}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its fallbacks read like failures at INFO


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="demo", help="preset name under configs/ (demo, in1k_vitb) or a YAML path")
    parser.add_argument("--flow", default="lease", choices=["lease", "tokenize"],
                        help="lease: every stage; tokenize: the tokenization sub-flow only")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="recompute STAGE and its dependents even if cached (repeatable)")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every output file and input's content before trusting a cached artifact")
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="fail at once, naming the other run, when a stage is being built by another run "
                             "on the same artifacts (default: wait for it, then use its result)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=/data/imgs kmeans.k=512")


def run_flow(args: argparse.Namespace) -> int:
    """Validate the config first (a bad key fails before Prefect starts), then run the flow."""
    from pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides)
    from prefect.exceptions import FailedRun

    from flows.lease_flow import lease_flow, tokenize_flow
    from pipeline.stages import with_dependents

    with_dependents(cfg, args.force)  # unknown stage names fail here, before any work
    flow_fn = lease_flow if args.flow == "lease" else tokenize_flow
    try:
        flow_fn(config=args.config, overrides=args.overrides, force=args.force, verify=args.verify, wait=args.wait)
    except FailedRun as err:  # a stage failed: its reason and the stage table are already in the log
        log.error("%s", err)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lease", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the Prefect flow over cached stages")
    add_run_arguments(p)
    p.set_defaults(func=run_flow)
    for name, (_, help_text) in STAGE_COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (`lease {name} --help`)", add_help=False)
    from lease import cli as core_cli
    from lease import evaluate

    bench_group = core_cli.register(sub)
    for name, (_, _, help_text) in BENCH_COMMANDS.items():
        bench_group.add_parser(name, help=f"{help_text} (`lease bench {name} --help`)", add_help=False)
    evaluate.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGE_COMMANDS:
        return importlib.import_module(STAGE_COMMANDS[argv[0]][0]).main(argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCH_COMMANDS:
        module, sub_command, _ = BENCH_COMMANDS[argv[1]]
        return importlib.import_module(module).main([sub_command, *argv[2:]])
    args = build_parser().parse_args(argv)
    _setup_logging()  # before Prefect is imported: Prefect then keeps this root handler
    try:
        return args.func(args)
    except ConfigError as err:
        log.error("config error: %s", err)
        return 2
    except CheckpointFileError as err:  # missing, garbage, or refused as unsafe: the message says which
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
