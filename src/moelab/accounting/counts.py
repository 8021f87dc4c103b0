"""Total and active parameters of an MoE language model, with a breakdown by kind.

Total = every stored parameter (what `sum(p.numel() for p in model.parameters())` gives).
Active = the parameters one token's forward pass uses: everything except the routed experts, of which
top_k per layer count (Shazeer et al. 2017; the "active parameters" of Mixtral, DeepSeek-V3, ...).

Vendors disagree on whether the vocabulary matrices are "active", so three numbers are reported:
- `active`: all embeddings counted — input embedding and output head (Mistral's 12.9B for
  Mixtral-8x7B, OLMoE, Qwen, DBRX, Phi-3.5-MoE count this way).
- `active_no_input_embedding`: without the input embedding, a row lookup rather than a matmul; the
  output head stays (gpt-oss model card Table 1; DeepSeek-V2/V3 and Kimi-K2 figures fit this one).
  With tied embeddings the matrix is the output head too, so it stays and this equals `active`.
- `active_no_embeddings`: without any vocabulary matrix (GLM-4.5 and Granite figures fit this one).
`activation_ratio` = active / total, both with all embeddings counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.accounting.spec import ModelSpec, spec_from_model_config
from moelab.config.model import ModelConfig

CATEGORIES = ("input_embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "routers",
              "norms", "output_head")


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one model (main model; MTP modules and vision encoder reported apart).

    breakdown / active_breakdown: per category (see CATEGORIES) total and per-token active counts.
    mtp / mtp_active: multi-token-prediction modules (not in total or active).
    vision: vision encoder + projector of a multimodal model (not in total or active).
    """

    name: str
    model_type: str
    total: int
    active: int
    active_no_input_embedding: int
    active_no_embeddings: int
    breakdown: dict[str, int]
    active_breakdown: dict[str, int]
    tied_embeddings: bool
    mtp: int = 0
    mtp_active: int = 0
    vision: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def activation_ratio(self) -> float:
        """active / total, all embeddings counted in both."""
        return self.active / self.total

    @property
    def total_no_embeddings(self) -> int:
        """total without the vocabulary matrices (the "non-embedding" count of Qwen model cards)."""
        return self.total - self.breakdown["input_embedding"] - self.breakdown["output_head"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model_type": self.model_type, "total_params": self.total,
            "active_params": self.active, "active_params_no_input_embedding": self.active_no_input_embedding,
            "active_params_no_embeddings": self.active_no_embeddings,
            "activation_ratio": self.activation_ratio, "total_params_no_embeddings": self.total_no_embeddings,
            "tied_embeddings": self.tied_embeddings, "breakdown": dict(self.breakdown),
            "active_breakdown": dict(self.active_breakdown), "mtp_params": self.mtp,
            "mtp_active_params": self.mtp_active, "vision_params": self.vision, "notes": list(self.notes),
        }


def _layers_breakdown(layers) -> tuple[dict[str, int], dict[str, int]]:
    total = dict.fromkeys(CATEGORIES, 0)
    active = dict.fromkeys(CATEGORIES, 0)

    def add(cat: str, t: int, a: int) -> None:
        total[cat] += t
        active[cat] += a

    for layer in layers:
        att, ffn = layer.attention, layer.ffn
        add("norms", layer.norms + att.norms, layer.norms + att.norms)
        add("attention", att.params, att.params)
        if att.experts is not None:
            add("attention", att.experts.total, att.experts.active)
            add("routers", att.experts.router, att.experts.router)
        add("dense_ffn", ffn.dense, ffn.dense)
        add("shared_experts", ffn.shared, ffn.shared)
        add("routed_experts", ffn.fixed, ffn.fixed)
        if ffn.experts is not None:
            add("routed_experts", ffn.experts.total, ffn.experts.active)
            add("routers", ffn.experts.router, ffn.experts.router)
    return total, active


def count_spec(spec: ModelSpec) -> ParamCount:
    """Count a `ModelSpec`: per-category sums over its layers plus embeddings, final norm and head."""
    total, active = _layers_breakdown(spec.layers)
    for cat, n in (("input_embedding", spec.input_embedding), ("output_head", spec.output_head),
                   ("norms", spec.final_norm)):
        total[cat] += n
        active[cat] += n
    mtp_total, mtp_active = _layers_breakdown(spec.mtp_layers)
    n_active = sum(active.values())
    vocab = spec.input_embedding + spec.output_head
    return ParamCount(
        name=spec.name, model_type=spec.model_type, total=sum(total.values()), active=n_active,
        active_no_input_embedding=n_active if spec.tied else n_active - spec.input_embedding,
        active_no_embeddings=n_active - vocab, breakdown=total, active_breakdown=active,
        tied_embeddings=spec.tied,
        mtp=sum(mtp_total.values()) + spec.mtp_extra if spec.mtp_layers else 0,
        mtp_active=sum(mtp_active.values()) + spec.mtp_extra if spec.mtp_layers else 0,
        vision=spec.vision, notes=spec.notes)


def to_spec(source: ModelConfig | ModelSpec | dict[str, Any] | str | Path) -> ModelSpec:
    """Normalise anything `count_params` accepts to a `ModelSpec`.

    source: a moelab `ModelConfig`; a `ModelSpec`; a dict holding a Hugging Face config (or a moelab
    `ModelConfig.to_dict()`); a path to a `config.json` or to a directory holding one; the name of a
    preset shipped in `moelab/presets/` (see `list_presets()`); or the name of a training preset
    (`moelab.config.PRESETS`).
    """
    from moelab.accounting import hf_configs, presets

    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, ModelConfig):
        return spec_from_model_config(source)
    if isinstance(source, dict):
        return hf_configs.spec_from_dict(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.exists():
            return hf_configs.spec_from_path(path)
        if isinstance(source, Path):
            raise ValueError(f"{source}: no such config.json or model directory")
        return presets.spec_of_name(source)
    raise ValueError(
        f"cannot count parameters of a {type(source).__name__}: pass a ModelConfig, a config dict, "
        "a path to config.json or a model directory, or a preset name")


def count_params(source: ModelConfig | ModelSpec | dict[str, Any] | str | Path) -> ParamCount:
    """Total and active parameters of a model, with a breakdown.

    source: a moelab `ModelConfig`, a Hugging Face config dict, a path to `config.json` or a model
    directory, or a preset name ("mixtral-8x7b", or a training preset such as "tiny"). Raises ValueError
    naming the problem for an unknown `model_type`, a missing, malformed or out-of-range field, or an
    unreadable file.
    """
    return count_spec(to_spec(source))
