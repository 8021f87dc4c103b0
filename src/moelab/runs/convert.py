"""Run directories ↔ Hugging Face directories: the two `moelab convert` directions.

Both refuse a non-empty output directory unless `overwrite` (then they replace the files they write).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moelab.hf.export import check_output_dir, save
from moelab.runs.load import hf_stop_id, read_json


def convert_from_hf(hf_dir: str | Path, out_run_dir: str | Path, dtype: torch.dtype | str | None = None,
                    overwrite: bool = False, quant: str | None = None, group_size: int = 32) -> Path:
    """A Hugging Face checkpoint → a moelab run directory (`moelab generate` / `moelab card` read it).

    Writes `config.json` ({"model": ..., "train": defaults}), a step-0 checkpoint (moelab.runs.checkpoint:
    safetensors + JSON, sha256 manifest) and copies `tokenizer.json` when the source has one. With
    `overwrite`, a run already in `out_run_dir` is replaced (its config, checkpoints, metrics, token cache
    and tokenizer), under the run's lock. With `quant` ("int8" | "int4", `group_size` for int4) the run holds
    the quantized model (`moelab.runs.quantized`; config.json gets "quant"), which loads without re-quantizing.
    config.json also records the checkpoint's prompt rule, {"prompt": {"rule": "tokenizer", "stop_id": its
    eos_token_id}}, so the run continues a prompt as its source does (`moelab.runs.load.LoadedModel.prompt_ids`).
    An error or an interrupt (Ctrl-C) while writing leaves an output directory that was empty as it was
    (no `checkpoints/.tmp-*`), so the same command can simply be run again.
    """
    from moelab.config.train import TrainConfig
    from moelab.hf import load
    from moelab.inference.formats import check_quant
    from moelab.runs import checkpoint as ckpt_io
    from moelab.runs.quantized import quant_record, quantized_state
    from moelab.runs.rundir import DATA_DIR, METRICS, TOKENIZER, RunDir

    hf_dir, run = Path(hf_dir), RunDir(out_run_dir)
    if quant is not None:
        check_quant(quant, group_size)
    check_output_dir(run.path, overwrite)
    # quantized as read (never whole in float); a float run stores the plain trainable model's weights
    model = load(hf_dir, dtype, quant=quant, group_size=group_size, for_training=quant is None)
    config = {"model": model.cfg.to_dict(), "train": TrainConfig().to_dict(),
              "prompt": {"rule": "tokenizer", "stop_id": hf_stop_id(read_json(hf_dir / "config.json"))}}
    if quant is None:
        weights, optimizer = model, torch.optim.AdamW(model.parameters())  # no state until a step: nothing allocated
    else:
        weights = quantized_state(model)
        config["quant"], optimizer = quant_record(quant, group_size), {"state": {}, "param_groups": []}
    created = not run.path.exists()
    fresh = created or not any(run.path.iterdir())
    run.path.mkdir(parents=True, exist_ok=True)
    try:
        with run.lock():
            for old in (run.path / "checkpoints", run.path / DATA_DIR):
                shutil.rmtree(old, ignore_errors=True)
            for name in (METRICS, TOKENIZER):
                (run.path / name).unlink(missing_ok=True)
            ckpt_io.save_checkpoint(run.path, 0, model=weights, optimizer=optimizer, config=config,
                                    trainer={"train_tokens": 0, "train_seconds": 0.0, "converted_from": str(hf_dir)},
                                    rng={"torch": torch.get_rng_state(), "data": torch.Generator().get_state()})
            if (hf_dir / "tokenizer.json").is_file():
                shutil.copyfile(hf_dir / "tokenizer.json", run.tokenizer_path)
            run.write_config(config)  # last: a directory with config.json and a checkpoint is a complete run
    except BaseException:  # an error or Ctrl-C: an output directory that was empty is left as it was
        if fresh:
            if created:
                shutil.rmtree(run.path, ignore_errors=True)
            else:
                for p in run.path.iterdir():
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    return run.path


def convert_to_hf(run_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 2 << 30,
                  overwrite: bool = False) -> Path:
    """A moelab run (its newest checkpoint) or checkpoint directory → a Hugging Face model directory
    (`moelab.hf.save`); a non-empty `out_dir` is refused unless `overwrite`."""
    from moelab.runs import checkpoint as ckpt_io
    from moelab.runs.load import load_run
    from moelab.runs.rundir import RunDir

    check_output_dir(Path(out_dir), overwrite)
    target = Path(run_dir) if (Path(run_dir) / "manifest.json").is_file() else RunDir(run_dir).latest_checkpoint()
    quant = ckpt_io.read_config(target).get("quant") if target is not None else None
    if quant is not None:
        raise ValueError(f"{run_dir} holds a {quant['format']}-quantized model: a Hugging Face export needs "
                         "float weights (convert the original checkpoint, or export the float run)")
    model, config = load_run(run_dir, for_training=True)
    tok = RunDir(run_dir).tokenizer_path
    return save(model, out_dir, tokenizer_json=tok if tok.is_file() else None, max_shard_bytes=max_shard_bytes,
                overwrite=overwrite)
