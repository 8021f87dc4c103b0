"""What `moelab serve` counts, in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters: requests by route and HTTP status, prompt and completion tokens, decode steps and rows, the distinct
experts touched per MoE layer per decode step summed over steps, and the same sum under uniform independent routing,
E·(1 − (1 − k/E)^B) per layer per step (`moelab.accounting.experts_touched`): their ratio shows how far the router's
choices cluster (below 1) or spread (1) across the batch. Gauges: queue depth, batch size, the expert cache's hit
rate under a memory budget (`moelab.inference.offload.expert_cache`). Histograms: time to first token (from the
request's arrival to its first token) and inter-token latency (between consecutive tokens of a request), seconds.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative buckets (le = upper bound), their sum and count."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """The server's counters (thread-safe: the engine thread and the HTTP handlers both write). `gauges` is called
    at each scrape for the values read then (queue depth, batch size, cache statistics)."""

    def __init__(self, n_experts: int = 0, top_k: int = 0, gauges: Callable[[], dict[str, float]] | None = None):
        self.n_experts, self.top_k, self.gauges = n_experts, top_k, gauges
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = self.completion_tokens = 0
        self.steps = self.step_rows = 0
        self.touched = self.touched_uniform = 0.0
        self.layer_steps = 0
        self.ttft, self.itl = Histogram(), Histogram()

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def latency(self, ttft: float | None = None, itl: float | None = None) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def step(self, info: dict) -> None:
        """One decode step: info = {"batch": B, "experts_touched": [distinct experts per MoE layer]}."""
        B, touched = info["batch"], info["experts_touched"]
        with self.lock:
            self.steps += 1
            self.step_rows += B
            if touched and self.n_experts:
                from moelab.accounting.costs import experts_touched

                self.touched += sum(touched)
                self.touched_uniform += len(touched) * experts_touched(self.n_experts, self.top_k, B)
                self.layer_steps += len(touched)

    def render(self) -> str:
        """The exposition text."""
        g = self.gauges() if self.gauges is not None else {}
        with self.lock:
            out = ["# HELP moelab_requests_total HTTP requests by route and status code.",
                   "# TYPE moelab_requests_total counter"]
            out += [f'moelab_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            for name, help_, value in (
                    ("moelab_prompt_tokens_total", "Prompt tokens of the requests admitted.", self.prompt_tokens),
                    ("moelab_completion_tokens_total", "Tokens generated.", self.completion_tokens),
                    ("moelab_decode_steps_total", "Decode steps of the running batch.", self.steps),
                    ("moelab_decode_rows_total", "Rows decoded, summed over decode steps.", self.step_rows),
                    ("moelab_moe_layer_steps_total", "MoE layers x decode steps with expert statistics.",
                     self.layer_steps),
                    ("moelab_experts_touched_total", "Distinct experts each MoE layer ran per decode step, summed.",
                     self.touched),
                    ("moelab_experts_touched_uniform_total",
                     "E*(1-(1-k/E)^B) per MoE layer per decode step, summed: uniform independent routing.",
                     self.touched_uniform)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {_num(value)}"]
            for name, help_, h in (("moelab_time_to_first_token_seconds", "Arrival to first token.", self.ttft),
                                   ("moelab_inter_token_latency_seconds", "Between consecutive tokens.", self.itl)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
        for name, value in sorted(g.items()):
            out += [f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        return "\n".join(out) + "\n"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
