"""Serving throughput and latency under N concurrent streaming clients, against the bound of bytes read per step.

    python benchmarks/serve.py --model DIR [--clients 1,2,4,8,16,32,64] [--max-tokens 64] [--quant int4]
    python benchmarks/serve.py --url http://127.0.0.1:8080 --model DIR   # a server already running (llama-server)
    python benchmarks/serve.py --model DIR --against http://127.0.0.1:8080  # moelab and that server, N by N
    python benchmarks/serve.py --make-tiny DIR                           # a small random checkpoint to try it on
    ... --plot tokens_per_s.png                                          # tokens/s against N, with the bound

With --model alone it starts `moelab serve DIR` on a free loopback port (max-batch = the largest N) and stops it at
the end; with --url it drives that server instead (any OpenAI-compatible one: llama.cpp's `llama-server
--parallel N` for instance) and uses --model only for the bound. For each N, N client threads each send
--requests streaming /v1/completions requests one after another; reported: aggregate output tokens/s (tokens over the
wall time of the N-client phase; each request's usage.completion_tokens), time to first token and inter-token
latency p50 / p99 (per SSE chunk with text),
and, from moelab's /metrics, the mean decode batch and the distinct experts touched per MoE layer per decode step next
to the uniform-routing count E·(1 − (1 − k/E)^B).

The bound (tokens/s no engine can beat with N rows on this machine): a decode step reads the non-expert weights once,
the experts N uniform independent choices touch in every MoE layer (E·(1 − (1 − k/E)^N)), and the KV cache of the N
rows; over the read bandwidth measured right before each N (the best of three passes over a 512 MB tensor), N / (bytes
per step / bandwidth).
The same curve for every engine serving those weights; the measured batch and experts per step are printed beside it.
With --save, each run (--label) is kept in a JSON file and --plot draws every run kept there with its bound:

    python benchmarks/serve.py --model Q3 --quant int4 --label "moelab int4" --save runs.json
    python benchmarks/serve.py --url http://127.0.0.1:8080 --model Q3 --quant int4 --label "llama-server Q4_0" \
        --save runs.json --plot tokens_per_s.png
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def stream_one(url: str, model: str, prompt: str, max_tokens: int, seed: int = 0, external: bool = True) -> dict:
    """One streaming completion (sampled at temperature 1 with `seed`, so that concurrent streams differ as users'
    do): the send time, the arrival time of each chunk with text, the tokens generated."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream": True,
            "stream_options": {"include_usage": True}}
    if external and os.environ.get("SERVE_BENCH_IGNORE_EOS"):  # llama-server, like for like with moelab:
        body["ignore_eos"] = True  # decode all max_tokens (moelab does on a random model: no end-of-text id)
        body.update(cache_prompt=False, top_k=0, top_p=1.0, min_p=0.0)  # read every prompt; sample as moelab does
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
    arrivals, tokens = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        obj = json.loads(line[6:])
        if obj.get("usage"):
            tokens = obj["usage"].get("completion_tokens")
        choices = obj.get("choices") or [{}]
        if choices[0].get("text"):
            arrivals.append(time.perf_counter())
    conn.close()
    return {"sent": t0, "arrivals": arrivals, "tokens": tokens if tokens is not None else len(arrivals)}


def metrics(url: str) -> dict[str, float]:
    u = urlparse(url)
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("moelab_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def phase(url: str, model: str, n: int, requests: int, max_tokens: int, external: bool = True) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(requests):
            res = stream_one(url, model, PROMPT + f"# client {i} request {r}\n", max_tokens, seed=1000 * i + r,
                             external=external)
            with lock:
                results.append(res)

    before = metrics(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics(url)
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["arrivals"][0] - r["sent"] for r in results if r["arrivals"])
    itl = sorted(b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]))
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps, layer_steps = d.get("moelab_decode_steps_total", 0), d.get("moelab_moe_layer_steps_total", 0)
    return {"n": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99),
            "batch": d["moelab_decode_rows_total"] / steps if steps else None,
            "touched": d["moelab_experts_touched_total"] / layer_steps if layer_steps else None,
            "touched_uniform": d["moelab_experts_touched_uniform_total"] / layer_steps if layer_steps else None}


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def read_bandwidth(mb: int = 512) -> float:
    """Bytes/s of one read pass over a tensor far larger than the caches (best of 3)."""
    import torch

    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(3))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_bytes(path: str, quant: str | None) -> dict:
    """Bytes the decode step reads (`moelab.inference.prepare.decode_bytes`): the non-expert weights, one routed
    expert (the mean of a layer's store), KV per position; E, k and the number of MoE layers."""
    from moelab.inference.prepare import decode_bytes
    from moelab.serve.server import load

    model = load(path, quant=quant).model
    moes = model.moe_layers()
    cfg = model.cfg
    store = [(m.experts.nbytes if hasattr(m.experts, "nbytes") else
              sum(p.numel() * p.element_size() for p in m.experts.parameters())) for m in moes]
    counted = sum(m.experts.nbytes * m.cfg.top_k // m.experts.n_experts for m in moes if hasattr(m.experts, "nbytes"))
    base = decode_bytes(model, 0)
    return {"non_expert": base - counted, "per_expert": sum(store) / (len(moes) * cfg.moe.n_experts) if moes else 0.0,
            "kv_per_pos": decode_bytes(model, 1) - base, "n_experts": cfg.moe.n_experts if cfg.moe else 0,
            "top_k": cfg.moe.top_k if cfg.moe else 0, "n_moe": len(moes)}


def sizes_of(path: str, quant: str | None, cache: str | None) -> dict:
    """`model_bytes` computed in a child process (the weights loaded there, not beside the server's copy), kept in the
    JSON file `cache` (keyed by the resolved path and the format) when given."""
    key = f"{Path(path).resolve()}|{quant}"
    known = json.loads(Path(cache).read_text()) if cache and Path(cache).exists() else {}
    if key not in known:
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import serve; "
                f"print(json.dumps(serve.model_bytes({path!r}, {quant!r})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        known[key] = json.loads(out.strip().splitlines()[-1])
        if cache:
            Path(cache).write_text(json.dumps(known, indent=1))
    return known[key]


def bound(sizes: dict, batch: int, context: float, bandwidth: float) -> float:
    """Tokens/s no engine can beat with `batch` rows on this machine: a step reads the non-expert weights once, the
    experts B uniform independent choices touch in every MoE layer (E·(1 − (1 − k/E)^B)), and B·context KV
    positions; tokens/s = B / (bytes / bandwidth)."""
    from moelab.accounting.costs import experts_touched

    touched = experts_touched(sizes["n_experts"], sizes["top_k"], batch) if sizes["n_moe"] else 0
    step = sizes["non_expert"] + sizes["n_moe"] * touched * sizes["per_expert"] + batch * context * sizes["kv_per_pos"]
    return batch / (step / bandwidth)


def make_tiny(out: str) -> None:
    """A small random Qwen3-MoE-like checkpoint (d 256, 4 layers, 16 experts top-4, BPE vocabulary 2048)."""
    import sysconfig

    import torch

    from moelab import hf
    from moelab.config.model import ModelConfig, MoEConfig
    from moelab.data.tokenizer import train_tokenizer
    from moelab.model.transformer import MoETransformer

    out_p = Path(out)
    texts = [f.read_text(errors="ignore") for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]]
    train_tokenizer(texts, 2048, out_p.parent / (out_p.name + ".tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=512,
                      moe=MoEConfig(d_model=256, d_expert=256, n_experts=16, top_k=4))
    hf.save(MoETransformer(cfg), out_p, tokenizer_json=out_p.parent / (out_p.name + ".tokenizer.json"))
    print(f"wrote {out_p}")


def plot(runs: list[dict], out: str) -> None:
    """Aggregate tokens/s against N (log-log) for every saved run, each engine's bound dashed in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    bounds_drawn = set()
    for run in runs:
        ns = [r["n"] for r in run["rows"]]
        line, = ax.plot(ns, [r["tokens_per_s"] for r in run["rows"]], "o-", label=run["label"])
        if run["bound_label"] not in bounds_drawn:
            bounds_drawn.add(run["bound_label"])
            ax.plot(ns, [r["bound"] for r in run["rows"]], "--", color=line.get_color(), alpha=0.6,
                    label=f"bound: {run['bound_label']}")
    ns = sorted({r["n"] for run in runs for r in run["rows"]})
    ax.set(xscale="log", yscale="log", xlabel="concurrent streaming clients N", ylabel="aggregate output tokens/s")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


def wait_for(url: str, model_name: str | None) -> str:
    """Wait until the server at `url` answers /v1/models; the model id to send (`model_name`, else its first)."""
    u = urlparse(url)
    for _ in range(1200):
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            conn.request("GET", "/v1/models")
            return model_name or json.loads(conn.getresponse().read())["data"][0]["id"]
        except (OSError, ValueError, KeyError):
            time.sleep(0.25)
    raise SystemExit(f"{url} did not answer")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (served by moelab, and the weights of the bound)")
    p.add_argument("--url", help="an OpenAI-compatible server already running (None: start `moelab serve --model`)")
    p.add_argument("--model-name", default=None, help="the model id to send (None: the server's first)")
    p.add_argument("--against", metavar="URL", help="a second OpenAI-compatible server (llama-server) measured at "
                   "each N right after the first: the two side by side in one run, with their ratio")
    p.add_argument("--against-label", default=None, help="its name in the tables, --save and the plot")
    p.add_argument("--clients", default="1,2,4,8,16,32,64")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--quant", default=None, choices=["int8", "int4"])
    p.add_argument("--threads", type=int, default=None, help="torch threads of the moelab server")
    p.add_argument("--make-tiny", metavar="DIR", help="write a small random checkpoint to DIR and exit")
    p.add_argument("--label", default=None, help="the run's name in --save and the plot")
    p.add_argument("--sizes-cache", metavar="JSON", help="keep the weights' byte counts here between runs")
    p.add_argument("--save", metavar="JSON", help="append this run (label, rows, bound) to this file")
    p.add_argument("--plot", metavar="PNG", help="tokens/s against N of every run in --save (or this run), bounds "
                   "dashed, to this file")
    p.add_argument("--plot-only", action="store_true", help="only draw --plot from the runs in --save")
    args = p.parse_args()
    if args.make_tiny:
        return make_tiny(args.make_tiny)
    if args.plot_only:
        return plot(json.loads(Path(args.save).read_text()), args.plot)
    if not args.model:
        p.error("--model is required (the served weights, for the bound)")
    ns = [int(n) for n in args.clients.split(",")]
    sizes = sizes_of(args.model, args.quant, args.sizes_cache)  # before the server loads its copy
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "moelab", "serve", args.model, "--port", str(port), "--max-batch", str(max(ns)),
               "--max-queue", str(4 * max(ns))] + (["--quant", args.quant] if args.quant else [])
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = [(args.label or ("moelab serve" if proc else url), url, proc is None)]
        if args.against:
            targets.append((args.against_label or args.against, args.against, True))
        names = [wait_for(u, args.model_name) for _, u, _ in targets]
        for (_, u, ext), name in zip(targets, names):
            stream_one(u, name, PROMPT, 4, external=ext)  # warm-up
        context = 20 + args.max_tokens / 2  # the mean KV positions of a row: ~ prompt tokens + half the new ones
        print(f"server {url} ({'moelab serve' if proc else 'external'}), model {args.model}, quant {args.quant}, "
              f"non-expert {sizes['non_expert'] / 1e6:.1f} MB, expert "
              f"{sizes['per_expert'] / 1e6:.2f} MB x {sizes['n_experts']} x {sizes['n_moe']} layers, "
              f"top-{sizes['top_k']}" + (f"; against {args.against} (each N: this server, then that one)"
                                         if args.against else ""))
        print("| engine |  N | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | batch | experts/layer/step "
              "(uniform) | read GB/s | bound tokens/s | of bound |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows: list[list[dict]] = [[] for _ in targets]
        for n in ns:
            bw = read_bandwidth()  # before each N: this machine's read bandwidth drifts by ±30 % within minutes
            b = bound(sizes, n, context, bw)
            for (label, u, ext), name, kept in zip(targets, names, rows):
                r = phase(u, name, n, args.requests, args.max_tokens, external=ext)
                batch = f"{r['batch']:.1f}" if r["batch"] is not None else "n/a"
                touched = (f"{r['touched']:.2f} ({r['touched_uniform']:.2f})" if r["touched"] is not None else "n/a")
                print(f"| {label} | {n} | {r['tokens_per_s']:.1f} | {1e3 * r['ttft_p50']:.0f} / "
                      f"{1e3 * r['ttft_p99']:.0f} | {1e3 * r['itl_p50']:.1f} / {1e3 * r['itl_p99']:.1f} | {batch} | "
                      f"{touched} | {bw / 1e9:.1f} | {b:.0f} | {100 * r['tokens_per_s'] / b:.1f} % |", flush=True)
                kept.append({**r, "bound": b, "bandwidth": bw})
        if args.against:
            print(f"\n|  N | {targets[0][0]} | {targets[1][0]} | ratio |\n|---:|---:|---:|---:|")
            for a, o in zip(*rows):
                print(f"| {a['n']} | {a['tokens_per_s']:.1f} | {o['tokens_per_s']:.1f} | "
                      f"{a['tokens_per_s'] / o['tokens_per_s']:.2f} |")
        if args.save:
            runs = json.loads(Path(args.save).read_text()) if Path(args.save).exists() else []
            runs = [run for run in runs if run["label"] not in {label for label, _, _ in targets}]
            bound_label = f"{Path(args.model).name}, {args.quant or 'checkpoint dtype'}"
            runs += [{"label": label, "bound_label": bound_label, "rows": kept}
                     for (label, _, _), kept in zip(targets, rows)]
            Path(args.save).write_text(json.dumps(runs, indent=1))
        if args.plot:
            plot(json.loads(Path(args.save).read_text()) if args.save else
                 [{"label": label, "bound_label": "this run", "rows": kept} for (label, _, _), kept in
                  zip(targets, rows)], args.plot)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
