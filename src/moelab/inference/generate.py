"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

The prompt is run once through the model (prefill) filling the per-layer KV cache; each new token then
costs one single-position forward. Sampling draws from softmax(logits / temperature) restricted to the
nucleus: the smallest set of most likely tokens whose probabilities sum to at least top_p (Holtzman et
al. 2020), renormalised; temperature 0 is greedy (argmax).

Bounds: the prompt and the new tokens must fit the model's context, len(prompt) + max_new_tokens <=
max_seq_len, else ValueError naming both (nothing is cut silently). A text prompt is encoded as
[<|endoftext|>] + tokens (`moelab.data.tokenizer.prompt_ids`): every training document starts after that token, so
this asks for the start of a document; a model exported to Hugging Face does the same (its tokenizer
prepends the token, `moelab.hf.save`), so both give the same tokens.

Many prompts at once (`generate_batch`): the prompts are left-padded to the longest and run as one batch;
the cache's `pad` (`moelab.model.attention.KVCache`) gives each row its own rotary positions and masks its padding
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
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from moelab.inference.engine import reports_routes
from moelab.model.cache import KVCache
from moelab.model.transformer import MoETransformer


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """ValueError naming the argument when a generation setting is out of range."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: allowed an integer >= 0")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed a finite number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: allowed a number in (0, 1]")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_prompts(prompts: object, vocab_size: int, single: bool = False) -> list[list[int]]:
    """`prompts` as lists of ints: a non-empty list of non-empty sequences of token ids in [0, vocab_size)
    (ints, or integer tensors/arrays). TypeError naming the argument for text where ids are expected (a str,
    or a list of str) or for something that is not a sequence of ids; ValueError for an empty prompt or an id
    outside the vocabulary. `single`: `prompts` is [prompt_ids] of `generate`, and errors name prompt_ids."""
    def name(b: int) -> str:
        return "prompt_ids" if single else f"prompts[{b}]"

    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts={_short(prompts)} is not a list of token-id lists: pass e.g. "
                        "[moelab.runs.load.load_model(path).prompt_ids(text) for text in texts]")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt (a non-empty list of token ids)")
    out = []
    for b, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise TypeError(f"{name(b)}={_short(p)} is text: pass token ids, e.g. "
                            "moelab.runs.load.load_model(path).prompt_ids(text)")
        try:
            ids = [operator.index(i) for i in (p.tolist() if hasattr(p, "tolist") else p)]
        except TypeError:
            raise TypeError(f"{name(b)}={_short(p)} is not a sequence of integer token ids") from None
        if not ids:
            raise ValueError(f"{name(b)} is empty: pass at least one token (e.g. the end-of-text id)")
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise ValueError(f"{name(b)} holds token id {bad}: allowed 0..{vocab_size - 1} (the model's vocab_size)")
        out.append(ids)
    return out


def next_token_probs(logits_V: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution the next token is drawn from [V] (float32): one-hot on the argmax when temperature
    is 0, else softmax(logits / temperature) restricted to the top-p nucleus and renormalised. A token is
    in the nucleus when the probability mass of the tokens ranked before it is < top_p."""
    if not all(map(math.isfinite, torch.aminmax(logits_V))):  # NaN propagates to both; 5x cheaper than isfinite
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
    """One token id drawn from `next_token_probs` (the argmax when temperature is 0), by inverse transform
    sampling: one uniform u from `generator`, the first id whose cumulative probability (float64) exceeds
    u · total — a token of probability 0 is never drawn. (torch.multinomial draws from the same distribution
    but spends ~0.66 ms on 32,000 ids on a CPU core, against ~0.04 ms here: a decode step's whole budget for a
    one-row step of a small model.)"""
    probs = next_token_probs(logits_V, temperature, top_p)
    if temperature == 0:
        return int(probs.argmax())
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


def generate(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` (non-empty token ids, `check_prompts`) by up to `max_new_tokens` tokens; returns only
    the new ids (fewer when `stop_id` comes). ValueError when the prompt plus the new tokens exceed the model's
    max_seq_len; TypeError naming prompt_ids for text (encode it first: `LoadedModel.prompt_ids`)."""
    prompts = check_prompts([prompt_ids], model.cfg.vocab_size, single=True)
    return generate_batch(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
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
    prompts = check_prompts(prompts, model.cfg.vocab_size)
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
    stats = True if record is not None and not reports_routes(model) else None  # the kernels report routes anyway
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
        out = model(torch.tensor(step, device=device)[:, None], cache=cache, stats=stats)
        if record is not None:
            record.append([a.topk_idx.view(len(prompts), -1).cpu().numpy() for a in out.aux])
        logits = out.logits[:, -1]
    return new










