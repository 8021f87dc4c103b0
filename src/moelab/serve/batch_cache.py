"""The running batch's KV cache under continuous batching: rows that joined at different times, one buffer.

The model already decodes left-padded batches (`moelab.model.cache.KVCache.pad`: row b's first pad[b] positions
are padding, its rotary positions are p − pad[b], its queries see keys at positions ≥ pad[b]). Continuous
batching keeps that layout and changes only the rows (Yu et al. 2022, Orca's iteration-level scheduling):

    join(batch, row)      a request prefilled alone (its own KVCache of P positions, pad none) becomes the last
                          row, right-aligned at the batch's length L: pad = L − P. When P > L every row is shifted
                          right by P − L first (each row's pad grows by P − L).
    add_rows(batch, Ps)   on the kernels, new requests' rows are added empty, each placed so that its prompt of P
                          tokens ends at the position the running rows write next: the prompts are then read in the
                          same step as the running rows' tokens (`InferenceEngine.step_tokens`).
    keep(batch, rows)     finished rows leave the batch dim; then the leading columns that are padding in every
                          row are dropped (each pad shrinks by min(pad)): L = the longest row's own length.

All rows advance one position per decode step, so a row's tokens keep the rotary positions and the keys they have
alone: at temperature 0 each request gets the tokens it gets alone (up to the rounding of batched products; exact
in float32 on the models of the tests). Padding columns are zeros (masked out: a NaN there would still poison
0·v). The KV memory a batch holds is B·L positions per layer.

Legend: B = rows, G = kv heads, L = positions, Dk / Dv = key / value width.
"""

from __future__ import annotations

import torch

from moelab.model.cache import KVCache

HEADROOM = 32  # spare positions allocated after a join, so the next decode steps append without a copy


def positions(cache: KVCache | None) -> int:
    """B·L: the key/value positions per layer that the batch's buffers hold in use."""
    if cache is None or not cache.k or cache.k[0] is None:
        return 0
    return cache.k[0].shape[0] * cache.length


def join(batch: KVCache | None, row: KVCache) -> KVCache:
    """`batch` (None: empty) with `row` (one prefilled request, B = 1, no pad) appended as its last row,
    right-aligned (module docstring). A new cache; neither input is changed."""
    P = row.length
    if batch is None or not batch.k:
        return _with_pad([_copy(t, P) for t in row.k], [_copy(t, P) for t in row.v], torch.zeros(1, dtype=torch.long))
    L = batch.length
    B = batch.k[0].shape[0]
    new_L = max(L, P)
    old_pad = batch.pad if batch.pad is not None else torch.zeros(B, dtype=torch.long, device=batch.k[0].device)
    ks, vs = [], []
    for bufs, rbufs, out in ((batch.k, row.k, ks), (batch.v, row.v, vs)):
        for t, r in zip(bufs, rbufs, strict=True):
            G, D = t.shape[1], t.shape[3]
            grown = t.new_zeros(B + 1, G, new_L + HEADROOM, D)  # [B+1, G, L', D]
            grown[:B, :, new_L - L:new_L] = t[:, :, :L]
            grown[B, :, new_L - P:new_L] = r[0, :, :P]
            out.append(grown)
    pad = torch.cat([old_pad + (new_L - L), old_pad.new_tensor([new_L - P])])
    return _with_pad(ks, vs, pad, new_L)


def add_rows(batch: KVCache | None, prompts: list[int], shapes: list[tuple[int, int]], like: torch.Tensor
             ) -> tuple[KVCache, list[int]]:
    """`batch` (None: empty) with one empty row appended per prompt length P in `prompts`, placed so that the prompt
    fills positions L − P + 1 .. L, L = the position the running rows write next: the prompts are read in the same
    step as the running rows' tokens and all rows then advance together. When a prompt is longer than L + 1 every row
    is shifted right first (each pad grows). shapes: per layer (kv heads, head width) for a batch without buffers;
    like: their dtype and device. Returns (the new cache — its length L, its pad a tensor of every row's — and the
    new rows' pads)."""
    if batch is not None and batch.k and batch.k[0] is not None:
        B, L = batch.k[0].shape[0], batch.length
        old_pad = batch.pad if batch.pad is not None else torch.zeros(B, dtype=torch.long, device=batch.k[0].device)
    else:
        B, L, old_pad = 0, 0, torch.zeros(0, dtype=torch.long, device=like.device)
    if B and not prompts:  # no new row: the same buffers (nothing copied)
        return KVCache(k=batch.k, v=batch.v, pad=old_pad, lengths=batch.lengths), []
    shift = max(0, max(prompts, default=0) - 1 - L)
    new_L = L + shift
    pads = [new_L - P + 1 for P in prompts]
    ks, vs = [], []
    for i, (G, D) in enumerate(shapes):
        for bufs, out in (((batch.k if B else None), ks), ((batch.v if B else None), vs)):
            grown = like.new_zeros(B + len(prompts), G, new_L + 1 + HEADROOM, D)
            if B:
                grown[:B, :, shift:shift + L] = bufs[i][:, :, :L]
            out.append(grown)
    pad = torch.cat([old_pad + shift, old_pad.new_tensor(pads)])
    return KVCache(k=ks, v=vs, pad=pad, lengths=[new_L] * len(shapes)), pads


def keep(batch: KVCache, rows: list[int]) -> KVCache | None:
    """The batch restricted to `rows` (indices, in order), its all-padding leading columns dropped; None when no
    row is kept."""
    if not rows:
        return None
    B, L = batch.k[0].shape[0], batch.length
    pad = batch.pad if batch.pad is not None else torch.zeros(B, dtype=torch.long, device=batch.k[0].device)
    idx = torch.tensor(rows, device=pad.device)
    pad = pad[idx]
    m = int(pad.min())
    if m == 0 and rows == list(range(B)):
        return batch
    ks = [t[idx, :, m:L].clone() for t in batch.k]  # contiguous copies [B', G, L − m, D]
    vs = [t[idx, :, m:L].clone() for t in batch.v]
    return _with_pad(ks, vs, pad - m, L - m)


def _copy(t: torch.Tensor, n: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], t.shape[1], n + HEADROOM, t.shape[3])
    out[:, :, :n] = t[:, :, :n]
    return out


def _with_pad(ks: list[torch.Tensor], vs: list[torch.Tensor], pad: torch.Tensor, length: int | None = None) -> KVCache:
    """A KVCache over these buffers; `pad` None when no row has padding (a lone row then decodes as it does alone)."""
    length = ks[0].shape[2] - HEADROOM if length is None else length
    return KVCache(k=list(ks), v=list(vs), pad=pad if bool(pad.any()) else None, lengths=[length] * len(ks))
