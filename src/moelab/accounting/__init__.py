"""Parameter, FLOP and memory accounting for MoE language models — pure Python, no torch.

From a moelab `ModelConfig`, a Hugging Face `config.json` (file, directory or dict) or a shipped
preset name:
- `count_params`: total and active parameters per token, with a breakdown (counts.py);
- `flops_per_token`, `weight_bytes`, `kv_cache_bytes`, `accelerators_needed`, `experts_touched`,
  `decode_step` / `decode_curve`: what those parameters cost (costs.py);
- `expert_parallel_plan`, `remote_assignments`, `remote_ranks`: the bytes expert parallelism moves
  between ranks and the weights per rank (expert_parallel.py).

Modules: spec.py (the `ModelSpec` every number is computed from, and moelab's own layout),
hf_configs.py (Hugging Face config → ModelSpec, per `model_type`; it reads configs with
`moelab.config.hf` and takes their per-architecture meaning from `moelab.config.hf_arch`, both shared with
`moelab.hf`), presets.py (shipped configs), counts.py, costs.py, expert_parallel.py. Rendering lives
in `moelab.accounting.card`.
"""

from moelab.accounting.costs import (
    PRECISIONS,
    DecodeStep,
    Flops,
    MemoryPlan,
    accelerators_needed,
    bytes_per_param,
    decode_curve,
    decode_step,
    experts_touched,
    flops_per_token,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    serving_params,
    weight_bytes,
)
from moelab.accounting.counts import CATEGORIES, ParamCount, count_params, count_spec, to_spec
from moelab.accounting.expert_parallel import (
    DEFAULT_LINK_BANDWIDTH,
    ExpertParallelPlan,
    expert_parallel_plan,
    remote_assignments,
    remote_ranks,
)
from moelab.accounting.hf_configs import SUPPORTED_MODEL_TYPES, spec_from_dict, spec_from_path
from moelab.accounting.presets import list_presets, load_preset, published
from moelab.accounting.spec import ModelSpec, spec_from_model_config

__all__ = [
    "CATEGORIES", "DEFAULT_LINK_BANDWIDTH", "PRECISIONS", "SUPPORTED_MODEL_TYPES", "DecodeStep",
    "ExpertParallelPlan", "Flops", "MemoryPlan", "ModelSpec", "ParamCount", "accelerators_needed",
    "bytes_per_param", "count_params", "count_spec", "decode_curve", "decode_step", "expert_parallel_plan",
    "experts_touched", "flops_per_token", "kv_cache_bytes", "kv_cache_bytes_per_token", "list_presets",
    "load_preset", "published", "remote_assignments", "remote_ranks", "serving_params", "spec_from_dict",
    "spec_from_model_config", "spec_from_path", "to_spec", "weight_bytes",
]
