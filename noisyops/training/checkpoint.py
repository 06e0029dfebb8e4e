"""Atomic checkpoints: a run killed at any moment (even ``kill -9``) leaves either the previous
checkpoint or the new one on disk, never a torn file.

Write protocol: ``torch.save`` to ``<dir>/.<name>.tmp.<pid>``, flush + fsync, ``os.replace`` onto
the final name (atomic on POSIX within one filesystem), then fsync the directory. Stale temporary
files of killed runs are ignored (and removed on the next save). ``last.pt`` always names the most
recent checkpoint (step or epoch); ``latest(dir)`` finds it.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, Optional

import torch

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "latest"]


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


def atomic_save(obj: Any, path: str) -> str:
    """``torch.save(obj, path)`` atomically (temp file + fsync + ``os.replace``). Returns ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)
    return path


def save_checkpoint(state: Dict[str, Any], ckpt_dir: str, *, tag: Optional[str] = None) -> str:
    """Save ``state`` as ``<ckpt_dir>/last.pt`` (and, with ``tag``, also ``<ckpt_dir>/<tag>.pt``).

    ``last.pt`` is written last, so it is never older than a tagged file.
    """
    for stale in glob.glob(os.path.join(ckpt_dir, ".*.tmp.*")):
        try:
            os.remove(stale)
        except OSError:
            pass
    if tag is not None:
        atomic_save(state, os.path.join(ckpt_dir, f"{tag}.pt"))
    return atomic_save(state, os.path.join(ckpt_dir, "last.pt"))


def latest(ckpt_dir: str) -> Optional[str]:
    """Path of ``<ckpt_dir>/last.pt`` if it exists, else None."""
    p = os.path.join(ckpt_dir, "last.pt")
    return p if os.path.isfile(p) else None


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` (full pickle: it holds optimizer state and
    plain Python metadata; only load files you wrote)."""
    return torch.load(path, map_location=map_location, weights_only=False)
