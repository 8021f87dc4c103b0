"""Attention layers and their cache: grouped-query attention with RoPE (`Attention`; Ainslie et al. 2023,
optional q/k RMSNorm, gpt-oss's output bias, sinks and sliding windows), DeepSeek-V2/V3 multi-head latent
attention (`MLAttention`), and the per-layer KV cache generation writes in place (`KVCache`).

A batch of prompts of different lengths is left-padded (`KVCache.pad`): row b's first pad[b] positions are
padding (see `moelab.model`).

Legend: B = batch, S = sequence (new tokens), L = cached + new positions, H = heads, G = kv heads,
Dh = head width, D = model width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.config.model import ModelConfig
from moelab.model.attend import attend
from moelab.model.cache import KVCache
from moelab.model.init import init_linear, residual_std
from moelab.model.norm import RMSNorm
from moelab.model.rope import apply_rope, yarn_mscale


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k RMSNorm and, for gpt-oss, an output bias, attention
    sinks and a sliding window (`moelab.model.attend`)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_width
        self.rot = cfg.rotary_dim or self.hd  # channels RoPE rotates
        D = cfg.d_model
        self.wq = init_linear(nn.Linear(D, self.n_heads * self.hd, bias=cfg.qkv_bias))
        self.wk = init_linear(nn.Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias))
        self.wv = init_linear(nn.Linear(D, self.n_kv * self.hd, bias=cfg.qkv_bias))
        self.wo = init_linear(nn.Linear(self.n_heads * self.hd, D, bias=cfg.o_bias), residual_std(cfg))
        self.wqkv: nn.Module | None = None  # q|k|v fused into one projection for inference (moelab.inference)
        self.qk_norm, self.scale = cfg.qk_norm, cfg.attn_scale  # scale None: 1/sqrt(Dh)
        self.window = cfg.layer_window(layer)  # gpt-oss: sliding window on alternate layers
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None  # gpt-oss
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int) -> Tensor:
        B, S, _ = x.shape
        if self.wqkv is not None and self.qk_norm != "full":
            q, k, v = self._qkv_fused(x, cos, sin)
        else:
            q, k, v = self._qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, start, self.scale, self.window, self.sinks, cache.pad if cache is not None else None)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.wo.in_features))

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, S, Dh], k and v [B, G, S, Dh]: projected, q/k-normed and rotated."""
        B, S, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = self.wqkv(x).split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.hd).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(B, S, self.n_kv, self.hd).transpose(1, 2)  # [B, G, S, Dh]
        v = v.view(B, S, self.n_kv, self.hd).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _qkv_fused(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`_qkv` from the fused projection (inference): one product for q, k and v."""
        B, S, _ = x.shape
        H, G = self.n_heads, self.n_kv
        qkv = self.wqkv(x).view(B, S, H + 2 * G, self.hd).transpose(1, 2)  # [B, H + 2G, S, Dh]
        qk, v = qkv[:, :H + G], qkv[:, H + G:]
        q, k = qk[:, :H], qk[:, H:]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, 2024): keys/values from a compressed latent.

    q = W_qb · norm(W_qa · x) (or W_q · x);  [c_kv | k_rope] = W_kva · x;
    [k_nope | v] = W_kvb · norm(c_kv) per head; k = [k_nope | rope(k_rope) shared by heads].
    The cache here holds the decompressed keys and values (simple and exact; the compressed-cache
    saving is reported by `moelab.accounting`).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        H, D = cfg.n_heads, cfg.d_model
        self.H, self.nope, self.rope, self.vd = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.wq = init_linear(nn.Linear(D, H * qk, bias=False))
        else:
            self.wq_a = init_linear(nn.Linear(D, cfg.q_lora_rank, bias=False))
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = init_linear(nn.Linear(cfg.q_lora_rank, H * qk, bias=False))
        self.wkv_a = init_linear(nn.Linear(D, self.kv_rank + self.rope, bias=False))
        self.kv_a_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wkv_b = init_linear(nn.Linear(self.kv_rank, H * (self.nope + self.vd), bias=False))
        self.wo = init_linear(nn.Linear(H * self.vd, D, bias=False), residual_std(cfg))
        self.scale = qk ** -0.5
        s = cfg.rope_scaling
        if s is not None and s.mscale_all_dim:  # DeepSeek-V2/V3 YaRN: softmax scale × mscale(factor, all_dim)²
            self.scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, start: int) -> Tensor:
        B, S, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q = q.view(B, S, self.H, self.nope + self.rope).transpose(1, 2)  # [B, H, S, nope+rope]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.wkv_b(self.kv_a_norm(c_kv)).view(B, S, self.H, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k_rope = apply_rope(k_rope.view(B, 1, S, self.rope), cos, sin).expand(B, self.H, S, self.rope)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attend(q, k, v, start, scale=self.scale, pad=cache.pad if cache is not None else None)
        return self.wo(out.transpose(1, 2).reshape(B, S, self.wo.in_features))
