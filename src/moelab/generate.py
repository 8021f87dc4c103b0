"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

The prompt is run once through the model (prefill) filling the per-layer KV cache; each new token then
costs one single-position forward. Sampling draws from softmax(logits / temperature) restricted to the
nucleus: the smallest set of most likely tokens whose probabilities sum to at least top_p (Holtzman et
al. 2020), renormalised; temperature 0 is greedy (argmax).

Bounds: the prompt and the new tokens must fit the model's context, len(prompt) + max_new_tokens <=
max_seq_len, else ValueError naming both (nothing is cut silently). A text prompt is encoded as
[<|endoftext|>] + tokens (`moelab.data.prompt_ids`): every training document starts after that token, so
this asks for the start of a document; a model exported to Hugging Face does the same (its tokenizer
prepends the token, `moelab.hf.save`), so both give the same tokens.

Many prompts at once (`generate_batch`): the prompts are left-padded to the longest and run as one batch;
the cache's `pad` (`moelab.attention.KVCache`) gives each row its own rotary positions and masks its padding
out, so every prompt gets the tokens it gets alone (up to the rounding of batched products). Each decode
step then runs B tokens through the model in one forward: the non-expert weights are read once for all B,
and an MoE layer reads the distinct experts the B tokens chose — E·(1 − (1 − k/E)^B) of them for uniform
independent choices (`moelab.accounting.experts_touched`), k·B at most.

Routers whose choice for a token depends on other tokens (capacity dropping, expert choice) make cached
decoding differ from a full recompute, and batched decoding differ from decoding alone; token-choice
dropless routing does not.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.attention import KVCache
from moelab.model import MoETransformer


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """ValueError naming the argument when a generation setting is out of range."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: allowed an integer >= 0")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed a finite number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: allowed a number in (0, 1]")


def next_token_probs(logits_V: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution the next token is drawn from [V] (float32): one-hot on the argmax when temperature
    is 0, else softmax(logits / temperature) restricted to the top-p nucleus and renormalised. A token is
    in the nucleus when the probability mass of the tokens ranked before it is < top_p."""
    if not torch.isfinite(logits_V).all():
        raise ValueError("the model produced non-finite logits (NaN or inf): its weights are corrupt or diverged")
    if temperature == 0:
        return torch.zeros_like(logits_V, dtype=torch.float32).scatter_(0, logits_V.argmax().view(1), 1.0)
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        probs /= probs.sum()
    return probs


def sample_next(logits_V: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id drawn from `next_token_probs` (the argmax when temperature is 0)."""
    probs = next_token_probs(logits_V, temperature, top_p)
    if temperature == 0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` (non-empty) by up to `max_new_tokens` tokens; returns only the new ids (fewer
    when `stop_id` comes). ValueError when the prompt plus the new tokens exceed the model's max_seq_len."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one token (e.g. the end-of-text id)")
    return generate_batch(model, [prompt_ids], max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          stop_id=stop_id)[0]


@torch.no_grad()
def generate_batch(model: MoETransformer, prompts: list[list[int]], max_new_tokens: int, *,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   stop_id: int | None = None, record: list | None = None,
                   on_prefill: Callable[[], None] | None = None) -> list[list[int]]:
    """Continue each of `prompts` (non-empty id lists) by up to `max_new_tokens` tokens, all in one batch
    (module docstring); returns the new ids of each prompt (a prompt's list ends before its `stop_id`; the
    batch runs until every prompt has stopped or has max_new_tokens). With `seed`, each prompt draws from
    its own generator seeded with `seed`, as it would alone. `record`: when a list, each decode step appends
    one [B, k] int64 array per MoE layer, the experts each prompt's token chose (token-choice routers).
    `on_prefill`: called once after the prefill forward (to start a clock or read counters there).
    ValueError when the longest prompt plus the new tokens exceed the model's max_seq_len."""
    check_sampling(max_new_tokens, temperature, top_p)
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty id lists (e.g. start each with the "
                         "end-of-text id)")
    longest, limit = max(map(len, prompts)), model.cfg.max_seq_len
    if longest + max_new_tokens > limit:
        room = f"at most {limit - longest} new tokens" if longest < limit else "a shorter prompt"
        raise ValueError(f"the prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceed the model's "
                         f"max_seq_len={limit}: ask for {room}")
    model.eval()
    device = next(model.parameters()).device
    gens = [torch.Generator().manual_seed(seed) if seed is not None else None for _ in prompts]
    pad = [longest - len(p) for p in prompts]
    cache = KVCache(pad=torch.tensor(pad, device=device) if any(pad) else None)
    new: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return new
    filler = prompts[0][0]  # any valid id: padding, and the input of rows that have stopped
    ids = torch.tensor([[filler] * n + p for n, p in zip(pad, prompts)], device=device)
    logits = model(ids, cache=cache).logits[:, -1]
    running = list(range(len(prompts)))
    for i in range(max_new_tokens):
        rows, logits = logits.cpu(), None  # waits for the device: the prefill is done at i == 0
        if i == 0 and on_prefill is not None:
            on_prefill()
        step = [filler] * len(prompts)
        for b in list(running):
            token = sample_next(rows[b], temperature, top_p, gens[b])
            if stop_id is not None and token == stop_id:
                running.remove(b)
                continue
            new[b].append(token)
            step[b] = token
        if not running or i + 1 == max_new_tokens:
            break
        out = model(torch.tensor(step, device=device)[:, None], cache=cache, stats=record is not None)
        if record is not None:
            record.append([a.topk_idx.view(len(prompts), -1).cpu().numpy() for a in out.aux])
        logits = out.logits[:, -1]
    return new


def generate_text(path: str | Path, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = 0, device: str = "cpu") -> str:
    """Continue `prompt` (may be empty) with a moelab run's newest checkpoint or a Hugging Face directory
    (`moelab.models.load_model`), on `device`, by `max_new_tokens` tokens at most (None: up to 100, as many
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

    quant ("int8" / "int4", `moelab.quant`) converts the model for inference; max_memory_gb, policy and
    prefetch keep the routed experts on disk within a budget (`moelab.hf.load`, or for a quantized run
    `moelab.quant_io.load_quantized`). progress: a loading progress bar (None: when stderr is a terminal).
    Returns the texts with their timings, peak memory and (with a budget) the expert cache's statistics.
    ValueError naming the option for settings that do not apply (a budget for a float run, quantization off
    the CPU)."""
    from moelab.inference import check_inference_device, prepare_inference, weight_formats
    from moelab.models import load_model
    from moelab.offload import expert_cache
    from moelab.quant import check_quant
    from moelab.rundir import RunDir, is_hf_dir
    from moelab.train import check_device

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
    options = dict(quant=quant, group_size=group_size, progress=progress, **budget) if hf_dir else budget
    loaded = load_model(path, **options)
    model = loaded.model
    check_inference_device(model, device, str(path))
    if quant is not None and not hf_dir:
        held = {f for f in weight_formats(model) if f is not None}
        if held and held != {quant}:
            raise ValueError(f"quant={quant!r}: {path} is already quantized ({', '.join(sorted(held))}); "
                             "it cannot be converted again")
        prepare_inference(model, quant, group_size)
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
