"""What `moelab generate` runs: load a checkpoint, quantize it or give it a memory budget, decode the prompts,
and report speed, memory and the expert cache."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.inference.generate import check_sampling, generate_batch


def generate_text(path: str | Path, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = 0, device: str = "cpu") -> str:
    """Continue `prompt` (may be empty) with a moelab run's newest checkpoint or a Hugging Face directory
    (`moelab.runs.load.load_model`), on `device`, by `max_new_tokens` tokens at most (None: up to 100, as many
    as the model's context leaves); generation stops at the model's end-of-text token."""
    return generate_texts(path, [prompt], max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          device=device).texts[0]


@dataclass
class GenerationReport:
    """What `generate_texts` produced and what it cost. texts: the continuation of each prompt; new_tokens:
    tokens generated in all; load_s, prefill_s, decode_s: wall-clock seconds; decode_tokens: tokens generated
    by decode steps (the first token of each prompt comes from the prefill); peak_rss: the process's peak
    resident set in bytes; cache: with a memory budget, the expert cache's `CacheStats.to_dict()` over the
    whole generation, and `decode_bytes_read` of them by the decode steps (else None)."""

    texts: list[str]
    new_tokens: int = 0
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    peak_rss: int = 0
    cache: dict[str, Any] | None = field(default=None)

    def summary(self) -> list[str]:
        """One line of speed and memory, and one of the expert cache when there is a budget."""
        rate = self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")
        lines = [f"{len(self.texts)} prompt(s), {self.new_tokens} new tokens: load {self.load_s:.1f} s, prefill "
                 f"{self.prefill_s:.2f} s, decode {rate:.2f} tokens/s ({self.decode_tokens} tokens in "
                 f"{self.decode_s:.2f} s); peak RSS {self.peak_rss / 2**30:.2f} GiB"]
        if self.cache is not None:
            c = self.cache
            per_token = c["decode_bytes_read"] / self.decode_tokens if self.decode_tokens else float("nan")
            lines.append(f"expert cache ({_size(c['capacity'])}, {c['policy']}): hit rate {100 * c['hit_rate']:.1f} %, "
                         f"{_size(per_token)} read from disk per decode token ({_size(c['bytes_read'])} in all), "
                         f"{c['evictions']} evictions")
        return lines


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def peak_rss() -> int:
    """The process's peak resident set in bytes (getrusage; kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def generate_texts(path: str | Path, prompts: list[str], max_new_tokens: int | None = None, *,
                   temperature: float = 0.8, top_p: float = 0.95, seed: int | None = 0, device: str = "cpu",
                   quant: str | None = None, group_size: int = 32, max_memory_gb: float | None = None,
                   policy: str = "lru", prefetch: bool = False, progress: bool | None = None) -> GenerationReport:
    """Continue each of `prompts` (a batch, `generate_batch`) with a moelab run or a Hugging Face directory.

    quant ("int8" / "int4", `moelab.inference.formats`) converts the model for inference; max_memory_gb, policy and
    prefetch keep the routed experts on disk within a budget (`moelab.hf.load`, or for a quantized run
    `moelab.runs.quantized.load_quantized`). progress: a loading progress bar (None: when stderr is a terminal).
    Returns the texts with their timings, peak memory and (with a budget) the expert cache's statistics.
    ValueError naming the option for settings that do not apply (a budget for a float run, quantization off
    the CPU)."""
    from moelab.inference.formats import check_quant
    from moelab.inference.offload import expert_cache
    from moelab.inference.prepare import check_inference_device
    from moelab.runs.load import is_hf_dir, load_model
    from moelab.runs.rundir import RunDir
    from moelab.training.device import check_device

    check_device(device)
    check_sampling(max_new_tokens or 0, temperature, top_p)
    check_quant(quant, group_size)
    if not prompts:
        raise ValueError("no prompts: give at least one (it may be empty)")
    if (quant is not None or max_memory_gb is not None) and device != "cpu":
        raise ValueError(f"device={device!r}: quantized and budgeted models run on the CPU (quant and "
                         "max_memory_gb use the CPU's kernels and read experts into CPU memory)")
    hf_dir = Path(path).is_dir() and is_hf_dir(Path(path)) and not RunDir(Path(path)).checkpoints()
    t0 = time.perf_counter()
    budget = dict(max_memory_gb=max_memory_gb, policy=policy, prefetch=prefetch) if max_memory_gb is not None else {}
    options = dict(quant=quant, group_size=group_size, for_training=device != "cpu", **budget)  # off the CPU: plain
    loaded = load_model(path, **options, **(dict(progress=progress) if hf_dir else {}))
    model = loaded.model
    check_inference_device(model, device, str(path))
    model.to(device)
    load_s = time.perf_counter() - t0
    ids = [loaded.prompt_ids(p) for p in prompts]
    if not all(ids):
        raise ValueError(f"a prompt is empty and {path}'s tokenizer adds no start token: give a prompt")
    if max_new_tokens is None:
        max_new_tokens = max(1, min(100, model.cfg.max_seq_len - max(map(len, ids))))
    cache = expert_cache(model)
    if cache is not None:
        cache.reset_stats()
    at_prefill: dict[str, Any] = {"time": time.perf_counter(), "read": 0}  # kept when no token is asked for

    def prefill_done() -> None:
        at_prefill.update(time=time.perf_counter(), read=cache.stats.bytes_read if cache is not None else 0)

    t1 = time.perf_counter()
    new = generate_batch(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                         stop_id=loaded.stop_id, on_prefill=prefill_done)
    t2 = time.perf_counter()
    n_new = sum(map(len, new))
    report = GenerationReport([loaded.tokenizer.decode(n, skip_special_tokens=False) for n in new], n_new, load_s,
                              at_prefill["time"] - t1, t2 - at_prefill["time"],
                              sum(max(0, len(n) - 1) for n in new), peak_rss())
    if cache is not None:
        report.cache = {**cache.stats.to_dict(), "capacity": cache.capacity, "policy": cache.policy,
                        "decode_bytes_read": cache.stats.bytes_read - at_prefill["read"]}
    return report
