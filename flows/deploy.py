"""Serve the `full-pipeline` deployment of flow `lease` against a running Prefect server.

    make server                      # local Prefect server (SQLite under .prefect/), in the background
    make deploy                      # this module: serves lease/full-pipeline until stopped
    prefect deployment run lease/full-pipeline [--param config=in1k_vitb]

The deployment's default parameters are the preset and overrides given here; a run may override them
(`--param`/`--params`). Serving runs each flow run in a subprocess of this process, in the repository.
"""
from __future__ import annotations

import flows  # noqa: F401  (Prefect's environment defaults, before Prefect is imported)

import argparse
import logging
import os

import httpx

log = logging.getLogger(__name__)

DEPLOYMENT = "full-pipeline"
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
    from flows.lease_flow import lease_flow
    from pipeline.config import load_pipeline_config

    load_pipeline_config(config, overrides)  # a bad default config fails now, not at the first run
    lease_flow.serve(name=name, parameters={"config": config, "overrides": overrides},
                     description="LEASE: tokenize → k-means → pack → pretrain → evaluate, cached per stage",
                     tags=["lease"])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    parser = argparse.ArgumentParser(prog="lease deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="demo", help="default preset or YAML of the deployment's runs")
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("overrides", nargs="*", help="default key=value overrides of the deployment's runs")
    args = parser.parse_args(argv)
    api_url = os.environ.setdefault("PREFECT_API_URL", LOCAL_API)
    check_server(api_url)
    log.info("serving deployment lease/%s on %s", args.name, api_url)
    serve(args.config, args.overrides, args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
