"""Adapters of a serving simulation: which rank each has (:class:`AdapterSet`) and which are
resident in the device pool (:class:`AdapterPool`: residency, loading, LRU eviction).

Adapter ``k`` of ``n`` has rank ``ranks[k mod len(ranks)]`` unless an explicit table is given;
nothing is stored per adapter, so a million adapters cost what the requests touch.
"""
from __future__ import annotations

import numpy as np

from simcost.errors import SimcostError


class AdapterSet:
    """``n`` adapters with cyclic ranks, or an explicit per-adapter rank table."""

    def __init__(self, n: int, ranks, explicit: bool = False):
        self.n = int(n)
        self.table = np.asarray(ranks, dtype=float)
        self.explicit = explicit
        if self.table.size == 0 or (explicit and self.table.size != self.n):
            raise SimcostError("adapter ranks: one rank per adapter, or a cycle of ranks")

    @classmethod
    def of(cls, adapter_ranks) -> "AdapterSet | None":
        """None, an AdapterSet, or an explicit per-adapter rank array (old callers)."""
        if adapter_ranks is None or isinstance(adapter_ranks, AdapterSet):
            return adapter_ranks
        arr = np.asarray(adapter_ranks, dtype=float)
        return cls(arr.size, arr, explicit=True)

    def rank(self, ids):
        """Ranks (float) of adapter ids (an int or an int array)."""
        return self.table[ids] if self.explicit else self.table[np.asarray(ids) % self.table.size]

    def max_rank(self) -> float:
        return float(np.max(self.table))

    def check_ids(self, ad: np.ndarray) -> None:
        if ad.size and (ad.max() >= self.n or ad.min() < 0):
            bad = int(ad.max()) if ad.max() >= self.n else int(ad.min())
            raise SimcostError(f"adapter id {bad} is outside 0..{self.n - 1} (--adapters {self.n})")


class AdapterPool:
    """Adapters resident in the unified KV/adapter pool (S-LoRA §4.1), LRU by last use.

    ``bytes_of(a)`` is adapter ``a``'s size; a load costs ``copies`` host-to-device transfers
    of it plus ``host_lat`` per layer; the load time accumulates in ``pending_load`` until the
    next iteration exposes it."""

    def __init__(self, adapters: AdapterSet, rank_bytes: dict, *, host_bw: float,
                 host_lat: float, layers: int, copies: int):
        self.adapters = adapters
        self.rank_bytes = {int(r): float(b) for r, b in rank_bytes.items()}
        self.host_bw, self.host_lat, self.layers, self.copies = host_bw, host_lat, layers, copies
        self.resident: dict = {}          # adapter -> last use time
        self.bytes = 0.0                  # bytes of resident adapters
        self.max_resident = 0
        self.swaps = 0
        self.swap_time = 0.0
        self.pending_load = 0.0
        self._size: dict = {}

    def bytes_of(self, a) -> float:
        b = self._size.get(a)
        if b is None:
            b = self._size[a] = self.rank_bytes.get(int(self.adapters.rank(a)), 0.0)
        return b

    def _drop(self, a) -> float:
        b = self.bytes_of(a)
        self.bytes -= b
        del self.resident[a]
        return b

    def evict_idle(self, nbytes: float, busy: set) -> None:
        """Free ``nbytes`` by evicting adapters outside ``busy``, least recently used first."""
        freed = 0.0
        for a in sorted(self.resident, key=self.resident.get):
            if freed >= nbytes:
                break
            if a not in busy:
                freed += self._drop(a)

    def ensure(self, wanted: set, busy, t: float, *, used: float, pool: float,
               check: bool = True) -> bool:
        """Make ``wanted`` resident at time ``t``, evicting LRU adapters outside ``busy()`` (the
        adapters running requests use, asked only when a load is needed) when ``used`` +
        resident + new bytes exceed ``pool``; False when they cannot fit.
        ``check=False``: the caller's admission test has already counted their slots."""
        needed = wanted - set(self.resident)
        if not needed:
            for a in wanted:
                self.resident[a] = t
            return True
        extra = float(sum(self.bytes_of(a) for a in needed))
        if check and used + self.bytes + extra > pool:
            keep = busy()
            for a in sorted(self.resident, key=self.resident.get):
                if a not in keep:
                    self._drop(a)
                    if used + self.bytes + extra <= pool:
                        break
        if check and used + self.bytes + extra > pool:
            return False
        load = 0.0
        for a in needed:
            self.resident[a] = t
            self.bytes += self.bytes_of(a)
            load += self.copies * (self.bytes_of(a) / self.host_bw + self.host_lat * self.layers) \
                if self.host_bw else 0.0
        for a in wanted:
            self.resident[a] = t
        self.swaps += len(needed)
        self.swap_time += load
        self.pending_load += load
        self.max_resident = max(self.max_resident, len(self.resident))
        return True

    def release_unused(self, active: set) -> None:
        """S-LoRA's running-batch residency: free every adapter no running request uses."""
        for a in [a for a in self.resident if a not in active]:
            self._drop(a)

    def take_pending(self) -> float:
        p, self.pending_load = self.pending_load, 0.0
        return p
