"""The `full-pipeline` deployment of flow `lease` on a running Prefect server: served by this process, or
registered on a `process` work pool whose workers run it (on GPU machines the server does not run on).

    make server                      # local Prefect server (SQLite under .prefect/), in the background
    make serve                       # this module: serves lease/full-pipeline from this process until stopped
    make deploy                      # this module --pool: lease/full-pipeline on the process work pool `lease-gpu`
    make worker                      # a process worker of that pool: runs its flow runs on this machine
    prefect deployment run lease/full-pipeline [--param config=in1k_vitb]

The deployment's default parameters are the preset and overrides given here; a run may override them
(`--param`/`--params`). Serving runs each flow run in a subprocess of this process, in the repository. On
a work pool, a worker starts each flow run as a subprocess of its own, in the checkout named by its
`LEASE_REPO` (`make worker` sets it to its own checkout), so the server and the workers may sit on
different machines with the repository at different paths; each machine's artifacts root is its own.
"""
from __future__ import annotations

import flows  # noqa: F401  (Prefect's environment defaults, before Prefect is imported)

import argparse
import asyncio
import logging
import os
import signal

import httpx

from lease.cli_help import first_paragraph, show_defaults

log = logging.getLogger(__name__)

DEPLOYMENT = "full-pipeline"
DESCRIPTION = "LEASE: tokenize → k-means → pack → pretrain → evaluate, cached per stage"
LOCAL_API = "http://127.0.0.1:4200/api"


def check_server(api_url: str) -> None:
    """Fail early, saying what to do, when no Prefect server answers at `api_url`."""
    try:
        healthy = httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        raise SystemExit(f"no Prefect server answers at {api_url}: start one with `make server` "
                         "(or point PREFECT_API_URL at yours)")


def serve(config: str, overrides: list[str], name: str = DEPLOYMENT) -> None:
    """Serve lease/`name` from this process until SIGINT (Ctrl-C) or SIGTERM; returns once serving stopped.

    What `lease_flow.serve()` does, with a runner that stops the same cooperative way on either signal,
    whenever it comes: the handler starts the runner's `astop()` on its loop, which cancels a flow run in
    progress and ends the runner's loops, so `runner.start()` returns. A signal before the runner has
    started stops it as soon as it has. Left to themselves, Prefect's SIGTERM handler calls `stop()` from
    inside the running loop, where that only makes the `astop()` coroutine (never awaited: Python warns)
    and raises SystemExit out of the loop; and asyncio's Ctrl-C cancels the main task, which a runner
    still entering its services can outlive, serving on. A second signal stops at once.
    """
    from prefect.runner import Runner
    from prefect.settings import PREFECT_UI_URL

    from flows.lease_flow import lease_flow
    from pipeline.config import load_pipeline_config

    class StoppingRunner(Runner):
        stop_task: asyncio.Task | None = None
        stop_requested = False

        def handle_sigterm(self, signum: int = signal.SIGTERM, *args: object) -> None:
            """Runner.start installs it for SIGTERM, serve() for SIGINT as well."""
            if self.stop_requested:
                raise KeyboardInterrupt  # a second signal: at once
            self.stop_requested = True
            log.info("%s: stopping serving (a flow run in progress is cancelled)", signal.Signals(signum).name)
            if self.started:
                # A signal handler runs between two steps of the loop's own code: the stop starts from the loop.
                loop = asyncio.get_running_loop()
                loop.call_soon_threadsafe(self._stop_soon, loop)

        async def __aenter__(self) -> "StoppingRunner":
            entered = await super().__aenter__()
            if self.stop_requested:  # signalled while starting
                self._stop_soon(asyncio.get_running_loop())
            return entered

        def _stop_soon(self, loop: asyncio.AbstractEventLoop) -> None:
            if self.stop_task is None:
                self.stop_task = loop.create_task(self.astop())

    load_pipeline_config(config, overrides)  # a bad default config fails now, not at the first run
    runner = StoppingRunner(name=name, limit=None)  # as Flow.serve makes it
    previous = {sig: signal.signal(sig, runner.handle_sigterm) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deployment_id = runner.add_flow(lease_flow, name=name, parameters={"config": config, "overrides": overrides},
                                        description=DESCRIPTION, tags=["lease"])
        if runner.stop_requested:  # signalled while registering: nothing to serve
            return
        ui = PREFECT_UI_URL.value()
        log.info("deployment lease/%s is served: start a run with `prefect deployment run lease/%s` "
                 "[--param config=...]%s", name, name,
                 f" or from the UI, {ui}/deployments/deployment/{deployment_id}" if ui else "")
        asyncio.run(runner.start())
    except KeyboardInterrupt:  # a second signal
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


POOL = "lease-gpu"
ENTRYPOINT = "flows/lease_flow.py:lease_flow"  # relative to the checkout a flow run starts in
REPO_VARIABLE = "LEASE_REPO"  # on a worker's machine: the checkout its flow runs start in
# A flow run's first step on the worker: into the worker's checkout, which Prefect resolves from the
# environment of the worker's process ("{{ $NAME }}" templating of deployment steps).
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": f"{{{{ ${REPO_VARIABLE} }}}}"}}]


async def register_on_pool(config: str, overrides: list[str], pool: str = POOL, name: str = DEPLOYMENT) -> str:
    """Create the `process` work pool `pool` if the server has none of that name, and register (or update)
    the deployment lease/`name` on it; returns the deployment's id. Runs wait for a worker of the pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    from flows.lease_flow import lease_flow
    from pipeline.config import load_pipeline_config

    load_pipeline_config(config, overrides)  # a bad default config fails now, not at the first run
    async with get_client() as client:
        try:
            found = await client.read_work_pool(pool)
            if found.type != "process":
                raise SystemExit(f"work pool {pool!r} is of type {found.type!r}, not process: name another "
                                 "with --pool (make deploy POOL=...)")
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            log.info("created the process work pool %s", pool)
        flow_id = await client.create_flow_from_name(lease_flow.name)
        deployment_id = await client.create_deployment(
            flow_id, name, work_pool_name=pool, entrypoint=ENTRYPOINT, pull_steps=PULL_STEPS,
            parameters={"config": config, "overrides": overrides},
            parameter_openapi_schema=parameter_schema(lease_flow).model_dump_for_openapi(),
            enforce_parameter_schema=True, tags=["lease"],
            description=DESCRIPTION)
    return str(deployment_id)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    parser = argparse.ArgumentParser(prog="lease deploy", description=first_paragraph(__doc__))
    parser.add_argument("--config", default="demo", help="default preset or YAML of the deployment's runs")
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("--pool", default="", help="register the deployment on this process work pool (created "
                        "if missing) for its workers to run, instead of serving it from this process")
    parser.add_argument("overrides", nargs="*", help="default key=value overrides of the deployment's runs")
    args = show_defaults(parser).parse_args(argv)
    api_url = os.environ.setdefault("PREFECT_API_URL", LOCAL_API)
    check_server(api_url)
    if args.pool:
        deployment_id = asyncio.run(register_on_pool(args.config, args.overrides, args.pool, args.name))
        log.info("deployment lease/%s (%s) is on work pool %s of %s: start its workers with `make worker` "
                 "(%s=<checkout> PREFECT_API_URL=%s prefect worker start --pool %s)", args.name, deployment_id,
                 args.pool, api_url, REPO_VARIABLE, api_url, args.pool)
        return 0
    log.info("serving deployment lease/%s on %s: this command blocks while it serves; Ctrl-C (or SIGTERM) "
             "stops serving (a flow run in progress stops with it and resumes when run again)", args.name, api_url)
    serve(args.config, args.overrides, args.name)
    log.info("stopped serving lease/%s", args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
