"""A memory budget at a real shape: decode speed, expert-cache hit rate, bytes read per token and peak memory
against the budget, and the peak memory of loading against the loaded model's size.

Each row runs in a fresh process (its peak RSS its own): `moelab.hf.load(ckpt, quant=, max_memory_gb=,
policy=, prefetch=)` — or, for a run converted by `moelab convert --from-hf CKPT RUN --quant int4` (give RUN and
its format, `--quants int4`), `moelab.rundir.load_run(RUN, max_memory_gb=, ...)` — then one prompt of
`--prompt` random tokens continued by `--new` tokens sampled at temperature 1 (seeded: every row draws the
same tokens; `moelab.generate.generate_batch`). Sampled, not
greedy: a random-weight model's greedy continuation soon repeats one token, whose experts then always hit
the cache. Per row:
- load s, and the loading peak: the rise of the process's peak RSS (VmHWM) over its RSS after importing torch
  and moelab, against the loaded model's resident bytes (`moelab.inference.offload.resident_bytes`);
- decode tok/s (the clock starts after the prefill), the cache's hit rate and the bytes it read from the
  checkpoint per decode token (decode steps only);
- the peak RSS rise over the whole run, against the budget.
Rows: every budget × policy (lru, lfu) × prefetch (off, on), then the whole model in memory (each `--quant`).
Before each row the share of the checkpoint's bytes in the page cache is measured (`fincore`) and printed:
experts "read from disk" come from the page cache when it holds them. `--cold` drops the page cache before
each row (`/proc/sys/vm/drop_caches`, root only; other processes lose their cached files too).

    python benchmarks/offload.py CKPT                                   # bf16; budgets 2, 4, 6 GB + whole
    python benchmarks/offload.py CKPT --quants int4 --budgets 1,2 --new 24
    python benchmarks/offload.py RUN --quants int4 --budgets 1,2 --new 24     # a quantized run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cached_share(ckpt: str) -> float | None:
    """Share of the checkpoint's safetensors bytes in the page cache (util-linux `fincore`), or None."""
    files = sorted(str(p) for p in Path(ckpt).rglob("*.safetensors"))
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *files],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return res / size if size else None


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(ckpt: str, quant: str, budget: float | None, policy: str, prefetch: bool, prompt: int, new: int,
          threads: int) -> dict:
    import torch

    from moelab import hf
    from moelab.inference.generate import generate_batch
    from moelab.inference.offload import expert_cache, resident_bytes
    from moelab.inference.prepare import prepare_inference

    torch.set_num_threads(threads)
    q = None if quant == "bf16" else quant
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peaks below are this row's
    base = status("VmRSS:")
    t0 = time.perf_counter()
    if (Path(ckpt) / "checkpoints").is_dir():  # a run converted by `moelab convert --quant`: experts as stored
        from moelab.runs.load import load_run

        model = load_run(ckpt, max_memory_gb=budget, policy=policy, prefetch=prefetch)[0]
    else:
        model = hf.load(ckpt, "bfloat16", quant=q, max_memory_gb=budget, policy=policy, prefetch=prefetch,
                        progress=False)
    load_s, load_peak, resident = time.perf_counter() - t0, status("VmHWM:") - base, resident_bytes(model)
    prepare_inference(model, q)  # the whole model in bf16: the decode formats (a budgeted or quantized one has them)
    cache = expert_cache(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (prompt,), generator=g).tolist()
    mark: dict = {}

    def prefill_done() -> None:
        mark["t"] = time.perf_counter()
        mark["stats"] = dict(vars(cache.stats)) if cache is not None else None

    out = generate_batch(model, [ids], new, temperature=1.0, seed=0, on_prefill=prefill_done)
    decode_s = time.perf_counter() - mark["t"]
    row = {"quant": quant, "budget": budget, "policy": policy if budget else "-",
           "prefetch": ("on" if prefetch else "off") if budget else "-",
           "load_s": load_s, "load_peak": load_peak, "resident": resident, "tok_s": (len(out[0]) - 1) / decode_s,
           "peak": status("VmHWM:") - base, "hit_rate": None, "read_per_token": None}
    if cache is not None:
        s0, s1 = mark["stats"], vars(cache.stats)
        lookups = s1["lookups"] - s0["lookups"]
        row["hit_rate"] = (s1["hits"] + s1["waits"] - s0["hits"] - s0["waits"]) / max(lookups, 1)
        row["read_per_token"] = (s1["bytes_read"] - s0["bytes_read"]) / (len(out[0]) - 1)
        row["capacity"] = cache.capacity
        cache.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Hugging Face checkpoint directory (config.json + safetensors), or a quantized run")
    p.add_argument("--quants", default="bf16", help="comma-separated: bf16, int8, int4")
    p.add_argument("--budgets", default="2,4,6", help="comma-separated budgets in GB")
    p.add_argument("--policies", default="lru,lfu")
    p.add_argument("--prefetch", default="off,on")
    p.add_argument("--no-whole", dest="whole", action="store_false", help="skip the whole-model rows")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=13, help="new tokens (the first from the prefill)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine busy with other work: "
                   "two threads then wait for each other at every op)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each row (root)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        quant, budget, policy, prefetch = json.loads(a.child)
        print(json.dumps(child(a.ckpt, quant, budget, policy, prefetch, a.prompt, a.new, a.threads)))
        return
    rows = []
    for quant in a.quants.split(","):
        rows += [(quant, float(b), policy, pre == "on") for b in a.budgets.split(",") if b
                 for policy in a.policies.split(",") for pre in a.prefetch.split(",")]
        if a.whole:
            rows.append((quant, None, "lru", False))
    print(f"# {a.ckpt}: prompt {a.prompt} tokens, {a.new} new (sampled), {a.threads} thread(s); load average "
          f"{loadavg()}")
    print("| quant | budget GB | policy | prefetch | page cache before | load s | loading peak GB | resident GB | "
          "decode tok/s | hit rate | read/token MB | peak RSS rise GB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for quant, budget, policy, prefetch in rows:
        if a.cold:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")
        share = cached_share(a.ckpt)
        res = subprocess.run([sys.executable, __file__, a.ckpt, "--prompt", str(a.prompt), "--new", str(a.new),
                              "--threads", str(a.threads), "--child", json.dumps([quant, budget, policy, prefetch])],
                             capture_output=True, text=True)
        if res.returncode:
            print(f"| {quant} | {budget} | {policy} | {prefetch} | failed: {res.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        hit = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f} %"
        per_token = "-" if r["read_per_token"] is None else f"{r['read_per_token'] / 1e6:.0f}"
        cached = "?" if share is None else f"{100 * share:.0f} %"
        print(f"| {quant} | {budget or 'whole'} | {r['policy']} | {r['prefetch']} | {cached} | {r['load_s']:.1f} | "
              f"{r['load_peak'] / 1e9:.2f} | {r['resident'] / 1e9:.2f} | {r['tok_s']:.2f} | {hit} | {per_token} | "
              f"{r['peak'] / 1e9:.2f} | {loadavg()} |", flush=True)


if __name__ == "__main__":
    main()
