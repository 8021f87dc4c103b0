"""`moelab.generate.generate` and `generate_batch`, the public decoding functions (they live in
`moelab.inference.generate`)."""

from moelab.inference.generate import generate, generate_batch

__all__ = ["generate", "generate_batch"]
