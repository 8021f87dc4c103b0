"""How to train: `TrainConfig`, the named training presets and command-line overrides.

`TrainConfig` is a frozen dataclass validated on construction like the model configs (`moelab.config`);
`preset(name, **overrides)` gives the (ModelConfig, TrainConfig) of a training preset, and
`with_overrides` applies "field" / "moe.field" settings to a pair of configs (the command line's flags).
This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from moelab.config.fields import _choice, _fail, _JsonMixin, _nonneg_number, _positive_int
from moelab.config.model import ModelConfig, MoEConfig

DTYPES = ("float32", "bfloat16")


def check_device_name(device: Any) -> None:
    """A device moelab trains and generates on: "cpu", "cuda" or "cuda:N" (presence is checked at run time)."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        _fail("device", device, "'cpu', 'cuda' or 'cuda:N'")



@dataclass(frozen=True)
class TrainConfig(_JsonMixin):
    """How to train: optimisation, schedule, data and bookkeeping.

    Fields:
        steps: optimizer steps of the whole run (raise it on --resume to train longer).
        batch_size / seq_len: sequences per micro-batch and tokens per sequence.
        grad_accum: micro-batches per optimizer step (tokens per step = grad_accum·batch_size·seq_len).
        lr / min_lr_ratio / warmup_steps: linear warm-up to lr, then cosine decay to lr·min_lr_ratio.
        weight_decay / beta1 / beta2: AdamW (Loshchilov & Hutter 2019); no decay on norms and biases.
        grad_clip: max global gradient norm (0 = off).
        eval_every / eval_batches: validation every n steps (and at the end) over this many batches.
        log_every: one metrics line per this many steps.
        save_every: checkpoint every n steps (0 = only at the end).
        keep_checkpoints: newest checkpoints kept in the run directory; older ones are deleted after
            each save (the newest one is never deleted, and a checkpoint is only written when every
            weight is finite).
        tensorboard: also write the metrics as TensorBoard scalars to RUN/tensorboard (needs the
            optional tensorboard package: pip install 'moelab[tensorboard]').
        seed: seeds the model init and the data sampler.
        max_corpus_bytes: cap on the default corpus (the Python standard library) size.
        val_fraction: share of the token stream held out for validation.
        dtype: "float32" or "bfloat16" (autocast for the forward; weights and optimizer stay float32).
        threads: torch intra-op threads (0 = torch's default).
        device: where the model, its optimizer state and the batches live: "cpu", "cuda" or "cuda:N"
            (checkpoints are device-free; a run may resume on another device).
        expert_parallel: processes the routed experts are split over (launch that many with torchrun);
            batch_size stays the global batch, split evenly over them (moelab.parallel).
        data_parallel_shard: 0 = the expert-parallel run above (other weights replicated, checkpoints
            gathered into one file). D >= 1 = a 2-D mesh (dp_shard D × ep expert_parallel) of D ·
            expert_parallel processes: every weight sharded by FSDP2, gradients reduced by FSDP,
            sharded checkpoints (torch.distributed.checkpoint) that resume on any mesh; with
            dtype="bfloat16" FSDP's mixed precision (bf16 compute, fp32 reduce) replaces autocast.
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = False
    seed: int = 0
    max_corpus_bytes: int = 6_000_000
    val_fraction: float = 0.05
    dtype: str = field(default="float32", metadata={"choices": DTYPES})
    threads: int = 0
    device: str = "cpu"
    expert_parallel: int = 1
    data_parallel_shard: int = 0

    # Fields a resumed run may change: how long it runs, its learning-rate schedule and clipping (the way
    # to recover from a loss spike), bookkeeping, and where/how it executes. Everything else (the batch,
    # the data, AdamW's betas and decay, which live in the optimizer state) is fixed by the checkpoint.
    RESUMABLE = ("steps", "lr", "min_lr_ratio", "warmup_steps", "grad_clip", "eval_every", "eval_batches",
                 "log_every", "save_every", "keep_checkpoints", "tensorboard", "dtype", "threads", "device",
                 "expert_parallel", "data_parallel_shard")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every",
                     "keep_checkpoints", "max_corpus_bytes", "expert_parallel"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "seed", "threads", "data_parallel_shard"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "an integer >= 0")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not 0 < self.lr < math.inf:
            _fail("lr", self.lr, "a finite number > 0")
        for name in ("min_lr_ratio", "beta1", "beta2", "val_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                _fail(name, value, "a number")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                _fail(name, getattr(self, name), "a number in [0, 1]")
        _nonneg_number("weight_decay", self.weight_decay)
        _nonneg_number("grad_clip", self.grad_clip)
        if not 0 < self.val_fraction < 0.5:
            _fail("val_fraction", self.val_fraction, "a number in (0, 0.5)")
        _choice("dtype", self.dtype, DTYPES)
        check_device_name(self.device)
        if self.device != "cpu" and self.world > 1:
            _fail("device", self.device, "'cpu' when expert_parallel > 1 or data_parallel_shard > 1 (it runs on gloo "
                  "over CPU processes; NCCL is not supported yet)")
        if self.batch_size % self.world:
            _fail("batch_size", self.batch_size, f"a multiple of the {self.world} processes (expert_parallel="
                  f"{self.expert_parallel} × data_parallel_shard={self.data_parallel_shard or 1}; it is the "
                  "global batch, split evenly over the processes)")

    @property
    def world(self) -> int:
        """The processes a run spans: expert_parallel × data_parallel_shard (at least 1)."""
        return self.expert_parallel * max(1, self.data_parallel_shard)

    def resume_changes(self, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """{field: (this run's value, new value)} for a resumed run; ValueError naming every field that
        differs but may not change on resume (`RESUMABLE` lists those that may)."""
        changed = {f.name: (getattr(self, f.name), getattr(new, f.name)) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(new, f.name)}
        fixed = {k: v for k, v in changed.items() if k not in self.RESUMABLE}
        if fixed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
            raise ValueError(f"cannot change {listed} on resume (fixed by the checkpoint; a resumed run may change "
                             f"only {', '.join(self.RESUMABLE)}); start a new run with --out to change it")
        return changed


# Training presets are data: {"model": ModelConfig fields, "moe": MoEConfig fields, "train": TrainConfig fields}.
# The dense-FFN width d_ff equals the MoE active width (top_k·d_expert) so dense_twin() is well defined.
# route_scale = top_k for renormalised top-k routing: the k weights sum to k, so the MoE output starts at
# the scale of its dense twin (k experts of width f = one FFN of width k·f) instead of 1/k of it (the
# same role as DeepSeek-V3's routed_scaling_factor); measured in development to train faster.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256, d_ff=256),
        "moe": dict(d_expert=128, n_experts=16, top_k=2, route_scale=2.0, aux_loss_coef=0.01, z_loss_coef=1e-3),
        "train": dict(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40, eval_every=100),
    },
    "small": {
        "model": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512, d_ff=512),
        "moe": dict(d_expert=256, n_experts=16, top_k=2, route_scale=2.0, aux_loss_coef=0.01, z_loss_coef=1e-3),
        "train": dict(steps=1000, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=100, eval_every=200,
                      max_corpus_bytes=20_000_000),
    },
    "tiny-deepseek": {
        "model": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256, d_ff=256,
                      n_dense_layers=1),
        "moe": dict(d_expert=64, n_experts=16, top_k=3, n_shared=1, router="sigmoid", n_groups=4, topk_groups=2,
                    expert_bias=True, aux_loss_coef=0.0, seq_aux_loss_coef=1e-4, z_loss_coef=0.0, route_scale=1.0),
        "train": dict(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40, eval_every=100),
    },
}


def preset(name: str, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """Configs of a named training preset; `overrides` keys are "field" (model/train) or "moe.field"."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not a training preset: allowed {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]
    moe = MoEConfig(**{"d_model": p["model"].get("d_model", ModelConfig.d_model), **p["moe"]})
    return with_overrides(ModelConfig(**p["model"], moe=moe), TrainConfig(**p["train"]), overrides)


def with_overrides(model: ModelConfig, train: TrainConfig, overrides: dict[str, Any]) -> tuple[ModelConfig,
                                                                                                 TrainConfig]:
    """`model` and `train` with `overrides` applied: keys "field" (a ModelConfig or TrainConfig field) or
    "moe.field" (a MoEConfig field; the MoE layer's d_model follows the model's)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_kw, moe_kw, train_kw = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("moe.") and key[4:] in moe_fields:
            moe_kw[key[4:]] = value
        elif key in model_fields:
            model_kw[key] = value
        elif key in train_fields:
            train_kw[key] = value
        else:
            raise ValueError(f"unknown setting {key!r}: allowed model fields {sorted(model_fields)}, "
                             f"'moe.<field>' for {sorted(moe_fields)}, train fields {sorted(train_fields)}")
    moe = model_kw.pop("moe", model.moe)
    if moe_kw and moe is None:
        raise ValueError(f"moe.{next(iter(moe_kw))} is set but the model is dense (moe=None)")
    if moe is not None:
        moe = moe.replace(**moe_kw, d_model=model_kw.get("d_model", model.d_model))
    return model.replace(**model_kw, moe=moe), train.replace(**train_kw)
