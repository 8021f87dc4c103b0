"""Quality of the inference weight formats on a trained run: validation loss and perplexity, float vs int8 vs int4.

The run (a moelab run directory, e.g. one written by `moelab train --preset tiny`) is loaded once per format,
converted by `moelab.inference.prepare_inference` (int8 per output channel; int4 group-wise at each group size
asked for) and evaluated by `moelab.training.evaluation.evaluate_text` on held-out text — the same windows, tokens and
separator for every format. Prints, per format: bytes of the converted weights (`weight_bytes`), loss in
nats/token, perplexity and its change against the unconverted float model, bits per byte.

    python benchmarks/quant_quality.py RUN --data TEXT [--group-sizes 32,128] [--max-tokens 200000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from moelab.data.corpus import Corpus
from moelab.inference.prepare import InferenceLinear, prepare_inference
from moelab.inference.quantized_experts import QuantizedExperts
from moelab.runs.load import load_model
from moelab.training.evaluation import evaluate_text


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the converted weights (linears and experts); of the same weights as float before conversion."""
    total = 0
    for m in model.modules():
        if isinstance(m, InferenceLinear):
            total += m.w.nbytes
        elif isinstance(m, QuantizedExperts):
            total += m.nbytes
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="moelab run directory")
    p.add_argument("--data", required=True, help="held-out text file or directory")
    p.add_argument("--group-sizes", default="32,128", help="int4 group sizes to evaluate")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    formats = [("float (as trained)", "raw", 32), ("float (converted)", None, 32), ("int8", "int8", 32)]
    formats += [(f"int4 g{g}", "int4", g) for g in map(int, a.group_sizes.split(","))]
    rows = []
    for label, quant, group_size in formats:
        loaded = load_model(a.run, for_training=True)
        if quant != "raw":
            prepare_inference(loaded.model, quant, group_size)
        nbytes = weight_bytes(loaded.model)
        r = evaluate_text(loaded.model, loaded.tokenizer, Corpus(a.data).documents(), loaded.stop_id,
                          seq_len=a.seq_len, max_tokens=a.max_tokens)
        rows.append({"format": label, "weight_bytes": nbytes, **r.to_dict()})
    ref = rows[0]["perplexity"]
    if a.json:
        print(json.dumps({"run": a.run, "data": a.data, "load": os.getloadavg(), "rows": rows}, indent=2))
        return
    print(f"{a.run} on {a.data}: {rows[0]['tokens']:,} tokens, {rows[0]['bytes']:,} bytes, windows of "
          f"{rows[0]['seq_len']}")
    print("| format | weight MB | loss (nats/token) | perplexity | Δ perplexity | bits/byte |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mb = f"{r['weight_bytes'] / 1e6:.2f}" if r["weight_bytes"] else "–"
        print(f"| {r['format']} | {mb} | {r['loss']:.4f} | {r['perplexity']:.3f} | "
              f"{100 * (r['perplexity'] / ref - 1):+.2f} % | {r['bits_per_byte']:.4f} |")


if __name__ == "__main__":
    main()
