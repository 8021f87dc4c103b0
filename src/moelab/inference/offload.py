"""Routed experts read from disk on demand within a memory budget: `OffloadedExperts`, the `ExpertStore` of
each MoE layer, and the one `ExpertCache` all layers share.

    budget = resident weights (everything but the routed experts) + the cache's capacity (bytes of experts)

An expert is read from the checkpoint when a token is routed to it and it is not in the cache, converted
to the form it computes in (float, or a quantized format of `moelab.inference.formats`), and kept until the cache
needs room for another; what is evicted is chosen by the policy:
- "lru": the least recently used expert (any layer);
- "lfu": the least frequently used over the whole run (counts survive eviction), ties to the least
  recently used — expert popularity in trained MoE models is skewed and stable (Mixtral, Jiang et al.
  2024, §5; DeepSeek-V3's load statistics), which frequency keeps and recency forgets.
Space is made *before* an expert is read, so the experts held never exceed the capacity; the only excess
is what a caller still computes with after it was evicted: at most k − 1 of a token's k experts of one layer (the
last one fetched is in the cache).
Creating a cache fixes glibc's mmap threshold (`return_freed_memory`), so that the memory of evicted
experts goes back to the system instead of fragmenting the heap.

Prefetching (optional, `OffloadedExperts.next`): on entering layer l, the next MoE layer's router is applied
to layer l's input and the experts it predicts are read on one background thread while layer l computes
(the hidden state changes little from one layer to the next: "Pre-gated MoE", Hwang et al. 2024;
MoE-Infinity, Xue et al. 2024). A wrong guess costs a read and possibly an eviction; its accounting
(`CacheStats.prefetched`, `prefetch_used`) says whether it pays — docs/BENCHMARKS.md ("Memory budget").

Legend: D = model width, I = expert hidden width, n = rows of one expert's segment.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import platform
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.inference.formats import LinearWeight
from moelab.inference.quantized_experts import QuantizedExperts, decode_experts
from moelab.layer.experts import ExpertStore

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


# glibc's malloc serves blocks below its mmap threshold from its heap, and raises that threshold (up to 32 MiB)
# each time a larger mapped block is freed; experts read, converted and evicted over and over then leave
# their freed memory in a fragmented heap, and the resident set grows past the budget. Fixing the threshold
# (which also stops it moving) makes every block from this size up its own mapping, returned when freed.
MMAP_THRESHOLD = 256 << 10
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's M_MMAP_THRESHOLD for this process (see above); False where the C library is not glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def check_policy(policy: str) -> None:
    """ValueError naming the value when `policy` is not one of `POLICIES`."""
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid: allowed {', '.join(map(repr, POLICIES))}")


def check_budget(max_memory_gb: float | None, policy: str) -> None:
    """ValueError naming the option when max_memory_gb or policy is out of range."""
    number = isinstance(max_memory_gb, (int, float)) and not isinstance(max_memory_gb, bool)
    if max_memory_gb is not None and not (number and 0 < max_memory_gb < math.inf):
        raise ValueError(f"max_memory_gb={max_memory_gb!r} is invalid: allowed a number of GB > 0, or None (the "
                         "whole model in memory)")
    check_policy(policy)


class ExpertCache:
    """A map (layer, expert) → expert weights holding at most `capacity` bytes, filled by `load`.

    load(key) → (weights, resident bytes, bytes read from disk). `get(key)` returns the weights, reading
    them on a miss (after evicting by `policy`, `POLICIES`); `prefetch(keys)` reads on a background
    thread. Thread-safe: a lock guards the bookkeeping, reads happen outside it. An evicted expert's
    memory is freed when its last user drops it."""

    def __init__(self, capacity: int, load: Callable[[Key], tuple[Any, int, int]], policy: str = "lru",
                 on_close: Callable[[], object] | None = None) -> None:
        check_policy(policy)
        self.capacity, self.policy, self._load, self._on_close = int(capacity), policy, load, on_close
        self._items: OrderedDict[Key, _Item] = OrderedDict()  # least recently used first
        self._counts: dict[Key, int] = {}  # uses per key over the run (LFU)
        self._inflight: dict[Key, Future] = {}
        self._reserved = 0  # bytes set aside for reads in progress
        self._used = 0
        self._item_bytes = 0  # the largest expert seen: the room made before a read
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self.stats = CacheStats()
        return_freed_memory()

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
        """The weights of expert `key`: from the cache, from the prefetcher, or read now."""
        with self._lock:
            self.stats.lookups += 1
            self._counts[key] = self._counts.get(key, 0) + 1
            item = self._items.get(key)
            if item is not None:
                self.stats.hits += 1
                self._used_now(key, item)
                return item.value
            future = self._inflight.get(key)
            if future is None:
                self.stats.misses += 1
                reserved = self._reserve()
        if future is not None:
            future.result()
            with self._lock:
                item = self._items.get(key)
                if item is not None:
                    self.stats.waits += 1
                    self._used_now(key, item)
                    return item.value
                self.stats.misses += 1  # prefetched, then evicted before this use: read again
                reserved = self._reserve()
        return self._read(key, reserved, prefetched=False).value

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
        """Mark held experts as recently used without counting a use (under LRU, so that a prefetch does not
        evict them; under LFU their counts already protect them)."""
        with self._lock:
            for key in keys:
                if key in self._items:
                    self._items.move_to_end(key)

    def close(self) -> None:
        """Stop the prefetch thread (after its reads in progress), then call `on_close` (e.g. close the
        checkpoint the experts are read from: the cache cannot read after that)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # -- internals (the lock held where said) ------------------------------------------------------------
    def _prefetch_one(self, key: Key) -> None:
        try:
            with self._lock:
                if key in self._items:
                    return
                reserved = self._reserve()
            self._read(key, reserved, prefetched=True)
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _reserve(self) -> int:
        """(lock held) Make room for one expert and set it aside for the read about to start; returns the
        bytes set aside, which that read gives back."""
        self._make_room(self._item_bytes)
        self._reserved += self._item_bytes
        return self._item_bytes

    def _read(self, key: Key, reserved: int, prefetched: bool) -> _Item:
        """Read `key` (the caller reserved `reserved` bytes for it, lock not held) and insert it."""
        try:
            value, nbytes, nread = self._load(key)
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

    def _make_room(self, nbytes: int) -> None:
        """(lock held) Evict until `nbytes` more fit beside the held experts and the reads in progress."""
        while self._items and self._used + self._reserved + nbytes > self.capacity:
            if self.policy == "lru":
                key = next(iter(self._items))
            else:  # least used over the run, a prefetched expert not before its first use (its count is
                # still 0); the OrderedDict's order breaks ties by recency
                used = [k for k, item in self._items.items() if not item.prefetched]
                key = min(used or self._items, key=lambda k: self._counts.get(k, 0))
            self._used -= self._items.pop(key).nbytes
            self.stats.evictions += 1


class OffloadedExperts(ExpertStore):
    """The routed experts of MoE layer `layer` (block index), held by a shared `ExpertCache` of
    `moelab.inference.quantized_experts.ExpertWeights` (any format) and read on demand: `ffn` and `decode` compute with
    `cache.get((layer, e))`; there are no stacked weights, so the policy runs this store on the decode path
    and the grouped loop (`moelab.layer.policy`). Between fetching a token's k experts and computing with them
    an evicted one stays alive: the memory held may exceed the capacity by up to k − 1 experts.

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
        y = self.cache.get((self.layer, e)).ffn(x_nD)
        return y if dtype is None else y.to(dtype)

    def forward(self, x_AD: Tensor, counts: Tensor, backend: str = "loop",
                dtype: torch.dtype | None = None) -> Tensor:
        if self.next is not None:
            self._prefetch_next(x_AD, counts.nonzero().flatten().tolist())
        return super().forward(x_AD, counts, backend, dtype)

    def decode(self, x_1D: Tensor, experts: list[int], weights: list[float],
               dtype: torch.dtype | None = None) -> Tensor:
        """`quant_experts.decode_experts` (what `QuantizedExperts.decode` runs) on the k experts fetched from
        the cache, so a budgeted model computes bit for bit what the same model held in memory computes."""
        self._prefetch_next(x_1D, experts)
        chosen = [self.cache.get((self.layer, e)) for e in experts]
        return decode_experts(chosen, weights, self.activation, x_1D, dtype)

    def _prefetch_next(self, x_TD: Tensor, experts: Iterable[int]) -> None:
        """Hold this layer's experts against eviction, then prefetch the next layer's predicted ones."""
        if self.next is None:
            return
        self.cache.touch((self.layer, e) for e in experts)
        router, layer = self.next
        predicted = router(x_TD, with_probs=False).topk_idx.unique().tolist()
        self.cache.prefetch((layer, e) for e in predicted)


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a model holds in memory: its parameters and buffers, the weights converted for
    inference (`moelab.inference`) and in-memory quantized experts; an offloaded store holds none."""
    total = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    for m in model.modules():
        if isinstance(getattr(m, "w", None), LinearWeight):
            total += m.w.nbytes
        elif isinstance(m, QuantizedExperts):
            total += m.nbytes
    return total


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


def offload_experts(model: torch.nn.Module, load: Callable[[Key], tuple[Any, int, int]], max_memory_gb: float,
                    policy: str = "lru", prefetch: bool = False,
                    on_close: Callable[[], object] | None = None) -> ExpertCache:
    """Give every MoE layer of `model` (its other weights resident) an `OffloadedExperts` store over one
    `ExpertCache` of (budget − resident bytes), filled by `load` (key → (weights, bytes, bytes read)); the
    cache. ValueError saying how much is needed when the budget holds less than the resident weights plus one
    expert (measured on expert 0 of the first MoE layer)."""
    resident = resident_bytes(model)
    moes = [(i, b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]
    one = load((moes[0][0], 0))[1]
    budget = int(max_memory_gb * 1e9)
    if budget < resident + one:
        need = math.ceil((resident + one) / 1e6) / 1e3
        raise ValueError(f"max_memory_gb={max_memory_gb!r} is below what this model needs in memory: "
                         f"{resident / 1e9:.3f} GB of non-expert weights + {one / 1e9:.4f} GB for one expert; "
                         f"allowed >= {need:.3f}")
    cache = ExpertCache(budget - resident, load, policy, on_close=on_close)
    for i, moe in moes:
        moe.experts = OffloadedExperts(i, moe.cfg.n_experts, moe.cfg.activation, cache)
    enable_prefetch(model, prefetch)
    return cache
