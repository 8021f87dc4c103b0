"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

The prompt is run once through the model (prefill) filling the per-layer KV cache; each new token then
costs one single-position forward. Top-p keeps the smallest set of most likely tokens whose
probabilities sum to at least p (Holtzman et al. 2020).

Routers whose choice for a token depends on other tokens (capacity dropping, expert choice) make cached
decoding differ from a full recompute; token-choice dropless routing does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from moelab.model import KVCache, MoETransformer

END_OF_TEXT = "<|endoftext|>"


def sample_next(logits_V: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from a logits row: greedy when temperature == 0, else temperature + top-p sampling."""
    if temperature == 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # a token is kept if the mass before it is < p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: MoETransformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` (non-empty) by up to `max_new_tokens` tokens; returns only the new ids."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one token (e.g. the end-of-text id)")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    model.eval()
    limit = model.cfg.max_seq_len
    ids = prompt_ids[-limit:]  # keep the most recent context the model can hold
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache()
    logits = model(torch.tensor([ids], device=device), cache=cache).logits[0, -1]
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits.cpu(), temperature, top_p, gen)
        if stop_id is not None and token == stop_id:
            break
        new.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache).logits[0, -1]
    return new


def generate_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int | None = 0, device: str = "cpu") -> str:
    """Load a run's newest checkpoint and tokenizer.json onto `device` and continue `prompt` (may be empty)."""
    from moelab.data import load_tokenizer
    from moelab.train import check_device, load_run

    check_device(device)
    model, _ = load_run(run_dir)
    model.to(device)
    tok_path = Path(run_dir) / "tokenizer.json"
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path} not found: the run directory must hold the tokenizer it was trained with")
    tokenizer = load_tokenizer(tok_path)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids = [eot] + tokenizer.encode(prompt).ids if eot is not None else tokenizer.encode(prompt).ids
    new = generate(model, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop_id=eot)
    return tokenizer.decode(new)
