"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"): a dense checkpoint becomes an MoE whose experts start as copies of its FFNs.

    moe = upcycle_model(dense, n_experts=8, top_k=2)          # a MoETransformer, nothing trained yet
    upcycle(DENSE_PATH, OUT, n_experts=8, top_k=2)             # `moelab upcycle`: OUT a moelab run directory

Every dense FFN (SwiGLU, hidden width S) becomes an MoE layer of E experts; everything else (embeddings,
attention, norms, head) is copied unchanged. As in the paper, the experts are copies of the FFN and the router
is new, initialised at random (N(0, router_std²), std 0.02 as moelab's other linear layers), since a dense
model has none.

The router is the renormalised top-k softmax (Mixtral's): the k chosen weights w_i sum to 1. With identical
experts, y = Σ_i w_i · FFN(x) = FFN(x) for every token whatever the router picks, so at step 0 the upcycled
model computes the dense model's function (to float rounding: the k products are summed), the invariant
tests/test_upcycle.py checks. Training then makes the copies diverge; the load-balancing loss
(`aux_loss_coef`, Switch's E·Σ fᵢ·Pᵢ) keeps the router from sending everything to the copy that first pulls
ahead (the paper keeps its auxiliary loss; `benchmarks/upcycle.py` measures the divergence).

Fine-grained upcycling (`granularity` G > 1, as Qwen1.5-MoE did): each expert is one of G slices of the FFN's
hidden units (SwiGLU is a sum over its hidden units, FFN(x) = Σ_j FFN_j(x)), expert e taking slice e mod G,
so E must be a multiple of G; d_expert = S / G and route_scale = G. With top_k = G and the router's weights
uniform over one copy of each slice, the output is again FFN(x); a real router is not uniform, so a
fine-grained upcycle starts near, not at, the dense function.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moelab.config.model import ModelConfig, MoEConfig
from moelab.config.train import TrainConfig
from moelab.model.transformer import MoETransformer

ROUTER_STD = 0.02


def check_counts(n_experts: int, top_k: int, granularity: int = 1) -> None:
    """ValueError naming experts, top_k or granularity when it is not a positive integer, or top_k > experts."""
    for name, v in (("experts", n_experts), ("top_k", top_k), ("granularity", granularity)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: allowed an integer >= 1")
    if top_k > n_experts:
        raise ValueError(f"top_k={top_k} is invalid with experts={n_experts}: allowed 1 <= top_k <= experts")


def upcycle_config(dense: ModelConfig, n_experts: int, top_k: int, granularity: int = 1,
                   aux_loss_coef: float = 0.01, z_loss_coef: float = 1e-3) -> ModelConfig:
    """The MoE config of an upcycled dense model; ValueError naming the field (experts, top_k, granularity)
    and the allowed values, or the dense model's field that rules it out."""
    check_counts(n_experts, top_k, granularity)
    if dense.moe is not None:
        raise ValueError("the model is already a Mixture-of-Experts (moe is set): upcycling takes a dense model "
                         "(moe=None)")
    if dense.activation != "swiglu":
        raise ValueError(f"activation={dense.activation!r}: upcycling copies SwiGLU FFNs (allowed 'swiglu')")
    if dense.d_ff % granularity or n_experts % granularity:
        raise ValueError(f"granularity={granularity} is invalid: allowed a divisor of the FFN width (d_ff="
                         f"{dense.d_ff}) and of experts ({n_experts})")
    moe = MoEConfig(d_model=dense.d_model, d_expert=dense.d_ff // granularity, n_experts=n_experts, top_k=top_k,
                    router="topk_softmax", norm_topk_prob=True, route_scale=float(granularity),
                    aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef)
    return dense.replace(moe=moe, n_dense_layers=0, moe_every=1)


@torch.no_grad()
def upcycle_model(dense: MoETransformer, n_experts: int, top_k: int, granularity: int = 1, seed: int = 0,
                  router_std: float = ROUTER_STD, **moe_fields: Any) -> MoETransformer:
    """The upcycled MoE of a dense `MoETransformer` (module docstring), float32, train mode. `moe_fields`:
    aux_loss_coef / z_loss_coef of `upcycle_config`."""
    cfg = upcycle_config(dense.cfg, n_experts, top_k, granularity, **moe_fields)
    moe = MoETransformer(cfg)
    src = dense.state_dict()
    state = moe.state_dict()
    S, F, G = dense.cfg.d_ff, cfg.moe.d_expert, granularity
    gen = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        if ".ffn." not in name:
            t.copy_(src[name])  # embeddings, attention, norms, head: the dense model's
    for i, block in enumerate(moe.blocks):
        w_in, w_out = src[f"blocks.{i}.ffn.w_in.weight"], src[f"blocks.{i}.ffn.w_out.weight"]  # [2S, D], [D, S]
        for e in range(n_experts):
            j = e % G  # the slice of hidden units this expert copies
            gate, up = w_in[j * F:(j + 1) * F], w_in[S + j * F:S + (j + 1) * F]  # [F, D] each
            block.ffn.experts.w_in[e].copy_(torch.cat([gate.t(), up.t()], dim=1))  # [D, 2F]
            block.ffn.experts.w_out[e].copy_(w_out[:, j * F:(j + 1) * F].t())  # [F, D]
        r = block.ffn.router
        r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * router_std)  # [E, D]
        r.bias.zero_()
    return moe.train()


def _load_dense(path: Path) -> tuple[MoETransformer, dict[str, Any], Path]:
    """The dense model of a Hugging Face directory or a moelab run, what config.json["init"] records of it, and
    the directory holding its tokenizer files."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.runs.load import is_hf_dir, load_run
    from moelab.runs.rundir import TOKENIZER, RunDir
    from moelab.training.init import origin

    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a dense Hugging Face directory or a moelab dense run")
    tok = path / TOKENIZER
    record = origin(path, load_tokenizer(tok) if tok.is_file() else None)
    if is_hf_dir(path) and not RunDir(path).checkpoints():
        from moelab.hf.loading import load

        return load(path, "float32", for_training=True), record, path
    if (path / "config.json").is_file() and "quant" in RunDir(path).read_config():
        raise ValueError(f"{path} holds a quantized run: upcycle its float source")
    return load_run(path, for_training=True)[0].float(), record, path


def upcycle(dense_path: str | Path, out: str | Path, n_experts: int, top_k: int, granularity: int = 1,
            seed: int = 0, aux_loss_coef: float = 0.01, z_loss_coef: float = 1e-3) -> Path:
    """`moelab upcycle`: the dense checkpoint at `dense_path` (a Hugging Face Llama / Mistral / Qwen2 / Qwen3
    directory, or a moelab dense run) upcycled into the run directory `out`: config.json, a step-0 checkpoint,
    the tokenizer and chat-template files; continue it with `moelab train --init-from OUT`. `out` must not
    exist or be empty; it is written in a temporary directory beside it and renamed into place, so it is
    either whole or absent. ValueError naming the field for bad values."""
    from moelab.runs import checkpoint as ckpt_io
    from moelab.runs.rundir import TOKENIZER, RunDir
    from moelab.training.init import TEMPLATE_FILES

    dense_path, out = Path(dense_path), Path(out)
    check_counts(n_experts, top_k, granularity)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory: upcycle writes a new run directory — "
                              "nothing was written")
    dense, record, files = _load_dense(dense_path)
    if dense.cfg.moe is not None:
        raise ValueError(f"{dense_path} is already a Mixture-of-Experts (moe is set): upcycling takes a dense model")
    moe = upcycle_model(dense, n_experts, top_k, granularity, seed, aux_loss_coef=aux_loss_coef,
                        z_loss_coef=z_loss_coef)
    record |= {"upcycled": {"from": str(dense_path), "experts": n_experts, "top_k": top_k,
                            "granularity": granularity, "seed": seed, "router_std": ROUTER_STD}}
    config = {"model": moe.cfg.to_dict(), "train": TrainConfig().to_dict(), "init": record}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ckpt_io.save_checkpoint(tmp, 0, model=moe, optimizer={"state": {}, "param_groups": []}, config=config,
                                trainer={"train_tokens": 0, "train_seconds": 0.0, "upcycled_from": str(dense_path)},
                                rng={"torch": torch.get_rng_state(), "data": torch.Generator().get_state()})
        RunDir(tmp).write_config(config)
        for name in (TOKENIZER, *TEMPLATE_FILES):
            if (files / name).is_file():
                shutil.copyfile(files / name, tmp / name)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
