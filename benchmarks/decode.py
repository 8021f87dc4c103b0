"""Batch-1 decode and prefill of one real-shaped MoE checkpoint, engine by engine, against the memory bound.

A decode step must read every weight it uses once (and the KV cache), so its time is bounded below by
bytes read per token / read bandwidth. Each row runs in its own process (so its peak RSS is its own): it
loads the model, then, before every timed run, measures the read bandwidth in that same process — the
probe is bimodal on some machines, so it sums several fresh 1 GiB buffers and reports their min / median /
max — then prefills the prompt and greedily decodes `--new` tokens, timing every step. Rows:

- moelab bf16 / int8 / int4 (`moelab.hf.load` + `moelab.inference.prepare_inference`);
- transformers (bf16; its experts implementations "grouped_mm" and "eager"), when installed;
- llama.cpp (llama-cpp-python) on GGUFs of the same weights (BF16, Q8_0, Q4_0), when installed and given.

Per row: GB/token (weights read per decode token + the KV cache at mid-generation), decode tok/s (median
step), effective GB/s (= tok/s · GB/token), % of the bound (effective / probe median), the ratio to
llama.cpp at the same bits and to transformers, prefill tok/s and peak RSS. The load average is printed
with every run. Checkpoint and GGUFs are built elsewhere (random weights from transformers' own classes;
GGUFs by llama.cpp's converter) — see docs/BENCHMARKS.md ("Decode").

    python benchmarks/decode.py CKPT_DIR [--gguf bf16=F.gguf --gguf q8_0=G.gguf --gguf q4_0=H.gguf]
        [--engines moelab,transformers,llama.cpp] [--quants bf16,int8,int4] [--hf-experts grouped_mm,eager]
        [--prompt 32] [--new 128]
        [--runs 3] [--threads 2] [--quiet-below 0.3] [--quiet-timeout 600]
        [--python-other PYTHON]   # a Python with transformers / llama_cpp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

# the engines import their own packages: none may find a script of this directory first (as transformers, which
# imports a `kernels` package when present, once found one here)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

GiB = 2**30
BITS = {"bf16": "bf16", "int8": "8-bit", "int4": "4-bit", "BF16": "bf16", "Q8_0": "8-bit", "Q4_0": "4-bit"}


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def read_bandwidth(buffers: int = 5, nbytes: int = GiB) -> list[float]:
    """GB/s of `torch.sum` over `buffers` fresh buffers of `nbytes` each (best of 3 sums per buffer)."""
    out = []
    for _ in range(buffers):
        t = torch.ones(nbytes // 4)
        t.sum()
        best = min(_timed(t.sum) for _ in range(3))
        out.append(nbytes / best / 1e9)
        del t
    return out


def cpu_busy(seconds: float = 1.0) -> float:
    """Cores busy (user, nice and system time of every process) over the next `seconds`, from /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        return v[0] + v[1] + v[2] + v[5] + v[6], sum(v)
    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def wait_quiet(below: float, timeout: float) -> float:
    """Wait until the other processes keep fewer than `below` cores busy (this one is idle meanwhile), or until
    `timeout` seconds have passed; the last reading. Timings on a shared machine are otherwise meaningless."""
    t0 = time.time()
    while (busy := cpu_busy()) >= below and time.time() - t0 < timeout:
        pass
    return busy


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------- engines

def moelab_engine(ckpt: str, quant: str, logits_out: str | None = None):
    """(step(ids) -> logits of the last position, reset(), GB/token at mid-generation). Variant "float" is the
    model as loaded, unconverted: the reference of the quality columns. With `logits_out`, the logits of every
    position of a fixed token sequence (QUALITY_TOKENS) are saved there first."""
    from moelab.hf import load
    from moelab.inference.prepare import decode_bytes, prepare_inference
    from moelab.model.cache import KVCache

    with torch.no_grad():
        model = load(ckpt, for_training=True)  # unconverted: the "float" reference; the others converted below
        if quant != "float":
            prepare_inference(model, None if quant == "bf16" else quant)
        if logits_out:
            from safetensors.torch import save_file

            save_file({"logits": model(quality_tokens()).logits[0].float()}, logits_out)
    state = {"cache": KVCache()}

    def step(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids]), cache=state["cache"]).logits[0, -1]

    def reset() -> None:
        state["cache"] = KVCache()

    if quant == "float":
        return step, reset, lambda positions: 0
    return step, reset, lambda positions: decode_bytes(model, positions)


QUALITY_TOKENS = 128


def quality_tokens() -> torch.Tensor:
    """[1, QUALITY_TOKENS] fixed token ids at which the quantized models' logits are compared with the float's."""
    return torch.randint(0, 20000, (1, QUALITY_TOKENS), generator=torch.Generator().manual_seed(1))


def logits_quality(path: str, reference: str) -> tuple[float, float]:
    """(‖Δ‖/‖logits‖ over all positions, fraction of positions whose top-1 token agrees) against the reference."""
    from safetensors.torch import load_file

    got, want = load_file(path)["logits"].double(), load_file(reference)["logits"].double()
    return ((got - want).norm() / want.norm()).item(), (got.argmax(-1) == want.argmax(-1)).double().mean().item()


def transformers_engine(ckpt: str, experts: str):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, experts_implementation=experts).eval()
    cfg = model.config
    state = {"cache": DynamicCache(config=cfg), "pos": 0}

    def step(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = model(torch.tensor([ids]), past_key_values=state["cache"], use_cache=True)
        return out.logits[0, -1]

    def reset() -> None:
        state["cache"] = DynamicCache(config=cfg)

    per_token = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if "embed_tokens" not in n and ".experts." not in n)
    experts_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    per_token += experts_bytes * cfg.num_experts_per_tok // cfg.num_experts
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    return step, reset, lambda positions: per_token + positions * kv


def gguf_tensor_bytes(path: str) -> dict[str, int]:
    """name -> bytes of every tensor in a GGUF file (from its header: sizes are the gaps between offsets)."""
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string():
            return f.read(read("Q")).decode("utf-8", "replace")

        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def skip(vtype):
            if vtype == 8:
                string()
            elif vtype == 9:
                etype, n = read("I"), read("Q")
                for _ in range(n):
                    skip(etype)
            else:
                f.read(sizes[vtype])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        read("I")
        n_tensors, n_kv = read("Q"), read("Q")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = string(), read("I")
            if key == "general.alignment":
                alignment = read("I")
            else:
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string()
            f.read(8 * read("I"))
            read("I")
            infos.append((read("Q"), name))
        data_start = -(-f.tell() // alignment) * alignment
    infos.sort()
    ends = [off for off, _ in infos[1:]] + [os.path.getsize(path) - data_start]
    return {name: end - off for (off, name), end in zip(infos, ends)}


def llamacpp_engine(gguf: str, threads: int):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=1024, n_batch=128, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    n_vocab = llm.n_vocab()

    def step(ids: list[int]) -> torch.Tensor:
        llm.eval(ids)
        return torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy())

    meta = llm.metadata
    arch = meta["general.architecture"]
    k, E = int(meta[f"{arch}.expert_used_count"]), int(meta[f"{arch}.expert_count"])
    L, G = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count_kv"])
    hd = int(meta.get(f"{arch}.attention.key_length", 128))
    tensors = gguf_tensor_bytes(gguf)
    per_token = sum(n * k // E if "_exps" in name else n for name, n in tensors.items() if name != "token_embd.weight")
    return step, llm.reset, lambda positions: per_token + positions * L * 2 * G * hd * 2  # f16 KV cache


# ------------------------------------------------------------------------------------------- one row

def run_child(a: argparse.Namespace) -> None:
    """One engine: load, then per run probe the bandwidth and time prefill + decode; JSON lines to stdout."""
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.engine == "moelab":
        step, reset, gb_at = moelab_engine(a.ckpt, a.variant, a.logits_out)
    elif a.engine == "transformers":
        step, reset, gb_at = transformers_engine(a.ckpt, a.variant)
    else:
        step, reset, gb_at = llamacpp_engine(a.variant, a.threads)
    load_s = time.perf_counter() - t0
    prompt = torch.randint(0, 20000, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    gb = gb_at(a.prompt + a.new // 2) / 1e9
    for run in range(a.runs + 1 if a.runs else 0):  # run 0 warms up (first touch of mmap'd or packed weights)
        busy = wait_quiet(a.quiet_below, a.quiet_timeout) if run else 0.0
        probe = read_bandwidth(a.buffers)
        load = loadavg()
        reset()
        t0 = time.perf_counter()
        token = int(step(prompt).argmax())
        prefill = time.perf_counter() - t0
        times, tokens = [], [token]
        for _ in range(a.new - 1):
            t0 = time.perf_counter()
            token = int(step([token]).argmax())
            times.append(time.perf_counter() - t0)
            tokens.append(token)
        if run == 0:
            continue
        print(json.dumps({"run": run, "tok_s": 1 / statistics.median(times), "prefill_tok_s": a.prompt / prefill,
                          "GB_token": gb, "probe": probe, "load": load, "others_busy": busy,
                          "tokens": tokens[:6]}), flush=True)
    print(json.dumps({"summary": True, "load_s": load_s, "peak_rss_gib": peak_rss_gib()}), flush=True)


def rows_to_run(a: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    """(engine, variant, label, bits) of every row asked for."""
    rows = []
    engines = a.engines.split(",")
    if "moelab" in engines:
        rows += [("moelab", q, f"moelab {q}", BITS[q]) for q in a.quants.split(",")]
    if "transformers" in engines:
        rows += [("transformers", x, f"transformers bf16 ({x})", "bf16") for x in a.hf_experts.split(",")]
    if "llama.cpp" in engines:
        for kind, path in (g.split("=", 1) for g in a.gguf):
            rows.append(("llama.cpp", path, f"llama.cpp {kind.upper()}", BITS[kind.upper()]))
    return rows


def available(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="Hugging Face checkpoint directory")
    p.add_argument("--gguf", action="append", default=[], metavar="KIND=PATH", help="e.g. q4_0=/path/model.gguf")
    p.add_argument("--engines", default="moelab,transformers,llama.cpp")
    p.add_argument("--quants", default="bf16,int8,int4")
    p.add_argument("--hf-experts", default="grouped_mm,eager", help="transformers' experts implementations to run")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--buffers", type=int, default=5, help="fresh 1 GiB buffers per bandwidth probe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet-below", type=float, default=0.3,
                   help="before each timed run, wait until other processes keep fewer cores than this busy")
    p.add_argument("--quiet-timeout", type=float, default=600, help="seconds to wait for that at most (0: never)")
    p.add_argument("--python-other", default=sys.executable, help="Python for the transformers / llama.cpp rows")
    p.add_argument("--no-quality", dest="quality", action="store_false",
                   help="skip the logits comparison of moelab's formats with the float model (one more load)")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--logits-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.engine, a.variant = a.child
        return run_child(a)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  threads {a.threads}  prompt {a.prompt}  "
          f"new {a.new}  runs {a.runs}  load {loadavg()}", flush=True)
    results = {}
    tmp = tempfile.mkdtemp(prefix="moelab-decode-")
    rows = rows_to_run(a)
    if a.quality and any(engine == "moelab" for engine, *_ in rows):
        rows.insert(0, ("moelab", "float", "moelab float (unconverted; quality reference)", "bf16"))
    for engine, variant, label, bits in rows:
        python = sys.executable if engine == "moelab" else a.python_other
        module = {"moelab": "moelab", "transformers": "transformers", "llama.cpp": "llama_cpp"}[engine]
        if not available(python, module):
            print(f"# {label}: skipped ({module} is not installed in {python})", flush=True)
            continue
        cmd = [python, __file__, a.ckpt, "--child", engine, variant, "--prompt", str(a.prompt), "--new", str(a.new),
               "--runs", str(a.runs if variant != "float" else 0), "--buffers", str(a.buffers),
               "--threads", str(a.threads), "--quiet-below", str(a.quiet_below),
               "--quiet-timeout", str(a.quiet_timeout)]
        logits = os.path.join(tmp, f"{variant}.safetensors") if engine == "moelab" and a.quality else None
        if logits:
            cmd += ["--logits-out", logits]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines or not lines[-1].get("summary"):
            print(f"# {label}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        runs, summary = lines[:-1], lines[-1]
        if variant == "float":
            continue
        for r in runs:
            print(f"# {label} run {r['run']}: {r['tok_s']:.2f} tok/s, prefill {r['prefill_tok_s']:.1f} tok/s, probe "
                  f"{min(r['probe']):.1f}/{statistics.median(r['probe']):.1f}/{max(r['probe']):.1f} GB/s, "
                  f"load {r['load']}, others busy {r['others_busy']:.2f} cores, tokens {r['tokens']}", flush=True)
        results[label] = dict(
            bits=bits, engine=engine, GB=runs[0]["GB_token"], tok_s=statistics.median(r["tok_s"] for r in runs),
            prefill=statistics.median(r["prefill_tok_s"] for r in runs),
            probe=[x for r in runs for x in r["probe"]], rss=summary["peak_rss_gib"])
        if logits and os.path.exists(os.path.join(tmp, "float.safetensors")):
            results[label]["quality"] = logits_quality(logits, os.path.join(tmp, "float.safetensors"))
    shutil.rmtree(tmp, ignore_errors=True)
    report(results)


def report(results: dict) -> None:
    llama = {r["bits"]: r["tok_s"] for r in results.values() if r["engine"] == "llama.cpp"}
    hf = max((r["tok_s"] for r in results.values() if r["engine"] == "transformers"), default=None)
    print("| engine | GB/token | decode tok/s | effective GB/s | probe GB/s min/med/max | % of bound (med) | "
          "vs llama.cpp same bits | vs transformers | prefill tok/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        eff = r["tok_s"] * r["GB"]
        probe = r["probe"]
        vs_llama = f"{r['tok_s'] / llama[r['bits']]:.2f}" if r["bits"] in llama else "–"
        vs_hf = f"{r['tok_s'] / hf:.2f}" if hf else "–"
        print(f"| {label} | {r['GB']:.3f} | {r['tok_s']:.2f} | {eff:.1f} | {min(probe):.0f}/"
              f"{statistics.median(probe):.0f}/{max(probe):.0f} | {100 * eff / statistics.median(probe):.0f} % | "
              f"{vs_llama} | {vs_hf} | {r['prefill']:.0f} | {r['rss']:.1f} |")
    quality = {label: r["quality"] for label, r in results.items() if "quality" in r}
    if quality:
        print(f"\nLogits against the unconverted float model at {QUALITY_TOKENS} positions of a fixed sequence:")
        print("| moelab format | ‖Δlogits‖/‖logits‖ | top-1 agreement |\n|---|---|---|")
        for label, (err, top1) in quality.items():
            print(f"| {label} | {err:.4f} | {100 * top1:.1f} % |")


if __name__ == "__main__":
    main()
