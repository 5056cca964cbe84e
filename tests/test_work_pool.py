"""The deployment on a `process` work pool, run by a real worker: `make server`, the pool and
deployment registered by `python -m flows.deploy --pool` (what `make deploy` runs), and the worker started
by the command line `make worker` runs, polling once, from another directory (as on another machine).
The run's config names a bad key, so the flow fails within seconds at its first line with our config
loader's message: the worker took the pool's run and started it in its checkout (LEASE_REPO) from the
deployment's entrypoint, with the run's parameters."""
import atexit
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a worker and one flow-run process (~15 s on 2 cores)

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lease-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
import flows  # noqa: E402,F401  (the project's Prefect defaults: analytics and telemetry off)

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402
from prefect.settings import temporary_settings  # noqa: E402

from flows import deploy  # noqa: E402
from flows.deploy import ENTRYPOINT, PULL_STEPS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POOL = "lease-test-pool"


def make_worker_command(api_url: str) -> list[str]:
    """The command `make worker` runs (its last line under `make -n`), polling the pool once."""
    lines = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed-stamp", "worker", f"POOL={POOL}",
                            f"PREFECT_API_URL={api_url}", "ARGS=--run-once"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()
    return shlex.split(lines[-1])


def test_a_process_worker_runs_the_pool_deployment_in_its_checkout(tmp_path, monkeypatch, prefect_server):
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        api_url = prefect_server
        monkeypatch.setenv("PREFECT_API_URL", api_url)
        env = dict(os.environ, PREFECT_API_URL=api_url)
        assert deploy.main(["--pool", POOL, "--config", "demo", f"artifacts={tmp_path / 'artifacts'}"]) == 0
        with get_client(sync_client=True) as client:
            assert client.read_work_pool(POOL).type == "process"
            deployment = client.read_deployment_by_name("lease/full-pipeline")
            assert deployment.work_pool_name == POOL and deployment.entrypoint == ENTRYPOINT
            assert deployment.pull_steps == PULL_STEPS
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"overrides": [f"artifacts={tmp_path / 'artifacts'}", "kmeans.kk=3"]})

            command = make_worker_command(api_url)
            assert command[:2] == [f"LEASE_REPO={REPO}", f"PREFECT_API_URL={api_url}"]
            assigned = dict(word.split("=", 1) for word in command[:2])
            python = str(REPO / command[2])  # the checkout's virtualenv; started elsewhere, as on another machine
            worker = subprocess.run([python, *command[3:]], cwd=tmp_path, env={**env, **assigned},
                                    capture_output=True, text=True, timeout=240)
            state = client.read_flow_run(run.id).state
        output = worker.stdout[-3000:] + worker.stderr[-3000:]
        assert state.is_failed(), f"{state}\n{output}"
        assert "kmeans.kk" in state.message, f"{state.message}\n{output}"
