"""The inference engine: the one object that owns every call into moelab's kernels for a prepared model.

The model and the MoE layer run torch code only. The engine is applied to a built model (as gpt-fast applies
quantization): `prepare_inference` installs it as the model's decode step (`MoETransformer.decoder`), and the
model's forward hands it each decode step.

    engine = InferenceEngine(model)          # prepare_inference does this: model.decoder = engine
    engine.refresh()                         # (re)build the kernels' arguments now
    engine.describe()                        # per layer, which half runs where: ["kernel", "torch"], ...

What runs where is decided here, in `_attention_args` and `_ffn_args`:
- A decode step takes the kernels when it is one new token per row, outside autograd, autocast and training mode,
  with no statistics asked and no forward hook on the modules the kernels stand in for; otherwise the blocks' torch
  code runs the step (the engine answers None). Several rows (a continuous batch, `moelab.serve`; left-padded) or
  several tokens (a prompt) take them only in `native.decode_rows` calls (`takes_rows`): each token is then computed
  bit-identically to the same token decoded alone, in turn, while each weight is read once per call for all the
  tokens that use it.
- Each block's attention half runs on `native.attention_block` (norm, q|k|v, q/k norm, RoPE, cache append,
  attention, o, residual) when it is grouped-query attention with its projections on moelab's kernels and no sinks,
  window or residual scale; else on the block's torch code (`Block.attn_half`).
- Each block's FFN half runs on `native.moe_block` (norm, top-k softmax routing, the k experts, residual) when it is
  an MoE layer with a plain top-k softmax router (no selection or logit bias, no groups), no shared experts, no
  installed path, and experts all on moelab's kernels in one format; else on torch code (`Block.ffn_half`).
- When every half of every block is on the kernels, the whole step is one call (`native.decode_layers`); the
  MoEAux it returns carry the chosen experts (topk_idx) though no statistics were asked.

When the kernels' arguments are rebuilt — never guessed from data pointers: on first use; after `invalidate()`,
which the model calls when its tensors are moved or cast (`Module._apply`); when an object the arguments were built
from is no longer the model's (a replaced norm, projection, weight, expert store or router: checked by identity at
each step); and when a router's weight was changed in place (its version counter: the kernel reads a float32 copy
of a bfloat16 router). Other in-place changes to weights are read by the kernels directly.

The kernels compute in float32 with the roundings of the torch code they replace (cpu_kernels.c states them); they
are not bit-identical to it (sums run in another order), so logits agree to float rounding and greedy tokens agree
except at near-ties (tested against the torch code and a float64 reference).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.inference import native
from moelab.inference.quantized_experts import QuantizedExperts
from moelab.layer.moe import MoE, MoEAux, autocast_dtype
from moelab.model.attention import Attention
from moelab.model.cache import KVCache

ROWS_PER_CALL = 256  # tokens per decode_rows call (its buffers grow with them: ~60 KB per token at d_model 2048, k 8)


@dataclass
class BlockPlan:
    """One block's kernel arguments: `attn` for `native.attention_block`, `ffn` for `native.moe_block` (None: that half
    runs the block's torch code)."""

    attn: native.BlockArgs | None
    ffn: native.BlockArgs | None


def _attention_args(block: nn.Module) -> native.BlockArgs | None:
    """The attention half's kernel arguments, or None where `native.attention_block` does not take it (module doc)."""
    attn, norm = block.attn, block.attn_norm
    if not isinstance(attn, Attention) or attn.sinks is not None or attn.window is not None \
            or block.residual_scale != 1.0:
        return None
    wqkv, wo = getattr(attn.wqkv, "w", None), getattr(attn.wo, "w", None)
    if getattr(wqkv, "native", None) is None or getattr(wo, "native", None) is None:
        return None
    norms = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach()) if attn.qk_norm in ("head", "full") else ()
    return native.attention_args(norm.weight.detach(), norm.eps, wqkv.native, attn.wqkv.bias,
                                 (*norms, attn.q_norm.eps) if norms else None, attn.rot, wo.native, attn.wo.bias,
                                 attn.n_heads, attn.n_kv, attn.hd, attn.scale)


def _router_args(moe: MoE) -> tuple[Tensor, int, bool, float] | None:
    """(float32 router weight [E, D], k, renorm, scale) as `native.route` takes them, or None for a router it does not
    take (not top-k softmax, a selection or logit bias, groups, off the CPU)."""
    cfg, w = moe.cfg, moe.router.weight
    if (cfg.router != "topk_softmax" or cfg.expert_bias or cfg.biases or cfg.n_groups > 1
            or w.device.type != "cpu"):
        return None
    return w.detach().float().contiguous(), cfg.top_k, cfg.norm_topk_prob, cfg.route_scale


def _expert_table(moe: MoE) -> native.ExpertTable | None:
    """The routed experts as `native.moe_block` takes them, or None unless all run on the kernels in one format."""
    if not isinstance(moe.experts, QuantizedExperts):
        return None
    weights = moe.experts.weights
    return native.expert_table([ew.gate_up.native for ew in weights], [ew.down.native for ew in weights])


def _ffn_args(block: nn.Module) -> native.BlockArgs | None:
    """The FFN half's kernel arguments, or None where `native.moe_block` does not take it (module docstring)."""
    moe, norm = block.ffn, block.ffn_norm
    if not block.is_moe or moe.path is not None or moe.cfg.backend != "auto" or moe.shared is not None \
            or block.residual_scale != 1.0 or norm.weight.dtype != moe.router.weight.dtype:
        return None
    routing, table = _router_args(moe), _expert_table(moe)
    if routing is None or table is None:
        return None
    return native.moe_args(norm.weight.detach(), norm.eps, *routing, table, moe.experts.activation)


def _watched(block: nn.Module) -> list[tuple[object, str]]:
    """The (parent, attribute) pairs whose objects a block's kernel arguments are built from."""
    pairs = [(block, "attn_norm"), (block, "attn"), (block, "ffn_norm"), (block, "ffn"),
             (block.attn_norm, "weight"), (block.ffn_norm, "weight")]
    attn = block.attn
    for name in ("wqkv", "wo", "q_norm", "k_norm"):
        if hasattr(attn, name):
            pairs.append((attn, name))
            sub = getattr(attn, name)
            for leaf in ("w", "weight", "bias"):
                if sub is not None and hasattr(sub, leaf):
                    pairs.append((sub, leaf))
    if block.is_moe:
        pairs += [(block.ffn, "router"), (block.ffn, "experts"), (block.ffn, "shared"), (block.ffn, "path"),
                  (block.ffn.router, "weight")]
    return pairs


class InferenceEngine:
    """The kernels' side of a prepared model's decode step (module docstring). Installed as `model.decoder`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks: list[BlockPlan] = []
        self.table: native.LayerTable | None = None
        self.dtype: torch.dtype | None = None
        self._built = False
        self._watch: list[tuple[object, str, object]] = []
        self._routers: list[tuple[Tensor, int]] = []
        self._hooked: list[nn.Module] = []

    # ------------------------------------------------------------------------------------------ building

    def invalidate(self) -> None:
        """Rebuild the kernels' arguments before the next step (the model calls this when its tensors move)."""
        self._built = False

    def refresh(self) -> None:
        """Build every block's kernel arguments from the model as it is now."""
        model = self.model
        self.blocks, self.table, self._watch, self._routers, self._hooked = [], None, [], [], []
        self.dtype = model.embed.weight.dtype
        available = native.available() and model.embed.weight.device.type == "cpu"
        for block in model.blocks:
            plan = BlockPlan(_attention_args(block), _ffn_args(block)) if available else BlockPlan(None, None)
            for half in (plan.attn, plan.ffn):
                if half is not None and half.dtype != self.dtype:
                    plan = BlockPlan(None, None)
            self.blocks.append(plan)
            self._watch += [(parent, name, getattr(parent, name)) for parent, name in _watched(block)]
            if block.is_moe:
                self._routers.append((block.ffn.router.weight, block.ffn.router.weight._version))
            self._hooked += list(block.modules())
        self._watch.append((model, "blocks", model.blocks))
        whole = self.blocks and all(p.attn is not None and p.ffn is not None for p in self.blocks)
        if whole and len({p.attn.struct.rot for p in self.blocks}) == 1:
            self.table = native.LayerTable([(p.attn, p.ffn) for p in self.blocks])
        self._built = True

    def _current(self) -> bool:
        """Whether the arguments were built from the objects the model holds now (identity, not data pointers)."""
        return (all(getattr(parent, name, None) is obj for parent, name, obj in self._watch)
                and all(w._version == v for w, v in self._routers))

    def describe(self) -> list[tuple[str, str]]:
        """Per layer, where (attention half, FFN half) run at decode: "kernel" or "torch"."""
        if not self._built or not self._current():
            self.refresh()
        return [("kernel" if p.attn is not None else "torch", "kernel" if p.ffn is not None else "torch")
                for p in self.blocks]

    # ------------------------------------------------------------------------------------------ a step

    def _applies(self, x: Tensor, cos: Tensor, cache: KVCache, start: int, stats: bool | None) -> bool:
        return (not stats and not torch.is_grad_enabled() and start == cache.length and x.is_contiguous()
                and autocast_dtype(x) is None and not _global_hooks()
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self._hooked))

    def takes_rows(self) -> bool:
        """Whether a decode step of several rows (a continuous batch, left-padded) runs on the kernels, in one
        `native.decode_rows` call: every half of every block on the kernels, every MoE layer dropless (no capacity
        factor: a batch's tokens would compete for capacity) and routing to one k. Its MoEAux then carry topk_idx
        without statistics being asked."""
        if not self._built or not self._current():
            self.refresh()
        return (self.table is not None and self.table.k is not None
                and all(b.ffn.cfg.capacity_factor is None for b in self.model.blocks if b.is_moe))

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, start: int,
                 stats: bool | None) -> tuple[Tensor, list[MoEAux]] | None:
        """x after every block for one decode step on the kernels where they apply (module docstring), and one
        MoEAux per MoE layer; None where the kernels do not take this step."""
        if not self._built or not self._current():
            self.refresh()
        if x.dtype != self.dtype or not any(p.attn or p.ffn for p in self.blocks) \
                or not self._applies(x, cos, cache, start, stats):
            return None
        if x.shape[0] > 1 or x.shape[1] > 1 or cache.pad is not None:
            return self._rows(x, cos, sin, cache) if self.takes_rows() else None
        if cos.shape[0] != 1:
            return None
        blocks = self.model.blocks
        if self.table is not None:
            if not self._reserve(cache, 1, 1, x):
                return None
            experts = torch.empty(self.table.n, self.table.k, dtype=torch.int64) if self.table.k else None
            x = native.decode_layers(self.table, x, cos, sin, start, experts)
            cache.lengths[:] = [start + 1] * len(blocks)
            return x, [MoEAux(n_tokens=1, topk_idx=None if experts is None else experts[i:i + 1])
                       for i, b in enumerate(blocks) if b.is_moe]
        auxes = []
        for i, (block, plan) in enumerate(zip(blocks, self.blocks)):
            if plan.attn is not None:
                s = plan.attn.struct
                L = cache.reserve(i, (1, s.G, 1, s.Dh), (1, s.G, 1, s.Dh), x)
                x = native.attention_block(plan.attn, x, cos, sin, cache.k[i], cache.v[i], L)
                cache.lengths[i] = L + 1
            else:
                x = block.attn_half(x, cos, sin, cache, start)
            if plan.ffn is not None:
                x, chosen = native.moe_block(plan.ffn, x)
                aux = MoEAux(n_tokens=1, topk_idx=chosen[None])
            else:
                x, aux = block.ffn_half(x, stats)
            if aux is not None:
                auxes.append(aux)
        return x, auxes

    def _reserve(self, cache: KVCache, rows: int, S: int, like: Tensor) -> bool:
        """Room for S more positions of `rows` rows in every layer's cache (new buffers: like's dtype), the table
        pointed at the buffers; False when the layers' lengths differ."""
        L = cache.length
        for i, plan in enumerate(self.blocks):
            s = plan.attn.struct
            shape = (rows, s.G, S, s.Dh)
            if cache.reserve(i, shape, shape, like) != L:
                return False
            self.table.set_cache(i, cache.k[i], cache.v[i])
        return True

    def _rows(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache) -> tuple[Tensor, list[MoEAux]] | None:
        """S new tokens of each of B rows (left padding cache.pad), row-major: a token's earlier positions are written
        by the same `native.decode_rows` call or an earlier one (`_tokens`)."""
        B, S, D = x.shape
        L = cache.length
        if not self._reserve(cache, B, S, x):
            return None
        r, T = self.table.rot, B * S
        cos, sin = (t.reshape(-1, S, r).expand(B, S, r).reshape(T, r) for t in (cos, sin))  # [S or B·S, r] -> [T, r]
        positions = (L + torch.arange(S)).expand(B, S)
        pad = cache.pad.cpu() if cache.pad is not None else torch.zeros(B, dtype=torch.int64)
        start = torch.minimum(pad[:, None], positions).reshape(T)  # a padding token attends to itself only
        rows = torch.arange(B)[:, None].expand(B, S).reshape(T)
        x, auxes = self._tokens(x.reshape(T, 1, D), cos, sin, positions.reshape(T), start, rows)
        cache.lengths[:] = [L + S] * len(self.blocks)
        return x.view(B, S, D), auxes

    def _tokens(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, start: Tensor,
                rows: Tensor) -> tuple[Tensor, list[MoEAux]]:
        """`native.decode_rows` over T tokens [T, 1, D] in calls of at most ROWS_PER_CALL tokens, in order."""
        outs, experts = [], []
        for c in range(0, x.shape[0], ROWS_PER_CALL):
            part = slice(c, c + ROWS_PER_CALL)
            out, chosen = native.decode_rows(self.table, x[part], cos[part], sin[part], positions[part], start[part],
                                             rows[part])
            outs.append(out)
            experts.append(chosen)
        chosen = torch.cat(experts, 1)
        return torch.cat(outs), [MoEAux(n_tokens=x.shape[0], topk_idx=chosen[i])
                                 for i, b in enumerate(self.model.blocks) if b.is_moe]

    def kv_shapes(self) -> list[tuple[int, int]]:
        """Per layer, (kv heads, head width) of the cache a step on the kernels writes (`takes_rows` models)."""
        if not self._built or not self._current():
            self.refresh()
        return [(p.attn.struct.G, p.attn.struct.Dh) for p in self.blocks]

    def step_tokens(self, ids: Tensor, rows: Tensor, positions: Tensor, start: Tensor,
                    cache: KVCache) -> tuple[Tensor, list[MoEAux]]:
        """One pass over the weights for T tokens placed anywhere in the cache's rows — continuous batching's mixed
        step (Yu et al. 2022; Agrawal et al. 2024, Sarathi): the running rows' next tokens and new rows' whole prompts
        at once. Token t (ids [T]) is at position positions[t] of cache row rows[t], whose left padding ends at
        start[t] (its rotary position: positions[t] − start[t]; it attends to start[t] .. positions[t]); tokens of
        one row in increasing positions. The cache's buffers must hold the rows (`moelab.serve.batch_cache.add_rows`);
        its length becomes max(positions) + 1. Returns (the residual stream after the blocks [T, D] — the logits are
        `model.output` of the rows wanted — and one MoEAux per MoE layer with each token's experts). ValueError when
        the kernels do not take this model (`takes_rows`)."""
        if not self.takes_rows():
            raise ValueError("step_tokens: this model's blocks do not all run on moelab's kernels (takes_rows)")
        model, T = self.model, ids.shape[0]
        L, top = cache.length, int(positions.max()) + 1 if T else cache.length
        if not self._reserve(cache, cache.k[0].shape[0], max(1, top - L), cache.k[0]):
            raise ValueError("step_tokens: the cache's layers hold different lengths")
        x = model.embed_tokens(ids[:, None].to(model.embed.weight.device))  # [T, 1, D]
        angle = positions - start
        if T and (int(angle.min()) < 0 or int(angle.max()) >= model.rope_cos.shape[0]):
            raise ValueError(f"step_tokens: rotary positions positions − start must lie in [0, max_seq_len="
                             f"{model.rope_cos.shape[0]})")
        cos, sin = model.rope_cos[angle], model.rope_sin[angle]
        x, auxes = self._tokens(x.contiguous(), cos, sin, positions, start, rows)
        cache.lengths[:] = [max(L, top)] * len(self.blocks)
        return x[:, 0], auxes

    # ------------------------------------------------------------------------------------------ copies

    def __deepcopy__(self, memo: dict) -> InferenceEngine:
        """An engine for the copied model (built on its first step): the kernels' arguments point into the tensors of
        the model they were built from."""
        model = memo.get(id(self.model))
        return InferenceEngine(model if model is not None else copy.deepcopy(self.model, memo))

    def __getstate__(self) -> dict:
        return {"model": self.model}  # the kernels' arguments are rebuilt wherever the model is loaded

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])


def _global_hooks() -> bool:
    """Whether a global forward hook is registered (torch.nn.modules.module.register_module_forward_hook)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def reports_routes(model: nn.Module) -> bool:
    """Whether the model's decode steps, one row or a batch, return each MoE layer's chosen experts (MoEAux.topk_idx)
    without statistics being asked: its engine runs them on the kernels (`InferenceEngine.takes_rows`). Asking for
    statistics (stats=True) would send the step to the torch code instead."""
    decoder = getattr(model, "decoder", None)
    return isinstance(decoder, InferenceEngine) and decoder.takes_rows()


def install_engine(model: nn.Module) -> InferenceEngine:
    """model.decoder = an InferenceEngine of the model (built on its first step); the engine."""
    model.decoder = InferenceEngine(model)
    return model.decoder
