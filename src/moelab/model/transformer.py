"""The decoder-only MoE language model: blocks of attention (GQA or MLA, `moelab.model.attention`) with RoPE and
RMSNorm (`moelab.model.norm`, `moelab.model.rope`), and dense or MoE FFNs.

Pre-norm blocks  x = x + attn(norm(x));  x = x + ffn(norm(x)),  where ffn is a dense FFN for the first
`n_dense_layers` (and the non-MoE layers when `moe_every` > 1) and an `MoE` layer elsewhere
(DeepSeek-V3's `first_k_dense_replace`). Attention is causal `scaled_dot_product_attention` with
rotary position embeddings (Su et al. 2021, rotate-half convention; optionally extended by YaRN, Peng et
al. 2023) and grouped-query heads (Ainslie et al. 2023), optional q/k RMSNorm (OLMoE "full", Qwen3 "head"),
or DeepSeek-V2/V3 multi-head latent attention (MLA). Generation uses a per-layer KV cache (`KVCache`).
Granite's multipliers (`ModelConfig.embed_scale`, `residual_scale`, `logits_scaling`, `attn_scale`) scale
the embeddings, each block's two residual branches, the logits and the attention scores.

A batch of prompts of different lengths is left-padded (`KVCache.pad`): row b's first pad[b] positions are
padding. Its tokens then take positions p − pad[b] (each prompt's rotary positions are those it has alone)
and attend only to keys at positions ≥ pad[b], so padding changes no real token's output; a pad query
attends to itself alone (finite, and read by no one).

The model holds no kernels. An inference engine (`moelab.inference.engine`, installed by `prepare_inference`) may
install a decode step on a built model (`MoETransformer.decoder`): outside training mode, the forward hands it
each step's embedded tokens with the cache, and runs the blocks' own torch code wherever it answers None.
Moving or casting the model (`Module.to`, `.float()`, ...) tells the installed step to rebuild.

Legend: B = batch, S = sequence (new tokens), L = cached + new positions, H = heads, G = kv heads,
Dh = head width, D = model width, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config.model import ModelConfig
from moelab.layer.experts import INIT_STD, FeedForward
from moelab.layer.moe import MoE, MoEAux
from moelab.model.attention import Attention, MLAttention
from moelab.model.cache import KVCache
from moelab.model.init import init_linear, residual_std
from moelab.model.norm import RMSNorm
from moelab.model.rope import model_rope_tables


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is an `MoE` layer or a dense `FeedForward`."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        std = residual_std(cfg)
        self.ffn = MoE(cfg.moe, std) if self.is_moe else FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, std)
        self.dropout = nn.Dropout(cfg.dropout)
        self.residual_scale = cfg.residual_scale  # Granite's residual_multiplier (1: none)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int,
                stats: bool | None = None) -> tuple[Tensor, MoEAux | None]:
        """x [B, S, D] → (x after both halves, the MoE layer's MoEAux or None for a dense block)."""
        return self.ffn_half(self.attn_half(x, cos, sin, cache, start), stats)

    def attn_half(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int) -> Tensor:
        """x + residual_scale · dropout(attn(attn_norm(x)))."""
        return x + self._scaled(self._drop(self.attn(self.attn_norm(x), cos, sin, cache, start)))

    def ffn_half(self, x: Tensor, stats: bool | None = None) -> tuple[Tensor, MoEAux | None]:
        """x + residual_scale · dropout(ffn(ffn_norm(x))), and the MoE layer's MoEAux (None for a dense FFN)."""
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, stats)
        else:
            y, aux = self.ffn(h), None
        return x + self._scaled(self._drop(y)), aux

    def _drop(self, y: Tensor) -> Tensor:
        return self.dropout(y) if self.training and self.dropout.p > 0 else y  # identity otherwise: skip the call

    def _scaled(self, y: Tensor) -> Tensor:
        return y if self.residual_scale == 1.0 else y * self.residual_scale


class DecodeStep(Protocol):
    """A decode step installed on a built model by an inference engine (`moelab.inference.engine`): called with the
    embedded tokens x [B, S, D], the rotary tables, the cache and the start position, it returns (x after every
    block, one MoEAux per MoE layer) — or None where it does not apply, and the blocks' own code runs."""

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, start: int,
                 stats: bool | None) -> tuple[Tensor, list[MoEAux]] | None: ...

    def invalidate(self) -> None: ...


@dataclass
class ModelOutput:
    """logits [B, S, V]; loss: mean next-token cross-entropy when targets were given (NaN for zero
    tokens); aux_loss: the sum of the MoE layers' weighted auxiliary losses (add it to `loss` to
    train; zero when the statistics were not computed, see `moelab.layer.moe`); aux: one MoEAux per MoE layer."""

    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: list[MoEAux] = field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only LM: input_ids [B, S] → ModelOutput(logits [B, S, V], loss, aux_loss, aux)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else init_linear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        self.set_rope_tables()
        self.decoder: DecodeStep | None = None  # installed by an inference engine (module docstring)

    def _apply(self, fn, recurse: bool = True):
        """Module.to / float / cuda / ... move or cast the tensors: an installed decode step, which holds pointers
        into them, is told to rebuild before its next step."""
        if self.decoder is not None:
            self.decoder.invalidate()
        return super()._apply(fn, recurse)

    def set_rope_tables(self) -> None:
        """(Re)compute the rotary tables from the config, in float32 on the default device (buffers not saved
        with the weights): a model built on the meta device gets real ones here after `to_empty`."""
        cos, sin = model_rope_tables(self.cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, cache: KVCache | None = None,
                start: int | None = None, stats: bool | None = None) -> ModelOutput:
        """input_ids [B, S] (zero tokens give empty logits) → ModelOutput; `stats`: compute the MoE
        layers' statistics (None: when grad is enabled; True also under no_grad, for routing analytics)."""
        self._check_ids(input_ids)
        B, S = input_ids.shape
        start = (cache.length if cache is not None else 0) if start is None else start
        if start + S > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {start + S} positions exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        if cache is not None and cache.pad is not None:  # left-padded rows: positions p − pad[b], [B, 1, S, Dr]
            if cache.pad.shape != (B,):
                raise ValueError(f"cache.pad has shape {tuple(cache.pad.shape)}: expected one entry per row ({B},)")
            pos = (start + torch.arange(S, device=input_ids.device))[None, :] - cache.pad[:, None]
            pos = pos.clamp_min(0)
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        x = self.embed_tokens(input_ids)
        auxes: list[MoEAux] = []
        stepped = None
        if self.decoder is not None and cache is not None and not self.training:
            stepped = self.decoder(x, cos, sin, cache, start, stats)  # None where the installed step does not apply
        if stepped is not None:
            x, auxes = stepped
        else:
            for block in self.blocks:
                x, aux = block(x, cos, sin, cache, start, stats)
                if aux is not None:
                    auxes.append(aux)
        logits = self.output(x)
        loss = None
        if targets is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least (bf16 logits)
            loss = F.cross_entropy(wide.view(-1, logits.shape[-1]), targets.reshape(-1))
        aux_loss = sum((a.total_loss for a in auxes if a.losses), logits.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, aux=auxes)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """The residual stream's input: the ids' embeddings (times Granite's embedding_multiplier)."""
        x = self.embed(input_ids)
        return x * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else x

    def output(self, x: Tensor) -> Tensor:
        """Logits of the residual stream after the blocks: final norm, head (or the tied embedding), Granite's
        logits_scaling."""
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        return logits / self.cfg.logits_scaling if self.cfg.logits_scaling != 1.0 else logits

    def _check_ids(self, input_ids: Tensor) -> None:
        """[batch, seq] integer ids in [0, vocab_size): one min/max read (a host sync on a GPU)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be integer token ids (torch.long or torch.int32); got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"input_ids hold ids in [{lo}, {hi}]: allowed 0 <= id < vocab_size="
                                 f"{self.cfg.vocab_size}")

    @torch.no_grad()
    def update_expert_biases(self, loads: list[Tensor]) -> None:
        """Auxiliary-loss-free balancing for every MoE layer, after optimizer.step(): `loads[i]` is the
        per-expert load of MoE layer i observed in that step (summed over micro-batches)."""
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.update_expert_bias(load)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
