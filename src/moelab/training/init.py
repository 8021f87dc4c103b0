"""Training from a checkpoint (`moelab train --init-from PATH`): the model, tokenizer and prompt rules of a
Hugging Face directory or a moelab run, the architecture flags a fine-tune may set, freezing, and its data.

    init = load_init(path)                # Init: trainable float model, tokenizer, chat template, rules
    model_cfg = init_config(init, overrides)   # the checkpoint's config; a contradicting flag is a named error
    freeze(init.model, ["routers"])       # the common recipes: FREEZE_GROUPS
    train(model_cfg, train_cfg, out, init=init)   # fresh optimizer state; step-0 routing in metrics.jsonl

The optimizer starts fresh (a checkpoint's optimizer state belongs to another run, and Hugging Face
directories have none). Only training-time fields of the model config may differ from the checkpoint's
(`TRAINING_FIELDS`: balancing coefficients, dropout, backend...): anything else would change what the weights
mean. The data is plain text (documents separated by the checkpoint's end-of-text token) or JSONL
conversations (`moelab.data.conversations`: rendered with the checkpoint's chat template, loss on assistant
text only). The run directory keeps the tokenizer, the chat-template files and, in config.json["init"], where
the weights came from, the frozen groups and the prompt rule (so `moelab generate RUN` encodes prompts as the
checkpoint does).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.config.hf import load_json
from moelab.config.model import ModelConfig
from moelab.config.train import TrainConfig
from moelab.data.chat import ChatTemplate
from moelab.data.conversations import ChatData, is_conversations
from moelab.data.corpus import Corpus
from moelab.data.tokenizer import END_OF_TEXT, load_tokenizer
from moelab.data.tokens import prepare_data
from moelab.model.transformer import MoETransformer
from moelab.runs.rundir import TOKENIZER, RunDir

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja")  # copied into the run with tokenizer.json

# ModelConfig fields ("moe.x": MoEConfig's) that set how a model trains, not what its weights compute
TRAINING_FIELDS = frozenset({"dropout", "moe.aux_loss_coef", "moe.seq_aux_loss_coef", "moe.z_loss_coef",
                             "moe.bias_update_rate", "moe.freeze_router", "moe.backend"})

# --freeze groups: parameter-name tests (names as in MoETransformer.state_dict())
FREEZE_GROUPS = {
    "routers": lambda n: ".ffn.router." in n,
    "experts": lambda n: ".ffn.experts." in n,
    "shared": lambda n: ".ffn.shared." in n or ".ffn.shared_gate." in n,
    "dense": lambda n: ".ffn.w_in." in n or ".ffn.w_out." in n,
    "attention": lambda n: ".attn." in n,
    "norms": lambda n: n.endswith("norm.weight"),
    "embeddings": lambda n: n.startswith("embed.") or n.startswith("head."),
}


@dataclass
class Init:
    """What a run starts from: `model` (float, trainable), `tokenizer`, the chat `template` (None when the
    checkpoint has none), `separator` (the id between plain-text documents), and `record` (config.json["init"]:
    from, kind, prompt rule, eos_token_id, separator, freeze)."""

    model: MoETransformer
    tokenizer: Any
    template: ChatTemplate | None
    separator: int
    path: Path
    record: dict[str, Any] = field(default_factory=dict)


def load_init(path: str | Path, dtype: torch.dtype | str | None = None) -> Init:
    """A Hugging Face directory or a moelab run (its newest checkpoint) as an `Init`; ValueError /
    FileNotFoundError naming the path or field otherwise."""
    from moelab.runs.load import is_hf_dir, load_run

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--init-from {path} does not exist: pass a Hugging Face model directory or a "
                                "moelab run")
    if is_hf_dir(path) and not RunDir(path).checkpoints():
        from moelab.hf.loading import load

        model = load(path, dtype or "float32", for_training=True).train()  # float32 master weights by default
    else:
        if (path / "config.json").is_file() and "quant" in RunDir(path).read_config():
            raise ValueError(f"--init-from {path}: a quantized run cannot be trained; start from its float source")
        model, _ = load_run(path, for_training=True)
        model = model.to(dtype if isinstance(dtype, torch.dtype) else torch.float32).train()
    tok_path = path / TOKENIZER
    if not tok_path.is_file():
        raise FileNotFoundError(f"--init-from {path} has no {TOKENIZER}: training text cannot be tokenized as the "
                                "checkpoint was")
    tokenizer = load_tokenizer(tok_path)
    record = origin(path, tokenizer)
    if record["separator"] is None:
        raise ValueError(f"--init-from {path}: config.json field 'eos_token_id' is missing and the tokenizer has no "
                         f"{END_OF_TEXT}: nothing separates plain-text documents (allowed: an integer token id)")
    if max(tokenizer.get_vocab().values(), default=0) >= model.cfg.vocab_size:
        raise ValueError(f"--init-from {path}: {TOKENIZER} has ids beyond the model's vocab_size="
                         f"{model.cfg.vocab_size}")
    return Init(model, tokenizer, ChatTemplate.from_dir(path), record["separator"], path, record)


def origin(path: Path, tokenizer=None) -> dict[str, Any]:
    """config.json["init"] of a run started from `path`: from, kind ("hf" / "run"), prompt rule ("hf": the
    checkpoint's tokenizer adds its own special tokens; "run": moelab's [<|endoftext|>] + text), eos_token_id and
    the plain-text document separator (the tokenizer's <|endoftext|>, else the eos id). A run inherits the rules
    of the checkpoint it started from."""
    from moelab.runs.load import is_hf_dir

    path = Path(path)
    if is_hf_dir(path) and not RunDir(path).checkpoints():
        eos = load_json(path / "config.json").get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
        kind, prompt = "hf", "hf"
    else:
        previous = RunDir(path).read_config().get("init") or {} if (path / "config.json").is_file() else {}
        kind, prompt, eos = "run", previous.get("prompt", "run"), previous.get("eos_token_id")
    eot = tokenizer.token_to_id(END_OF_TEXT) if tokenizer is not None else None
    return {"from": str(path), "kind": kind, "prompt": prompt, "eos_token_id": eos,
            "separator": eot if eot is not None else eos}


def init_config(init: Init, overrides: dict[str, Any]) -> ModelConfig:
    """The checkpoint's ModelConfig with the `TRAINING_FIELDS` of `overrides` ("field" / "moe.field" keys, model
    fields only) applied; ValueError naming the first other field whose value contradicts the checkpoint."""
    cfg = init.model.cfg
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        obj, leaf = (cfg.moe, key[4:]) if key.startswith("moe.") else (cfg, key)
        if obj is None:
            raise ValueError(f"--init-from: {key}={value!r} contradicts the checkpoint: it is a dense model (moe=None)")
        current = getattr(obj, leaf)
        current = current.to_dict() if hasattr(current, "to_dict") else current
        if value == current:
            continue
        if key not in TRAINING_FIELDS:
            raise ValueError(f"--init-from: {key}={value!r} contradicts the checkpoint ({key}={current!r}); allowed: "
                             f"leave it out, or one of the training settings {', '.join(sorted(TRAINING_FIELDS))}")
        changes[key] = value
    moe = cfg.moe
    if moe is not None:
        moe = moe.replace(**{k[4:]: v for k, v in changes.items() if k.startswith("moe.")})
    return cfg.replace(moe=moe, **{k: v for k, v in changes.items() if not k.startswith("moe.")})


def apply_config(init: Init, cfg: ModelConfig) -> None:
    """Give the model (its MoE layers) the training fields of `cfg` (from `init_config`)."""
    old = init.model.cfg.moe
    init.model.cfg = cfg
    if old is not None:
        for m in init.model.modules():  # the MoE layers, their routers and expert stores hold the MoEConfig
            if isinstance(getattr(m, "cfg", None), type(old)) and m.cfg == old:
                m.cfg = cfg.moe
        for moe in init.model.moe_layers():
            if cfg.moe.freeze_router:
                moe.router.weight.requires_grad_(False)
    for block in init.model.blocks:
        block.dropout.p = cfg.dropout


def check_freeze(groups: list[str]) -> list[str]:
    """`groups` validated against FREEZE_GROUPS (ValueError naming the bad one and the allowed ones)."""
    for g in groups:
        if g not in FREEZE_GROUPS:
            raise ValueError(f"--freeze {g!r} is not a parameter group: allowed {', '.join(FREEZE_GROUPS)}")
    return list(dict.fromkeys(groups))


def freeze(model: MoETransformer, groups: list[str]) -> int:
    """requires_grad=False on every parameter of the `groups` (FREEZE_GROUPS); returns how many were frozen.
    ValueError when a group names no parameter of this model (e.g. "shared" without shared experts)."""
    frozen = 0
    if not groups:
        return 0
    for g in check_freeze(groups):
        hit = [p for n, p in model.named_parameters() if FREEZE_GROUPS[g](n)]
        if not hit:
            raise ValueError(f"--freeze {g!r}: this model has no such parameters")
        for p in hit:
            p.requires_grad_(False)
        frozen += sum(p.numel() for p in hit)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--freeze {','.join(groups)} freezes every parameter: nothing would train")
    return frozen


def init_data(init: Init, run: RunDir, data_path, cfg: TrainConfig, quiet: bool = True):
    """The token data of a run started from `init` and its record: conversations (a .jsonl file) or plain
    text; the tokenizer and the chat-template files are copied into the run first."""
    init.tokenizer.save(str(run.tokenizer_path))
    for name in TEMPLATE_FILES:
        if (init.path / name).is_file() and init.path.resolve() != run.path.resolve():
            shutil.copyfile(init.path / name, run.path / name)
    if is_conversations(data_path):
        data = ChatData(data_path, init.tokenizer, init.template, cfg.seq_len, cfg.val_fraction,
                        source_name=f"--init-from {init.path}")
    else:
        corpus = Corpus(data_path, cfg.max_corpus_bytes)
        data = prepare_data(corpus, run.path, init.model.cfg.vocab_size, val_fraction=cfg.val_fraction, quiet=quiet,
                            tokenizer=init.tokenizer, separator=init.separator)[1]
    meta = data.metadata
    return data, {"source": meta.get("source_spec"), "description": meta.get("source"),
                  "corpus_sha256": meta["corpus_sha256"], "tokenizer_sha256": meta["tokenizer_sha256"],
                  "n_tokens": meta["n_tokens"], **({"format": "conversations"} if is_conversations(data_path) else {})}


@torch.no_grad()
def step0_record(model: MoETransformer, data, cfg: TrainConfig, ctx, evaluate) -> dict[str, Any]:
    """metrics.jsonl's step-0 line of a run started from a checkpoint: the validation loss and the routing
    statistics (`layer_stats`) of the first validation batch (under expert parallelism, rank 0's share of it),
    before any update — the baseline of the drift. Every rank calls it (the forward has collectives)."""
    from moelab.training.metrics import layer_stats

    x, _ = next(iter(data.iter_eval_batches(cfg.batch_size, cfg.seq_len, max_batches=1)))
    was = model.training
    model.eval()
    out = model(x.tensor_split(ctx.world)[ctx.rank].to(cfg.device), stats=True)
    model.train(was)
    return {"step": 0, "val_loss": evaluate(), "tokens": 0, **layer_stats([out.aux], model)}


def log_step0(model: MoETransformer, data, cfg: TrainConfig, ctx, evaluate, metrics, board) -> None:
    """`step0_record` written to metrics.jsonl (`metrics`: its open file, None on ranks > 0) and TensorBoard."""
    record = step0_record(model, data, cfg, ctx, evaluate)
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
    if board is not None:
        board.write(record)


def init_entry(init: Init | None, saved: dict[str, Any] | None) -> dict[str, Any]:
    """{"init": record} for config.json: the new run's `init`, else the resumed run's own record; {} for neither."""
    record = init.record if init is not None else (saved or {}).get("init")
    return {} if record is None else {"init": record}


def saved_separator(saved: dict[str, Any] | None) -> int | None:
    """The plain-text document separator a run started from a checkpoint keeps (None: moelab's <|endoftext|>)."""
    return ((saved or {}).get("init") or {}).get("separator")


def resume_conversations(run: RunDir, saved: dict[str, Any], data_path, cfg: TrainConfig):
    """The conversations a resumed fine-tune trains on: its recorded file (or `data_path`, which must hold the
    same conversations), rendered with the run's own tokenizer and chat template."""
    path = data_path or saved.get("source")
    tokenizer = load_tokenizer(run.tokenizer_path)
    data = ChatData(path, tokenizer, ChatTemplate.from_dir(run.path), cfg.seq_len, cfg.val_fraction,
                    source_name=str(run.path))
    if data.metadata["corpus_sha256"] != saved.get("corpus_sha256"):
        raise ValueError(f"--resume: {path} does not hold the conversations {run.path} was trained on (its "
                         "corpus_sha256 differs); start a new run with --init-from to train on other data")
    return data, saved
