import logging
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def fixture_dir(env_var: str, default_name: str) -> Path:
    """Fixture directory from an environment variable, defaulting to ../shared/fixtures/<name>."""
    path = Path(os.environ.get(env_var, REPO.parent / "shared" / "fixtures" / default_name))
    if not path.is_dir():
        pytest.fail(f"fixture directory {path} not found: the fixtures ship beside the repository in "
                    f"../shared/fixtures/ (DESIGN.md); clone next to them or set {env_var} to their directory")
    return path


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One `make server` for the tests whose runs need a Prefect server but not a temporary one each."""
    from lease_runs import make_server

    with make_server(tmp_path_factory.mktemp("make-server")) as api_url:
        yield api_url


@pytest.fixture(scope="module")
def runs_use_the_server(prefect_server):
    """The `lease run` processes this module starts talk to `make server` (PREFECT_API_URL), as a user's
    would after `make server`: no temporary server each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_API_URL", prefect_server)
        yield prefect_server
