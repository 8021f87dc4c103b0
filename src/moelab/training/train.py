"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, MoE balancing, metrics, checkpoints.

One optimizer step:
    for each micro-batch:  loss = (cross-entropy + Σ MoE aux losses) / grad_accum;  backward
    clip the global gradient norm;  stop if the loss or the norm is not finite
    optimizer.step();  zero grads
    model.update_expert_biases(load of each MoE layer in this step)   # aux-loss-free balancing
Every `log_every` steps one JSON line goes to RUN/metrics.jsonl (loss, each aux loss, lr, tokens/s,
per-layer expert load, max/mean load, dropped fraction, router entropy, expert bias); validation loss
joins the line every `eval_every` steps. Checkpoints (moelab.runs.checkpoint) hold everything needed to
continue bit-for-bit: model, optimizer, step, torch RNG and the data sampler's generator state.

A run directory (moelab.runs.rundir) is written by one process at a time (its lock). A new run never
overwrites one; `resume=True` continues the newest checkpoint with the run's own configuration, tokenizer
and data: settings given again must equal the run's, except those `TrainConfig.RESUMABLE` lists (more
steps, another learning rate, ...), which are applied, printed and recorded in metrics.jsonl; new text is
refused unless `new_data=True` (the run's tokenizer is kept). A non-finite loss or gradient norm stops the
run before the update with `TrainingDiverged`; a checkpoint is only written when every weight is finite,
so the newest checkpoint is always a good one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from moelab.config.model import ModelConfig
from moelab.config.train import TrainConfig
from moelab.data.corpus import Corpus
from moelab.data.tokens import TokenData, prepare_data
from moelab.model.transformer import MoETransformer
from moelab.parallel import ParallelContext, exchange_stats, setup_from_env
from moelab.parallel.mesh import checkpoint_view
from moelab.runs import checkpoint as ckpt_io
from moelab.runs.rundir import RunDir, RunLockedError
from moelab.runs.sharded import is_sharded, load_sharded, save_sharded
from moelab.training.device import autocast, check_device
from moelab.training.init import Init, freeze, init_data, init_entry, log_step0, resume_conversations, saved_separator
from moelab.training.metrics import TensorBoardLog, layer_stats, parallel_stats, truncate_after
from moelab.training.optim import lr_at, make_optimizer
from moelab.training.resume import adopt_tokenizer, check_format, data_record, model_changes, resume_data

__all__ = ["train", "evaluate", "lr_at", "make_optimizer", "TrainResult", "TrainingDiverged"]

SINGLE_PROCESS = ParallelContext()


class TrainingDiverged(ValueError):
    """The loss or the gradient norm of a step is not finite (NaN or infinite): training stopped."""


@dataclass
class TrainResult:
    run_dir: Path
    model: MoETransformer
    steps: int
    final_val_loss: float
    train_tokens: int
    tokens_per_s: float  # training throughput over the run (excluding evaluation and checkpointing)
    train_seconds: float
    is_main: bool = True  # False on the ranks > 0 of an expert-parallel run


@torch.no_grad()
def evaluate(model: MoETransformer, data: TokenData, cfg: TrainConfig,
             ctx: ParallelContext = SINGLE_PROCESS) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows (under expert parallelism each
    rank takes its share of every window batch — the last may be smaller, even empty on some ranks — and
    the sums and counts are added over the ranks)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in data.iter_eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches):
        x, y = x.tensor_split(ctx.world)[ctx.rank].to(cfg.device), y.tensor_split(ctx.world)[ctx.rank].to(cfg.device)
        with autocast(cfg, ctx):
            loss = model(x, targets=y).loss  # every rank runs the forward: its collectives need all ranks
        if count := int((y != -100).sum()):  # the targets that count (conversations mask the others with -100)
            total += loss.item() * count
            n += count
    model.train(was_training)
    return ctx.sum(total) / max(ctx.sum(n), 1)






def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, data_path: str | Path | None = None,
          resume: bool = False, progress: bool = True, data: TokenData | None = None, desc: str = "train",
          new_data: bool = False, data_errors: str = "strict", init: Init | None = None) -> TrainResult:
    """Train `model_cfg` with `cfg`, writing metrics, checkpoints, plots and tokenizer.json to `run_dir`.

    `data_path` None means the default corpus (the running Python's standard library); `data` lets a
    caller reuse an already prepared token stream (the demo trains two models on the same tokens);
    `data_errors` "replace" reads text that is not valid UTF-8 with U+FFFD for its bad bytes.

    `resume`: continue the newest checkpoint in `run_dir` (ValueError when there is none). `model_cfg`
    must equal the run's; `cfg` may differ from the run's only in `TrainConfig.RESUMABLE` fields. Without
    `data_path` the run's own data is used; a `data_path` whose text differs from the run's is refused
    unless `new_data` (training continues on it, tokenized with the run's tokenizer).

    With `cfg.expert_parallel` = N > 1 every one of the N processes torchrun started calls this: the
    experts are split over them (moelab.parallel), each takes its share of the same global batch, rank 0
    writes metrics, checkpoints (in the single-process layout, so any N resumes them) and plots. A rank
    that dies makes the others raise within the collective timeout (MOELAB_DIST_TIMEOUT, 60 s).
    With `cfg.data_parallel_shard` = D >= 1, D × N processes form a (dp_shard, ep) mesh
    (moelab.parallel.mesh): every weight is sharded by FSDP2 and every rank writes its own shards of
    each checkpoint (moelab.runs.sharded), which any mesh dividing the model, or one process, resumes.
    `init` (`moelab.training.init`): a new run from that checkpoint's model (= `model_cfg`), tokenizer and data rules.
    """
    check_device(cfg.device)
    if cfg.tensorboard:
        TensorBoardLog.summary_writer()  # fail before anything is written
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    if new_data and not resume:
        raise ValueError("new_data (--new-data) continues a run on other text: it needs resume (--resume)")
    run = RunDir(run_dir)
    _check_state(run, resume)  # before anything is written: a mistyped --out creates nothing
    n_experts = model_cfg.moe.n_experts if model_cfg.moe is not None else None
    ctx = setup_from_env(cfg.expert_parallel, data_parallel_shard=cfg.data_parallel_shard, n_experts=n_experts)
    try:
        with _locked(run, ctx):
            _check_state(run, resume)  # again, now that no other process can write here
            trainer = _Trainer(model_cfg, cfg, run, ctx, progress and ctx.is_main, desc, None if resume else init)
            result = trainer.run(resume, data_path, data, new_data, data_errors)
        ctx.barrier()  # no rank tears its group down while a peer may still be inside a collective
        return result
    except RuntimeError as e:
        if not ctx.distributed or isinstance(e, RunLockedError):
            raise
        raise RuntimeError(f"rank {ctx.rank} of {ctx.world}: a collective failed — another rank "
                           f"probably died or stopped answering (timeout MOELAB_DIST_TIMEOUT): {e}") from e
    finally:
        ctx.close()


def _check_state(run: RunDir, resume: bool) -> None:
    run.require_resumable() if resume else run.require_new()


@contextlib.contextmanager
def _locked(run: RunDir, ctx: ParallelContext):
    """Hold the run directory's lock (rank 0 takes it; every rank learns whether it could)."""
    lock, error = None, None
    if ctx.is_main:
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            lock = run.lock()
            lock.acquire()
        except (RunLockedError, OSError) as e:
            error = e
    if ctx.sum(1.0 if error is not None else 0.0):
        raise error if error is not None else RunLockedError(f"rank 0 could not lock {run.path}")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class _Trainer:
    """One training run in a locked run directory: configuration, data, model, the loop, checkpoints."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, run: RunDir, ctx: ParallelContext,
                 progress: bool, desc: str, init: Init | None = None) -> None:
        self.model_cfg, self.cfg, self.run_dir, self.ctx = model_cfg, cfg, run, ctx
        self.progress, self.desc = progress, desc
        self.saved: dict[str, Any] | None = None  # the run's config.json when resuming
        self.resumed: dict[str, Any] | None = None  # what the first metrics line after a resume records
        self.init = init  # the checkpoint a new run starts from (`moelab.training.init`)

    # -- setup ---------------------------------------------------------------------------------------
    def run(self, resume: bool, data_path, data: TokenData | None, new_data: bool, data_errors: str) -> TrainResult:
        changes = self._check_resume() if resume else {}
        self.data, record = self._data(resume, data_path, data, new_data, data_errors)
        if self.data.vocab_size > self.model_cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self.data.vocab_size} tokens but the model's vocab_size="
                             f"{self.model_cfg.vocab_size}; raise vocab_size")
        self.config = {"model": self.model_cfg.to_dict(), "train": self.cfg.to_dict(), "data": record}
        self.config |= init_entry(self.init, self.saved)  # where a run started from a checkpoint came from
        threads = torch.get_num_threads()  # cfg.threads holds for this run only: the caller's count is given back
        try:
            start = self._build(resume)
            if self.ctx.is_main:
                if resume:
                    self._announce_resume(start, changes, record)
                self.run_dir.write_config(self.config)
            return self._loop(start)
        finally:
            torch.set_num_threads(threads)

    def _check_resume(self) -> dict[str, tuple[Any, Any]]:
        """The run's config against the requested one: the model must match; training settings may change
        only where `TrainConfig.RESUMABLE` allows. Returns the changes."""
        self.saved = self.run_dir.read_config()
        latest = self.run_dir.latest_checkpoint()
        weights_cfg = ckpt_io.read_config(latest)["model"]  # the config the weights were written with
        diff = model_changes(weights_cfg, self.model_cfg.to_dict())
        if diff:
            raise ValueError(f"the requested model differs from the run's ({latest.name}): {'; '.join(diff)} — a "
                             "resumed run keeps its model; start a new run with --out to train another")
        changes = TrainConfig.from_dict(self.saved["train"]).resume_changes(self.cfg)
        step = json.loads((latest / "trainer.json").read_text())["step"]
        if self.cfg.steps < step:
            raise ValueError(f"steps={self.cfg.steps} is invalid on resume: the run is at step {step}; allowed "
                             f"steps >= {step}")
        return changes

    def _data(self, resume: bool, data_path, data: TokenData | None, new_data: bool,
              data_errors: str) -> tuple[TokenData, dict[str, Any]]:
        """The token stream and the record config.json keeps of it (`moelab.training.resume`)."""
        cfg = self.cfg
        if self.init is not None and data is None:
            return self._in_turns(lambda: init_data(self.init, self.run_dir, data_path, cfg, quiet=not self.progress))
        if data is not None:  # prepared by the caller (the demo)
            if self.ctx.is_main:
                adopt_tokenizer(self.run_dir, data)
            return data, data_record(data)

        def prepare(corpus: Corpus, tokenizer=None) -> TokenData:
            return self._in_turns(lambda: prepare_data(corpus, self.run_dir.path, self.model_cfg.vocab_size,
                                                       val_fraction=cfg.val_fraction, quiet=not self.progress,
                                                       tokenizer=tokenizer, separator=saved_separator(self.saved))[1])

        if resume and ((self.saved or {}).get("data") or {}).get("format") == "conversations":
            return resume_conversations(self.run_dir, self.saved["data"], data_path, cfg)
        corpus = None if data_path is None else Corpus(data_path, cfg.max_corpus_bytes, data_errors)
        if not resume:
            data = prepare(corpus or Corpus(None, cfg.max_corpus_bytes))
            return data, data_record(data)
        return resume_data(self.run_dir, (self.saved or {}).get("data") or {}, corpus, new_data, prepare,
                           cfg.val_fraction, quiet=not self.progress)

    def _in_turns(self, build):
        """Rank 0 builds (tokenizer, token cache); the other ranks then read what it wrote."""
        result = build() if self.ctx.is_main else None
        self.ctx.barrier()  # the other ranks read what rank 0 wrote, then all go on together
        result = result if self.ctx.is_main else build()
        self.ctx.barrier()
        return result

    def _build(self, resume: bool) -> int:
        """Model, optimizer, sampler, counters; restored from the newest checkpoint when resuming. Returns
        the step to start from."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        model = self.init.model if self.init is not None else MoETransformer(self.model_cfg)
        freeze(model, [] if self.init is not None else self.config.get("init", {}).get("freeze", []))  # on resume
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.train_tokens, self.train_seconds = 0, 0.0
        latest = self.run_dir.latest_checkpoint() if resume else None
        sharded = latest is not None and is_sharded(latest)
        self.view = functools.partial(checkpoint_view, mesh=self.ctx.mesh) if self.ctx.mesh else None  # experts' layout
        if latest is not None:
            check_format(latest, sharded, self.ctx.mesh is not None, self.ctx.distributed)
            ckpt_io.verify(latest)
            if not sharded:
                ckpt_io.load_model_state(model, latest, verified=True)
        # expert-parallel: keep this rank's expert slices; on a mesh, every parameter sharded by FSDP2
        self.model = self.ctx.wrap(model, mixed_precision=cfg.dtype == "bfloat16").to(cfg.device)
        self.optimizer = make_optimizer(self.model, cfg)
        if latest is None:
            return 0
        if sharded:  # each rank reads its own shards, resharded from whatever mesh wrote them
            trainer, rng = load_sharded(latest, self.model, self.optimizer, self.view, verified=True)
        else:
            optim_state, trainer, rng = ckpt_io.read_training_state(latest)
            self.ctx.load_optimizer_state(self.optimizer, optim_state)
        self.train_tokens, self.train_seconds = trainer["train_tokens"], trainer["train_seconds"]
        torch.set_rng_state(rng["torch"])
        self.gen.set_state(rng["data"])
        if self.ctx.is_main:  # drop lines a killed run logged after its last checkpoint
            truncate_after(self.run_dir.metrics_path, trainer["step"])
        return trainer["step"]

    def _announce_resume(self, start: int, changes: dict[str, tuple[Any, Any]], record: dict[str, Any]) -> None:
        self.resumed = {"from_step": start, "changed": {k: list(v) for k, v in changes.items()}}
        saved = (self.saved or {}).get("data") or {}
        if saved and record["corpus_sha256"] != saved.get("corpus_sha256"):
            self.resumed["new_data"] = record["description"]
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()) or "no settings changed"
        new = f"; continuing on new data: {record['description']}" if "new_data" in self.resumed else ""
        print(f"moelab: resuming {self.run_dir.path} from step {start} ({said}){new}", file=sys.stderr)

    # -- the loop ------------------------------------------------------------------------------------
    def _loop(self, start: int) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        val_loss = float("nan")
        bar = tqdm(total=cfg.steps, initial=start, desc=self.desc, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        self.window_t, self.window_tokens = 0.0, 0
        self.model.train()
        board = TensorBoardLog(self.run_dir.path / "tensorboard") if cfg.tensorboard and ctx.is_main else None
        with open(self.run_dir.metrics_path, "a") if ctx.is_main else contextlib.nullcontext() as metrics:
            if self.init is not None and start == 0:  # the routing before any update (every rank: collectives)
                log_step0(self.model, self.data, cfg, ctx, lambda: evaluate(self.model, self.data, cfg, ctx),
                          metrics, board)
            for step in range(start, cfg.steps):
                record, dt, auxes = self._step(step)
                done = step + 1
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    val_loss = evaluate(self.model, self.data, cfg, ctx)
                    record = record or {"step": done, "loss": ctx.mean(self.last_loss), "tokens": self.train_tokens}
                    record["val_loss"] = val_loss
                if record is not None and metrics is not None:
                    if self.resumed is not None:
                        record["resumed"], self.resumed = self.resumed, None
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if board is not None:
                        board.write(record)
                    val = f"{val_loss:.3f}" if math.isfinite(val_loss) else "-"
                    bar.set_postfix(loss=f"{record['loss']:.3f}", val=val,
                                    tok_s=f"{record.get('tokens_per_s', 0):,.0f}")
                bar.update(1)
                if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                    self._save(done)
        bar.close()
        if board is not None:
            board.close()
        if start >= cfg.steps:  # resumed a finished run: report its final validation loss
            val_loss = evaluate(self.model, self.data, cfg, ctx)
        if ctx.is_main:
            try:
                from moelab.analysis.plots import plot_run

                plot_run(self.run_dir.path)
            except ImportError:  # matplotlib missing: metrics.jsonl still holds everything
                pass
        return TrainResult(run_dir=self.run_dir.path, model=self.model, steps=cfg.steps, final_val_loss=val_loss,
                           train_tokens=self.train_tokens,
                           tokens_per_s=self.train_tokens / max(self.train_seconds, 1e-9),
                           train_seconds=self.train_seconds, is_main=ctx.is_main)

    def _step(self, step: int) -> tuple[dict[str, Any] | None, float, list]:
        """One optimizer step; the metrics record when this step is logged."""
        cfg, ctx, model = self.cfg, self.ctx, self.model
        t0 = time.perf_counter()
        exchange_stats(model, reset=True)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        auxes, loss_sum, aux_sums = [], 0.0, {}
        for _ in range(cfg.grad_accum):
            x, y = self.data.get_batch("train", cfg.batch_size, cfg.seq_len, self.gen)  # the global batch
            x, y = ctx.shard(x).to(cfg.device, non_blocking=True), ctx.shard(y).to(cfg.device, non_blocking=True)
            with autocast(cfg, ctx):
                out = model(x, targets=y)
            ((out.loss + out.aux_loss) / cfg.grad_accum).backward()
            loss_sum += out.loss.item() / cfg.grad_accum
            for a in out.aux:
                for k, v in a.losses.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / cfg.grad_accum
            auxes.append(out.aux)
        grad_norm = ctx.clip_grads_(model, cfg.grad_clip or float("inf"))
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):  # the norm is global: every rank stops
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step + 1, f"loss {loss_sum}, gradient norm {grad_norm}: not finite")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if auxes[0]:  # the loads are global under expert parallelism: every rank moves its biases alike
            model.update_expert_biases([sum(m[i].load for m in auxes) for i in range(len(auxes[0]))])
        dt = time.perf_counter() - t0
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len  # global: all ranks together
        self.train_seconds += dt
        self.train_tokens += tokens
        self.window_t += dt
        self.window_tokens += tokens
        self.last_loss = loss_sum  # this rank's: the mean over its share of the batch
        done = step + 1
        if done % cfg.log_every and done != cfg.steps:
            return None, dt, auxes
        record = {"step": done, "loss": ctx.mean(loss_sum), **{f"aux_{k}": ctx.mean(v) for k, v in aux_sums.items()},
                  "lr": lr, "grad_norm": grad_norm, "tokens": self.train_tokens,
                  "tokens_per_s": self.window_tokens / self.window_t, **layer_stats(auxes, model)}
        if ctx.distributed:
            record |= parallel_stats(ctx, dt, auxes, model)
        self.window_t, self.window_tokens = 0.0, 0
        return record, dt, auxes

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        latest = self.run_dir.latest_checkpoint()
        advice = (f"the newest checkpoint, {latest.name}, is intact: resume with a lower --lr" if latest else
                  f"no checkpoint was written: start a new run (another --out, or delete {self.run_dir.path}) with a "
                  "lower --lr")
        return TrainingDiverged(f"step {step}: {what} — training stopped before this step's update; {advice}")

    def _save(self, step: int) -> None:
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]  # FSDP shards
        if self.ctx.sum(0.0 if all(torch.isfinite(p).all() for p in local) else 1.0):  # every rank stops alike
            raise self._diverged(step, "a weight is not finite")
        trainer = {"train_tokens": self.train_tokens, "train_seconds": self.train_seconds}
        rng = {"torch": torch.get_rng_state(), "data": self.gen.get_state()}
        if self.ctx.mesh is not None:  # every rank writes its shards
            save_sharded(self.run_dir.path, step, model=self.model, optimizer=self.optimizer, config=self.config,
                         trainer=trainer, rng=rng, keep=self.cfg.keep_checkpoints, view=self.view,
                         mesh_shape={"dp_shard": self.ctx.mesh.dp_shard, "ep": self.ctx.mesh.ep})
            return
        model_state, optim_state = self.ctx.model_state(self.model), self.ctx.optimizer_state(self.optimizer)
        if self.ctx.is_main:
            ckpt_io.save_checkpoint(
                self.run_dir.path, step, model=model_state, optimizer=optim_state, config=self.config,
                trainer=trainer, rng=rng, keep=self.cfg.keep_checkpoints)
        self.ctx.barrier()
