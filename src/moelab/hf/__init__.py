"""Hugging Face interop: MoE checkpoints in (`load`), moelab models out (`save`), and run-directory converters.

    model = moelab.hf.load("path/to/Mixtral-dir")        # config.json + *.safetensors → MoETransformer
    model = moelab.hf.load(path, quant="int4")            # experts (and other linears) quantized as they are read
    model = moelab.hf.load(path, max_memory_gb=8)         # experts read from disk on demand within 8 GB
    moelab.hf.save(model, "out/", tokenizer_json=...)      # → a directory transformers.from_pretrained loads
    convert_from_hf(hf_dir, run_dir) / convert_to_hf(run_dir, hf_dir)   # `moelab convert`

Loading (`moelab.hf.loading`) streams the checkpoint tensor by tensor into a model built without
initialising its weights; architectures and their tensor tables live in `moelab.hf.adapters`; see
docs/HF.md.
"""

from moelab.hf.adapters import CHECKPOINT_ADAPTERS, adapter_matching
from moelab.hf.export import save
from moelab.hf.loading import load, read_hf_config
from moelab.runs.convert import convert_from_hf, convert_to_hf

__all__ = ["load", "save", "convert_from_hf", "convert_to_hf", "read_hf_config", "CHECKPOINT_ADAPTERS",
           "adapter_matching"]
