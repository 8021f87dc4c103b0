"""Checkpoints on disk: atomic safetensors + JSON checkpoints (checkpoint.py), the run directory and its lock
(rundir.py), quantized runs (quantized.py), loading any run or Hugging Face directory (load.py), and
`moelab convert` between the two (convert.py)."""
