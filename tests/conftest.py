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
