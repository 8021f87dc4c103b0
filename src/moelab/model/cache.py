"""The per-layer KV cache that generation writes in place (buffers that double), with left padding for a batch of
prompts of different lengths (see `moelab.model.transformer`).

Legend: B = batch, G = kv heads, S = new positions, Dk / Dv = key / value width."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of past positions for every layer, in buffers written in place: k[i] [B, G, capacity, Dk],
    v[i] [B, G, capacity, Dv], of which the first `length` positions hold data (a step appends without copying
    the past; a full buffer doubles). `pad` [B] (int64, or None for none): the number of left-padding positions
    of each row (module docstring)."""

    k: list[Tensor | None] = field(default_factory=list)
    v: list[Tensor | None] = field(default_factory=list)
    pad: Tensor | None = None
    lengths: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k [B, G, S, Dk] and v [B, G, S, Dv] to layer `layer`; its keys and values so far (views)."""
        L, S = self.reserve(layer, k.shape, v.shape, k), k.shape[2]
        self.k[layer][:, :, L:L + S] = k
        self.v[layer][:, :, L:L + S] = v
        self.lengths[layer] = L + S
        return self.k[layer][:, :, :L + S], self.v[layer][:, :, :L + S]

    def reserve(self, layer: int, k_shape: tuple[int, ...], v_shape: tuple[int, ...], like: Tensor) -> int:
        """Make room in layer `layer`'s buffers for S more positions of keys [B, G, S, Dk] and values [B, G, S, Dv]
        (new buffers: like's dtype and device); the current length L, where they go."""
        while len(self.k) <= layer:
            self.k.append(None)
            self.v.append(None)
            self.lengths.append(0)
        L, S = self.lengths[layer], k_shape[2]
        if self.k[layer] is None or self.k[layer].shape[2] < L + S:
            capacity = max(2 * L, L + S, 64)
            for bufs, shape in ((self.k, k_shape), (self.v, v_shape)):
                grown = like.new_empty(*shape[:2], capacity, shape[3])
                if bufs[layer] is not None:
                    grown[:, :, :L] = bufs[layer][:, :, :L]
                bufs[layer] = grown
        return L
