"""Checkpoints that survive faults: atomic writes, a checksum per file, and a resume that falls
back to the newest checkpoint that verifies.

Write protocol (`atomic_save`): ``torch.save`` into memory, hash the bytes (SHA-256), write them to
``<dir>/.<name>.tmp.<pid>``, flush + fsync, ``os.replace`` onto the final name (atomic on POSIX
within one filesystem), then write the checksum file ``<name>.sha256`` the same way (the
``sha256sum`` format, so ``sha256sum -c last.pt.sha256`` checks a file by hand), then fsync the
directory. A run killed at any moment (even ``kill -9``) leaves whole files; a crash between the
two renames leaves a checkpoint whose checksum does not match, which verification rejects (the
previous checkpoint is then used). Stale temporary files of killed runs are removed on the next
save.

Files: ``last.pt`` is the most recent checkpoint; before it is replaced, the previous one is kept
as ``prev.pt`` (so a ``last.pt`` corrupted after it was written still has a fallback); tagged
saves (``epoch<k>.pt``, ``final.pt``) are kept as well.

Reading: `load_checkpoint` verifies the checksum (when a ``.sha256`` file exists) and raises
`CheckpointError` naming the file when it is truncated, corrupted or unreadable. `latest` returns
the newest checkpoint of a directory that verifies (``last.pt`` first, then the others newest
first), warning about each one it skips, so ``--resume`` continues from the newest good one.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import warnings
from typing import Any, Dict, List, Optional

import torch

__all__ = ["CheckpointError", "atomic_save", "save_checkpoint", "load_checkpoint", "verify",
           "latest", "candidates"]

CHECKSUM_SUFFIX = ".sha256"
LAST, PREV = "last.pt", "prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupted or unreadable (the message names the file)."""


def _fsync_dir(path: str) -> None:
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


def _write_atomic(data: bytes, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checksum_line(digest: str, path: str) -> bytes:
    return f"{digest}  {os.path.basename(path)}\n".encode()


def atomic_save(obj: Any, path: str) -> str:
    """``torch.save(obj, path)`` atomically, plus its checksum file ``path + ".sha256"``.

    Returns ``path``. The file is an ordinary ``torch.save`` file (``torch.load`` reads it).
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    _write_atomic(data, path)
    _write_atomic(_checksum_line(hashlib.sha256(data).hexdigest(), path), path + CHECKSUM_SUFFIX)
    _fsync_dir(d)
    return path


def _rename_pair(src: str, dst: str) -> None:
    """Move a checkpoint and its checksum file (the checksum first: a crash in between leaves a
    checkpoint without a checksum, which is verified by loading it)."""
    if os.path.exists(src + CHECKSUM_SUFFIX):
        os.replace(src + CHECKSUM_SUFFIX, dst + CHECKSUM_SUFFIX)
    elif os.path.exists(dst + CHECKSUM_SUFFIX):
        os.remove(dst + CHECKSUM_SUFFIX)
    os.replace(src, dst)


def save_checkpoint(state: Dict[str, Any], ckpt_dir: str, *, tag: Optional[str] = None) -> str:
    """Save ``state`` as ``<ckpt_dir>/last.pt`` (and, with ``tag``, also ``<ckpt_dir>/<tag>.pt``);
    the previous ``last.pt`` becomes ``prev.pt``.

    ``last.pt`` is written last, so it is never older than a tagged file. Returns its path.
    """
    for stale in glob.glob(os.path.join(ckpt_dir, ".*.tmp.*")):
        try:
            os.remove(stale)
        except OSError:
            pass
    if tag is not None:
        atomic_save(state, os.path.join(ckpt_dir, f"{tag}.pt"))
    last = os.path.join(ckpt_dir, LAST)
    if os.path.isfile(last):
        _rename_pair(last, os.path.join(ckpt_dir, PREV))
    return atomic_save(state, last)


def verify(path: str) -> None:
    """Check ``path`` against its ``.sha256`` file; raise `CheckpointError` naming the file if it
    is missing, truncated or corrupted. A file without a checksum file (written by an older
    version) is checked by `load_checkpoint` instead (it must load)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: file not found")
    sidecar = path + CHECKSUM_SUFFIX
    if not os.path.isfile(sidecar):
        return
    with open(sidecar, "rb") as f:
        fields = f.read().decode(errors="replace").split()
    if not fields or len(fields[0]) != 64:
        raise CheckpointError(f"checkpoint {path}: checksum file {sidecar} is malformed "
                              f"(expected '<sha256 hex>  <name>')")
    want = fields[0].lower()
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    got = h.hexdigest()
    if got != want:
        raise CheckpointError(f"checkpoint {path}: SHA-256 mismatch ({size} bytes, sha256 {got}; "
                              f"{sidecar} expects {want}): the file is truncated or corrupted")


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, verifying it first (`verify`).

    Raises `CheckpointError` naming the file when it is truncated, corrupted or unreadable.
    (Full pickle: it holds optimizer state and plain Python metadata; only load files you wrote.)
    """
    verify(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a torn zip, a bad pickle: name the file, keep the cause
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(exc).__name__}: {exc}); "
                              f"the file is truncated or corrupted") from exc


def candidates(ckpt_dir: str) -> List[str]:
    """Checkpoint files of ``ckpt_dir``, newest first: ``last.pt``, ``prev.pt``, then the tagged
    files by modification time."""
    head = [os.path.join(ckpt_dir, n) for n in (LAST, PREV)]
    head = [p for p in head if os.path.isfile(p)]
    rest = [p for p in glob.glob(os.path.join(ckpt_dir, "*.pt"))
            if os.path.basename(p) not in (LAST, PREV) and os.path.isfile(p)]
    rest.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    return head + rest


def latest(ckpt_dir: str) -> Optional[str]:
    """Path of the newest checkpoint in ``ckpt_dir`` that verifies and loads (`candidates` order),
    or None if there is none. Each file skipped as bad is reported with a `UserWarning` naming it
    and the reason."""
    for path in candidates(ckpt_dir):
        try:
            verify(path)
            if not os.path.isfile(path + CHECKSUM_SUFFIX):
                load_checkpoint(path)  # no checksum: it must at least load
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping a bad checkpoint: {exc}", stacklevel=2)
    return None
