"""Hugging Face interop: MoE checkpoints in (`load`) and moelab models out (`save`).

    model = moelab.hf.load("path/to/Mixtral-dir")        # config.json + *.safetensors → MoETransformer
    model = moelab.hf.load(path, quant="int4")            # experts (and other linears) quantized as they are read
    model = moelab.hf.load(path, max_memory_gb=8)         # experts read from disk on demand within 8 GB
    moelab.hf.save(model, "out/", tokenizer_json=...)      # → a directory transformers.from_pretrained loads

Loading (`moelab.hf.loading`) streams the checkpoint tensor by tensor into a model built without
initialising its weights; architectures and their tensor tables live in `moelab.hf.adapters`; see
docs/HF.md. Converting between a Hugging Face directory and a moelab run (`moelab convert`) is
`moelab.runs.convert`.
"""

from moelab.hf.adapters import CHECKPOINT_ADAPTERS, adapter_matching
from moelab.hf.export import save
from moelab.hf.loading import load, read_hf_config

__all__ = ["load", "save", "read_hf_config", "CHECKPOINT_ADAPTERS", "adapter_matching"]
