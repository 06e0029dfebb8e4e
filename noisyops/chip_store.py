"""Noisy weights of ``per_instance`` chips, owned by the modules that run the chips.

A chip's noisy weights ``Wn`` are a pure function of (weight values, layer parameters, chip id), so
a model evaluated on K chips over many batches needs each chip's weights only once. The op itself
keeps no state: a noisy module inside `noisyops.chips` / `noisyops.run_chips` (which made the chip
ids, so it knows them without reading a tensor) asks this store for the ``[K, *weight.shape]``
weights of its chips and hands them to the op as its ``chip_weights`` input; the ``cpu`` backend
uses them instead of generating (they are what it would generate, bit for bit).

Entries are keyed by the owning module and a key the module gives (its `OpParams`, the chip ids,
the dtype); the module also gives the state its weights are in — ``(weight._version,
weight.data_ptr())``, read without touching the values — and an entry whose state changed is stale
(``optimizer.step()``, ``load_state_dict``, ``.to()`` all change it). In-place edits through
``weight.data`` bypass the version counter: call `STORE.clear` after such an edit (nothing in the
op fingerprints the weight values any more).

Budget: ``NOISYOPS_CHIP_CACHE_MB`` (default 512) megabytes over all modules, read on every insert;
0 disables the store. When full, entries of dead owners or stale weights go first, then entries
idle for more than three passes over the keys in use; if nothing can go, the new entry is not
stored (so a working set larger than the budget keeps a stable, useful part instead of thrashing).
"""
from __future__ import annotations

import collections
import os
import weakref
from typing import Hashable, Optional

import torch

DEFAULT_BUDGET_MB = 512


def budget_bytes() -> int:
    """The store budget in bytes from ``NOISYOPS_CHIP_CACHE_MB`` (default 512)."""
    raw = os.environ.get("NOISYOPS_CHIP_CACHE_MB", str(DEFAULT_BUDGET_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"NOISYOPS_CHIP_CACHE_MB={raw!r}: expected a number of megabytes >= 0") from None
    if mb < 0:
        raise ValueError(f"NOISYOPS_CHIP_CACHE_MB={raw!r}: expected a number of megabytes >= 0")
    return int(mb * (1 << 20))


def weight_state(weight: torch.Tensor) -> Optional[tuple]:
    """``(version, data_ptr, dtype)`` of a weight, without reading its values; None when it cannot
    be tracked (inference tensors have no version counter)."""
    try:
        return weight._version, weight.data_ptr(), weight.dtype
    except RuntimeError:
        return None


class _Entry:
    __slots__ = ("ref", "state", "value", "tick", "current")

    def __init__(self, ref, state, value, tick, current):
        self.ref, self.state, self.value, self.tick, self.current = ref, state, value, tick, current


class ChipStore:
    """``(owner, key) -> tensor`` with owner-given state invalidation and a byte budget."""

    def __init__(self):
        self._entries: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
        self._seen: dict = {}  # every key looked up recently -> last tick (to size the idle window)
        self._bytes = 0
        self._tick = 0
        self.hits = 0
        self.misses = 0

    # ---- public -------------------------------------------------------------------------------
    def get(self, owner, key: Hashable, state) -> Optional[torch.Tensor]:
        """The stored tensor for ``(owner, key)`` if it was stored in ``state``, else None."""
        self._tick += 1
        full = (id(owner), key)
        self._seen[full] = self._tick
        e = self._entries.get(full)
        if e is not None:
            if e.ref() is owner and state is not None and e.state == state:
                e.tick = self._tick
                self.hits += 1
                return e.value
            self._drop(full)
        self.misses += 1
        return None

    def put(self, owner, key: Hashable, state, value: torch.Tensor, current=None) -> bool:
        """Store ``value`` for ``(owner, key)`` in ``state`` if the budget allows; returns whether
        it did. ``current(owner) -> state`` lets eviction find stale entries."""
        budget = budget_bytes()
        size = value.numel() * value.element_size()
        if state is None or size > budget:
            return False
        full = (id(owner), key)
        if full in self._entries:
            self._drop(full)
        if self._bytes + size > budget:
            self._evict(size, budget)
        if self._bytes + size > budget:
            return False
        try:
            ref = weakref.ref(owner)
        except TypeError:
            return False
        self._entries[full] = _Entry(ref, state, value, self._tick, current)
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
        for full, e in list(self._entries.items()):  # dead owners or stale weights
            o = e.ref()
            if o is None or (e.current is not None and e.current(o) != e.state):
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


STORE = ChipStore()
