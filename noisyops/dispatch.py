"""Backend registry and selection: which implementation of an op runs for a tensor's device.

Backends (``reference``, ``cpu``, ``triton``, ``cuda``) register implementations of the four
kernels ``conv2d_fwd``, ``conv2d_bwd``, ``linear_fwd``, ``linear_bwd`` with the same signatures as
`noisyops.reference` (an `OpParams` instead of the flat lists). Selection:

* ``NOISYOPS_BACKEND=reference|cpu|cuda|triton`` forces one backend; if it cannot run the call
  (unavailable, wrong device, unsupported case) the call raises instead of falling back.
* Otherwise the first backend in ``PREFERENCE[device type]`` that is available and accepts the
  call runs. An implementation declines a call by returning ``NotImplemented``.

Every kernel gets the call's `noisyops.plan.CallPlan` (built once by the op) as ``plan=``. A plan
whose route is ``clean`` (every option off) runs `noisyops.clean` on the chosen backend, for the
dtypes the backend supports (``SUPPORTED_DTYPES``): exactly ``F.conv2d`` / ``F.linear``, forced or
not. `route_counts` says how often each route ran.

Every call records which backend ran (`last_backend`, `backend_counts`), and logs it at DEBUG
level on the ``noisyops.dispatch`` logger, so a fallback is never silent. `path_counts` says which
call path reached the kernel: the custom op (``custom_op``) or the eager fast path (``eager``,
`noisyops.eager`).
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

log = logging.getLogger("noisyops.dispatch")

BACKENDS = ("reference", "cpu", "triton", "cuda")
KERNELS = ("conv2d_fwd", "conv2d_bwd", "linear_fwd", "linear_bwd")
# Fastest first. The triton backend runs on CPU tensors only under TRITON_INTERPRET=1 and only when
# forced (it is a correctness tool there, not a fast path).
PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


@dataclasses.dataclass
class Backend:
    """A backend: its module (imported lazily) and a probe saying whether it can run here."""

    name: str
    module: str  # provides `available() -> (bool, reason)`, `DEVICES`, and the kernels it has
    _mod: object = None
    _status: Optional[Tuple[bool, str]] = None

    def load(self):
        if self._mod is None:
            self._mod = importlib.import_module(self.module)
        return self._mod

    def status(self) -> Tuple[bool, str]:
        """``(available, reason)``; never raises."""
        if self._status is None:
            try:
                self._status = tuple(self.load().available())
            except Exception as exc:  # a missing compiled part must never break import
                self._status = (False, f"{type(exc).__name__}: {exc}")
        return self._status

    def kernel(self, name: str) -> Optional[Callable]:
        ok, _ = self.status()
        return getattr(self.load(), name, None) if ok else None

    def devices(self) -> Tuple[str, ...]:
        ok, _ = self.status()
        return tuple(getattr(self.load(), "DEVICES", ())) if ok else ()


_REGISTRY: Dict[str, Backend] = {name: Backend(name, f"noisyops.backends.{name}") for name in BACKENDS}
_counts: collections.Counter = collections.Counter()
_route_counts: collections.Counter = collections.Counter()
_path_counts: collections.Counter = collections.Counter()
_last: Dict[str, str] = {}
_clean = None  # noisyops.clean, imported on first use (it imports noisyops.plan)


def backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"NOISYOPS_BACKEND={name!r}: expected one of {BACKENDS}")
    return _REGISTRY[name]


def forced_backend() -> Optional[str]:
    """The backend forced by ``NOISYOPS_BACKEND``, or None (read on every call)."""
    name = os.environ.get("NOISYOPS_BACKEND", "").strip().lower()
    if not name:
        return None
    backend(name)  # validates
    return name


def candidates(device_type: str) -> List[str]:
    forced = forced_backend()
    if forced is not None:
        return [forced]
    return list(PREFERENCE.get(device_type, ("reference",)))


def _accepts_dtype(mod, dtype) -> bool:
    supported = getattr(mod, "SUPPORTED_DTYPES", None)
    return supported is None or dtype in supported


def run(kernel: str, plan, device_type: str, *args, path: str = "custom_op", **kwargs):
    """Run ``kernel`` for ``plan`` on the first backend that accepts the call; record which one
    ran, and the call ``path`` that got here (``custom_op`` or ``eager``). ``args`` are the
    kernel's arguments (`noisyops.reference` signatures)."""
    global _clean
    clean = _clean
    if clean is None:
        from . import clean
        _clean = clean
    forced = forced_backend()
    tried = []
    for name in ([forced] if forced is not None else PREFERENCE.get(device_type, ("reference",))):
        be = _REGISTRY[name]
        ok, reason = be.status()
        if not ok:
            tried.append(f"{name}: unavailable ({reason})")
            continue
        if device_type not in be.devices():
            tried.append(f"{name}: does not run on {device_type} tensors")
            continue
        fn = be.kernel(kernel)
        if fn is None:
            tried.append(f"{name}: has no {kernel}")
            continue
        if plan.route == "clean" and _accepts_dtype(be.load(), plan.product_dtype):
            out = getattr(clean, kernel)(plan, *args)
        else:
            out = fn(*args, plan=plan, **kwargs)
        if out is NotImplemented:
            tried.append(f"{name}: declined this call")
            continue
        _counts[(kernel, name)] += 1
        _route_counts[(kernel, plan.route)] += 1
        _path_counts[(kernel, path)] += 1
        _last[kernel] = name
        if log.isEnabledFor(logging.DEBUG):
            if tried:
                log.debug("%s on %s ran %s after: %s", kernel, device_type, name, "; ".join(tried))
            else:
                log.debug("%s on %s ran %s", kernel, device_type, name)
        return out
    what = f"NOISYOPS_BACKEND={forced}" if forced else f"device {device_type}"
    raise RuntimeError(f"noisyops: no backend could run {kernel} for {what}: " + "; ".join(tried))


def last_backend(kernel: str = "conv2d_fwd") -> Optional[str]:
    """Name of the backend that ran ``kernel`` most recently (None if it never ran)."""
    return _last.get(kernel)


def backend_counts() -> Dict[Tuple[str, str], int]:
    """``{(kernel, backend): calls}`` since import or the last `reset_counts`."""
    return dict(_counts)


def route_counts() -> Dict[Tuple[str, str], int]:
    """``{(kernel, route): calls}`` (routes: `noisyops.plan.ROUTES`) since the last `reset_counts`."""
    return dict(_route_counts)


def path_counts() -> Dict[Tuple[str, str], int]:
    """``{(kernel, path): calls}`` since the last `reset_counts`; ``path`` is ``custom_op`` (the
    ``torch.library`` ops of `noisyops.ops`) or ``eager`` (the fast path, `noisyops.eager`)."""
    return dict(_path_counts)


def reset_counts() -> None:
    _counts.clear()
    _path_counts.clear()
    _route_counts.clear()
    _last.clear()


def status() -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, reason)}`` for every backend."""
    return {name: be.status() for name, be in _REGISTRY.items()}
