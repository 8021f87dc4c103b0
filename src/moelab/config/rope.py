"""`RopeScaling`: RoPE context extension by YaRN, a field of `moelab.config.ModelConfig` (no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moelab.config.fields import _choice, _fail, _JsonMixin, _nonneg_number, _positive_int

ROPE_SCALINGS = ("yarn",)


@dataclass(frozen=True)
class RopeScaling(_JsonMixin):
    """RoPE context extension by YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large
    Language Models"), with the field names and semantics of transformers' `rope_parameters` (rope_type "yarn").

    Frequencies ("NTK-by-parts"): for rotary pair i of a width-`dim` head, inv_freq_i = θ^(−2i/dim) is kept
    where a wavelength fits ≥ beta_fast times into `original_max_seq_len`, divided by `factor` where it fits
    ≤ beta_slow times, and blended linearly in between over the pair indices
        d(b) = dim · ln(original_max_seq_len / (2π·b)) / (2 ln θ)     low = d(beta_fast), high = d(beta_slow)
    (floored / ceiled when `truncate`). cos and sin are multiplied by the attention factor
        attention_factor, or mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set
        (non-zero), else mscale(factor),       where mscale(s, m) = 0.1·m·ln s + 1 for s > 1, else 1.
    MLA attention (DeepSeek-V2/V3) also multiplies its softmax scale by mscale(factor, mscale_all_dim)² when
    mscale_all_dim is set; grouped-query attention does not (as in transformers' Mixtral/Qwen/OLMoE).

    Fields:
        factor: context extension ratio s (>= 1).
        original_max_seq_len: context length the model was pre-trained with (transformers'
            original_max_position_embeddings).
        type: "yarn" (the only scaling implemented).
        beta_fast / beta_slow: rotation counts bounding the blend (32 / 1 in the paper).
        mscale / mscale_all_dim: DeepSeek's temperature multipliers (None = unset).
        attention_factor: explicit cos/sin multiplier (None = derived as above).
        truncate: round the blend bounds to whole pairs (transformers' default True).
    """

    factor: float
    original_max_seq_len: int
    type: str = "yarn"
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopeScaling:
        missing = [n for n in ("factor", "original_max_seq_len") if n not in data]
        if missing:
            raise ValueError(f"rope_scaling: field(s) {missing} missing: factor and original_max_seq_len are required")
        return super().from_dict(data)

    def validate(self) -> None:
        _choice("rope_scaling.type", self.type, ROPE_SCALINGS)
        if not isinstance(self.factor, (int, float)) or isinstance(self.factor, bool) or not self.factor >= 1:
            _fail("rope_scaling.factor", self.factor, "a number >= 1")
        _positive_int("rope_scaling.original_max_seq_len", self.original_max_seq_len)
        for name in ("beta_fast", "beta_slow"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                _fail(f"rope_scaling.{name}", v, "a number > 0")
        if not self.beta_fast >= self.beta_slow:
            _fail("rope_scaling.beta_fast", self.beta_fast, f"a number >= beta_slow ({self.beta_slow})")
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _nonneg_number(f"rope_scaling.{name}", getattr(self, name))
        af = self.attention_factor
        if af is not None and (not isinstance(af, (int, float)) or isinstance(af, bool) or not af > 0):
            _fail("rope_scaling.attention_factor", af, "None or a number > 0")
        if not isinstance(self.truncate, bool):
            _fail("rope_scaling.truncate", self.truncate, "true or false")
