"""The `lease` command: pipeline stages, the Prefect flow, and the core commands of `lease.cli`.

    lease run --config configs/demo.yaml [key=value ...] [--force STAGE ...]   the whole flow (cached stages)
    lease run --flow tokenize --config demo data.source=/path/to/images          tokenization alone
    lease config show [PRESET] [key=value ...]                                   the resolved config
    lease manifest | demo-data | tokenize | kmeans | pack ... ARGS               one stage, no Prefect
    lease train | train-condgen | class-embeddings | import-reference | export | eval ...   core commands
    lease bench train | numerics | ddp | tokenize | precompute | kmeans ...       benchmarks/ harnesses
    lease deploy [--config ...]                                                   serve lease/full-pipeline
"""
from __future__ import annotations

import argparse
import atexit
import functools
import gc
import importlib
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn

from lease.cli_help import show_defaults
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
    parser.add_argument("--restart", action="store_true",
                        help="stages that run start from nothing, discarding what an interrupted run of them left "
                             "(default: continue it, e.g. pretraining from its last checkpoint)")
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="fail at once, naming the other run, when a stage is being built by another run "
                             "on the same artifacts (default: wait for it, then use its result)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=/data/imgs kmeans.k=512")


def run_flow(args: argparse.Namespace) -> int:
    """Validate the config first (a bad key fails before Prefect starts), then run the flow.

    Ctrl-C stops the running stage where a rerun continues from (`lease.stopping`); the run then ends
    with the stage table and the command that continues it, exit code 130. A second one exits at once.
    SIGTERM is not handled so yet: while a flow runs, Prefect's engine takes it (its cancellation signal)
    and the run ends as crashed; sent to the whole process group it also stops the temporary server.
    """
    from pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(args.config, args.overrides)
    from prefect.exceptions import FailedRun

    from flows.lease_flow import StageFailed, lease_flow, tokenize_flow
    from lease import stopping
    from pipeline.stages import with_dependents

    with_dependents(cfg, args.force)  # unknown stage names fail here, before any work
    _leave_out_result_line()
    flow_fn = lease_flow if args.flow == "lease" else tokenize_flow
    closing = ClosingLine()
    with stopping.stop_on_signals(functools.partial(_exit_at_once, continue_command(args))):
        try:
            start_temporary_server()
            result = flow_fn(config=args.config, overrides=args.overrides, force=args.force, verify=args.verify,
                             wait=args.wait, restart=args.restart)
        except StageFailed as err:  # its reason and the stage table are already in the log
            if err.interrupted:
                return _stopped(args, closing, err.stage, err.forced)
            closing.say = functools.partial(log.error, "%s", err)
            return 1
        except FailedRun as err:
            closing.say = functools.partial(log.error, "%s", err)
            return 1
        except KeyboardInterrupt:  # a Ctrl-C between stages, or while Prefect itself was at work
            stopping.interrupt_taken()
            return _stopped(args, closing)
    closing.say = functools.partial(print, result["summary"])  # the command's result: where the report is
    return 0


def _leave_out_result_line() -> None:
    """The flow logs its result line ("report: <path>") last, for served and worker's runs; `lease run`
    prints that line itself, as its very last (`ClosingLine`), so its console leaves the record out."""
    from flows import RESULT_LINE

    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: not getattr(record, RESULT_LINE, False))


class ClosingLine:
    """The run's last line (its result, its error, or how to continue it), said when the interpreter
    exits: Prefect stops its temporary server from an exit hook and says so; this hook, registered before
    the server starts, runs after that one (exit hooks run last-registered first)."""

    def __init__(self) -> None:
        self.say: Callable[[], None] | None = None
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if self.say is not None:
            self.say()
        # Last of all, the interpreter's final collection would walk every object torch and Prefect made
        # (seconds of silence after the closing line); at exit there is nothing left worth collecting.
        gc.freeze()


def _stopped(args: argparse.Namespace, closing: ClosingLine, stage: str | None = None, forced: bool = False) -> int:
    """Close with the command that continues an interrupted run; returns the exit code for its signal."""
    from lease import stopping

    sig = stopping.requested() or signal.SIGINT
    closing.say = functools.partial(log.error, "stopped by %s%s; to continue: %s", sig.name,
                                    f" during {stage}" if stage else "", continue_command(args, stage, forced))
    return 128 + sig


def continue_command(args: argparse.Namespace, stage: str | None = None, forced: bool = False) -> str:
    """The command line that continues this run: the same one, forcing only the interrupted stage if this
    run forced it (the stages before it are done; those after it follow it), without --restart.

    A forced stage must stay forced, or an older complete artifact of it would be taken from the cache
    instead of the interrupted work; with `stage` not known, every --force stays.
    """
    argv = _program() + ["run", "--config", args.config] + (["--flow", args.flow] if args.flow != "lease" else [])
    if stage is None:
        argv += [item for name in args.force for item in ("--force", name)]
    elif forced:
        argv += ["--force", stage]
    argv += [flag for flag, on in (("--verify", args.verify), ("--no-wait", not args.wait)) if on]
    return shlex.join(argv + list(args.overrides))


def _program() -> list[str]:
    """How this process was started: the `lease` script, or `python -m pipeline.cli` (relative paths
    where they lie below the working directory)."""
    def short(path: str) -> str:
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else path

    if Path(sys.argv[0]).name == "cli.py":
        return [short(sys.executable), "-m", "pipeline.cli"]
    return [short(sys.argv[0])]


def start_temporary_server() -> None:
    """Start Prefect's temporary API server for this run, unless PREFECT_API_URL names a server.

    A terminal sends Ctrl-C to its whole foreground process group, which holds the server too: dead, it
    could no longer record how the run ended, and `lease run` hung in connection retries. So the server
    is started from a thread that blocks SIGINT, and inherits the block (a blocked signal stays blocked
    across fork and exec); it still stops on SIGTERM, as Prefect stops it when the run exits. This is
    the instance Prefect's own clients then use (one per port; the default port's).
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    failure: list[BaseException] = []

    def start() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            SubprocessASGIServer().start()
        except BaseException as err:  # handed to the main thread
            failure.append(err)

    # A daemon thread: a Ctrl-C while the server starts ends the run without waiting for the server
    # (Prefect stops it at exit).
    starter = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    starter.start()
    starter.join()
    if failure:
        raise failure[0]


def _exit_at_once(command: str, sig: signal.Signals) -> NoReturn:
    """A second stop signal: end now, with the temporary server (SIGINT cannot reach it). What the
    stages wrote is written atomically, so `command` (this run's own) continues from it."""
    from prefect.server.api.server import SubprocessASGIServer

    log.error("signal %s again: exiting at once; to continue: %s", sig.name, command)
    server = SubprocessASGIServer().server_process  # the default port's instance: the one started here
    if server is not None:
        server.kill()
    os._exit(128 + sig)


def show_config(args: argparse.Namespace) -> int:
    """Print the resolved pipeline config (preset + overrides, validated) as YAML: what `lease run` with the
    same arguments would use. Paths and the device are not checked, so another machine's config shows."""
    import yaml

    from lease.typed_config import to_dict
    from pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(args.preset, args.overrides, machine_checks=False)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lease", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the Prefect flow over cached stages")
    add_run_arguments(p)
    p.set_defaults(func=run_flow)
    config = sub.add_parser("config", help="the resolved pipeline config: lease config show [PRESET] [key=value ...]")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="print the preset with the overrides applied and validated, as YAML")
    p.add_argument("preset", nargs="?", default="demo", help="preset name under configs/ or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as lease run takes them")
    p.set_defaults(func=show_config)
    for name, (_, help_text) in STAGE_COMMANDS.items():
        sub.add_parser(name, help=f"{help_text} (`lease {name} --help`)", add_help=False)
    from benchmarks import cli as bench_cli
    from lease import cli as core_cli
    from lease import evaluate

    core_cli.register(sub)
    bench_cli.add_placeholders(sub)
    evaluate.register(sub)
    return show_defaults(parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGE_COMMANDS:
        return importlib.import_module(STAGE_COMMANDS[argv[0]][0]).main(argv[1:])
    if argv[:1] == ["bench"]:
        from benchmarks import cli as bench_cli

        return bench_cli.main(argv[1:])
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
