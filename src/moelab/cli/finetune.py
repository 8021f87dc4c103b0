"""`moelab train --init-from PATH [--freeze GROUPS]` and `moelab upcycle DENSE_PATH OUT --experts E --top-k K`:
the command-line side of `moelab.training.init` and `moelab.training.upcycle`."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from moelab.cli.flags import FieldType
from moelab.config.model import ModelConfig, MoEConfig
from moelab.config.train import TrainConfig


def add_init_flags(p: argparse.ArgumentParser) -> None:
    """--init-from and --freeze of `moelab train`."""
    from moelab.training.init import FREEZE_GROUPS

    p.add_argument("--init-from", default=None, metavar="PATH",
                   help="start a new run from a checkpoint: a Hugging Face directory (MoE, or dense Llama / Mistral / "
                        "Qwen2 / Qwen3) or a moelab run (e.g. one `moelab upcycle` wrote); its weights, tokenizer, "
                        "chat template and prompt rule are used, the optimizer starts fresh; --data may be text or "
                        "a .jsonl file of {\"messages\": [...]} conversations (loss on assistant text only)")
    p.add_argument("--freeze", action="append", default=None, metavar="GROUPS",
                   help=f"with --init-from: parameter groups that do not train, comma-separated or repeated: "
                        f"{', '.join(FREEZE_GROUPS)}")


def train_from_checkpoint(args: argparse.Namespace, overrides: dict[str, Any]):
    """The (init, model config, train config) of `moelab train --init-from`; ValueError for a contradicting
    flag (naming the field), --resume, --preset or --dense alongside."""
    from moelab.training.init import apply_config, check_freeze, freeze, init_config, load_init

    for flag, given in (("--resume", args.resume), ("--preset", args.preset is not None), ("--dense", args.dense)):
        if given:
            raise ValueError(f"--init-from starts a new run from a checkpoint's model: {flag} does not apply")
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)} | {
        f"moe.{f.name}" for f in dataclasses.fields(MoEConfig)}
    groups = check_freeze([g.strip() for spec in args.freeze or [] for g in spec.split(",") if g.strip()])
    init = load_init(args.init_from)
    model_cfg = init_config(init, {k: v for k, v in overrides.items() if k in model_keys})
    train_cfg = TrainConfig().replace(**{k: v for k, v in overrides.items() if k not in model_keys})
    apply_config(init, model_cfg)
    if groups:
        freeze(init.model, groups)
        init.record["freeze"] = groups
    return init, model_cfg, train_cfg


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moelab.training.upcycle import upcycle

    out = upcycle(args.dense, args.out, args.experts, args.top_k, granularity=args.granularity, seed=args.seed,
                  aux_loss_coef=args.aux_loss_coef)
    print(f"upcycled run written to {out} (continue it: moelab train --init-from {out} --out RUN --data PATH)")
    return 0


def add_upcycle_parser(sub, fmt: dict[str, Any]) -> None:
    p = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE whose experts start as copies of its FFNs",
                       description="Sparse upcycling (Komatsuzaki et al. 2022): every FFN of a dense checkpoint (a "
                       "Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory or a moelab dense run) becomes an MoE "
                       "layer of E copies with a new random router (renormalised top-k softmax), the rest copied; at "
                       "step 0 the MoE computes the dense model's function. OUT is a new moelab run directory, written "
                       "whole or not at all; continue it with `moelab train --init-from OUT`.", **fmt)
    p.add_argument("dense", metavar="DENSE_PATH", help="dense Hugging Face directory or moelab run")
    p.add_argument("out", metavar="OUT", help="the new run directory (absent or empty)")
    p.add_argument("--experts", type=FieldType("int"), required=True, help="experts E per MoE layer")
    p.add_argument("--top-k", type=FieldType("int"), required=True, help="experts per token k (<= E)")
    p.add_argument("--granularity", type=FieldType("int"), default=1,
                   help="fine-grained upcycling: each expert is 1/G of the FFN's hidden units (G divides E and the "
                        "FFN width; route_scale G); 1 = full copies, the only choice that starts at the dense function")
    p.add_argument("--aux-loss-coef", type=FieldType("float"), default=0.01,
                   help="weight of the Switch load-balancing loss, which keeps the copies from collapsing onto one")
    p.add_argument("--seed", type=FieldType("int"), default=0, help="seed of the router's random initialisation")
    p.set_defaults(func=cmd_upcycle)
