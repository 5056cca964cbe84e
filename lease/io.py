"""Small file helpers shared by the trainer and the pipeline: atomic writes, digests, safe torch loading."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import errno
import os
import shutil
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
FULL_DISK_BYTES = 1 << 20  # a failed write with less than this left free was a full disk


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    A crash or interrupt leaves either the old file or no file, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class CheckpointFileError(ValueError):
    """A torch file that is missing, unreadable, or refused because only full unpickling could read it."""


def load_torch_file(path: str | Path, error: type[Exception] = CheckpointFileError, missing_hint: str = "") -> Any:
    """`torch.load` on the CPU with `weights_only=True`: tensors and plain containers, never code.

    Every torch file the project reads goes through here, so no file can run code when it is loaded
    (full unpickling calls whatever a pickle names, `os.system` included). A file that pickles other
    Python objects is refused with their names and the command that converts it once, trusted.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist{missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a plain torch checkpoint"
        raise error(load_failure_message(path, err)) from err


def load_failure_message(path: Path, err: Exception) -> str:
    """Why `path` did not load weights-only, on one line: the Python objects only full unpickling would
    build, with the command that converts the file, or else the reader's own reason."""
    unsafe = _unsafe_globals(path, err)
    if unsafe:
        return (f"refusing to load {path}: it pickles Python objects ({', '.join(unsafe)}) that only full "
                "unpickling builds, and full unpickling can run any code the file names; if you trust where it "
                f"came from, convert it once with `lease convert-checkpoint {path} OUT --trust-checkpoint` and "
                "load OUT instead")
    return f"{path} is not a readable torch checkpoint ({_one_line_reason(err)})"


def load_torch_file_inert(path: str | Path, error: type[Exception] = CheckpointFileError) -> Any:
    """A torch file that needs more than weights-only, read weights-only all the same, so that no code it
    names ever runs: numpy values and `argparse.Namespace` rebuild as themselves (data-only constructors),
    and every other Python global the file names resolves to an inert record of its arguments (which
    `lease convert-checkpoint` then drops). For a file the user vouched for (`--trust-checkpoint`)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist")
    named: set[str] = set()
    for _ in range(_MAX_GLOBAL_ROUNDS):  # a non-zip file names its globals one failure at a time
        stand_ins = [(_inert_global(name), name) for name in sorted(named)]
        with torch.serialization.safe_globals([*_data_rebuilders(), *stand_ins]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                new = set(_unsafe_globals(path, err)) - named
                if not new:
                    raise error(f"{path} is not a readable torch checkpoint ({_one_line_reason(err)})") from err
                named |= new
            except Exception as err:  # noqa: BLE001 - any other failure means "not a torch checkpoint"
                raise error(f"{path} is not a readable torch checkpoint ({_one_line_reason(err)})") from err
    raise error(f"{path} names more than {_MAX_GLOBAL_ROUNDS} Python globals")


_MAX_GLOBAL_ROUNDS = 256


def _data_rebuilders() -> list:
    """Constructors that only build data: numpy's array, scalar and dtype rebuilders, argparse.Namespace."""
    import argparse

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [argparse.Namespace, core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype,
            *dtype_classes]


class InertGlobal:
    """What a Python global of a converted file becomes: its name and the arguments it was called with."""

    global_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _inert_global(name: str) -> type:
    module, _, qualname = name.rpartition(".")
    return type(qualname, (InertGlobal,), {"__module__": module, "__qualname__": qualname, "global_name": name})


def _one_line_reason(err: Exception) -> str:
    """The gist of a loading error on one line; torch wraps a weights-only failure in advice to unpickle in
    full, which is wrong for a damaged file, so only the unpickler's own reason is kept."""
    detail = re.search(r"WeightsUnpickler error:(.+?)(?:Check the documentation|$)", str(err), re.S)
    reason = " ".join((detail.group(1) if detail else str(err)).split())
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The Python globals a file needs beyond what `weights_only` allows; [] when it is not a torch pickle.

    Zip-format files are scanned whole (no code runs); otherwise torch's error names the first one.
    """
    import pickle

    import torch

    if not isinstance(err, pickle.UnpicklingError):
        return []
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError):
        return re.findall(r"GLOBAL ([\w.]+)", str(err))


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """Digest of a JSON-serialisable object with sorted keys (stable across runs)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def save_torch_file(obj: Any, path: str | Path) -> Path:
    """`torch.save` atomically, with the same bytes for the same object: saved through a file object,
    the archive's inner folder is torch's fixed name instead of the (random) temporary file's."""
    import torch

    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        try:
            torch.save(obj, fh)
        except RuntimeError as err:  # torch's writer turns a full disk into "unexpected pos ..."
            if shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise
    return Path(path)
