"""GGUFs of a Hugging Face checkpoint for the llama.cpp rows of `benchmarks/decode.py` (benchmark-only).

    python benchmarks/make_gguf.py CKPT LLAMA_CPP_DIR OUT_PREFIX      # writes OUT_PREFIX-{bf16,q8_0,q4_0}.gguf

LLAMA_CPP_DIR is llama.cpp's source tree (e.g. `vendor/llama.cpp` of llama-cpp-python's source package, the one
the installed llama_cpp was built from). BF16 and Q8_0 come from its own converter (`convert_hf_to_gguf.py
--outtype`); Q4_0 from llama.cpp's quantizer (`llama_cpp.llama_model_quantize`) on the BF16 file. The converter
refuses a tokenizer whose pre-tokenizer hash it does not know, as is that of `make_checkpoint.py`: it is run from
a copy in which an unknown byte-level BPE counts as GPT-2's (the tokenizer plays no part in the timings).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

UNKNOWN = "        if res is None:\n            logger.warning(\"\\n\")"
PATCH = "        if res is None:  # benchmark-only: an unknown byte-level BPE is GPT-2's\n            res = \"gpt-2\"\n"


def patched_converter(llama_cpp_dir: Path, tmp: Path) -> Path:
    for name in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
        src = llama_cpp_dir / name
        if src.is_dir():
            shutil.copytree(src, tmp / name)
        elif src.exists():
            shutil.copy(src, tmp / name)
    target = next(p for p in [tmp / "conversion" / "base.py", tmp / "convert_hf_to_gguf.py"]
                  if p.exists() and UNKNOWN in p.read_text())
    target.write_text(target.read_text().replace(UNKNOWN, PATCH + UNKNOWN, 1))
    return tmp / "convert_hf_to_gguf.py"


def main() -> None:
    import llama_cpp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt")
    p.add_argument("llama_cpp_dir", type=Path)
    p.add_argument("out_prefix")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        convert = patched_converter(a.llama_cpp_dir, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "gguf-py")}
        for outtype in ("bf16", "q8_0"):
            subprocess.run([sys.executable, str(convert), a.ckpt, "--outtype", outtype,
                            "--outfile", f"{a.out_prefix}-{outtype}.gguf"], check=True, env=env)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(f"{a.out_prefix}-bf16.gguf".encode(), f"{a.out_prefix}-q4_0.gguf".encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


if __name__ == "__main__":
    main()
