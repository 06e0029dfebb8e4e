"""Cache of per-chip noisy weights for ``per_instance`` evaluation on the CPU backend.

A chip's noisy weights ``Wn`` are a pure function of (weight values, layer parameters, chip id), so
a model evaluated on K chips over many batches needs to generate each chip's weights only once.
Entries are keyed by the weight tensor's identity *and* its ``_version`` (any in-place update, e.g.
``optimizer.step()``, invalidates them), its data pointer, a checksum of its values (edits through
``.data`` do not bump ``_version``), the parameters that shape ``Wn``, the
dtype and the tuple of chip ids (the stacked ``[K, *weight.shape]`` tensor is cached, so K chips run
as one grouped conv / batched matmul without a copy).

Budget: ``NOISYOPS_CHIP_CACHE_MB`` (default 512) megabytes, read on every insert; 0 disables the
cache. When the cache is full, entries of dead or modified weights go first, then entries idle for
more than three passes over the keys in use; if nothing can go, the new entry is not cached (so a
working set larger than the budget keeps a stable, useful part cached instead of thrashing an LRU).
"""
from __future__ import annotations

import collections
import os
import weakref
from typing import Hashable, Optional, Tuple

import torch

DEFAULT_BUDGET_MB = 512


def budget_bytes() -> int:
    """The cache budget in bytes from ``NOISYOPS_CHIP_CACHE_MB`` (default 512)."""
    raw = os.environ.get("NOISYOPS_CHIP_CACHE_MB", str(DEFAULT_BUDGET_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"NOISYOPS_CHIP_CACHE_MB={raw!r}: expected a number of megabytes >= 0") from None
    if mb < 0:
        raise ValueError(f"NOISYOPS_CHIP_CACHE_MB={raw!r}: expected a number of megabytes >= 0")
    return int(mb * (1 << 20))


_RAMPS: dict = {}


def fingerprint(weight: torch.Tensor) -> Tuple[float, float]:
    """``(Σ w, Σ i·w)`` in float64: catches in-place edits that bypass ``_version`` (``w.data``,
    gradcheck's perturbations); one pass over the weights, cheap next to regenerating the noise."""
    w = weight.detach().reshape(-1)
    key = (w.numel(), w.dtype)
    ramp = _RAMPS.get(key)
    if ramp is None:
        if len(_RAMPS) > 256:
            _RAMPS.clear()
        ramp = _RAMPS[key] = torch.linspace(0.5, 1.5, w.numel(), dtype=w.dtype)
    return float(w.sum(dtype=torch.float64)), float((w * ramp).sum(dtype=torch.float64))


def _weight_state(weight: torch.Tensor) -> Optional[Tuple]:
    """``(version, data_ptr, fingerprint)`` or None when the tensor cannot be tracked (inference
    tensors have no version counter)."""
    try:
        return weight._version, weight.data_ptr(), fingerprint(weight)
    except RuntimeError:
        return None


def _weight_state_cheap(weight):
    try:
        return weight._version, weight.data_ptr()
    except RuntimeError:
        return None


class _Entry:
    __slots__ = ("ref", "state", "value", "tick")

    def __init__(self, ref, state, value, tick):
        self.ref, self.state, self.value, self.tick = ref, state, value, tick


class ChipCache:
    """``(weight, key) -> tensor`` with weight-version invalidation and a byte budget."""

    def __init__(self):
        self._entries: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
        self._seen: dict = {}  # every key looked up recently -> last tick (to size the idle window)
        self._bytes = 0
        self._tick = 0
        self.hits = 0
        self.misses = 0

    # ---- public -------------------------------------------------------------------------------
    def get(self, weight: torch.Tensor, key: Hashable) -> Optional[torch.Tensor]:
        """The cached tensor for ``(weight, key)`` if ``weight`` is unchanged, else None."""
        self._tick += 1
        full = (id(weight), key)
        self._seen[full] = self._tick
        e = self._entries.get(full)
        if e is not None:
            if e.ref() is weight and e.state[:2] == _weight_state_cheap(weight) and e.state == _weight_state(weight):
                e.tick = self._tick
                self.hits += 1
                return e.value
            self._drop(full)
        self.misses += 1
        return None

    def put(self, weight: torch.Tensor, key: Hashable, value: torch.Tensor) -> bool:
        """Cache ``value`` for ``(weight, key)`` if the budget allows; returns whether it did."""
        state = _weight_state(weight)
        budget = budget_bytes()
        size = value.numel() * value.element_size()
        if state is None or size > budget:
            return False
        full = (id(weight), key)
        if full in self._entries:
            self._drop(full)
        if self._bytes + size > budget:
            self._evict(size, budget)
        if self._bytes + size > budget:
            return False
        try:
            ref = weakref.ref(weight)
        except TypeError:
            return False
        self._entries[full] = _Entry(ref, state, value, self._tick)
        self._bytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._seen.clear()
        self._bytes = 0
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # ---- internals ----------------------------------------------------------------------------
    def _drop(self, full) -> None:
        e = self._entries.pop(full)
        self._bytes -= e.value.numel() * e.value.element_size()

    def _evict(self, need: int, budget: int) -> None:
        for full, e in list(self._entries.items()):  # dead or modified weights
            w = e.ref()
            if w is None or e.state[:2] != _weight_state_cheap(w):
                self._drop(full)
        if len(self._seen) > 4 * max(64, len(self._entries)):  # forget keys not looked up lately
            keep = sorted(self._seen.items(), key=lambda kv: -kv[1])[: 2 * max(64, len(self._entries))]
            self._seen = dict(keep)
        window = 3 * max(1, len(self._seen))
        for full, e in list(self._entries.items()):
            if self._bytes + need <= budget:
                break
            if self._tick - e.tick > window:
                self._drop(full)


CACHE = ChipCache()
