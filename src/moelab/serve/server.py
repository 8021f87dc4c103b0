"""`moelab serve PATH`: load a checkpoint as `moelab generate` does, start the engine, serve the app with uvicorn.

    served = build(load_model(path), max_batch=16)      # the engine (started on a thread) and what the app needs
    app = create_app(served)                            # moelab.serve.app
    serve(path, port=8000)                              # all of it, until SIGTERM / SIGINT (then drains)

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets the open responses (streams included)
finish, then the app's shutdown stops the engine once it has drained; `serve` returns and the process exits 0.
`serve` runs the engine loop on the main thread (where the model was loaded) and uvicorn on a second thread: the
kernels' OpenMP threads then belong to one team only (`moelab.serve.scheduler.Engine.run` says why that matters).
"""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from moelab.serve.app import Served, create_app
from moelab.serve.metrics import Metrics
from moelab.serve.scheduler import Engine, check_options


def load(path: str | Path, *, quant: str | None = None, group_size: int = 32, max_memory_gb: float | None = None,
         policy: str = "lru", prefetch: bool = False, progress: bool | None = None):
    """The `moelab.runs.load.LoadedModel` of a run, a quantized run or a Hugging Face directory, with the load
    options of `moelab generate` (quantized at load, experts on disk within a memory budget)."""
    from moelab.inference.formats import check_quant
    from moelab.runs.load import is_hf_dir, load_model
    from moelab.runs.rundir import RunDir

    check_quant(quant, group_size)
    path = Path(path)
    hf_dir = path.is_dir() and is_hf_dir(path) and not RunDir(path).checkpoints()
    budget = dict(max_memory_gb=max_memory_gb, policy=policy, prefetch=prefetch) if max_memory_gb is not None else {}
    loaded = load_model(path, quant=quant, group_size=group_size, **budget,
                        **(dict(progress=progress) if hf_dir else {}))  # converted for inference (moelab.runs.load)
    if loaded.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: the server needs one to read prompts and write text")
    return loaded


def build(loaded: Any, *, model_name: str | None = None, max_batch: int = 16, max_queue: int = 64,
          max_tokens_in_flight: int | None = None, prefill_chunk: int = 256, api_key: str | None = None,
          start: bool = True) -> Served:
    """The engine over `loaded` (a LoadedModel; started on its own thread unless `start` is False — then `run`
    runs it) and what `create_app` needs: its name (None: the directory's name), encoders, chat template (None when
    the checkpoint has none), metrics."""
    from moelab.data.chat import ChatTemplate
    from moelab.inference.offload import expert_cache

    model, tok = loaded.model, loaded.tokenizer
    moe = model.cfg.moe
    engine_ref: dict[str, Engine] = {}
    cache = expert_cache(model)

    def gauges() -> dict[str, float]:
        e = engine_ref["engine"]
        out = {"moelab_queue_depth": e.queue_depth, "moelab_batch_size": e.batch_size,
               "moelab_prefilling_requests": len(e.prefilling)}
        if cache is not None:
            out |= {"moelab_expert_cache_hit_rate": cache.stats.hit_rate, "moelab_expert_cache_lookups":
                    cache.stats.lookups, "moelab_expert_cache_bytes_read": cache.stats.bytes_read}
        return out

    has_moe = bool(model.moe_layers())
    metrics = Metrics(moe.n_experts if has_moe else 0, moe.top_k if has_moe else 0, gauges)
    engine = Engine(model, lambda ids: tok.decode(ids, skip_special_tokens=True), loaded.stop_id,
                    max_batch=max_batch, max_queue=max_queue, max_tokens_in_flight=max_tokens_in_flight,
                    prefill_chunk=prefill_chunk, expert_stats=has_moe, on_step=metrics.step)
    engine_ref["engine"] = engine
    path = Path(loaded.path)
    template = ChatTemplate.from_dir(path if path.is_dir() else path.parent)
    return Served(engine.start() if start else engine, model_name or path.resolve().name, loaded.prompt_ids,
                  lambda text: tok.encode(text, add_special_tokens=False).ids, template, metrics, api_key,
                  int(time.time()))


def serve(path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, quant: str | None = None,
          group_size: int = 32, max_memory_gb: float | None = None, policy: str = "lru", prefetch: bool = False,
          max_batch: int = 16, max_queue: int = 64, max_tokens_in_flight: int | None = None,
          api_key: str | None = None, model_name: str | None = None, log_level: str = "info") -> int:
    """Serve a checkpoint until SIGTERM / SIGINT; 0 once the open requests have drained."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r} is invalid: allowed an integer in [0, 65535]")
    check_options(max_batch, max_queue, max_tokens_in_flight)
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty: give a token, or leave --api-key out")
    if api_key is None and not _loopback(host):
        print(f"moelab serve: warning: listening on {host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    loaded = load(path, quant=quant, group_size=group_size, max_memory_gb=max_memory_gb, policy=policy,
                  prefetch=prefetch)
    served = build(loaded, model_name=model_name, max_batch=max_batch, max_queue=max_queue,
                   max_tokens_in_flight=max_tokens_in_flight, api_key=api_key, start=False)
    run(create_app(served), host, port, log_level, engine=served.engine)
    return 0


def run(app: Any, host: str, port: int, log_level: str = "info", engine: Engine | None = None) -> None:
    """uvicorn over `app` until SIGTERM / SIGINT (graceful: open responses finish first; a second SIGINT forces the
    exit). With `engine` (not started), uvicorn runs on a second thread and the engine loop on this one, until the
    app's shutdown has stopped it; otherwise uvicorn runs on this thread. Returns normally then: uvicorn itself
    re-raises the signal after its shutdown, which would end the process with status −15 instead of 0 once the
    requests have drained. An error of uvicorn's (the port taken, say) is raised here."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    if engine is None:
        server.run()
        return
    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 — uvicorn raises SystemExit(3) when it cannot start
            failed.append(e)
        finally:
            engine.stop(drain=True)  # after the app's shutdown (a no-op then), or when uvicorn never started

    handlers = ({sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})  # only the main thread can
    thread = threading.Thread(target=http, name="moelab-http", daemon=True)
    try:
        thread.start()
        engine.run()
        thread.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failed and not (isinstance(failed[0], SystemExit) and not failed[0].code):
        raise failed[0]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
