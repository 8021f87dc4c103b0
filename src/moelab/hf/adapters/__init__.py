"""One adapter per Hugging Face MoE architecture: config mapping and the tensor-name/shape table.

An adapter knows, for one `model_type`, how a Hugging Face `config.json` maps to a moelab
`ModelConfig` (and back), and which Hugging Face tensors make up each moelab tensor. The table is a
list of `Entry`: one Hugging Face tensor name and shape, the moelab state-dict name it lands in, the
index inside that tensor, and the layout change on the way (transpose, row permutation). The same
table drives loading (`moelab.hf.load`) and export (`moelab.hf.save`), so the two are inverses by
construction.

Layouts (legend: E = experts, D = model width, F = expert hidden width, S = shared/dense hidden width):
    moelab  experts.w_in [E, D, 2F] = [gate | up] columns for x @ w;  experts.w_out [E, F, D]
            dense / shared FFN  w_in.weight [2S, D] (gate rows, then up rows);  w_out.weight [D, S]
    HF      per expert  gate_proj / up_proj [F, D], down_proj [D, F]  (Mixtral: w1 / w3 / w2)
            or stacked  experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F] (transformers 5
            in memory; accepted on load)

Supported: Mixtral, Qwen2-MoE (sigmoid-gated shared expert), Qwen3-MoE (per-head q/k norm), OLMoE
(full-width q/k norm), DeepSeek-V3 (MLA, sigmoid router with score-correction bias, group-limited
routing, shared experts, dense first layers; interleaved RoPE handled by permuting weight rows), GraniteMoE
(embedding / residual / attention / logit multipliers, stacked expert tensors), DeepSeek-V2 (MLA with or
without q LoRA, softmax router, greedy or group-limited), GLM-4.5 (DeepSeek-V3's MoE block under GQA with
q/k/v biases, optional q/k norm and partial rotary), gpt-oss (attention sinks, alternating sliding windows,
biased router and experts, clamped SwiGLU; MXFP4 experts dequantized on load). Any of them
may carry YaRN rope scaling (`rope_scaling` / `rope_parameters` with rope_type "yarn" → `RopeScaling`); other
scalings are refused.

config.json is read with `moelab.config.hf.HFConfig` (its docstring holds the rule for absent, null and
zero fields) and what its fields mean per model_type — MoE layers, KV heads, head width, biases, windows,
experts, routing groups, MLA widths, RoPE — comes from `moelab.config.hf_arch`, which `moelab.accounting` uses
to count the same architectures: an adapter adds only what moelab's ModelConfig needs besides.

The dense families Llama, Mistral, Qwen2 and Qwen3 are read too (`dense`: moe=None, for `moelab upcycle`), not
written. One module per family (`base`: the shared parts; `mixtral`, `qwen`, `olmoe`, `deepseek`, `granite`, `glm`,
`gpt_oss`, `dense`); this package holds the registry.
"""

from __future__ import annotations

from moelab.config.hf import HFConfig
from moelab.config.model import ModelConfig
from moelab.hf.adapters.base import Adapter, Entry, ffn_entries
from moelab.hf.adapters.deepseek import DeepseekV2, DeepseekV3
from moelab.hf.adapters.dense import Llama, Mistral, Qwen2, Qwen3
from moelab.hf.adapters.glm import Glm4Moe
from moelab.hf.adapters.gpt_oss import GptOss
from moelab.hf.adapters.granite import GraniteMoe
from moelab.hf.adapters.mixtral import Mixtral
from moelab.hf.adapters.olmoe import Olmoe
from moelab.hf.adapters.qwen import Qwen2Moe, Qwen3Moe

__all__ = ["Adapter", "Entry", "ffn_entries", "CHECKPOINT_ADAPTERS", "adapter_for", "adapter_matching"]

# model_type -> the adapter that maps its config.json and tensors to moelab's (load and save)
CHECKPOINT_ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in (Mixtral(), Qwen2Moe(), Qwen3Moe(), Olmoe(),
                                                                     DeepseekV3(), GraniteMoe(), DeepseekV2(),
                                                                     Glm4Moe(), GptOss(), Llama(), Mistral(),
                                                                     Qwen2(), Qwen3())}


def adapter_for(c: HFConfig) -> Adapter:
    """The adapter of a config.json's `model_type`, or ValueError naming it and the supported ones."""
    model_type = c.data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CHECKPOINT_ADAPTERS:
        raise ValueError(f"{c.where}: model_type={model_type!r} is not supported by moelab.hf: allowed "
                         + ", ".join(repr(k) for k in CHECKPOINT_ADAPTERS))
    return CHECKPOINT_ADAPTERS[model_type]


def adapter_matching(cfg: ModelConfig) -> Adapter:
    """The architecture a moelab config can be exported as, or ValueError listing why none fits."""
    reasons = []
    for a in CHECKPOINT_ADAPTERS.values():
        why = a.mismatch(cfg)
        if why is None:
            return a
        reasons.append(f"{a.model_type}: {why}")
    raise ValueError("no Hugging Face architecture matches this moelab config — " + "; ".join(reasons))
