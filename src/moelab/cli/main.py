"""The `moelab` command: thin — it parses arguments, calls a library function, prints.

    moelab demo                       MoE vs its dense twin on the default corpus, in minutes
    moelab train --preset tiny ...    train one model (every config field is a flag: --d-model,
                                      --moe-n-experts, --lr, ...; --dense trains the dense twin)
    moelab generate PATH --prompt TEXT   a run or a Hugging Face directory (--prompt again: a batch;
                                      --quant int8|int4; --max-memory-gb: experts read from disk)
    moelab eval PATH --data TEXT      loss, perplexity and bits per byte on held-out text
    moelab routing PATH --out DIR     what the experts do: routing.json, figures, report.html
    moelab card MODEL... [--json]     total/active parameters and what they cost
    moelab convert --from-hf DIR OUT | --to-hf RUN OUT
    moelab serve PATH [--port 8000]   an OpenAI-compatible server with continuous batching (moelab[serve])
    moelab train --init-from PATH ... fine-tune a Hugging Face MoE or a run (--freeze routers,...; --data a.jsonl)
    moelab upcycle DENSE OUT --experts E --top-k K   a dense checkpoint → an MoE run (sparse upcycling)

Errors a user can cause (bad values, missing files, a run in use, a diverged run...) print one line,
`moelab <command>: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from moelab import __version__
from moelab.cli.commands import cmd_convert, cmd_demo, cmd_eval, cmd_generate, cmd_routing, cmd_serve, cmd_train
from moelab.cli.flags import (
    FieldType,
    add_config_flags,
    setting,
)
from moelab.config.train import PRESETS, TrainConfig


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `moelab train: error: argument --d-model: 'abc' is not an integer (see
    moelab train --help)`, exit status 2 (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moelab", description="Mixture-of-Experts transformers: build, train, "
                                     "run, count and inspect them.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    p = sub.add_parser("demo", help="train a tiny MoE and its dense twin on the same tokens and compare them",
                       description="Experiments on the default corpus: moe-vs-dense (default) trains a tiny MoE and "
                       "its dense twin (same active parameters) on the same tokens; balancing trains the MoE four "
                       "times — no balancing, the Switch auxiliary loss, the auxiliary-loss-free bias, noisy top-k "
                       "gating with its importance and load losses — and compares "
                       "their expert load and validation loss.", **fmt)
    p.add_argument("--experiment", default="moe-vs-dense", choices=["moe-vs-dense", "balancing"],
                   help="which experiment")
    p.add_argument("--out", default=None, help="directory for the runs and the comparison, refused when it holds an "
                   "earlier demo (None: runs/demo or runs/balancing, or the first of runs/demo-2, runs/demo-3, ... "
                   "that is free, so the demo can be typed again)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="training preset")
    p.add_argument("--steps", type=FieldType("int | None"), default=None,
                   help="optimizer steps per model (None: the preset's)")
    p.add_argument("--data", default=None, help="text file or directory (None: the Python standard library)")
    p.add_argument("--set", action="append", type=setting, metavar="FIELD=VALUE",
                   help="balancing only: a setting for all its runs, e.g. --set moe.n_experts=64 --set lr=0.01")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one model; writes metrics.jsonl, checkpoints and plots to --out",
                       description="Train one model into a run directory. A new run never overwrites one; --resume "
                       "continues the newest checkpoint with the run's own settings, tokenizer and data (flags given "
                       "again must agree with the run, except the resumable ones: "
                       f"{', '.join(TrainConfig.RESUMABLE)}). One process at a time writes a run (run.lock).")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help=f"training preset: {', '.join(sorted(PRESETS))} (default: tiny; on --resume, the run's "
                        "settings)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text file or directory (default: the Python standard library; on --resume, the run's data)")
    p.add_argument("--data-errors", default="strict", choices=["strict", "replace"],
                   help="text that is not valid UTF-8: strict = refuse it, naming the file; replace = bad bytes "
                        "become U+FFFD (default: strict)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (an error when there is none)")
    p.add_argument("--new-data", action="store_true",
                   help="with --resume and --data: continue training on other text, tokenized with the run's "
                        "tokenizer (without it, text that differs from the run's is refused)")
    p.add_argument("--dense", action="store_true", help="train the dense twin (same active parameters)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from moelab.cli.finetune import add_init_flags, add_upcycle_parser

    add_init_flags(p)
    add_config_flags(p)
    p.set_defaults(func=cmd_train)
    add_upcycle_parser(sub, fmt)

    p = sub.add_parser("generate", help="continue prompts with a run or a Hugging Face model (KV-cached decoding)",
                       description="Continue one prompt or a batch of prompts (decoded together, left-padded) with "
                       "the newest checkpoint of a run or a Hugging Face directory (config.json + safetensors + "
                       "tokenizer.json). A trained run's prompt is encoded after the end-of-text token every training "
                       "document starts with; a Hugging Face directory's, and a run converted from one, as its "
                       "tokenizer encodes it (transformers' tokenizer(prompt): its special tokens, e.g. a BOS); "
                       "the longest prompt + new tokens must fit the model's max_seq_len. A prompt stops "
                       "early at an end-of-text token. The texts go to stdout; tokens/s, peak memory and (with "
                       "--max-memory-gb) the expert cache's hit rate and bytes read from disk per token to stderr.",
                       **fmt)
    p.add_argument("run", metavar="PATH", help="run directory (its newest checkpoint and tokenizer.json are used) or "
                   "Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text to continue (may be empty); repeat for a batch of prompts (None: one empty prompt)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="UTF-8 text file, one prompt per non-empty line, added after the --prompt ones")
    p.add_argument("--max-new-tokens", type=FieldType("int | None"), default=None,
                   help="tokens to generate at most (None: up to 100, as many as the model's context leaves)")
    p.add_argument("--temperature", type=FieldType("float"), default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=FieldType("float"), default=0.95, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=FieldType("int"), default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (--quant and --max-memory-gb: cpu)")
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the experts and the other linear layers, at load (None: the "
                   "checkpoint's float weights)")
    p.add_argument("--group-size", type=FieldType("int | None"), default=None,
                   help="with --quant int4: the int4 group size, 32, 64, 128 or 256 (None: 32)")
    p.add_argument("--max-memory-gb", type=FieldType("float | None"), default=None, metavar="GB",
                   help="memory budget for the weights in GB (10^9 bytes), for a Hugging Face directory or a "
                   "quantized run (`moelab convert --from-hf ... --quant`; a float run is refused): the non-expert "
                   "weights stay in memory, the routed experts are read from the safetensors files on demand into a "
                   "cache of the rest; at most this machine's memory (None: the whole model in memory)")
    p.add_argument("--cache-policy", default=None, choices=["lru", "lfu"],
                   help="which expert the cache evicts, with --max-memory-gb: least recently or least frequently "
                   "used (None: lru)")
    p.add_argument("--prefetch", action="store_true",
                   help="with --max-memory-gb: read the next layer's predicted experts on a background thread")
    p.add_argument("--quiet", action="store_true", help="no loading progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="Serve a run, a quantized run or a Hugging Face directory over the OpenAI API "
                       "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics), decoding the requests "
                       "in one running batch that requests join and leave at every step. SIGTERM or Ctrl-C: stop "
                       "accepting, finish the open requests, exit 0.", **fmt)
    p.add_argument("run", metavar="PATH", help="run directory or Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (another than loopback: use --api-key)")
    p.add_argument("--port", type=FieldType("int"), default=8000, help="TCP port")
    p.add_argument("--max-batch", type=FieldType("int"), default=16, help="requests decoded together at most")
    p.add_argument("--max-queue", type=FieldType("int"), default=64,
                   help="requests waiting for a row at most; past it a request gets 429 with Retry-After")
    p.add_argument("--max-tokens-in-flight", type=FieldType("int | None"), default=None, metavar="N",
                   help="KV positions the running batch may hold (rows x the longest prompt + max_tokens among "
                   "them); a request waits until it fits (None: bounded by --max-batch and the context only)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (None: no key)")
    p.add_argument("--model-name", default=None, help="the model's id in the API (None: the directory's name)")
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="weight-only quantization at load (None: the checkpoint's weights)")
    p.add_argument("--group-size", type=FieldType("int"), default=32, help="int4 group size: 32, 64, 128 or 256")
    p.add_argument("--max-memory-gb", type=FieldType("float | None"), default=None, metavar="GB",
                   help="memory budget for the weights (GB): routed experts read from disk into a cache (None: all "
                   "in memory)")
    p.add_argument("--cache-policy", default=None, choices=["lru", "lfu"], help="expert cache eviction policy")
    p.add_argument("--prefetch", action="store_true", help="with --max-memory-gb: prefetch the next layer's experts")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run or Hugging Face model on text",
                       description="Evaluate a model on held-out text: every document after the model's separator "
                       "token, in consecutive windows; prints cross-entropy (nats/token), perplexity and bits per "
                       "byte.", **fmt)
    p.add_argument("path", help="a moelab run directory or a Hugging Face model directory")
    p.add_argument("--data", required=True, help="text file or directory to evaluate on")
    p.add_argument("--data-errors", default="strict", choices=["strict", "replace"],
                   help="text that is not valid UTF-8: refuse it, or replace bad bytes with U+FFFD")
    p.add_argument("--seq-len", type=FieldType("int | None"), default=None,
                   help="tokens per window, 1 to the model's max_seq_len (None: the model's max_seq_len)")
    p.add_argument("--batch-size", type=FieldType("int"), default=8, help="windows per forward pass, >= 1")
    p.add_argument("--max-tokens", type=FieldType("int | None"), default=None,
                   help="stop adding documents once this many tokens (>= 2) are reached (None: all the text)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("routing", help="what a model's experts do on text: load, balance, specialisation, "
                       "prefetch predictability, batch economics (routing.json, PNGs, report.html)",
                       description="Route held-out text through a run or a Hugging Face model and write "
                       "DIR/routing.json, PNG figures and a self-contained DIR/report.html (schema: docs/ROUTING.md).",
                       **fmt)
    p.add_argument("path", help="a moelab run directory or a Hugging Face model directory")
    p.add_argument("--data", action="append", metavar="PATH[=LABEL]",
                   help="labelled text (repeat for several: e.g. --data src/=code --data docs/=prose); default: the "
                        "default corpus's held-out tail, labelled code and prose")
    p.add_argument("--tokens", type=FieldType("int"), default=4096,
                   help="tokens routed per label, at least --seq-len (whole sequences are routed)")
    p.add_argument("--seq-len", type=FieldType("int | None"), default=None,
                   help="tokens per sequence, 1 to the model's max_seq_len (None: 256, or max_seq_len if smaller)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_routing)

    from moelab.accounting import card

    p = sub.add_parser("card", help="total and active parameters, FLOPs, memory and accelerators for models")
    card.add_arguments(p)
    p.set_defaults(func=card.run)

    p = sub.add_parser("convert", help="Hugging Face MoE checkpoint <-> moelab run directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-hf", dest="from_hf", action="store_true",
                      help="SOURCE is a Hugging Face model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
                           "DeepSeek-V3); OUT becomes a moelab run directory")
    mode.add_argument("--to-hf", dest="to_hf", action="store_true",
                      help="SOURCE is a moelab run (newest checkpoint); OUT becomes a Hugging Face model directory")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT, replacing the files the conversion writes (without it a "
                        "non-empty OUT is refused)")
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="with --from-hf: store the weights quantized (int8 per output channel, int4 group-wise); "
                        "the run is for inference (generate, eval)")
    p.add_argument("--group-size", type=FieldType("int | None"), default=None,
                   help="with --quant int4: the int4 group size, 32, 64, 128 or 256 (None: 32)")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("out", metavar="OUT")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moelab.runs.rundir import RunLockedError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RunLockedError) as e:
        if isinstance(e, BrokenPipeError):
            return _closed_stdout()
        what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"moelab {args.command}: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _closed_stdout() -> int:
    """The reader of our output went away (`moelab card ... | head -1`): stop quietly, as `head` expects."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
