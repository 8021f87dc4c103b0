"""`moelab routing`: route held-out text through a model and report what its experts do.

    record = collect_routing(model, tokenizer, sources, separator, tokens=4096)   # the routing of N tokens
    report = routing_report(record, decode=tokenizer.id_to_token)                # a JSON-able dict
    write_report(report, "out/")               # routing.json, PNG figures, report.html (figures embedded)

Sources are labelled texts (e.g. code vs prose); each label contributes up to `tokens` tokens, cut into
sequences of `seq_len`. For every MoE layer the record keeps each token's chosen experts, its label, id and
sequence, and the layer's mean per-token router entropy and dropped fraction. The statistics are those of
`moelab.analysis.routing_stats`; routing.json's schema is in docs/ROUTING.md.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moelab.analysis import routing_stats as rs
from moelab.model.transformer import MoETransformer

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class RoutingRecord:
    """The routing of N tokens: per MoE layer `topk` [N, K]; per token `labels`, `token_ids`, `sequences`."""

    layers: list[int]  # block index of each MoE layer
    n_experts: int
    top_k: int
    label_names: list[str]
    topk: list[np.ndarray] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sequences: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    router_entropy: list[float] = field(default_factory=list)  # mean per-token entropy (nats) per layer
    dropped_frac: list[float] = field(default_factory=list)


def _sequences(tokenizer, documents: Iterable[str], separator: int | None, tokens: int,
               seq_len: int) -> list[list[int]]:
    ids: list[int] = []
    for doc in documents:
        if len(ids) >= tokens:
            break
        ids += ([separator] if separator is not None else []) + tokenizer.encode(doc, add_special_tokens=False).ids
    ids = ids[:tokens]
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) == seq_len]


@torch.no_grad()
def collect_routing(model: MoETransformer, tokenizer, sources: list[tuple[str, Iterable[str]]],
                    separator: int | None, tokens: int = 4096, seq_len: int | None = None, batch_size: int = 8,
                    progress: bool = False) -> RoutingRecord:
    """Route up to `tokens` tokens of each labelled source (in whole sequences of `seq_len`, 1..max_seq_len;
    None: 256 or max_seq_len if smaller) and record the choices. ValueError naming the argument for a
    seq_len outside 1..max_seq_len, tokens < seq_len or batch_size < 1 (nothing is clamped)."""
    cfg = model.cfg
    if cfg.moe is None:
        raise ValueError("the model has no MoE layer: there is no routing to report")
    if cfg.moe.router == "expert_choice":
        raise ValueError("router='expert_choice' picks tokens per expert; routing reports cover token-choice routers")
    seq_len = min(256, cfg.max_seq_len) if seq_len is None else seq_len
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is invalid: allowed 1..max_seq_len={cfg.max_seq_len}")
    if tokens < seq_len:
        raise ValueError(f"tokens={tokens} is invalid: allowed an integer >= seq_len={seq_len} (whole sequences of "
                         "seq_len tokens are routed)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: allowed an integer >= 1")
    layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    rec = RoutingRecord(layers, cfg.moe.n_experts, cfg.moe.top_k, [label for label, _ in sources])
    rows: list[tuple[int, list[int]]] = []
    for label_idx, (label, docs) in enumerate(sources):
        seqs = _sequences(tokenizer, docs, separator, tokens, seq_len)
        if not seqs:
            raise ValueError(f"data {label!r} gives fewer than seq_len={seq_len} tokens: pass more text")
        rows += [(label_idx, s) for s in seqs]
    device = next(model.parameters()).device
    model.eval()
    topk: list[list[np.ndarray]] = [[] for _ in layers]
    entropy = [0.0] * len(layers)
    dropped = [0.0] * len(layers)
    labels, token_ids, sequences = [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="routing", disable=not progress, unit="batch"):
        chunk = rows[start:start + batch_size]
        ids = torch.tensor([s for _, s in chunk], device=device)
        out = model(ids, stats=True)
        for i, aux in enumerate(out.aux):
            topk[i].append(aux.topk_idx.reshape(-1, cfg.moe.top_k).cpu().numpy())
            entropy[i] += float(aux.router_entropy) * ids.numel()
            dropped[i] += float(aux.dropped_frac) * ids.numel()
        labels += [lab for lab, s in chunk for _ in s]
        token_ids.append(ids.reshape(-1).cpu().numpy())
        sequences.append(np.repeat(np.arange(start, start + len(chunk)), seq_len))
    n = len(labels)
    rec.topk = [np.concatenate(t) for t in topk]
    rec.labels, rec.token_ids, rec.sequences = np.array(labels), np.concatenate(token_ids), np.concatenate(sequences)
    rec.router_entropy = [e / n for e in entropy]
    rec.dropped_frac = [d / n for d in dropped]
    return rec


def routing_report(rec: RoutingRecord, decode: Callable[[int], str] | None = None) -> dict[str, Any]:
    """The report (routing.json) of a record: per layer balance, co-activation, next-layer prediction,
    specialisation, top tokens and batch economics (`moelab.analysis.routing_stats`)."""
    E, K = rec.n_experts, rec.top_k
    n_labels = len(rec.label_names)
    layers = []
    for i, topk in enumerate(rec.topk):
        entry: dict[str, Any] = {"layer": rec.layers[i], **rs.balance(rs.load_counts(topk, E)),
                                 "router_entropy": rec.router_entropy[i],
                                 "router_entropy_normalised": rec.router_entropy[i] / math.log(E) if E > 1 else 0.0,
                                 "dropped_frac": rec.dropped_frac[i], "coactivation": rs.coactivation(topk, E)}
        if i + 1 < len(rec.topk):
            entry["next_layer"] = rs.next_layer_prediction(topk, rec.topk[i + 1], E)
        entry["specialisation"] = rs.specialisation(topk, rec.labels, E, n_labels)
        tops = rs.top_tokens(topk, rec.token_ids, E)
        entry["top_tokens"] = [[{"token": decode(t) if decode else t, "id": t, "count": c} for t, c in expert]
                               for expert in tops]
        entry["batch_economics"] = rs.batch_economics(topk, rec.sequences, E, list(BATCHES))
        layers.append(entry)
    return {"tokens": int(len(rec.labels)), "labels": rec.label_names,
            "tokens_per_label": np.bincount(rec.labels, minlength=n_labels).tolist(), "n_experts": E, "top_k": K,
            "layers": layers}


# ------------------------------------------------------------------------------------------------- output
def _figures(report: dict[str, Any], out: Path) -> list[tuple[str, Path]]:
    """PNG figures of a report (matplotlib's Agg canvas): (caption, path)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, E = report["layers"], report["n_experts"]
    names = [f"layer {entry['layer']}" for entry in layers]
    figures = []

    def save(fig: Figure, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        figures.append((caption, out / name))

    fig = Figure(figsize=(9, 1.2 + 0.35 * len(layers)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow([entry["utilisation"] for entry in layers], aspect="auto", cmap="viridis", vmin=0)
    ax.set(yticks=range(len(layers)), yticklabels=names, xlabel="expert", title="load / ideal load (1 = uniform)")
    fig.colorbar(im, ax=ax)
    save(fig, "load.png", "Utilisation of every expert in every MoE layer (load divided by the uniform share).")

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    x = np.arange(len(layers))
    a1.bar(x - 0.2, [entry["entropy"] for entry in layers], 0.4, label="load entropy / ln E")
    a1.bar(x + 0.2, [entry["router_entropy_normalised"] for entry in layers], 0.4, label="per-token entropy / ln E")
    a1.set(xticks=x, xticklabels=names, ylim=(0, 1.05), title="balance")
    a1.legend(fontsize=7)
    a2.bar(x, [entry["dead_experts"] for entry in layers])
    a2.set(xticks=x, xticklabels=names, title=f"dead experts (of {E})")
    save(fig, "balance.png", "Normalised entropy of the load and of each token's router distribution; dead experts.")

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    pairs = [entry for entry in layers if "next_layer" in entry]
    if pairs:
        xs = np.arange(len(pairs))
        for off, key, lab in ((-0.27, "hit_rate", "from the previous layer"),
                              (0.0, "baseline_hit_rate", "most frequent experts"), (0.27, "random_hit_rate", "random")):
            a1.bar(xs + off, [entry["next_layer"][key] for entry in pairs], 0.27, label=lab)
        a1.set(xticks=xs, xticklabels=[f"{entry['layer']}→next" for entry in pairs], ylim=(0, 1),
               title="predicting the next layer's experts")
        a1.legend(fontsize=7)
    a2.imshow(layers[0]["coactivation"]["lift"], cmap="magma")
    a2.set(title=f"co-activation lift, {names[0]}", xlabel="expert", ylabel="expert")
    save(fig, "prefetch.png", "Hit rate of predicting each token's experts from the previous layer's choices (the "
                              "basis of prefetching), and which experts fire together.")

    fig = Figure(figsize=(9, 1.2 + 0.9 * len(layers)))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(len(layers), 1))
    for ax, entry in zip(axes, layers):
        share = np.array(entry["specialisation"]["share_by_label"]).T  # [L, E]
        bottom = np.zeros(E)
        for lab, row in zip(report["labels"], share):
            ax.bar(range(E), row, bottom=bottom, label=lab)
            bottom += row
        overall = np.cumsum(report["tokens_per_label"])[:-1] / report["tokens"]
        for y in overall:  # the label mix of all tokens: an expert that does not specialise sits on it
            ax.axhline(y, color="k", ls="--", lw=0.8)
        ax.set(ylabel=f"layer {entry['layer']}", ylim=(0, 1),
               title=f"NMI(expert; label) = {entry['specialisation']['normalised_mutual_information']:.3f}")
    axes[0].legend(fontsize=7, ncol=len(report["labels"]))
    axes[-1].set_xlabel("expert")
    save(fig, "specialisation.png", "Share of each expert's tokens from each data label.")

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for entry in layers:
        pts = entry["batch_economics"]
        ax.plot([p["batch"] for p in pts], [p["experts_touched"] for p in pts], "o-", ms=3,
                label=f"layer {entry['layer']}")
    pts = layers[0]["batch_economics"]
    ax.plot([p["batch"] for p in pts], [p["experts_touched_uniform"] for p in pts], "k--",
            label="uniform E(1-(1-k/E)^B)")
    ax.set(xscale="log", xlabel="batch B (tokens from different sequences)", ylabel="distinct experts touched",
           title="batch economics")
    ax.legend(fontsize=7)
    save(fig, "batch_economics.png", "Experts a batch of B tokens touches per layer, measured and uniform.")
    return figures


def _row(e: dict[str, Any]) -> str:
    cells = [e["layer"], f"{e['entropy']:.3f}", f"{e['router_entropy_normalised']:.3f}", e["dead_experts"],
             f"{e['max_violation']:.2f}", f"{e['dropped_frac']:.3f}",
             f"{e['specialisation']['normalised_mutual_information']:.3f}",
             f"{e['next_layer']['hit_rate']:.2f}" if "next_layer" in e else "-"]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def write_report(report: dict[str, Any], out: str | Path, title: str = "routing report") -> Path:
    """routing.json, the PNG figures and one self-contained report.html (figures embedded) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    figures = _figures(report, out)
    rows = "".join(_row(e) for e in report["layers"])
    images = "".join(f"<figure><img alt=\"{html.escape(name.stem)}\" src=\"data:image/png;base64,"
                     f"{base64.b64encode(name.read_bytes()).decode()}\"><figcaption>{html.escape(caption)}</figcaption>"
                     "</figure>" for caption, name in figures)
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{report['tokens']:,} tokens "
            f"({', '.join(map(html.escape, report['labels']))}), {report['n_experts']} experts, "
            f"top-{report['top_k']}.</p><table><tr><th>layer</th><th>load entropy"
            "</th><th>token entropy</th><th>dead</th><th>max/mean</th><th>dropped</th><th>NMI(label)</th>"
            f"<th>next-layer hit</th></tr>{rows}</table>{images}</body></html>\n")
    (out / "report.html").write_text(page)
    return out / "report.html"
