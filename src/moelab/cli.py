"""The `moelab` command: thin — it parses arguments, calls a library function, prints.

    moelab demo                       MoE vs its dense twin on the default corpus, in minutes
    moelab train --preset tiny ...    train one model (every config field is a flag: --d-model,
                                      --moe-n-experts, --lr, ...; --dense trains the dense twin)
    moelab generate RUN --prompt TEXT
    moelab card MODEL... [--json]     total/active parameters and what they cost
    moelab convert --from-hf DIR OUT | --to-hf RUN OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from moelab.config import PRESETS, ModelConfig, MoEConfig, TrainConfig

_SKIP = {ModelConfig: {"moe"}, MoEConfig: {"d_model"}, TrainConfig: set()}
_PREFIX = {ModelConfig: "", MoEConfig: "moe-", TrainConfig: ""}
_KEY_PREFIX = {ModelConfig: "", MoEConfig: "moe.", TrainConfig: ""}


def _parse_value(text: str, type_name: str) -> Any:
    """Parse a flag value by the dataclass field's annotation ("int", "float | None", "bool", ...)."""
    if "None" in type_name and text.lower() == "none":
        return None
    base = type_name.replace(" | None", "").strip()
    if base == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")
    if base == "int":
        return int(text)
    if base == "float":
        return float(text)
    return text


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for cls in (ModelConfig, MoEConfig, TrainConfig):
        group = parser.add_argument_group(f"{cls.__name__} fields (override the preset)")
        for f in dataclasses.fields(cls):
            if f.name in _SKIP[cls] or f.name in ("steps", "seed", "save_every"):
                continue
            type_name = str(f.type)
            group.add_argument(f"--{_PREFIX[cls]}{f.name.replace('_', '-')}", dest=f"cfg:{_KEY_PREFIX[cls]}{f.name}",
                               type=lambda s, t=type_name: _parse_value(s, t), default=None, metavar=type_name.upper())


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    for name in ("steps", "seed", "save_every"):
        if getattr(args, name, None) is not None:
            out[name] = getattr(args, name)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from moelab.config import preset
    from moelab.train import train

    model_cfg, train_cfg = preset(args.preset, **_overrides(args))
    if args.dense:
        model_cfg = model_cfg.dense_twin()
    result = train(model_cfg, train_cfg, args.out, data_path=args.data, resume=args.resume,
                   progress=not args.quiet)
    if result.is_main:
        print(f"run: {result.run_dir}  steps: {result.steps}  validation loss: {result.final_val_loss:.4f}  "
              f"training tokens/s: {result.tokens_per_s:,.0f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moelab.demo import run_demo

    run_demo(args.out, preset_name=args.preset, steps=args.steps, data_path=args.data, progress=not args.quiet)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moelab.generate import generate_text

    print(args.prompt + generate_text(args.run, args.prompt, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                      device=args.device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moelab", description="Mixture-of-Experts transformers: build, train, "
                                     "run, count and inspect them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a tiny MoE and its dense twin on the same tokens and compare them")
    p.add_argument("--out", default="runs/demo", help="directory for both runs and the comparison (default runs/demo)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default: the preset's)")
    p.add_argument("--data", default=None, help="text file or directory (default: the Python standard library)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one model; writes metrics.jsonl, checkpoints and plots to --out")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--data", default=None, help="text file or directory (default: the Python standard library)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--dense", action="store_true", help="train the dense twin (same active parameters)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt with a trained run (KV-cached decoding)")
    p.add_argument("run", help="run directory (its newest checkpoint and tokenizer.json are used)")
    p.add_argument("--prompt", default="", help="text to continue (may be empty)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(func=cmd_generate)

    from moelab import card

    p = sub.add_parser("card", help="total and active parameters, FLOPs, memory and accelerators for models")
    card.add_arguments(p)
    p.set_defaults(func=card.run)
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"moelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_convert(args: argparse.Namespace) -> int:
    from moelab import hf

    if args.from_hf:
        out = hf.convert_from_hf(args.source, args.out)
        print(f"moelab run written to {out} (use: moelab generate {out} / moelab card {out})")
    else:
        out = hf.convert_to_hf(args.source, args.out)
        print(f"Hugging Face model written to {out} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face MoE checkpoint <-> moelab run directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-hf", dest="from_hf", action="store_true",
                      help="SOURCE is a Hugging Face model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
                           "DeepSeek-V3); OUT becomes a moelab run directory")
    mode.add_argument("--to-hf", dest="to_hf", action="store_true",
                      help="SOURCE is a moelab run (newest checkpoint); OUT becomes a Hugging Face model directory")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out", metavar="OUT")
    p.set_defaults(func=cmd_convert)


if __name__ == "__main__":
    raise SystemExit(main())
