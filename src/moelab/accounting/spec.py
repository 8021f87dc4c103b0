"""A model's parameter layout, reduced to what accounting needs (no torch).

`ModelSpec` is the one intermediate form between a config (moelab's `ModelConfig` or a Hugging Face
`config.json`) and every number `moelab card` prints: parameter counts come from its integers, FLOPs
and KV-cache sizes from its attention shapes, decode bounds from its expert sizes. Each adapter
(`spec_from_model_config` here, `moelab.accounting.hf_configs` for Hugging Face) fills it in once, so
the counting and cost formulas exist once.

Counting conventions used throughout:
- Every number is a count of stored parameters (tensor elements), the quantity `sum(p.numel())` gives.
  Buffers (RoPE tables, DeepSeek-V3's selection-only expert bias) are not parameters.
- "Routed" parameters belong to one of `n_experts` interchangeable experts of which `top_k` run per
  token; everything else runs for every token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moelab.config.hf import MAX_EXPERTS, MAX_INT, MAX_LAYERS
from moelab.config.model import ModelConfig


@dataclass(frozen=True)
class ExpertBank:
    """A bank of `n` routed experts of which `top_k` run per token.

    params_each: parameters of one expert (its matrices and biases).
    router: parameters of the router that picks them (weight, and bias if any).
    n_groups / topk_groups: group-limited routing (DeepSeek-V2 device-limited, DeepSeek-V3
        node-limited): the experts form n_groups equal groups and a token's top_k lie in at most
        topk_groups of them; 1 / 1 = no limit. Parameter counts do not depend on it.
    """

    n: int
    top_k: float
    params_each: int
    router: int
    n_groups: int = 1
    topk_groups: int = 1

    @property
    def total(self) -> int:
        return self.n * self.params_each

    @property
    def active(self) -> int:
        """top_k experts' parameters (an integer whenever top_k is)."""
        return round(self.top_k * self.params_each)


@dataclass(frozen=True)
class AttentionSpec:
    """One attention block.

    params: parameters that run for every token (projections, biases, attention sinks); norms inside
        attention (q/k norms, MLA's latent norms) are in `norms`, not here.
    norms: q/k-norm and MLA latent-norm parameters.
    experts: mixture-of-attention experts (JetMoE's query/output projections), else None.
    n_heads / qk_head_dim / v_head_dim: what one token's attention computes — n_heads query heads
        with scores of width qk_head_dim and values of width v_head_dim.
    kv_cache_width: elements cached per token in this layer (K and V of every KV head, or MLA's
        compressed latent plus the shared RoPE key).
    window: sliding-window or chunk length (the most tokens one query attends to and the most the
        cache must hold for this layer); None means the whole context.
    """

    params: int
    norms: int
    n_heads: int
    qk_head_dim: int
    v_head_dim: int
    kv_cache_width: int
    window: int | None = None
    experts: ExpertBank | None = None
    kind: str = "gqa"


@dataclass(frozen=True)
class FFNSpec:
    """One feed-forward block: a dense FFN, or routed experts (+ shared experts), or both.

    dense: parameters of a dense FFN (0 in MoE layers).
    experts: the routed experts and their router, or None in dense layers.
    shared: always-on shared experts, including a shared-expert gate if any.
    fixed: other always-on parameters of an MoE block (JetMoE's output bias), counted with the
        routed experts in the breakdown but active for every token.
    """

    dense: int = 0
    experts: ExpertBank | None = None
    shared: int = 0
    fixed: int = 0


@dataclass(frozen=True)
class LayerSpec:
    """One transformer block: attention, feed-forward, and its own norms (pre-attention, pre-FFN...)."""

    attention: AttentionSpec
    ffn: FFNSpec
    norms: int


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only language model as accounting sees it.

    input_embedding: vocab_size × d_model (the matrix; a lookup reads one row per token).
    output_head: the unembedding matrix (+ bias), 0 when tied to the input embedding.
    tied: the output head is the input embedding matrix (counted once, as input_embedding).
    final_norm: the norm before the head.
    mtp: multi-token-prediction modules (DeepSeek-V3, GLM-4.5), counted apart from the main model;
        each is a transformer block plus `mtp_extra` parameters (DeepSeek-V3 eq. 21: the projection
        M ∈ R^{d×2d} and its norms); embedding and head are shared with the main model.
    vision: parameters of a vision encoder and projector (Llama 4), counted apart from the text model.
    """

    name: str
    model_type: str
    vocab_size: int
    d_model: int
    input_embedding: int
    output_head: int
    tied: bool
    final_norm: int
    layers: tuple[LayerSpec, ...]
    mtp_layers: tuple[LayerSpec, ...] = ()
    mtp_extra: int = 0
    vision: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def swiglu_params(d: int, f: int) -> int:
    """A SwiGLU FFN: gate and up d×f, down f×d (Shazeer 2020) = 3·d·f."""
    return 3 * d * f


def spec_from_model_config(cfg: ModelConfig, name: str = "moelab") -> ModelSpec:
    """The layout of moelab's own `MoETransformer` built from `cfg`.

    Per block: two RMSNorms (d each); attention (below); in dense layers an FFN of width d_ff with
    `cfg.activation` (SwiGLU 3·d·d_ff, GELU 2·d·d_ff); in MoE layers a router E×d (no bias; the
    selection bias is a buffer), E stacked experts (SwiGLU d·2f + f·d, GELU d·f + f·d with
    f = d_expert), one fused shared FFN of width `moe.shared_width` with the experts' activation,
    and d more for the shared gate.
    Attention "gqa": wq d×(H·hd), wk and wv d×(H_kv·hd), wo (H·hd)×d, biases on q, k, v when
    `qkv_bias`, on wo (d) when `o_bias`, H sink logits when `attn_sinks`; qk_norm "head" adds 2·hd,
    "full" adds H·hd + H_kv·hd. With `moe.biases` (gpt-oss) each expert adds 2f + d biases and the
    router E. Router "noisy_topk" adds its noise weight W_noise E×d to the router (Shazeer et al. 2017),
    counted as active too: a training forward uses it (eval and decode do not).
    Attention "mla" (DeepSeek-V2 §2.1): wq_a d×r_q, q_a_norm r_q, wq_b r_q×H·(nope+rope), or
    wq d×H·(nope+rope) without q_lora_rank; wkv_a d×(r_kv + rope); kv_a_norm r_kv;
    wkv_b r_kv×H·(nope+v); wo H·v×d.
    Plus the embedding V×d, the head V×d unless tied, and a final RMSNorm d.
    Integer fields beyond the bounds of `moelab.config.hf` (n_layers <= MAX_LAYERS, moe.n_experts <=
    MAX_EXPERTS, others <= MAX_INT) are a ValueError, as for a Hugging Face config.
    """
    _check_bounds(cfg)
    d, H = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is not None:
            q = d * cfg.q_lora_rank + cfg.q_lora_rank * H * qk
            q_norm = cfg.q_lora_rank
        else:
            q, q_norm = d * H * qk, 0
        params = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                  + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * d)
        attention = AttentionSpec(
            params=params, norms=q_norm + cfg.kv_lora_rank, n_heads=H, qk_head_dim=qk,
            v_head_dim=cfg.v_head_dim, kv_cache_width=cfg.kv_lora_rank + cfg.qk_rope_head_dim, kind="mla")
    else:
        hd, kv = cfg.head_width, cfg.n_kv_heads
        norms = {"none": 0, "head": 2 * hd, "full": H * hd + kv * hd}[cfg.qk_norm]
        bias = (H * hd + 2 * kv * hd if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0) + (H if cfg.attn_sinks else 0)
        attention = AttentionSpec(
            params=2 * d * H * hd + 2 * d * kv * hd + bias, norms=norms, n_heads=H, qk_head_dim=hd,
            v_head_dim=hd, kv_cache_width=2 * kv * hd, kind="gqa")
    layers = []
    for i in range(cfg.n_layers):
        if cfg.attention == "gqa":
            attention = dataclasses.replace(attention, window=cfg.layer_window(i))
        if cfg.is_moe_layer(i):
            moe = cfg.moe
            assert moe is not None
            f, w = moe.d_expert, moe.shared_width
            per_matrix_pair = 2 if moe.activation == "gelu" else 3  # SwiGLU: gate, up, down
            biases = 2 * f + d if moe.biases else 0  # gpt-oss: on both projections, and on the router's logits
            router_mats = 2 if moe.router == "noisy_topk" else 1  # W_g, and W_noise for noisy top-k gating
            ffn = FFNSpec(
                experts=ExpertBank(n=moe.n_experts, top_k=moe.top_k, params_each=per_matrix_pair * d * f + biases,
                                router=moe.n_experts * (d * router_mats + moe.biases), n_groups=moe.n_groups,
                                topk_groups=moe.topk_groups),
                shared=per_matrix_pair * d * w + (d if moe.shared_gate else 0))
        else:
            ffn = FFNSpec(dense=(3 if cfg.activation == "swiglu" else 2) * d * cfg.d_ff)
        layers.append(LayerSpec(attention=attention, ffn=ffn, norms=2 * d))
    return ModelSpec(
        name=name, model_type="moelab", vocab_size=cfg.vocab_size, d_model=d,
        input_embedding=cfg.vocab_size * d, output_head=0 if cfg.tie_embeddings else cfg.vocab_size * d,
        tied=cfg.tie_embeddings, final_norm=d, layers=tuple(layers))


def _check_bounds(cfg: ModelConfig) -> None:
    fields = {**cfg.to_dict(), **{f"moe.{k}": v for k, v in (cfg.moe.to_dict() if cfg.moe else {}).items()}}
    for name, value in fields.items():
        limit = MAX_LAYERS if name == "n_layers" else MAX_EXPERTS if name == "moe.n_experts" else MAX_INT
        if isinstance(value, int) and value > limit:
            raise ValueError(f"{name}={value} is invalid: allowed an integer <= {limit} (moelab.accounting's bound)")
