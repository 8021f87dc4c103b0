"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, MoE balancing, metrics, checkpoints.

One optimizer step:
    for each micro-batch:  loss = (cross-entropy + Σ MoE aux losses) / grad_accum;  backward
    clip the global gradient norm;  optimizer.step();  zero grads
    model.update_expert_biases(load of each MoE layer in this step)   # aux-loss-free balancing
Every `log_every` steps one JSON line goes to RUN/metrics.jsonl (loss, each aux loss, lr, tokens/s,
per-layer expert load, max/mean load, dropped fraction, router entropy, expert bias); validation loss
joins the line every `eval_every` steps. Checkpoints (moelab.checkpoint) hold everything needed to
continue bit-for-bit: model, optimizer, step, torch RNG and the data sampler's generator state.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moelab import checkpoint as ckpt_io
from moelab.config import ModelConfig, TrainConfig
from moelab.data import TokenData, prepare_data
from moelab.model import MoETransformer


@dataclass
class TrainResult:
    run_dir: Path
    model: MoETransformer
    steps: int
    final_val_loss: float
    train_tokens: int
    tokens_per_s: float  # training throughput over the run (excluding evaluation and checkpointing)
    train_seconds: float


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to lr·min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings, projections, experts, routers)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def evaluate(model: MoETransformer, data: TokenData, cfg: TrainConfig) -> float:
    """Mean next-token cross-entropy (nats) over fixed validation windows."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in data.iter_eval_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches):
        with _autocast(cfg):
            total += model(x, targets=y).loss.item() * x.numel()
        n += x.numel()
    model.train(was_training)
    return total / max(n, 1)


def _autocast(cfg: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


def _layer_stats(auxes_per_micro: list[list], model: MoETransformer) -> dict[str, Any]:
    """Per-MoE-layer statistics of one optimizer step, summed/averaged over its micro-batches."""
    if not auxes_per_micro or not auxes_per_micro[0]:
        return {}
    n_layers = len(auxes_per_micro[0])
    loads = [sum(m[i].load for m in auxes_per_micro) for i in range(n_layers)]
    out: dict[str, Any] = {
        "expert_load": [(ld / ld.sum()).tolist() for ld in loads],
        "max_mean_load": [(ld.max() / ld.mean()).item() for ld in loads],
        "dropped_frac": [sum(m[i].dropped_frac.item() for m in auxes_per_micro) / len(auxes_per_micro)
                         for i in range(n_layers)],
        "router_entropy": [sum(m[i].router_entropy.item() for m in auxes_per_micro) / len(auxes_per_micro)
                           for i in range(n_layers)],
    }
    if any(moe.cfg.expert_bias for moe in model.moe_layers()):
        out["expert_bias"] = [moe.router.bias.tolist() for moe in model.moe_layers()]
    return out


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    existing = run_dir / "metrics.jsonl"
    if not resume and (existing.exists() or ckpt_io.list_checkpoints(run_dir)):
        raise FileExistsError(
            f"{run_dir} already holds a run (metrics.jsonl or checkpoints); pass --resume to continue it or "
            "choose another --out — nothing was overwritten")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only metric lines up to `last_step` (lines a killed run logged after its last checkpoint)."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, data_path: str | Path | None = None,
          resume: bool = False, progress: bool = True, data: TokenData | None = None,
          desc: str = "train") -> TrainResult:
    """Train `model_cfg` with `cfg`, writing metrics, checkpoints, plots and tokenizer.json to `run_dir`.

    `data_path` None means the default corpus (the running Python's standard library); `data` lets a
    caller reuse an already prepared token stream (the demo trains two models on the same tokens).
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir, resume)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    if data is None:
        _, data = prepare_data(data_path, run_dir, vocab_size=model_cfg.vocab_size,
                               max_bytes=cfg.max_corpus_bytes, val_fraction=cfg.val_fraction, quiet=not progress)
    if data.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {data.vocab_size} tokens but the model's vocab_size="
                         f"{model_cfg.vocab_size}; raise vocab_size")

    torch.manual_seed(cfg.seed)
    model = MoETransformer(model_cfg)
    optimizer = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    config = {"model": model_cfg.to_dict(), "train": cfg.to_dict()}
    start, train_tokens, train_seconds = 0, 0, 0.0
    if resume and not ckpt_io.list_checkpoints(run_dir):
        _truncate_metrics(run_dir / "metrics.jsonl", 0)  # killed before its first checkpoint: start over
    if resume and ckpt_io.list_checkpoints(run_dir):
        latest = ckpt_io.list_checkpoints(run_dir)[-1]
        ckpt_io.verify(latest)
        saved = ckpt_io.read_config(latest)
        if saved["model"] != config["model"]:
            raise ckpt_io.CheckpointError(f"{latest}: the checkpoint was written with a different model config than "
                                          "the one requested; resume with the same preset and overrides")
        ckpt_io.load_model_state(model, latest, verified=True)
        trainer, rng = ckpt_io.load_training_state(latest, optimizer)
        start, train_tokens, train_seconds = trainer["step"], trainer["train_tokens"], trainer["train_seconds"]
        torch.set_rng_state(rng["torch"])
        gen.set_state(rng["data"])
        _truncate_metrics(run_dir / "metrics.jsonl", start)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))

    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    val_loss = float("nan")
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
    window_t, window_tokens = 0.0, 0
    model.train()
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            auxes, loss_sum, aux_sums = [], 0.0, {}
            for _ in range(cfg.grad_accum):
                x, y = data.get_batch("train", cfg.batch_size, cfg.seq_len, gen)
                with _autocast(cfg):
                    out = model(x, targets=y)
                ((out.loss + out.aux_loss) / cfg.grad_accum).backward()
                loss_sum += out.loss.item() / cfg.grad_accum
                for a in out.aux:
                    for k, v in a.losses.items():
                        aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / cfg.grad_accum
                auxes.append(out.aux)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if auxes[0]:
                model.update_expert_biases([sum(m[i].load for m in auxes) for i in range(len(auxes[0]))])
            dt = time.perf_counter() - t0
            train_seconds += dt
            train_tokens += tokens_per_step
            window_t += dt
            window_tokens += tokens_per_step
            done = step + 1
            record: dict[str, Any] | None = None
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = {"step": done, "loss": loss_sum, **{f"aux_{k}": v for k, v in aux_sums.items()},
                          "lr": lr, "grad_norm": grad_norm, "tokens": train_tokens,
                          "tokens_per_s": window_tokens / window_t, **_layer_stats(auxes, model)}
                window_t, window_tokens = 0.0, 0
            if done % cfg.eval_every == 0 or done == cfg.steps:
                val_loss = evaluate(model, data, cfg)
                record = record or {"step": done, "loss": loss_sum, "tokens": train_tokens}
                record["val_loss"] = val_loss
            if record is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{loss_sum:.3f}", val=f"{val_loss:.3f}",
                                tok_s=f"{record.get('tokens_per_s', 0):,.0f}")
            bar.update(1)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                metrics.flush()
                ckpt_io.save_checkpoint(
                    run_dir, done, model=model, optimizer=optimizer, config=config,
                    trainer={"train_tokens": train_tokens, "train_seconds": train_seconds},
                    rng={"torch": torch.get_rng_state(), "data": gen.get_state()})
    bar.close()
    if start >= cfg.steps:  # resumed a finished run: report its final validation loss
        val_loss = evaluate(model, data, cfg)
    try:
        from moelab.analysis import plot_run

        plot_run(run_dir)
    except ImportError:  # matplotlib missing: metrics.jsonl still holds everything
        pass
    return TrainResult(run_dir=run_dir, model=model, steps=cfg.steps, final_val_loss=val_loss,
                       train_tokens=train_tokens, tokens_per_s=train_tokens / max(train_seconds, 1e-9),
                       train_seconds=train_seconds)


def load_run(run_dir: str | Path) -> tuple[MoETransformer, dict[str, Any]]:
    """The newest checkpoint of a run as a model (eval mode) and its config dict; verified, no pickle."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    ckpts = ckpt_io.list_checkpoints(run_dir)
    target = ckpts[-1] if ckpts else run_dir  # a run dir, or a checkpoint dir given directly
    ckpt_io.verify(target)
    config = ckpt_io.read_config(target)
    model = MoETransformer(ModelConfig.from_dict(config["model"]))
    ckpt_io.load_model_state(model, target, verified=True)
    return model.eval(), config
