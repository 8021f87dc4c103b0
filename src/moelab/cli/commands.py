"""What each `moelab` command does, a few lines over a library function each: the parsed arguments in, one call,
the results printed (the parser and the one-line errors are in cli/main.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from moelab.cli.flags import (
    at_least,
    check_budget_fits_machine,
    check_preset,
    config_overrides,
    group_size_flag,
    seq_len_fits,
)
from moelab.config.model import ModelConfig
from moelab.config.train import TrainConfig, preset, with_overrides


def cmd_train(args: argparse.Namespace) -> int:
    from moelab.runs.rundir import RunDir
    from moelab.training.train import train

    check_preset(args.preset)
    overrides = config_overrides(args)
    init = None
    if args.freeze and args.init_from is None:
        raise ValueError("--freeze applies with --init-from (fine-tuning a checkpoint)")
    if args.init_from is not None:
        from moelab.cli.finetune import train_from_checkpoint

        init, model_cfg, train_cfg = train_from_checkpoint(args, overrides)
    elif args.resume and args.preset is None:  # flags not given keep the run's values
        run = RunDir(args.out)
        run.require_resumable()
        saved = run.read_config()
        model_cfg, train_cfg = with_overrides(ModelConfig.from_dict(saved["model"]),
                                              TrainConfig.from_dict(saved["train"]), overrides)
    else:
        model_cfg, train_cfg = preset(args.preset or "tiny", **overrides)
    if args.dense:
        model_cfg = model_cfg.dense_twin()
    result = train(model_cfg, train_cfg, args.out, data_path=args.data, resume=args.resume, progress=not args.quiet,
                   new_data=args.new_data, data_errors=args.data_errors, init=init)
    if result.is_main:
        print(f"run: {result.run_dir}  steps: {result.steps}  validation loss: {result.final_val_loss:.4f}  "
              f"training tokens/s: {result.tokens_per_s:,.0f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from moelab.cli.demo import fresh_out

    overrides = dict(args.set or [])
    balancing = args.experiment == "balancing"
    if overrides and not balancing:
        raise ValueError("--set applies to --experiment balancing; the MoE-vs-dense demo runs its preset")
    out = args.out
    if out is None:  # the default directory, or runs/demo-2, -3, ... when an earlier demo is there
        from moelab.cli.balancing import METHODS

        out = fresh_out("runs/balancing" if balancing else "runs/demo", METHODS if balancing else ("moe", "dense"))
        print(f"moelab demo: writing to {out} (--out DIR to choose)", flush=True)
    if balancing:
        from moelab.cli.balancing import run_balancing

        run_balancing(out, preset_name=args.preset, steps=args.steps, data_path=args.data,
                      progress=not args.quiet, overrides=overrides)
        return 0
    from moelab.cli.demo import run_demo

    run_demo(out, preset_name=args.preset, steps=args.steps, data_path=args.data, progress=not args.quiet)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from moelab.cli.generate import generate_texts

    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        with open(args.prompts_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if not lines:
            raise ValueError(f"--prompts-file {args.prompts_file} holds no prompt: one prompt per non-empty line")
        prompts += lines
    prompts = prompts or [""]
    if args.max_memory_gb is None and (args.cache_policy is not None or args.prefetch):
        raise ValueError("--cache-policy and --prefetch apply with --max-memory-gb (a budget for the experts)")
    group_size = group_size_flag(args)
    check_budget_fits_machine(args.max_memory_gb)
    report = generate_texts(args.run, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, device=args.device, quant=args.quant, group_size=group_size,
                            max_memory_gb=args.max_memory_gb, policy=args.cache_policy or "lru",
                            prefetch=args.prefetch, progress=False if args.quiet else None)
    for i, (prompt, text) in enumerate(zip(prompts, report.texts)):
        if len(prompts) > 1:
            print(f"--- prompt {i + 1} ---")
        print(prompt + text)
    for line in report.summary():
        print(line, file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from moelab.serve.server import serve
    except ImportError as e:
        raise ValueError(f"the server needs FastAPI and uvicorn ({e}): pip install 'moelab[serve]'") from None
    if args.max_memory_gb is None and (args.cache_policy is not None or args.prefetch):
        raise ValueError("--cache-policy and --prefetch apply with --max-memory-gb (a budget for the experts)")
    return serve(args.run, host=args.host, port=args.port, quant=args.quant, group_size=args.group_size,
                 max_memory_gb=args.max_memory_gb, policy=args.cache_policy or "lru", prefetch=args.prefetch,
                 max_batch=args.max_batch, max_queue=args.max_queue, max_tokens_in_flight=args.max_tokens_in_flight,
                 api_key=args.api_key, model_name=args.model_name)


def cmd_eval(args: argparse.Namespace) -> int:
    from moelab.data.corpus import Corpus
    from moelab.runs.load import load_model
    from moelab.training.evaluation import evaluate_text

    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-tokens", args.max_tokens, 2, " (one token is predicted from the one before it)")
    loaded = load_model(args.path)
    seq_len_fits("--seq-len", args.seq_len, loaded.model)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.path} has no tokenizer.json: the text cannot be tokenized")
    result = evaluate_text(loaded.model, loaded.tokenizer, Corpus(args.data, errors=args.data_errors).documents(),
                           loaded.stop_id, seq_len=args.seq_len, batch_size=args.batch_size,
                           max_tokens=args.max_tokens, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps({"path": str(args.path), "data": str(args.data), **result.to_dict()}, indent=2))
    else:
        print(f"{args.path} on {args.data}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.4g}, "
              f"{result.bits_per_byte:.4f} bits/byte ({result.tokens:,} tokens, {result.bytes:,} bytes, "
              f"{result.documents} documents, windows of {result.seq_len})")
    return 0


def cmd_routing(args: argparse.Namespace) -> int:
    from moelab.analysis.routing_report import collect_routing, routing_report, write_report
    from moelab.data.corpus import Corpus, default_corpus_tail
    from moelab.runs.load import load_model

    at_least("--seq-len", args.seq_len, 1)
    at_least("--tokens", args.tokens, 1)
    loaded = load_model(args.path)
    seq_len_fits("--seq-len", args.seq_len, loaded.model)
    seq_len = args.seq_len or min(256, loaded.model.cfg.max_seq_len)
    at_least("--tokens", args.tokens, seq_len, f" (--seq-len {seq_len}: whole sequences are routed)")
    if loaded.tokenizer is None:
        raise ValueError(f"{args.path} has no tokenizer.json: the text cannot be tokenized")
    if args.data:
        sources = []
        for spec in args.data:
            path, _, label = spec.partition("=")
            sources.append((label or os.path.basename(os.path.normpath(path)), Corpus(path).documents()))
    else:  # the default corpus's held-out tail, code and prose apart
        sources = [(kind, default_corpus_tail(kind, TrainConfig().max_corpus_bytes)) for kind in ("code", "prose")]
    record = collect_routing(loaded.model, loaded.tokenizer, sources, loaded.stop_id, tokens=args.tokens,
                             seq_len=seq_len, progress=not args.quiet)
    report = routing_report(record, decode=loaded.tokenizer.id_to_token)
    report["model"] = str(args.path)
    page = write_report(report, args.out, title=f"routing of {args.path}")
    for e in report["layers"]:
        print(f"layer {e['layer']:>3}: load entropy {e['entropy']:.3f}  dead {e['dead_experts']:>3}/"
              f"{report['n_experts']}  max/mean {e['max_violation']:.2f}  "
              f"NMI(label) {e['specialisation']['normalised_mutual_information']:.3f}")
    print(f"{args.out}/routing.json and {page} written ({report['tokens']:,} tokens)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moelab.runs.convert import convert_from_hf, convert_to_hf

    if args.from_hf:
        out = convert_from_hf(args.source, args.out, overwrite=args.overwrite, quant=args.quant,
                              group_size=group_size_flag(args))
        print(f"moelab run written to {out} (use: moelab generate {out} / moelab card {out})")
    else:
        if args.quant is not None or args.group_size is not None:
            raise ValueError("--quant and --group-size apply to --from-hf (a Hugging Face export holds float weights)")
        out = convert_to_hf(args.source, args.out, overwrite=args.overwrite)
        print(f"Hugging Face model written to {out} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0
