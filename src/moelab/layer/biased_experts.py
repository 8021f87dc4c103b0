"""gpt-oss's routed experts (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): biased projections and a
clamped SwiGLU, as one `ExpertStore` (`MoEConfig.biases`, activation "clamped_swiglu").

For expert e and a row x [D]:
    h = x · w_in[e] + b_in[e]                      h [2I]: gate and up *interleaved* (gate = h[0::2], up = h[1::2])
    g = min(gate, LIMIT);  u = clamp(up, −LIMIT, LIMIT)
    a = (u + 1) · g · sigmoid(ALPHA · g)            ALPHA = 1.702, LIMIT = 7 (gpt-oss's swiglu_alpha / swiglu_limit)
    y = a · w_out[e] + b_out[e]                     y [D]
Weights keep the Hugging Face layout (w_in [E, D, 2I] interleaved, w_out [E, I, D]), so loading is a copy.
The store has no stacked form for the grouped kernels (`stacked()` is None): `moelab.layer.policy` runs it on the
decode path and the per-expert loop. Legend as in `moelab.layer.experts`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.config.model import MoEConfig
from moelab.layer.experts import INIT_STD, ExpertStore

ALPHA = 1.702  # gpt-oss's swiglu_alpha
LIMIT = 7.0  # gpt-oss's swiglu_limit


def clamped_swiglu(h_nH: Tensor) -> Tensor:
    """a [n, I] from h [n, 2I] with gate and up interleaved (module docstring)."""
    gate, up = h_nH[..., 0::2].clamp(max=LIMIT), h_nH[..., 1::2].clamp(-LIMIT, LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * ALPHA))


class BiasedExperts(ExpertStore):
    """E experts with biases: w_in [E, D, 2I], b_in [E, 2I], w_out [E, I, D], b_out [E, D]; weights drawn
    from N(0, INIT_STD) and N(0, `out_std`), biases zero."""

    def __init__(self, cfg: MoEConfig, out_std: float = INIT_STD) -> None:
        super().__init__()
        self.activation, self.n_experts = cfg.activation, cfg.n_experts
        E, D, I = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.w_in = nn.Parameter(torch.empty(E, D, 2 * I).normal_(std=INIT_STD))
        self.b_in = nn.Parameter(torch.zeros(E, 2 * I))
        self.w_out = nn.Parameter(torch.empty(E, I, D).normal_(std=out_std))
        self.b_out = nn.Parameter(torch.zeros(E, D))

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, w_in={tuple(self.w_in.shape)}, w_out={tuple(self.w_out.shape)}, biases"

    def ffn(self, x_nD: Tensor, e: int, dtype: torch.dtype | None = None) -> Tensor:
        w_in, b_in, w_out, b_out = self.w_in[e], self.b_in[e], self.w_out[e], self.b_out[e]
        if dtype is not None:
            w_in, b_in, w_out, b_out = (t.to(dtype) for t in (w_in, b_in, w_out, b_out))
        return clamped_swiglu(x_nD @ w_in + b_in) @ w_out + b_out
