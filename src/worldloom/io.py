"""Safe, atomic file I/O: every file is written to a temporary name and renamed into place.

Weights go to safetensors, metadata to JSON/YAML. Nothing here unpickles or executes a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import CheckpointError, WorldloomError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's temp files are 0600)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place. Only a regular file (or nothing)
    is ever replaced: a rename onto a device such as /dev/null would put a plain file in its place (as root,
    for the whole machine), so anything else at ``path`` is refused with a one-line error."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise WorldloomError(f"{path} exists and is not a regular file (a device, folder or socket); "
                             "give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def check_new_folder(out: Path) -> None:
    """A folder about to be written whole (`atomic_folder`): CheckpointError if it is a file or a non-empty folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file, not a folder; choose another")
    if out.is_dir() and any(out.iterdir()):
        raise CheckpointError(f"output folder {out} exists and is not empty; choose another (nothing was written)")


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Yield a temporary folder beside ``out``, renamed to ``out`` when the block ends without an
    error (an empty ``out`` is replaced); on an error it is removed, so ``out`` is whole or absent."""
    out = Path(out)
    check_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # what mkdir would give (mkdtemp's folders are 0700)
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty: check_new_folder said so
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files atomic_write_bytes leaves in `folder` when killed mid-write."""
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from a file; CheckpointError if it is missing, not JSON, or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{what} {path} is corrupt ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is corrupt (a JSON {type(data).__name__}, expected an object)")
    return data


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous, de-aliased copies)."""
    data = save({k: v.detach().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_tensors(path: Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None
