"""Routed experts read from disk on demand within a memory budget: `OffloadedExperts`, the `ExpertStore` of
each MoE layer, and the one `ExpertCache` all layers share.

    budget = resident weights (everything but the routed experts) + the cache's capacity (bytes of experts)

An expert is read from the checkpoint when a token is routed to it and it is not in the cache, converted
to the form it computes in (float, or a quantized format of `moelab.quant`), and kept until the cache
needs room for another; what is evicted is chosen by the policy:
- "lru": the least recently used expert (any layer);
- "lfu": the least frequently used over the whole run (counts survive eviction), ties to the least
  recently used — expert popularity in trained MoE models is skewed and stable (Mixtral, Jiang et al.
  2024, §5; DeepSeek-V3's load statistics), which frequency keeps and recency forgets.
Space is made *before* an expert is read, so the experts held never exceed the capacity; the only excess
is the expert a caller is still computing with after it was evicted (at most one per thread).

Prefetching (optional, `OffloadedExperts.next`): on entering layer l, the next MoE layer's router is applied
to layer l's input and the experts it predicts are read on one background thread while layer l computes
(the hidden state changes little from one layer to the next: "Pre-gated MoE", Hwang et al. 2024;
MoE-Infinity, Xue et al. 2024). A wrong guess costs a read and possibly an eviction; its accounting
(`CacheStats.prefetched`, `prefetch_used`) says whether it pays — docs/BENCHMARKS.md ("Memory budget").

Legend: D = model width, I = expert hidden width, n = rows of one expert's segment.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.experts import ExpertStore

POLICIES = ("lru", "lfu")
Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    """Counters of an `ExpertCache` since its last `reset_stats`.

    lookups: experts asked for by a forward; hits: found in the cache (read earlier or prefetched);
    waits: found being prefetched and waited for; misses: read by the caller. bytes_read: bytes read
    from the checkpoint (caller and prefetcher); prefetched: experts the prefetcher read; prefetch_used:
    of those, how many a forward asked for before they were evicted; evictions: experts dropped."""

    lookups: int = 0
    hits: int = 0
    waits: int = 0
    misses: int = 0
    bytes_read: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """(hits + waits) / lookups: the share of expert uses that the caller did not read itself."""
        return (self.hits + self.waits) / self.lookups if self.lookups else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate}


@dataclass
class _Item:
    value: Any
    nbytes: int
    prefetched: bool = False


class ExpertCache:
    """A map (layer, expert) → expert weights holding at most `capacity` bytes, filled by `load`.

    load(key, spare) → (weights, resident bytes, bytes read from disk); `spare` is an evicted expert's
    weights the read may reuse (or None): reusing them keeps the allocator from fragmenting its heap with
    freed experts, so the memory held stays the memory used. Weights are called as `weights(x_nD)` → the
    expert's unweighted output. `get(key)` returns the weights, reading them on a miss (after evicting
    by `policy`, `POLICIES`); `prefetch(keys)` reads on a background thread. Thread-safe: a lock guards
    the bookkeeping, reads happen outside it."""

    def __init__(self, capacity: int, load: Callable[[Key, Any], tuple[Any, int, int]], policy: str = "lru") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is invalid: allowed {', '.join(map(repr, POLICIES))}")
        self.capacity, self.policy, self._load = int(capacity), policy, load
        self._items: OrderedDict[Key, _Item] = OrderedDict()  # least recently used first
        self._counts: dict[Key, int] = {}  # uses per key over the run (LFU)
        self._inflight: dict[Key, Future] = {}
        self._reserved = 0  # bytes set aside for reads in progress
        self._used = 0
        self._item_bytes = 0  # the largest expert seen: the room made before a read
        self._in_use: Key | None = None  # the expert the caller was last given
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return (f"ExpertCache(capacity={self.capacity / 1e9:.3f} GB, policy={self.policy!r}, "
                f"held={len(self._items)}, used={self._used / 1e9:.3f} GB)")

    @property
    def used(self) -> int:
        """Bytes of the experts held."""
        return self._used

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    def get(self, key: Key) -> Any:
        """The weights of expert `key`: from the cache, from the prefetcher, or read now. The caller computes
        with them before its next `get` (one caller at a time: the expert it was last given is never
        recycled by the prefetcher)."""
        with self._lock:
            self.stats.lookups += 1
            self._counts[key] = self._counts.get(key, 0) + 1
            self._in_use = key
            item = self._items.get(key)
            if item is not None:
                self.stats.hits += 1
                self._used_now(key, item)
                return item.value
            future = self._inflight.get(key)
            if future is None:
                self.stats.misses += 1
                spare = self._reserve()
        if future is not None:
            future.result()
            with self._lock:
                item = self._items.get(key)
                if item is not None:
                    self.stats.waits += 1
                    self._used_now(key, item)
                    return item.value
                self.stats.misses += 1  # prefetched, then evicted before this use: read again
                spare = self._reserve()
        return self._read(key, spare, prefetched=False).value

    def prefetch(self, keys: Iterable[Key]) -> None:
        """Read the experts `keys` not yet held on the background thread (one thread, in order)."""
        with self._lock:
            for key in keys:
                if key in self._items or key in self._inflight:
                    continue
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(1, thread_name_prefix="moelab-prefetch")
                self._inflight[key] = self._worker.submit(self._prefetch_one, key)

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark held experts as recently used without counting a use (so a prefetch does not evict them)."""
        with self._lock:
            for key in keys:
                if key in self._items:
                    self._items.move_to_end(key)

    def close(self) -> None:
        """Stop the prefetch thread (after its reads in progress)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    # -- internals (the lock held where said) ------------------------------------------------------------
    def _prefetch_one(self, key: Key) -> None:
        try:
            with self._lock:
                if key in self._items:
                    return
                spare = self._reserve(recycle_in_use=False)
            self._read(key, spare, prefetched=True)
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _reserve(self, recycle_in_use: bool = True) -> Any:
        """(lock held) Make room for one expert and set it aside; return an evicted expert the read may
        reuse (None if none was evicted, or — for the prefetcher — it is the one the caller computes with)."""
        evicted = self._make_room(self._item_bytes)
        self._reserved += self._item_bytes
        spare = [v for k, v in evicted if recycle_in_use or k != self._in_use]
        return spare[0] if spare else None

    def _read(self, key: Key, spare: Any, prefetched: bool) -> _Item:
        """Read `key` (room for `_item_bytes` was reserved by the caller, lock not held) and insert it."""
        reserved = self._item_bytes
        try:
            value, nbytes, nread = self._load(key, spare)
        except BaseException:
            with self._lock:
                self._reserved -= reserved
            raise
        item = _Item(value, nbytes, prefetched)
        with self._lock:
            self._reserved -= reserved
            self.stats.bytes_read += nread
            if prefetched:
                self.stats.prefetched += 1
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= old.nbytes
            self._item_bytes = max(self._item_bytes, nbytes)
            self._make_room(nbytes)
            self._items[key] = item
            self._used += nbytes
        return item

    def _used_now(self, key: Key, item: _Item) -> None:
        self._items.move_to_end(key)
        if item.prefetched:
            item.prefetched = False
            self.stats.prefetch_used += 1

    def _make_room(self, nbytes: int) -> list[tuple[Key, Any]]:
        """(lock held) Evict until `nbytes` more fit beside the held experts and the reads in progress;
        return what was evicted."""
        evicted = []
        while self._items and self._used + self._reserved + nbytes > self.capacity:
            if self.policy == "lru":
                key = next(iter(self._items))
            else:  # least used over the run; the OrderedDict's order breaks ties by recency
                key = min(self._items, key=lambda k: self._counts.get(k, 0))
            item = self._items.pop(key)
            self._used -= item.nbytes
            self.stats.evictions += 1
            evicted.append((key, item.value))
        return evicted


class OffloadedExperts(ExpertStore):
    """The routed experts of MoE layer `layer` (block index), held by a shared `ExpertCache` and read on
    demand: `ffn` and `decode` compute with `cache.get((layer, e))`; there are no stacked weights, so the
    policy runs this store on the decode path and the grouped loop (`moelab.policy`).

    `next`: (the next MoE layer's router, its layer index) to prefetch that layer's predicted experts on
    entry (`enable_prefetch`), or None."""

    def __init__(self, layer: int, n_experts: int, activation: str, cache: ExpertCache) -> None:
        super().__init__()
        self.layer, self.n_experts, self.activation, self.cache = layer, n_experts, activation, cache
        self.next: tuple[torch.nn.Module, int] | None = None

    def extra_repr(self) -> str:
        return f"layer={self.layer}, n_experts={self.n_experts}, {self.cache!r}"

    def stacked(self, dtype: torch.dtype | None = None) -> None:
        return None

    def ffn(self, x_nD: Tensor, e: int, dtype: torch.dtype | None = None) -> Tensor:
        return self.cache.get((self.layer, e))(x_nD)

    def forward(self, x_AD: Tensor, counts: Tensor, backend: str = "loop",
                dtype: torch.dtype | None = None) -> Tensor:
        if self.next is not None:
            self._prefetch_next(x_AD, counts.nonzero().flatten().tolist())
        return super().forward(x_AD, counts, backend, dtype)

    def decode(self, x_1D: Tensor, experts: list[int], weights: list[float],
               dtype: torch.dtype | None = None) -> Tensor:
        self._prefetch_next(x_1D, experts)
        return super().decode(x_1D, experts, weights, dtype)

    def _prefetch_next(self, x_TD: Tensor, experts: Iterable[int]) -> None:
        """Hold this layer's experts against eviction, then prefetch the next layer's predicted ones."""
        if self.next is None:
            return
        self.cache.touch((self.layer, e) for e in experts)
        router, layer = self.next
        predicted = router(x_TD, with_probs=False).topk_idx.unique().tolist()
        self.cache.prefetch((layer, e) for e in predicted)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers: the weights a budget keeps in memory (an offloaded store
    holds none)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def offloaded_stores(model: torch.nn.Module) -> list[OffloadedExperts]:
    """The `OffloadedExperts` stores of a model's MoE layers (empty for a model held in memory)."""
    return [moe.experts for moe in model.moe_layers() if isinstance(moe.experts, OffloadedExperts)]


def expert_cache(model: torch.nn.Module) -> ExpertCache | None:
    """The cache a budgeted model's layers share, or None for a model held in memory."""
    stores = offloaded_stores(model)
    return stores[0].cache if stores else None


def enable_prefetch(model: torch.nn.Module, on: bool = True) -> None:
    """Point each offloaded layer at the next MoE layer's router (or, with on=False, stop prefetching)."""
    stores = offloaded_stores(model)
    routers = {moe.experts.layer: moe.router for moe in model.moe_layers() if moe.experts in stores}
    for store, after in zip(stores, stores[1:] + [None]):
        store.next = (routers[after.layer], after.layer) if on and after is not None else None


class FloatExpert:
    """One SwiGLU/GELU expert in float for a cache: w_in [H, D] (gate rows then up rows), w_out [D, I]
    (nn.Linear layout, as stored in Hugging Face checkpoints); `expert(x_nD)` → its output [n, D]."""

    def __init__(self, w_in_HD: Tensor, w_out_DI: Tensor, activation: str) -> None:
        self.w_in, self.w_out, self.activation = w_in_HD, w_out_DI, activation
        self.nbytes = w_in_HD.numel() * w_in_HD.element_size() + w_out_DI.numel() * w_out_DI.element_size()

    def __call__(self, x_nD: Tensor) -> Tensor:
        from moelab.kernels import activate

        w_in, w_out = self.w_in, self.w_out
        if x_nD.dtype != w_in.dtype:
            w_in, w_out = w_in.to(x_nD.dtype), w_out.to(x_nD.dtype)
        return torch.nn.functional.linear(activate(torch.nn.functional.linear(x_nD, w_in), self.activation), w_out)
