"""Running a built model fast: weight formats (formats.py) and the one choice of kernel (backend.py), quantized expert
stores (quantized_experts.py), `prepare_inference` (prepare.py), the engine that owns every call into moelab's C
kernels (engine.py, native/), experts streamed within a memory budget (offload.py), and decoding (generate.py)."""

from moelab.inference.engine import InferenceEngine
from moelab.inference.prepare import prepare_inference

__all__ = ["InferenceEngine", "prepare_inference"]
