"""No torch file runs code when it is loaded: every loader reads weights only, refuses a malicious pickle
before any of it runs (naming what it would need and how to convert it), and `lease convert-checkpoint
--trust-checkpoint` turns a trusted file that needs full unpickling into one that loads."""
import argparse
import ast
import datetime
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lease.checkpoints import (CheckpointError, convert_checkpoint, import_reference, load_checkpoint,
                               model_from_checkpoint, read_state_dict)
from lease.io import CheckpointFileError, load_torch_file
from lease.tokenizers.dinov2 import load_hf_dinov2, load_timm_dinov2
from lease.tokenizers.tiny import save_tiny_hf_dinov2, save_tiny_taming_vqgan
from lease.tokenizers.vqgan_maskgit import load_maskgit_vqgan
from lease.tokenizers.vqgan_taming import load_taming_vqgan, read_lightning_state_dict

REPO = Path(__file__).resolve().parents[1]
REFUSAL = r"refusing to load .*\(posix\.system\).*lease convert-checkpoint .* OUT --trust-checkpoint"


class RunsShellCommand:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


@pytest.fixture
def evil(tmp_path, marker):
    """A torch file shaped like every checkpoint kind (state_dict, model) whose unpickling touches `marker`."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "model": RunsShellCommand(f"touch {marker}")}, path)
    return path


def lease_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_malicious_file_would_run_a_shell_command(evil):
    """The fixture is live: full unpickling would call os.system with its command (named in its pickle)."""
    assert "posix.system" in torch.serialization.get_unsafe_globals_in_checkpoint(evil)


def _hf_dinov2_directory_with(weights: Path) -> Path:
    directory = save_tiny_hf_dinov2(weights.parent / "hf", seed=0, hidden_size=64, depth=1)
    for safetensors in directory.glob("*.safetensors"):
        safetensors.unlink()
    os.replace(weights, directory / "pytorch_model.bin")
    return directory


def _taming_with(weights: Path) -> None:
    _, config = save_tiny_taming_vqgan(weights.parent / "taming", seed=0)
    load_taming_vqgan(weights, config)


LOADERS = {
    "training checkpoint (train --resume, pretrain stage)": load_checkpoint,
    "model_from_checkpoint (export, evaluate, eval generate)": model_from_checkpoint,
    "read_state_dict": read_state_dict,
    "import-reference": lambda path: import_reference(path, path.with_name("codebook.npy")),
    "taming Lightning reader": read_lightning_state_dict,
    "taming VQGAN": _taming_with,
    "MaskGIT VQGAN": load_maskgit_vqgan,
    "DINOv2 timm .pth": load_timm_dinov2,
    "DINOv2 HF directory with pytorch_model.bin": lambda path: load_hf_dinov2(_hf_dinov2_directory_with(path)),
}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
def test_every_loader_refuses_the_malicious_file_before_it_runs(loader, evil, marker):
    with pytest.raises(CheckpointFileError, match=REFUSAL):
        loader(evil)
    assert not marker.exists()


def test_lease_export_refuses_the_malicious_file_in_one_line(evil, marker, tmp_path):
    result = lease_command("export", str(evil), "--out", str(tmp_path / "export"))
    assert not marker.exists()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert f"refusing to load {evil}" in error and "(posix.system)" in error
    assert f"lease convert-checkpoint {evil} OUT --trust-checkpoint" in error
    assert not (tmp_path / "export").exists()


def test_lease_export_of_a_garbage_file_is_one_clear_line(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    result = lease_command("export", str(garbage), "--out", str(tmp_path / "export"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [error] = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert f"{garbage} is not a readable torch checkpoint (UnpicklingError: " in error
    assert "weights_only" not in error  # torch's advice to unpickle in full is wrong for a damaged file


def test_no_module_calls_torch_load_but_the_safe_helper():
    """Every torch file is read through lease.io, so a new `torch.load` elsewhere cannot skip the checks."""
    callers = []
    for path in sorted(p for d in ("lease", "pipeline", "flows", "benchmarks") for p in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name)
                    and node.value.id == "torch"):
                callers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert callers and all(c.startswith("lease/io.py:") for c in callers), callers


# ------------------------------------------------------------------------ converting trusted files
@pytest.fixture
def old_lightning_checkpoint(tmp_path):
    """A taming VQGAN checkpoint as older Lightning wrote them: hyper-parameters as an argparse.Namespace,
    callback state keyed by class, a numpy score and a non-data object beside the state dict."""
    ckpt, config = save_tiny_taming_vqgan(tmp_path / "taming", seed=0)
    state = torch.load(ckpt, weights_only=True)
    state.update(hyper_parameters=argparse.Namespace(embed_dim=16, lr=4.5e-6),
                 callbacks={argparse.ArgumentParser: {"best_model_score": np.float64(0.25)}},
                 loops={"elapsed": datetime.timedelta(hours=1), "epochs": [np.int64(3)]})
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    return old, config, state["state_dict"]


def test_a_file_needing_full_unpickling_is_refused_with_the_objects_named(old_lightning_checkpoint):
    old, config, _ = old_lightning_checkpoint
    with pytest.raises(CheckpointFileError, match=r"refusing to load .*argparse\.Namespace.*convert-checkpoint"):
        load_taming_vqgan(old, config)


def test_convert_checkpoint_round_trip(old_lightning_checkpoint, tmp_path):
    old, config, state_dict = old_lightning_checkpoint
    converted = tmp_path / "converted.ckpt"
    result = lease_command("convert-checkpoint", str(old), str(converted), "--trust-checkpoint")
    assert result.returncode == 0, result.stderr
    assert f"reading {old} beyond weights-only because --trust-checkpoint vouches for it" in result.stderr
    loaded = load_torch_file(converted)
    assert loaded["hyper_parameters"] == {"embed_dim": 16, "lr": 4.5e-6}
    assert loaded["callbacks"] == {} and loaded["loops"] == {"epochs": [3]}
    assert "dropped 2 non-data objects" in result.stderr
    sd = read_lightning_state_dict(converted)
    assert sd.keys() == {k for k in state_dict if not k.startswith("loss.")}
    assert all(torch.equal(sd[k], state_dict[k]) for k in sd)
    load_taming_vqgan(converted, config)


def test_converting_the_malicious_file_runs_none_of_its_code(evil, marker, tmp_path):
    """Even with --trust-checkpoint the converter reads weights-only: a file that calls os.system is
    refused (torch blocks that module even as an inert stand-in), nothing runs, nothing is written."""
    with pytest.raises(CheckpointError, match=r"posix\.system"):
        convert_checkpoint(evil, tmp_path / "converted.pt", trust_checkpoint=True)
    assert not marker.exists() and not (tmp_path / "converted.pt").exists()


def test_convert_checkpoint_refuses_without_the_trust_flag(old_lightning_checkpoint, evil, marker, tmp_path):
    old, _, _ = old_lightning_checkpoint
    result = lease_command("convert-checkpoint", str(old), str(tmp_path / "converted.ckpt"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pass --trust-checkpoint only for a file whose origin you trust" in result.stderr
    assert not (tmp_path / "converted.ckpt").exists()
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        convert_checkpoint(evil, tmp_path / "converted.ckpt", trust_checkpoint=False)
    assert not marker.exists()
