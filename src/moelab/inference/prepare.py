"""A built model converted for inference: every large linear weight in an inference format (`moelab.inference.formats`),
applied after the model is built (as gpt-fast applies quantization), so `moelab.model` holds no kernels.

    model = prepare_inference(model, quant=None | "int8" | "int4", group_size=32)   # in place; eval mode
    decode_bytes(model, positions)     # bytes of weights and KV cache one decode token reads

What `prepare_inference` converts, and what it keeps:
- attention: q, k and v fused into one projection (`Attention.wqkv`: one product reads them in one pass),
  the output projection; MLA: each of its projections;
- dense FFNs and shared experts: w_in, w_out (`InferenceLinear`);
- routed experts: a stacked `Experts` store becomes a `QuantizedExperts` of per-expert
  gate_up = w_in[e]ᵀ [H, D] and down = w_out[e]ᵀ [D, I]; any other store (one that streams experts from disk,
  or one converted already) is left as it is;
- the output head (with tied embeddings: a copy of the embedding in the head's format; the lookup keeps the
  float table);
- kept float: embeddings, norms, routers and the shared-expert gate (small; the router decides which
  experts run, so its precision is worth more than its bytes).
A weight "int4" cannot take (out_features not a multiple of 16, in_features not a multiple of the group
size) is stored int8 instead; `weight_formats(model)` lists what each weight became. The converted model is
for inference only: its converted weights are no parameters and carry no gradient.

Legend: D = model width, H = first expert projection's width, I = expert hidden width.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.inference.backend import INT4_N_MULTIPLE
from moelab.inference.engine import InferenceEngine, install_engine
from moelab.inference.formats import LinearWeight, check_quant, linear_weight
from moelab.inference.quantized_experts import ExpertWeights, QuantizedExperts, expert_weights
from moelab.layer.experts import Experts
from moelab.layer.moe import MoE
from moelab.model.attention import Attention
from moelab.model.transformer import MoETransformer


class InferenceLinear(nn.Module):
    """nn.Linear's place for inference: y = x·Wᵀ (+ bias) with W a `LinearWeight`; x [..., K] → y [..., N]."""

    def __init__(self, weight: LinearWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.w = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = self.w(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.w!r}, quant={self.w.quant!r}, bias={self.bias is not None}"


def weight_quant(shape: tuple[int, int] | torch.Size, quant: str | None, group_size: int) -> str | None:
    """The format a [N, K] weight gets under `quant`: int4 where it fits, else int8 (module docstring)."""
    N, K = shape
    if quant == "int4" and (N % INT4_N_MULTIPLE or K % group_size):
        return "int8"
    return quant


def expert_quant(gate_up_shape: tuple[int, int] | torch.Size, down_shape: tuple[int, int] | torch.Size,
                 quant: str | None, group_size: int) -> str | None:
    """The one format of an expert's two weights under `quant`: int8 for both where int4 fits only one."""
    fits = {weight_quant(gate_up_shape, quant, group_size), weight_quant(down_shape, quant, group_size)}
    return "int8" if "int8" in fits else quant


def _linear(w: Tensor, bias: Tensor | None, quant: str | None, group_size: int) -> InferenceLinear:
    return InferenceLinear(linear_weight(w, weight_quant(w.shape, quant, group_size), group_size), bias)


def store_experts(experts: Experts, quant: str | None, group_size: int = 32) -> QuantizedExperts:
    """A stacked store (w_in [E, D, H], w_out [E, I, D]) as per-expert weights in format `quant`."""
    out: list[ExpertWeights] = []
    for w_in_DH, w_out_ID in zip(experts.w_in.detach().unbind(0), experts.w_out.detach().unbind(0)):
        gate_up, down = w_in_DH.t(), w_out_ID.t()
        q = expert_quant(gate_up.shape, down.shape, quant, group_size)
        out.append(expert_weights(gate_up, down, q, group_size, experts.activation))
    return QuantizedExperts(out)


@dataclass(frozen=True)
class Slot:
    """A place where `prepare_inference` puts an `InferenceLinear`: attribute `attr` of `parent` (state-dict prefix
    `prefix`), made of the float linears `parts` (their out_features `rows`; q, k and v fused, else one)."""

    parent: nn.Module
    prefix: str
    attr: str
    parts: tuple[str, ...]
    rows: tuple[int, ...] | None = None


def linear_slots(model: MoETransformer) -> Iterator[Slot]:
    """Every linear `prepare_inference` converts (module docstring), on a float, meta or converted model alike."""
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        attn, p = block.attn, f"blocks.{i}."
        if isinstance(attn, Attention):
            q, kv = cfg.n_heads * cfg.head_width, cfg.n_kv_heads * cfg.head_width
            yield Slot(attn, p + "attn.", "wqkv", ("wq", "wk", "wv"), (q, kv, kv))
            yield Slot(attn, p + "attn.", "wo", ("wo",))
        else:  # multi-head latent attention
            for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo"):
                if hasattr(attn, name):
                    yield Slot(attn, p + "attn.", name, (name,))
        ffn, fp = (block.ffn, p + "ffn.") if not block.is_moe else (block.ffn.shared, p + "ffn.shared.")
        if ffn is not None:
            yield Slot(ffn, fp, "w_in", ("w_in",))
            yield Slot(ffn, fp, "w_out", ("w_out",))
    yield Slot(model, "", "head", ("head",))


def moe_stores(model: MoETransformer) -> Iterator[tuple[str, MoE]]:
    """(state-dict prefix of the store, layer) for every MoE layer."""
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            yield f"blocks.{i}.ffn.experts.", block.ffn


def install_linear(slot: Slot, linear: InferenceLinear) -> None:
    """Put `linear` in the slot, removing the float linears it replaces."""
    for part in slot.parts:
        if part != slot.attr:
            delattr(slot.parent, part)
    setattr(slot.parent, slot.attr, linear)


def slot_tensors(model: MoETransformer, slot: Slot) -> list[str]:
    """The state-dict names of the float tensors a slot is made of (a tied head: the embedding's)."""
    if slot.attr == "head" and model.head is None:
        return ["embed.weight"]
    return [f"{slot.prefix}{part}.{kind}" for part in slot.parts for kind in ("weight", "bias")
            if getattr(getattr(slot.parent, part), kind, None) is not None]


@torch.no_grad()
def convert_slot(model: MoETransformer, slot: Slot, quant: str | None, group_size: int) -> None:
    """Replace the float linears of one slot by their `InferenceLinear`; one converted already is kept, or — a float
    one asked for a quantized format — quantized from its float weight. ValueError for a quantized one asked for
    another format (quantizing twice)."""
    current = getattr(slot.parent, slot.attr, None)
    if isinstance(current, InferenceLinear):
        held, w = current.w.quant, current.w
        if quant is None or held == weight_quant((w.out_features, w.in_features), quant, group_size):
            return
        if held is not None:
            raise ValueError(f"{slot.prefix}{slot.attr} is {held}-quantized already: it cannot be converted to "
                             f"quant={quant!r} (convert the float model)")
        setattr(slot.parent, slot.attr, _linear(w.dequantize(w.dtype), current.bias, quant, group_size))
        return
    if slot.attr == "head" and model.head is None:  # tied: the head's own copy of the embedding
        parts = [model.embed]
    else:
        parts = [getattr(slot.parent, part) for part in slot.parts]
    bias = torch.cat([m.bias for m in parts]) if getattr(parts[0], "bias", None) is not None else None
    install_linear(slot, _linear(torch.cat([m.weight for m in parts]), bias, quant, group_size))


@torch.no_grad()
def prepare_inference(model: MoETransformer, quant: str | None = None, group_size: int = 32) -> MoETransformer:
    """Convert `model` in place for inference (module docstring), install its inference engine (`model.decoder`,
    `moelab.inference.engine`: the decode step on moelab's kernels) and return it in eval mode. ValueError for an
    unsupported quant or group size. Idempotent: what is converted already is kept."""
    check_quant(quant, group_size)
    model.eval().requires_grad_(False)
    for slot in linear_slots(model):
        convert_slot(model, slot, quant, group_size)
    for prefix, moe in moe_stores(model):
        if isinstance(moe.experts, Experts):
            moe.experts = store_experts(moe.experts, quant, group_size)
        elif isinstance(moe.experts, QuantizedExperts) and quant is not None:
            moe.experts = _requantized(moe.experts, quant, group_size, prefix)
    if not isinstance(model.decoder, InferenceEngine):
        install_engine(model)
        model.register_state_dict_post_hook(_portable_state_hook)
    model.decoder.invalidate()
    return model


def _requantized(store: QuantizedExperts, quant: str, group_size: int, prefix: str) -> QuantizedExperts:
    """A float QuantizedExperts quantized to `quant` (the store itself where its formats are that already);
    ValueError for experts quantized in another format."""
    out: list[ExpertWeights] = []
    for ew in store.weights:
        gu, dn = ew.gate_up, ew.down
        q = expert_quant((gu.out_features, gu.in_features), (dn.out_features, dn.in_features), quant, group_size)
        if (gu.quant, dn.quant) == (q, q):
            return store
        if gu.quant is not None or dn.quant is not None:
            raise ValueError(f"{prefix[:-1]} holds {gu.quant}-quantized experts: they cannot be converted to "
                             f"quant={quant!r} (convert the float model)")
        out.append(expert_weights(gu.dequantize(gu.dtype), dn.dequantize(dn.dtype), q, group_size, ew.activation))
    return QuantizedExperts(out)


ROW_DIM = {"weight": 0, "qweight": 0, "scale": 0, "scale_zero": 1, "bias": 0}  # the out_features dimension


def portable_state(model: MoETransformer, state: dict[str, Tensor], prefix: str = "") -> None:
    """Rewrite `state` (model's state dict, keys under `prefix`) in place into the portable layout of a converted
    model (`moelab.runs.quantized` states it): each converted linear as its float parts' names with their portable
    tensors (`LinearWeight.tensors()`, fused q|k|v split back into wq, wk, wv), each converted expert store as its
    experts' tensors stacked per projection. Nothing kernel-specific is ever in it."""
    for slot in linear_slots(model):
        linear = getattr(slot.parent, slot.attr, None)
        if not isinstance(linear, InferenceLinear):
            continue
        tensors = dict(linear.w.tensors())
        if linear.bias is not None:
            tensors["bias"] = linear.bias
        for name in [n for n in state if n.startswith(f"{prefix}{slot.prefix}{slot.attr}.")]:
            del state[name]
        rows = slot.rows or (linear.out_features,)
        for key, t in tensors.items():
            for part, block in zip(slot.parts, t.split(list(rows), dim=ROW_DIM[key])):
                state[f"{prefix}{slot.prefix}{part}.{key}"] = block
    for store_prefix, moe in moe_stores(model):
        if not isinstance(moe.experts, QuantizedExperts):
            continue
        for proj in ("gate_up", "down"):
            per_expert = [getattr(ew, proj).tensors() for ew in moe.experts.weights]
            if len({tuple(t) for t in per_expert}) != 1:
                raise ValueError(f"{store_prefix[:-1]}: the experts' {proj} weights are in different formats")
            for key in per_expert[0]:
                state[f"{prefix}{store_prefix}{proj}.{key}"] = torch.stack([t[key] for t in per_expert])


def _portable_state_hook(module: MoETransformer, state: dict[str, Tensor], prefix: str, local_metadata) -> None:
    portable_state(module, state, prefix)


def weight_formats(model: nn.Module) -> Counter:
    """How many weights of each format a converted model holds: Counter({"int4": …, "int8": …, None: …})."""
    counts: Counter = Counter()
    for m in model.modules():
        if isinstance(m, InferenceLinear):
            counts[m.w.quant] += 1
        elif isinstance(m, QuantizedExperts):
            for ew in m.weights:
                counts.update([ew.gate_up.quant, ew.down.quant])
    return counts


def check_inference_device(model: nn.Module, device: str, name: str = "the model") -> None:
    """ValueError when a model holding weights converted for CPU inference (`prepare_inference`: packed or
    quantized, kept outside the module's parameters, so `.to(device)` would not move them) is to run on
    another device than the CPU."""
    formats = {f or "float" for f in weight_formats(model)}
    if formats and device != "cpu":
        raise ValueError(f"device={device!r}: {name} holds weights converted for CPU inference "
                         f"({', '.join(sorted(formats))}), which run on the CPU")


def decode_bytes(model: MoETransformer, positions: int) -> int:
    """Bytes one decode token reads with `positions` cached positions: the converted linear weights, the top_k
    experts of every MoE layer (at their mean size), the routers, and the KV cache (in the model's dtype)."""
    total = 0
    for m in model.modules():
        if isinstance(m, InferenceLinear):
            total += m.w.nbytes
    for moe in model.moe_layers():
        total += moe.router.weight.numel() * moe.router.weight.element_size()
        if isinstance(moe.experts, QuantizedExperts):
            total += moe.experts.nbytes * moe.cfg.top_k // moe.experts.n_experts
    cfg = model.cfg
    kv_width = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) \
        if cfg.attention == "mla" else 2 * cfg.n_kv_heads * cfg.head_width
    return total + cfg.n_layers * positions * kv_width * model.embed.weight.element_size()
