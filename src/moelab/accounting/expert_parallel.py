"""Expert parallelism on paper: the bytes an MoE model moves between ranks, and its weights per rank.

The layout of GShard (Lepikhin et al. 2020, arXiv:2006.16668) and DeepSeek-V3 (arXiv:2412.19437
§3.2): each MoE layer's E routed experts are split evenly over N ranks (m = E/N each, expert e on rank
e // m); every rank holds 1/N of the tokens and a full copy of everything else (attention, shared
experts, dense FFNs, embeddings, routers). In each MoE layer a token's hidden vector is sent to the
ranks of its routed experts (dispatch, one all-to-all) and the experts' outputs come back (combine,
a second all-to-all). No torch; from a `ModelSpec`.

Legend: E experts per MoE layer, k experts per token, N ranks, m = E/N, d = d_model, b = bytes per
activation element, L = MoE layers, T = tokens per step.

Uniform routing (every k-subset of experts equally likely, tokens spread evenly over ranks):
- per assignment (one copy per routed expert, GShard): each of the k experts lives on another rank
  than the token with probability (N−1)/N, so a token sends c = k·(N−1)/N copies per layer;
- deduplicated per rank (one copy per destination rank, summed there before the combine — DeepSeek-V3
  §3.2.2 does this per node): a given other rank is skipped iff all k experts avoid its m experts,
  probability C(E−m, k)/C(E, k) (hypergeometric), so by linearity of expectation
  c = R = (N−1)·(1 − C(E−m, k)/C(E, k)). R = k·(N−1)/N when m = 1 and is smaller when m > 1.
- forward bytes per token per MoE layer = 2·c·d·b (dispatch + combine): 2·k·(N−1)/N·d·b per
  assignment, 2·R·d·b deduplicated. Training adds the backward pass, which sends the gradients of the
  same vectors the other way: ≈ 2 × forward. Per token: × L (Σ over MoE layers). Per step: × T over
  all ranks; each rank sends its T/N tokens' share over its own link, in both directions at once, so
  time per step = (T/N) · bytes per token / link bandwidth.
- weights per rank = expert weights / N + everything else (replicated).

Group-limited routing (DeepSeek-V2 §2.2.2 device-limited, DeepSeek-V3 §2.1.2 node-limited, M = 4
nodes): a token's experts lie in at most topk_groups of n_groups groups, which bounds the ranks it
reaches; `max_remote_ranks` reports that bound — the expectations above stay the uniform model's.

Not modelled: latency, overlap with compute (DeepSeek-V3's DualPipe hides most of it), load
imbalance, capacity and dropped tokens, hierarchical (node, then NVLink) forwarding, recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moelab.accounting.costs import bytes_per_param, serving_params
from moelab.accounting.spec import ExpertBank, ModelSpec
from moelab.config.hf_arch import EXPERT_FIELDS

DEFAULT_LINK_BANDWIDTH = 50e9  # bytes/s: one 400 Gb/s InfiniBand NDR NIC per GPU, the IB figure of DeepSeek-V3 §3.2.2

# model_type -> the config field holding E, for error messages
EXPERT_COUNT_FIELDS: dict[str, str] = {
    **{model_type: count for model_type, (count, _) in EXPERT_FIELDS.items()},
    "moelab": "moe.n_experts", "llama4": "text_config.num_local_experts", "dbrx": "ffn_config.moe_num_experts",
}


def _check_ranks(n_experts: int, ranks: int) -> None:
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ValueError(f"expert_parallel={ranks!r} is invalid: allowed an integer >= 1")
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts={n_experts!r} is invalid: allowed an integer >= 1")
    if n_experts % ranks:
        raise ValueError(f"expert_parallel={ranks} does not divide n_experts={n_experts}; "
                         f"allowed: {', '.join(map(str, divisors(n_experts)))}")


def _check_top_k(n_experts: int, top_k: float) -> int:
    if top_k != int(top_k) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: allowed an integer in [1, n_experts={n_experts}]")
    return int(top_k)


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending: the rank counts that split n experts evenly."""
    return [i for i in range(1, n + 1) if n % i == 0]


def remote_assignments(n_experts: int, top_k: float, ranks: int) -> float:
    """Expected routed assignments of one token that land on another rank than the token's: k·(N−1)/N.

    Each assignment's expert is on a uniformly random rank (E/N experts per rank), so it is remote
    with probability (N−1)/N; exact also for k experts drawn without replacement (linearity).
    """
    _check_ranks(n_experts, ranks)
    if not 0 < top_k <= n_experts:
        raise ValueError(f"top_k={top_k!r} is invalid: allowed 0 < top_k <= n_experts ({n_experts})")
    return top_k * (ranks - 1) / ranks


def remote_ranks(n_experts: int, top_k: int, ranks: int) -> float:
    """Expected distinct other ranks one token's k experts live on (uniform k-subset of E experts):
    R = (N−1)·(1 − C(E−m, k)/C(E, k)), m = E/N.

    A given other rank holds m experts; all k chosen experts avoid them with the hypergeometric
    probability C(E−m, k)/C(E, k) = Π_{i<k} (E−m−i)/(E−i) = Π_{i<m} (E−k−i)/(E−i), a product of
    min(m, k) factors (not the binomials themselves, which have ~E/3 digits at E = 2^20, k = E/2);
    summing over the N−1 other ranks gives R. R = k·(N−1)/N when m = 1; R <= min(k, N−1).
    """
    _check_ranks(n_experts, ranks)
    k = _check_top_k(n_experts, top_k)
    m = n_experts // ranks
    other = k if m <= k else m  # the product runs over the smaller of m and k
    missed = 1.0
    for i in range(min(m, k)):
        missed *= max(n_experts - other - i, 0) / (n_experts - i)
    return (ranks - 1) * (1 - missed)


def max_remote_ranks(n_experts: int, top_k: int, ranks: int, n_groups: int, topk_groups: int) -> int:
    """The most other ranks one token can reach under group-limited routing: min(k, N−1, Σ of the
    topk_groups largest group spans), a group of E/n_groups consecutive experts spanning the ranks
    of its experts (expert e on rank e // m). With n_groups = 1 this is min(k, N−1)."""
    _check_ranks(n_experts, ranks)
    k = _check_top_k(n_experts, top_k)
    if not 1 <= topk_groups <= n_groups or n_experts % n_groups:
        raise ValueError(f"n_groups={n_groups}, topk_groups={topk_groups} are invalid: allowed n_groups dividing "
                         f"n_experts ({n_experts}) and 1 <= topk_groups <= n_groups")
    m, s = n_experts // ranks, n_experts // n_groups
    spans = sorted(((g + 1) * s - 1) // m - (g * s) // m + 1 for g in range(n_groups))
    return min(k, ranks - 1, sum(spans[-topk_groups:]))


@dataclass(frozen=True)
class Traffic:
    """Bytes and time of expert-parallel dispatch + combine under one way of counting copies.

    copies_per_token_layer: remote copies of a token's hidden vector per MoE layer (mean over MoE layers).
    bytes_per_token_layer: forward bytes per token per MoE layer, 2·copies·d·b (mean over MoE layers).
    bytes_per_token: forward bytes per token, all MoE layers.
    bytes_per_step: forward bytes of a step of T tokens, all ranks together (T · bytes_per_token).
    bytes_per_rank: what each rank sends (and receives) in a forward step, bytes_per_step / N.
    seconds: bytes_per_rank / link bandwidth. Training (forward + backward) is 2 × each of these.
    """

    copies_per_token_layer: float
    bytes_per_token_layer: float
    bytes_per_token: float
    bytes_per_step: float
    bytes_per_rank: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return {
            "remote_copies_per_token_layer": self.copies_per_token_layer,
            "bytes_per_token_layer_forward": self.bytes_per_token_layer,
            "bytes_per_token_forward": self.bytes_per_token, "bytes_per_token_training": 2 * self.bytes_per_token,
            "bytes_per_step_forward": self.bytes_per_step, "bytes_per_step_training": 2 * self.bytes_per_step,
            "bytes_per_rank_per_step_forward": self.bytes_per_rank,
            "bytes_per_rank_per_step_training": 2 * self.bytes_per_rank,
            "seconds_per_step_forward": self.seconds, "seconds_per_step_training": 2 * self.seconds,
        }


@dataclass(frozen=True)
class ExpertParallelPlan:
    """A model split over `ranks` expert-parallel ranks (see the module docstring for the formulas).

    moe_layers: layers with routed experts (L). n_experts / top_k: E and k (of the largest bank; 0 if
    dense). experts_per_rank: E/N. allowed_ranks: the N that divide E in every MoE layer (empty if dense).
    per_assignment / per_rank: traffic with one copy per remote expert / per remote rank.
    max_remote_ranks: the bound group-limited routing puts on per_rank copies, else None.
    expert_weight_bytes: routed FFN experts of all layers; replicated_weight_bytes: everything else
    (serving parameters); weight_bytes_per_rank = expert_weight_bytes / N + replicated_weight_bytes.
    """

    ranks: int
    moe_layers: int
    n_experts: int
    top_k: float
    experts_per_rank: int
    allowed_ranks: tuple[int, ...]
    d_model: int
    activation_bytes: float
    tokens_per_step: int
    link_bandwidth: float
    per_assignment: Traffic
    per_rank: Traffic
    max_remote_ranks: int | None
    n_groups: int
    topk_groups: int
    expert_weight_bytes: float
    replicated_weight_bytes: float
    notes: tuple[str, ...] = field(default=())

    @property
    def weight_bytes_per_rank(self) -> float:
        return self.expert_weight_bytes / self.ranks + self.replicated_weight_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranks": self.ranks, "moe_layers": self.moe_layers, "n_experts": self.n_experts, "top_k": self.top_k,
            "experts_per_rank": self.experts_per_rank, "allowed_ranks": list(self.allowed_ranks),
            "d_model": self.d_model, "activation_bytes": self.activation_bytes,
            "tokens_per_step": self.tokens_per_step, "link_bandwidth_bytes_per_s": self.link_bandwidth,
            "per_assignment": self.per_assignment.to_dict(), "deduplicated_per_rank": self.per_rank.to_dict(),
            "group_limit": None if self.max_remote_ranks is None else {
                "n_groups": self.n_groups, "topk_groups": self.topk_groups,
                "max_remote_ranks_per_token_layer": self.max_remote_ranks},
            "expert_weight_bytes": self.expert_weight_bytes, "replicated_weight_bytes": self.replicated_weight_bytes,
            "weight_bytes_per_rank": self.weight_bytes_per_rank, "notes": list(self.notes),
        }


def _banks(spec: ModelSpec) -> list[ExpertBank]:
    return [layer.ffn.experts for layer in spec.layers if layer.ffn.experts is not None]


def expert_parallel_plan(spec: ModelSpec, ranks: int, tokens: int = 1, activation_bytes: float = 2.0,
                         link_bandwidth: float = DEFAULT_LINK_BANDWIDTH, precision: str = "bf16",
                         int4_group_size: int = 128) -> ExpertParallelPlan:
    """Traffic and weights per rank of `spec` with its routed FFN experts split over `ranks` ranks.

    tokens: T, tokens of one step over all ranks (e.g. batch × context). activation_bytes: b, bytes of
    one hidden-vector element on the wire (2 for bf16). link_bandwidth: bytes/s of one rank's link, per
    direction. precision: weight storage, for the weights per rank. Raises ValueError when `ranks` does
    not divide the expert count of every MoE layer (naming the config field and the allowed values).
    A dense model moves nothing and keeps every weight on every rank.
    """
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ValueError(f"expert_parallel={ranks!r} is invalid: allowed an integer >= 1")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens={tokens!r} is invalid: allowed an integer >= 1")
    if not activation_bytes > 0:
        raise ValueError(f"activation_bytes={activation_bytes!r} is invalid: allowed a number > 0")
    if not link_bandwidth > 0:
        raise ValueError(f"link_bandwidth={link_bandwidth!r} is invalid: allowed a number > 0 (bytes/s)")
    banks = _banks(spec)
    sizes = sorted({b.n for b in banks})
    allowed = tuple(n for n in divisors(sizes[0]) if all(e % n == 0 for e in sizes)) if sizes else ()
    if banks and ranks not in allowed:
        field_name = EXPERT_COUNT_FIELDS.get(spec.model_type, "n_experts")
        raise ValueError(f"expert_parallel={ranks} does not divide {field_name}={'/'.join(map(str, sizes))} "
                         f"(routed experts per MoE layer); allowed: {', '.join(map(str, allowed))}")
    d, b, L = spec.d_model, activation_bytes, len(banks)
    notes = []
    group_bounds = []
    assignment_copies, rank_copies = [], []
    per_bank = {bank: (remote_assignments(bank.n, bank.top_k, ranks), remote_ranks(bank.n, bank.top_k, ranks),
                       max_remote_ranks(bank.n, bank.top_k, ranks, bank.n_groups, bank.topk_groups)
                       if bank.n_groups > 1 else None) for bank in set(banks)}  # once per distinct bank
    for bank in banks:
        per_assignment, per_rank, group_bound = per_bank[bank]
        assignment_copies.append(per_assignment)
        rank_copies.append(per_rank)
        if group_bound is not None:
            group_bounds.append(group_bound)

    def traffic(copies: list[float]) -> Traffic:
        per_token = sum((2 * c * d * b for c in copies), 0.0)
        per_step = tokens * per_token
        return Traffic(copies_per_token_layer=sum(copies) / L if L else 0.0,
                       bytes_per_token_layer=per_token / L if L else 0.0, bytes_per_token=per_token,
                       bytes_per_step=per_step, bytes_per_rank=per_step / ranks,
                       seconds=per_step / ranks / link_bandwidth)

    bpp = bytes_per_param(precision, int4_group_size)
    expert_params = sum(bank.total for bank in banks)
    replicated = serving_params(spec) - expert_params
    if not banks:
        notes.append("no routed experts: nothing is dispatched and every rank holds every weight")
    if any(layer.attention.experts is not None for layer in spec.layers):
        notes.append("attention experts (mixture of attention heads) are counted as replicated, not dispatched")
    if len(sizes) > 1 or len({b.top_k for b in banks}) > 1:
        notes.append("MoE layers differ in E or k: per-layer figures are means over MoE layers")
    big = max(banks, key=lambda bank: bank.n) if banks else None
    groups = (big.n_groups, big.topk_groups) if big is not None else (1, 1)
    bound = max(group_bounds) if group_bounds else None
    if bound is not None:
        limit = f"group-limited routing (a token's experts lie in at most {groups[1]} of {groups[0]} groups)"
        if bound < min(big.top_k, ranks - 1):
            notes.append(f"{limit}: at most {bound} other ranks per layer receive a token; the uniform model, "
                         f"which ignores the limit, expects {sum(rank_copies) / L:.2f}")
        else:
            notes.append(f"{limit} does not bound the ranks a token reaches at {ranks} ranks")
    return ExpertParallelPlan(
        ranks=ranks, moe_layers=L, n_experts=big.n if big else 0, top_k=big.top_k if big else 0,
        experts_per_rank=big.n // ranks if big else 0, allowed_ranks=allowed, d_model=d, activation_bytes=b,
        tokens_per_step=tokens, link_bandwidth=link_bandwidth, per_assignment=traffic(assignment_copies),
        per_rank=traffic(rank_copies), max_remote_ranks=bound, n_groups=groups[0], topk_groups=groups[1],
        expert_weight_bytes=expert_params * bpp, replicated_weight_bytes=replicated * bpp, notes=tuple(notes))
