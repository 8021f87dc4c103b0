"""The engine loop of `moelab serve`: continuous batching over one loaded model, no HTTP.

One thread runs steps (Yu et al. 2022, Orca: scheduling per iteration, not per request). A step

1. admits waiting requests while the batch has room (`max_batch` rows; `max_tokens_in_flight` KV positions, see
   `Engine.fits`); an admitted request is prefilled alone in chunks of at most `prefill_chunk` tokens, one chunk per
   step, so that the running streams keep getting a token every step while a long prompt is read;
2. when a prefill is complete, samples its first token and joins its KV cache to the running batch
   (`moelab.serve.batch_cache.join`);
3. runs one decode step over the batch: every row's last token in one forward [B, 1] (on a prepared model, one call
   of the kernels for all rows: `InferenceEngine.takes_rows`), each row sampled with its own temperature, top_p and
   generator (`moelab.inference.generate.sample_next`), as `generate` samples alone;
4. drops the rows that are done (the stop id, a stop string in the detokenized text, max_tokens) or whose
   client went away (`Request.cancel`), and failed rows (an exception in one row fails that request only).

On a model whose every block runs on moelab's kernels (`moelab.inference.engine.reports_routes`) steps 1–3 are one
pass over the weights (`_mixed_step`, as vLLM's and llama.cpp's servers mix prefill and decode tokens; Agrawal et al.
2024, Sarathi-Serve): the admitted prompts that fit `prefill_chunk` tokens become new rows of the batch
(`batch_cache.add_rows`) and are read in the same `InferenceEngine.step_tokens` call as the running rows' tokens,
each token computed as it would be alone; only a prompt longer than `prefill_chunk` is still prefilled alone first.

Each request's events (`Event`: text deltas, then "done" or "error") are delivered through its `emit` callback,
on the engine thread. Statistics of each decode step (batch size, experts touched per MoE layer) go to `on_step`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moelab.inference.engine import reports_routes
from moelab.inference.generate import check_sampling, sample_next
from moelab.model.cache import KVCache
from moelab.serve import batch_cache


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests: try again later (HTTP 429)."""


@dataclass
class Event:
    """kind "text" (delta: new text, tokens: new token ids), "done" (finish_reason "stop" | "length"), or "error"
    (message)."""

    kind: str
    delta: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    message: str = ""


@dataclass
class Request:
    """One completion: prompt ids, max_tokens new tokens at most, its sampling settings and stop strings. `emit`
    receives its events (on the engine thread); `generated` holds its new ids."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        self._sent = ""  # text delivered so far
        self._cache: KVCache | None = None  # its own cache while it is prefilled
        self._read = 0  # prompt tokens prefilled
        self._last = -1  # the token the next decode step feeds

    def cancel(self) -> None:
        """The client went away: the engine drops the request at its next step."""
        self.cancelled = True

    @property
    def reserved(self) -> int:
        """The positions its row can hold: prompt + max_tokens."""
        return len(self.prompt) + self.max_tokens


def check_options(max_batch: int, max_queue: int, max_tokens_in_flight: int | None, prefill_chunk: int = 1) -> None:
    """ValueError naming the engine option that is out of range."""
    for name, value, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                            ("prefill_chunk", prefill_chunk, 1), ("max_tokens_in_flight", max_tokens_in_flight, 2)):
        if name == "max_tokens_in_flight" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= {lo}"
                             + (" or None" if name == "max_tokens_in_flight" else ""))


class Engine:
    """Continuous batching over `model` (eval mode). `decode(ids) -> str` turns ids into text (stop strings are
    matched on it); `stop_id`: the end-of-text id (a row stops there, the id not part of its output).

    max_batch: rows decoded together at most; max_queue: requests waiting at most (`submit` raises QueueFull past
    it); max_tokens_in_flight: KV positions the batch may hold at most — the padded batch holds rows × the longest
    row, so a request is admitted while (rows + 1) · max(prompt + max_tokens over them) stays within it (None: no
    bound but max_batch); prefill_chunk: prompt tokens read per step; expert_stats: record the experts each decode
    step touches (the MoE layers' topk_idx; costs the statistics' forward)."""

    def __init__(self, model: torch.nn.Module, decode: Callable[[list[int]], str], stop_id: int | None = None, *,
                 max_batch: int = 16, max_queue: int = 64, max_tokens_in_flight: int | None = None,
                 prefill_chunk: int = 256, expert_stats: bool = True,
                 on_step: Callable[[dict], None] | None = None) -> None:
        check_options(max_batch, max_queue, max_tokens_in_flight, prefill_chunk)
        self.model, self.decode, self.stop_id = model.eval(), decode, stop_id
        self.max_batch, self.max_queue, self.max_tokens_in_flight = max_batch, max_queue, max_tokens_in_flight
        self.prefill_chunk, self.expert_stats, self.on_step = prefill_chunk, expert_stats, on_step
        self.max_seq_len = model.cfg.max_seq_len
        self._mixed = reports_routes(model)  # all on the kernels: new prompts are read in the running rows' step
        self._stats = None if self._mixed else (self.expert_stats or None)
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.rows: list[Request] = []  # the running batch, in the cache's row order
        self.cache: KVCache | None = None
        self._lock = threading.Condition()
        self._stop = self._drain = False
        self._thread: threading.Thread | None = None

    # -- the caller's side (any thread) ----------------------------------------------------------------------
    def check(self, prompt: list[int], max_tokens: int) -> None:
        """ValueError (naming the field) when a request can never run: an empty prompt, prompt + max_tokens past
        the model's context or past max_tokens_in_flight."""
        if not prompt:
            raise ValueError("prompt: it encodes to no token")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r} is invalid: allowed an integer >= 1")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt: {len(prompt)} tokens, the model's context is {self.max_seq_len} tokens: "
                             "allowed a shorter prompt")
        if len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(f"max_tokens={max_tokens} with a prompt of {len(prompt)} tokens exceeds the model's "
                             f"context of {self.max_seq_len} tokens: allowed at most {self.max_seq_len - len(prompt)}")
        if self.max_tokens_in_flight is not None and len(prompt) + max_tokens > self.max_tokens_in_flight:
            raise ValueError(f"max_tokens={max_tokens} with a prompt of {len(prompt)} tokens exceeds the server's "
                             f"--max-tokens-in-flight={self.max_tokens_in_flight}: allowed at most "
                             f"{self.max_tokens_in_flight - len(prompt)}")

    def submit(self, req: Request) -> None:
        """Queue `req` (checked: `check`, `check_sampling`); QueueFull when max_queue requests wait already."""
        self.check(req.prompt, req.max_tokens)
        check_sampling(req.max_tokens, req.temperature, req.top_p)
        with self._lock:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue={self.max_queue})")
            self.waiting.append(req)
            self._lock.notify()

    def start(self) -> Engine:
        """Run the loop (`run`) on a new thread."""
        self._thread = threading.Thread(target=self.run, name="moelab-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop: with `drain`, after every admitted and waiting request has finished."""
        with self._lock:
            self._stop = True
            self._drain = drain
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    # -- the engine thread -----------------------------------------------------------------------------------
    def run(self) -> None:
        """The loop, on the calling thread, until `stop` (with drain: once nothing is waiting or running).

        Which thread runs it matters for speed on the CPU: the kernels and torch run their parallel work on the
        OpenMP thread team of the calling thread, and libgomp cuts the time a team's idle threads wait actively
        for the next parallel region (from 300,000 spins to 100) once the process holds more OpenMP threads than cores —
        a second team (the loader's, left on the main thread, and the engine thread's) is enough, and then
        every region boundary of a step sleeps and wakes through the kernel. `moelab serve` therefore runs this
        loop on the main thread, where the model was loaded, and HTTP on another thread."""
        while True:
            with self._lock:
                while not (self.waiting or self.prefilling or self.rows or self._stop):
                    self._lock.wait()
                if self._stop and not (self._drain and (self.waiting or self.prefilling or self.rows)):
                    for req in [*self.waiting, *self.prefilling, *self.rows]:
                        self._fail(req, "the server stopped")
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 — a fault outside any one request: fail those in flight, go on
                for req in [*self.prefilling, *self.rows]:
                    self._fail(req, f"{type(e).__name__}: {e}")
                self.prefilling, self.rows, self.cache = [], [], None

    def fits(self, req: Request) -> bool:
        """Whether `req` can join now: a row is free and the padded batch stays within max_tokens_in_flight."""
        admitted = self.rows + self.prefilling
        if len(admitted) >= self.max_batch:
            return False
        if self.max_tokens_in_flight is None:
            return True
        longest = max(r.reserved for r in [*admitted, req])
        return (len(admitted) + 1) * longest <= self.max_tokens_in_flight

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: admit, one prefill chunk, one decode step, drop finished rows (module docstring)."""
        with self._lock:
            while self.waiting and (self.waiting[0].cancelled or self.fits(self.waiting[0])):
                req = self.waiting.popleft()
                if not req.cancelled:
                    self.prefilling.append(req)
        self.prefilling = [r for r in self.prefilling if not r.cancelled]
        if self._mixed:
            self._mixed_step()
            return
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])
        if self.rows:
            self._decode_step()

    def _mixed_step(self) -> None:
        """On the kernels: the waiting prompts that fit this step's budget (prefill_chunk tokens in all) join the
        running rows' step as new rows (`batch_cache.add_rows`, `InferenceEngine.step_tokens`), one pass over the
        weights for every token; a longer prompt is prefilled alone, a chunk per step, and joins when done."""
        new, budget = [], self.prefill_chunk
        for r in self.prefilling:
            if r._cache is None and len(r.prompt) <= budget:
                new.append(r)
                budget -= len(r.prompt)
        alone = [r for r in self.prefilling if r not in new]
        if alone:
            self._prefill_chunk(alone[0])
        if not new and not self.rows:
            return
        self.prefilling = [r for r in self.prefilling if r not in new]
        B, engine = len(self.rows), self.model.decoder
        try:
            self.cache, pads = batch_cache.add_rows(self.cache, [len(r.prompt) for r in new],
                                                    engine.kv_shapes() if new else [], self.model.embed.weight)
            L, pad = self.cache.length, self.cache.pad.tolist()
            ids = [r._last for r in self.rows] + [t for r in new for t in r.prompt]
            rows = list(range(B)) + [B + j for j, r in enumerate(new) for _ in r.prompt]
            positions = [L] * B + [p for q in pads for p in range(q, L + 1)]
            start = pad[:B] + [q for q, r in zip(pads, new) for _ in r.prompt]
            last = list(range(B)) + [B + n - 1 for n in itertools.accumulate(len(r.prompt) for r in new)]
            hidden, aux = engine.step_tokens(*(torch.tensor(v) for v in (ids, rows, positions, start)), self.cache)
            logits = self.model.output(hidden[last]).cpu()
        except Exception as e:  # noqa: BLE001 — a failed step fails the rows in it, not the server
            for r in [*self.rows, *new]:
                self._fail(r, f"{type(e).__name__}: {e}")
            self.rows, self.cache = [], None
            return
        now = time.perf_counter()
        for r in new:
            r.first_token_at = now
        self.rows += new
        self._advance(logits, aux)

    def _prefill_chunk(self, req: Request) -> None:
        try:
            if req._cache is None:
                req._cache = KVCache()
            end = min(len(req.prompt), req._read + self.prefill_chunk)
            ids = torch.tensor([req.prompt[req._read:end]], device=self.device)
            logits = self.model(ids, cache=req._cache).logits[0, -1]
            req._read = end
            if end < len(req.prompt):
                return
            self.prefilling.remove(req)
            req.first_token_at = time.perf_counter()
            if self._accept(req, sample_next(logits.cpu(), req.temperature, req.top_p, req.generator)):
                self.cache = batch_cache.join(self.cache, req._cache)
                self.rows.append(req)
            req._cache = None
        except Exception as e:  # noqa: BLE001 — one request's failure is that request's
            if req in self.prefilling:
                self.prefilling.remove(req)
            req._cache = None
            self._fail(req, f"{type(e).__name__}: {e}")

    def _decode_step(self) -> None:
        ids = torch.tensor([[r._last] for r in self.rows], device=self.device)
        try:
            out = self.model(ids, cache=self.cache, stats=self._stats)
        except Exception as e:  # noqa: BLE001 — a failed batched forward fails the rows in it, not the server
            for r in self.rows:
                self._fail(r, f"{type(e).__name__}: {e}")
            self.rows, self.cache = [], None
            return
        self._advance(out.logits[:, -1].cpu(), out.aux)

    def _advance(self, logits: torch.Tensor, aux: list) -> None:
        """Report the step (`on_step`: rows, distinct experts per MoE layer over the step's tokens), sample each row's
        next token from its logits [rows, V], drop the rows that are done."""
        B = len(self.rows)
        if self.on_step is not None:
            touched = [int(a.topk_idx.unique().numel()) for a in aux if self.expert_stats and a.topk_idx is not None]
            self.on_step({"batch": B, "experts_touched": touched})
        keep = []
        for b, r in enumerate(self.rows):
            if r.cancelled:
                r.done = True
                continue
            try:
                if self._accept(r, sample_next(logits[b], r.temperature, r.top_p, r.generator)):
                    keep.append(b)
            except Exception as e:  # noqa: BLE001
                self._fail(r, f"{type(e).__name__}: {e}")
        if len(keep) < B:
            self.cache = batch_cache.keep(self.cache, keep)
            self.rows = [self.rows[b] for b in keep]

    def _accept(self, req: Request, token: int) -> bool:
        """Take `token` as `req`'s next one: deliver its text, finish it when it is done; whether it runs on."""
        if req.cancelled:
            req.done = True
            return False
        if self.stop_id is not None and token == self.stop_id:
            self._finish(req, "stop", self.decode(req.generated))
            return False
        req.generated.append(token)
        req._last = token
        text = self.decode(req.generated)
        for s in req.stop:
            at = text.find(s)
            if at >= 0:
                self._finish(req, "stop", text[:at])
                return False
        if len(req.generated) >= req.max_tokens:
            self._finish(req, "length", text)
            return False
        safe = _safe_prefix(text, req.stop)
        if len(safe) > len(req._sent) and safe.startswith(req._sent):
            req.emit(Event("text", delta=safe[len(req._sent):], tokens=[token]))
            req._sent = safe
        else:
            req.emit(Event("text", tokens=[token]))
        return True

    def _finish(self, req: Request, reason: str, text: str) -> None:
        req.done = True
        delta = text[len(req._sent):] if text.startswith(req._sent) else ""
        req._sent = text
        req.emit(Event("done", delta=delta, finish_reason=reason))

    def _fail(self, req: Request, message: str) -> None:
        req.done = True
        with contextlib.suppress(Exception):  # a listener that is gone
            req.emit(Event("error", message=message))


def _safe_prefix(text: str, stops: list[str]) -> str:
    """The part of `text` that can be sent now: without an incomplete UTF-8 character at its end ("\\ufffd") and
    without a tail that may begin a stop string (it is held until the next tokens decide)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = max((n for s in stops for n in range(1, min(len(s) - 1, end) + 1) if text[:end].endswith(s[:n])),
               default=0)
    return text[:end - held]
