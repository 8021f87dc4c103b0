"""`moelab card`: the two numbers of an MoE model (total and active parameters) and what they cost.

    moelab card mixtral-8x7b                       one model (a preset name, config.json or directory)
    moelab card tiny                               a training preset (the model `moelab train --preset` builds)
    moelab card mixtral-8x7b deepseek-v3 dbrx      side by side
    moelab card deepseek-v3 --json                 machine-readable, one object per model
    moelab card qwen3-30b-a3b --precision int4 --accelerator-memory 24 --batch 8 --context 32768
    moelab card mixtral-8x7b deepseek-v3 --plot decode.png
    moelab card deepseek-v3 --expert-parallel 64 --batch 8 --context 4096 --link-bandwidth 50

Everything is computed by `moelab.accounting` (no torch needed); this module only assembles, prints
and plots. `card_report` is the library entry point: it returns the dict that `--json` prints.
Units: parameters in K/M/B/T (10³...10¹²); bytes in kB/MB/GB/TB (10³...10¹²); FLOPs count a
multiply-add as 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.accounting import (
    CATEGORIES,
    PRECISIONS,
    ModelSpec,
    accelerators_needed,
    bytes_per_param,
    count_spec,
    decode_curve,
    expert_parallel_plan,
    flops_per_token,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    serving_params,
    to_spec,
    weight_bytes,
)
from moelab.accounting import presets as _presets
from moelab.config.train import PRESETS

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TABLE_BATCHES = (1, 8, 64, 512)
# a vendor's counting convention -> the report key holding our count under it
CONVENTIONS = {"all_embeddings": "active_params", "no_input_embedding": "active_params_no_input_embedding",
               "no_embeddings": "active_params_no_embeddings"}
CONVENTION_LABELS = {"all_embeddings": "all embeddings", "no_input_embedding": "no input embedding",
                     "no_embeddings": "no vocabulary matrices"}


@dataclass(frozen=True)
class CardSettings:
    """The deployment a card is costed for.

    precision: weight storage (fp32, bf16, fp16, fp8, int4 with a 2-byte scale per 128 weights).
    kv_precision: KV-cache element type. context / batch: tokens per sequence and sequences.
    accelerator_memory_gb: memory of one accelerator (1 GB = 10⁹ bytes). bandwidth_tb_s: memory
    bandwidth of one accelerator (TB/s). accelerators: how many share the weights for the decode bound;
    None = as many as weights + KV at (batch, context) need.
    expert_parallel: N ranks the routed experts are split over, for the expert-parallel section (None:
    no section); its step is batch × context tokens over all N ranks. link_bandwidth_gb_s: one rank's
    link, GB/s per direction (default 50 = one 400 Gb/s InfiniBand NIC per GPU, DeepSeek-V3's IB
    figure). activation_precision: hidden vectors on the wire (dispatch and combine).
    """

    precision: str = "bf16"
    kv_precision: str = "bf16"
    context: int = 4096
    batch: int = 1
    accelerator_memory_gb: float = 80.0
    bandwidth_tb_s: float = 3.35
    accelerators: int | None = None
    batches: tuple[int, ...] = DEFAULT_BATCHES
    expert_parallel: int | None = None
    link_bandwidth_gb_s: float = 50.0
    activation_precision: str = "bf16"

    def validate(self) -> None:
        for name in ("precision", "kv_precision", "activation_precision"):
            allowed = PRECISIONS if name == "precision" else [p for p in PRECISIONS if p != "int4"]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed one of {', '.join(allowed)}")
        for name in ("context", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: allowed an integer >= 1")
        for name in ("accelerator_memory_gb", "bandwidth_tb_s", "link_bandwidth_gb_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed a number > 0")
        if self.accelerators is not None and (not isinstance(self.accelerators, int) or self.accelerators < 1):
            raise ValueError(f"accelerators={self.accelerators!r} is invalid: allowed an integer >= 1 or None")
        if self.expert_parallel is not None and (not isinstance(self.expert_parallel, int)
                                                 or self.expert_parallel < 1):
            raise ValueError(f"expert_parallel={self.expert_parallel!r} is invalid: allowed an integer >= 1 or None")


def _published(source: str | Path | Any) -> dict[str, Any] | None:
    if isinstance(source, str) and not Path(source).exists() and _presets.is_preset(source):
        return _presets.published(source)
    return None


def card_report(source: Any, settings: CardSettings = CardSettings()) -> dict[str, Any]:
    """Everything `moelab card` shows for one model, as a JSON-able dict.

    source: anything `moelab.accounting.count_params` accepts (preset or training preset name,
    config.json path, model directory, HF config dict, ModelConfig). Keys: the parameter counts of
    `ParamCount.to_dict()` (`total_params`, `active_params`, `active_params_no_input_embedding`,
    `active_params_no_embeddings`, `activation_ratio`, breakdowns, MTP/vision), `published` (presets
    only), `costs`, and
    `expert_parallel` (`ExpertParallelPlan.to_dict()` plus `weights_fit_accelerator`; None unless
    `settings.expert_parallel` is set).
    """
    settings.validate()
    spec = to_spec(source)
    counts = count_spec(spec)
    kv_bytes = PRECISIONS[settings.kv_precision]
    memory = settings.accelerator_memory_gb * 1e9
    plan = accelerators_needed(spec, settings.precision, memory, settings.batch, settings.context, kv_bytes)
    n_acc = settings.accelerators or plan.accelerators
    bandwidth = n_acc * settings.bandwidth_tb_s * 1e12
    batches = sorted(set(settings.batches) | {settings.batch})
    flops = flops_per_token(spec, settings.context)
    decode = []
    for step in decode_curve(spec, batches, settings.context, settings.precision, bandwidth, kv_bytes):
        decode.append({"batch": step.batch, "experts_touched_per_layer": step.experts_touched,
                       "weight_bytes_read": step.weight_bytes, "kv_bytes_read": step.kv_bytes,
                       "tokens_per_s_bound": step.tokens_per_s,
                       "fits": plan.weight_bytes + kv_cache_bytes(spec, settings.context, step.batch, kv_bytes)
                       <= n_acc * memory})
    report = counts.to_dict()
    report["published"] = _published(source)
    report["costs"] = {
        "precision": settings.precision, "bytes_per_param": bytes_per_param(settings.precision),
        "kv_precision": settings.kv_precision, "context": settings.context, "batch": settings.batch,
        "flops_per_token_forward": flops.forward, "flops_per_token_matmul": flops.matmul,
        "flops_per_token_attention": flops.attention, "flops_per_token_training": flops.training,
        "serving_params": serving_params(spec), "weight_bytes": plan.weight_bytes,
        "weight_bytes_by_precision": {p: weight_bytes(serving_params(spec), p)
                                      for p in ("fp32", "bf16", "fp8", "int4")},
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(spec, kv_bytes), "kv_cache_bytes": plan.kv_bytes,
        "accelerator_memory_bytes": memory, "accelerators_needed": plan.accelerators,
        "decode_accelerators": n_acc, "bandwidth_bytes_per_s": bandwidth,
        "n_experts": _experts_per_layer(spec), "decode": decode,
    }
    report["expert_parallel"] = None
    if settings.expert_parallel is not None:
        ep = expert_parallel_plan(spec, settings.expert_parallel, tokens=settings.batch * settings.context,
                                  activation_bytes=PRECISIONS[settings.activation_precision],
                                  link_bandwidth=settings.link_bandwidth_gb_s * 1e9, precision=settings.precision)
        report["expert_parallel"] = {"activation_precision": settings.activation_precision, **ep.to_dict(),
                                     "weights_fit_accelerator": ep.weight_bytes_per_rank <= memory}
    return report


def _experts_per_layer(spec: ModelSpec) -> int:
    return max((layer.ffn.experts.n for layer in spec.layers if layer.ffn.experts is not None), default=0)


# -- text rendering ----------------------------------------------------------------------------------

def _num(n: float, units: tuple[str, ...] = ("", "K", "M", "B", "T"), sep: str = "") -> str:
    """n scaled by 1000s with a unit suffix, 3-4 significant digits: 46.70B, 671.0B, 257.4."""
    if n == 0:
        return "0"
    i = 0
    while abs(n) >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    digits = 2 if abs(n) < 100 else 1
    return f"{n:.{digits}f}{sep}{units[i]}".rstrip()


def fmt_params(n: float) -> str:
    return _num(n)


def fmt_bytes(n: float) -> str:
    return _num(n, ("B", "kB", "MB", "GB", "TB", "PB"), " ") if n >= 1000 else f"{n:.0f} B"


def fmt_flops(n: float) -> str:
    return _num(n, ("", "k", "M", "G", "T", "P"), " ") + "FLOP"


def fmt_seconds(t: float) -> str:
    """A duration with 3-4 significant digits: 0 s, 812.0 µs, 9.40 ms, 1.25 s."""
    if t == 0:
        return "0 s"
    for scale, unit in ((1e-6, "µs"), (1e-3, "ms")):
        if t < 1000 * scale:
            return _num(t / scale, (unit,), " ")
    return _num(t, ("s",), " ")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _published_rows(r: dict[str, Any]) -> tuple[str, str]:
    p = r["published"]
    if not p:
        return "-", "-"
    conv = p["active_convention"]
    computed_total = r["total_params"] + (r["vision_params"] if p["total_convention"] == "main+vision" else 0)
    computed_active = r[CONVENTIONS[conv]]
    return (f"{p['total']} / {p['active']} ({CONVENTION_LABELS[conv]})",
            f"{fmt_params(computed_total)} / {fmt_params(computed_active)}")


def render_table(reports: list[dict[str, Any]]) -> str:
    """The reports side by side: one column per model."""
    def col(f) -> list[str]:
        return [f(r) for r in reports]

    c0 = reports[0]["costs"]
    rows: list[tuple[str, list[str]]] = [
        ("model", col(lambda r: r["name"])),
        ("model type", col(lambda r: r["model_type"])),
        ("total params", col(lambda r: fmt_params(r["total_params"]))),
        ("active params (all embeddings)", col(lambda r: fmt_params(r["active_params"]))),
        ("active, without input embedding", col(lambda r: fmt_params(r["active_params_no_input_embedding"]))),
        ("active, without vocab matrices", col(lambda r: fmt_params(r["active_params_no_embeddings"]))),
        ("activation ratio (active/total)", col(lambda r: _pct(r["activation_ratio"]))),
        ("published total / active", col(lambda r: _published_rows(r)[0])),
        ("  computed, same convention", col(lambda r: _published_rows(r)[1])),
        ("breakdown, total / active", ["" for _ in reports]),
    ]
    for cat in CATEGORIES:
        rows.append((f"  {cat.replace('_', ' ')}",
                     col(lambda r, c=cat: f"{fmt_params(r['breakdown'][c])} / {fmt_params(r['active_breakdown'][c])}")))
    rows += [
        ("MTP modules (not in total)", col(lambda r: fmt_params(r["mtp_params"]) if r["mtp_params"] else "-")),
        ("vision encoder (not in total)", col(lambda r: fmt_params(r["vision_params"]) if r["vision_params"] else "-")),
        (f"forward FLOPs/token @ {c0['context']} ctx", col(lambda r: fmt_flops(r["costs"]["flops_per_token_forward"]))),
        ("  of which attention", col(lambda r: fmt_flops(r["costs"]["flops_per_token_attention"]))),
        ("training FLOPs/token (3x)", col(lambda r: fmt_flops(r["costs"]["flops_per_token_training"]))),
        ("weights fp32 / bf16 / fp8 / int4",
         col(lambda r: " / ".join(fmt_bytes(b) for b in r["costs"]["weight_bytes_by_precision"].values()))),
        (f"weights @ {c0['precision']} (used below)", col(lambda r: fmt_bytes(r["costs"]["weight_bytes"]))),
        (f"KV cache per token @ {c0['kv_precision']}",
         col(lambda r: fmt_bytes(r["costs"]["kv_cache_bytes_per_token"]))),
        (f"KV cache, batch {c0['batch']} x {c0['context']}", col(lambda r: fmt_bytes(r["costs"]["kv_cache_bytes"]))),
        (f"accelerators of {c0['accelerator_memory_bytes'] / 1e9:g} GB (weights + KV)",
         col(lambda r: str(r["costs"]["accelerators_needed"]))),
        ("decode bound: accelerators x TB/s",
         col(lambda r: f"{r['costs']['decode_accelerators']} x "
                       f"{r['costs']['bandwidth_bytes_per_s'] / r['costs']['decode_accelerators'] / 1e12:g}")),
    ]
    shown = sorted(set(TABLE_BATCHES) | {c0["batch"]})
    for b in shown:
        rows.append((f"  batch {b}: experts per layer, bound", col(lambda r, b=b: _decode_cell(r, b))))
    ep_rows = _expert_parallel_rows(reports)
    rows += ep_rows
    width = max(len(label) for label, _ in rows)
    widths = [max(len(values[i]) for _, values in rows) for i in range(len(reports))]
    lines = [f"{label:<{width}}  " + "  ".join(f"{v:<{w}}" for v, w in zip(values, widths)) for label, values in rows]
    lines.append("")
    lines.append("Active params: all embeddings = every matrix a token touches, each vocabulary matrix counted once; "
                 "without input embedding = the lookup not counted (gpt-oss, DeepSeek); without vocab matrices = "
                 "neither embedding nor output head.")
    lines.append("Decode bound: tokens/s <= batch x bandwidth / (weights read + KV read) per step, uniform routing "
                 "(E·(1-(1-k/E)^B) experts per layer); * = weights + KV do not fit the accelerators at that batch.")
    if ep_rows:
        lines.append("Expert parallelism: experts split evenly over N ranks, uniform routing; a token's hidden vector "
                     "goes to each remote expert and back, forward bytes per token per MoE layer = 2·k·(N-1)/N·d·b "
                     "(per expert) or 2·R·d·b with R = (N-1)(1 - C(E-E/N,k)/C(E,k)) remote ranks (one copy per "
                     "rank); training = 2 x forward; each rank sends 1/N of the step over its own link, no overlap "
                     "with compute.")
    lines += [f"note ({r['name']}): {n}" for r in reports for n in r["notes"]]
    lines += [f"note ({r['name']}, expert parallel): {n}" for r in reports if r.get("expert_parallel")
              for n in r["expert_parallel"]["notes"]]
    return "\n".join(lines)


def _expert_parallel_rows(reports: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Rows of the expert-parallel section (none when no report has one)."""
    ep0 = next((r["expert_parallel"] for r in reports if r.get("expert_parallel")), None)
    if ep0 is None:
        return []
    c0 = reports[0]["costs"]

    def col(f) -> list[str]:
        return [f(r["expert_parallel"]) if r.get("expert_parallel") and r["expert_parallel"]["moe_layers"]
                else "dense" for r in reports]

    def pair(key: str, fmt) -> list[str]:  # "per assignment / deduplicated per rank"
        return col(lambda e: f"{fmt(e['per_assignment'][key])} / {fmt(e['deduplicated_per_rank'][key])}")

    memory = c0["accelerator_memory_bytes"] / 1e9
    tokens = f"{c0['batch']} x {c0['context']}"
    return [
        (f"expert parallel over {ep0['ranks']} ranks",
         col(lambda e: f"{e['experts_per_rank']}/{e['n_experts']} experts per rank, {e['moe_layers']} MoE layers")),
        (f"  weights per rank @ {c0['precision']}",
         [fmt_bytes(r["expert_parallel"]["weight_bytes_per_rank"])
          + ("" if r["expert_parallel"]["weights_fit_accelerator"] else f" (> {memory:g} GB)") for r in reports]),
        ("  remote copies/token/layer: per expert / per rank",
         pair("remote_copies_per_token_layer", lambda x: f"{x:.2f}")),
        (f"  bytes/token/layer, fwd @ {ep0['activation_precision']}", pair("bytes_per_token_layer_forward", fmt_bytes)),
        ("  bytes/token, all MoE layers, fwd", pair("bytes_per_token_forward", fmt_bytes)),
        (f"  step of {tokens} tokens: bytes per rank, fwd", pair("bytes_per_rank_per_step_forward", fmt_bytes)),
        (f"  time per step @ {ep0['link_bandwidth_bytes_per_s'] / 1e9:g} GB/s link, fwd",
         pair("seconds_per_step_forward", fmt_seconds)),
        ("  time per step, training (fwd + bwd)", pair("seconds_per_step_training", fmt_seconds)),
    ]


def _decode_cell(r: dict[str, Any], batch: int) -> str:
    step = next(s for s in r["costs"]["decode"] if s["batch"] == batch)
    n = r["costs"]["n_experts"]
    experts = f"{step['experts_touched_per_layer']:.1f}/{n}" if n else "dense"
    return f"{experts}, {_num(step['tokens_per_s_bound'])} tok/s{'' if step['fits'] else '*'}"


# -- plot --------------------------------------------------------------------------------------------

def plot_decode(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """PNG of, against batch size: experts touched per MoE layer (share of E) and the decode tokens/s
    bound — one line per model, each on the accelerators its weights + KV need (or `--accelerators`);
    x marks batches whose KV cache no longer fits. Uses matplotlib's Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax_e, ax_t = fig.subplots(1, 2)
    for r in reports:
        steps = r["costs"]["decode"]
        batches = [s["batch"] for s in steps]
        n = r["costs"]["n_experts"]
        if n:
            ax_e.plot(batches, [100 * s["experts_touched_per_layer"] / n for s in steps], marker="o", ms=3,
                      label=f"{r['name']} (E={n})")
        tps = [s["tokens_per_s_bound"] for s in steps]
        (line,) = ax_t.plot(batches, tps, marker="o", ms=3,
                            label=f"{r['name']} ({r['costs']['decode_accelerators']} accelerators)")
        spill = [(b, t) for b, t, s in zip(batches, tps, steps) if not s["fits"]]
        if spill:  # KV cache no longer fits next to the weights at these batches
            ax_t.plot(*zip(*spill), "x", color=line.get_color(), ms=7)
    c = reports[0]["costs"]
    ax_e.set(xscale="log", xlabel="batch size B (tokens per decode step)", ylabel="experts touched per layer (% of E)",
             title="E·(1-(1-k/E)^B), uniform routing", ylim=(0, 105))
    ax_t.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="tokens/s (upper bound)",
             title=f"decode bound, {c['precision']}, context {c['context']} (x: KV won't fit)")
    for ax in (ax_e, ax_t):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# -- command line ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="preset name (" + ", ".join(_presets.list_presets()) + "), training preset name ("
                             + ", ".join(sorted(PRESETS)) + "), a config.json, or a model/run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model (a JSON list)")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                        help="weight precision (int4: 4 bits + a 2-byte scale per 128 weights); default bf16")
    parser.add_argument("--kv-precision", default="bf16", choices=[p for p in PRECISIONS if p != "int4"],
                        help="KV-cache precision; default bf16")
    parser.add_argument("--accelerator-memory", type=float, default=80.0, metavar="GB",
                        help="memory of one accelerator in GB (10^9 bytes); default 80")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together; default 1")
    parser.add_argument("--context", type=int, default=4096, help="tokens of context per sequence; default 4096")
    parser.add_argument("--bandwidth", type=float, default=3.35, metavar="TB/s",
                        help="memory bandwidth of one accelerator in TB/s; default 3.35 (H100 SXM)")
    parser.add_argument("--accelerators", type=int, default=None, metavar="N",
                        help="accelerators whose bandwidth adds up for the decode bound; "
                             "default: as many as weights + KV need")
    parser.add_argument("--expert-parallel", type=int, default=None, metavar="N",
                        help="add the communication cost of splitting the routed experts over N ranks "
                             "(N must divide the experts per layer); the step is --batch x --context tokens "
                             "over all N ranks")
    parser.add_argument("--link-bandwidth", type=float, default=50.0, metavar="GB/s",
                        help="bandwidth of one rank's link for --expert-parallel, GB/s per direction; default 50 "
                             "(one 400 Gb/s InfiniBand NIC per GPU)")
    parser.add_argument("--activation-precision", default="bf16", choices=[p for p in PRECISIONS if p != "int4"],
                        help="element type of the hidden vectors sent between ranks; default bf16")
    parser.add_argument("--plot", default=None, metavar="PATH.png",
                        help="write a plot of experts touched and decode tokens/s bound vs batch size")


def run(args: argparse.Namespace) -> int:
    """Print the card(s); raise ValueError (the CLI reports it) for an unusable model or option."""
    settings = CardSettings(precision=args.precision, kv_precision=args.kv_precision, context=args.context,
                            batch=args.batch, accelerator_memory_gb=args.accelerator_memory,
                            bandwidth_tb_s=args.bandwidth, accelerators=args.accelerators,
                            expert_parallel=args.expert_parallel, link_bandwidth_gb_s=args.link_bandwidth,
                            activation_precision=args.activation_precision)
    settings.validate()
    if args.plot is not None and not str(args.plot).lower().endswith(".png"):
        raise ValueError(f"--plot {args.plot!r} is invalid: allowed a path ending in .png")
    reports = [card_report(m, settings) for m in args.models]
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        print(render_table(reports))
    if args.plot is not None:
        path = plot_decode(reports, args.plot)
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0
