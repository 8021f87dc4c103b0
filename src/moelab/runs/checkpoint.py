"""Checkpoints: a directory of safetensors + JSON, written atomically and verified on load.

Layout of `RUN/checkpoints/step_00000100/`:
    config.json          {"model": ModelConfig, "train": TrainConfig} as plain JSON
    model.safetensors    the model's state dict (parameters and persistent buffers, e.g. expert biases)
    optimizer.safetensors optimizer state tensors, keyed "<param index>.<name>"
    trainer.safetensors  RNG states (torch CPU RNG, data sampler generator) as uint8 tensors
    trainer.json         step, tokens seen, optimizer param groups, anything else JSON-able
    manifest.json        sha256 and size of every file above — written last
(A sharded checkpoint, written by every rank of a 2-D mesh run, holds dcp/ instead of the two tensor
files: moelab.runs.sharded; `verify` checks both kinds.)

The directory is assembled under a temporary name in the same parent and renamed into place, so a
directory with the final name is always complete; an error or an interrupt (Ctrl-C) mid-write removes the
`.tmp-*` directory, and one left by a crash (SIGKILL, power loss) is removed by the next save. Loading never
unpickles: safetensors and JSON only, and every file's hash is checked
against the manifest before use, so a truncated or tampered checkpoint is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STEP_DIR = re.compile(r"^step_(\d{8})$")
FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "trainer.safetensors", "trainer.json")
SHARDED_FILES = ("config.json", "trainer.safetensors", "trainer.json")  # + dcp/*, moelab.runs.sharded


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, tampered with, or does not fit the model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_tensors(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict (of a module, or given) as contiguous CPU tensors (tied weights appear once)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    tensors = {}
    for idx, pstate in state["state"].items():
        for name, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().to("cpu").contiguous()
    return tensors, state["param_groups"]


def save_checkpoint(run_dir: str | Path, step: int, *, model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict, config: dict[str, Any], trainer: dict[str, Any],
                    rng: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX atomically; keep the newest `keep` complete checkpoints.

    `model` / `optimizer` are the objects or their state dicts (expert parallelism passes the state
    gathered into the single-process layout)."""
    parent = Path(run_dir) / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = parent / f"step_{step:08d}"
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, optimizer, config, trainer, rng, step)
    except BaseException:  # an error or an interrupt (Ctrl-C) mid-write: leave no partial checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(parent)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, model: nn.Module | dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | dict,
                 config: dict[str, Any], trainer: dict[str, Any], rng: dict[str, torch.Tensor], step: int) -> None:
    """The checkpoint's files in `tmp`, manifest.json last, each fsync'ed."""
    opt_tensors, groups = optimizer_tensors(optimizer)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "trainer.safetensors"))
    pause = float(os.environ.get("MOELAB_TEST_CHECKPOINT_PAUSE", "0"))  # tests kill or interrupt us mid-write here
    end = time.monotonic() + pause
    while time.monotonic() < end:  # short sleeps: a SIGINT taken by another thread is raised here at once
        time.sleep(0.05)
    (tmp / "trainer.json").write_text(json.dumps({**trainer, "param_groups": groups, "step": step}, indent=2))
    manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for name in (*FILES, "manifest.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-named checkpoint directories, oldest first."""
    parent = Path(run_dir) / "checkpoints"
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def verify(ckpt: str | Path) -> dict[str, Any]:
    """Check every file against manifest.json; return the manifest or raise CheckpointError."""
    ckpt = Path(ckpt)
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json — not a complete moelab checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path}: corrupt manifest ({e})") from None
    names: tuple[str, ...] = FILES
    if (ckpt / "dcp").is_dir():  # a sharded checkpoint (moelab.runs.sharded): every dcp/ file listed
        on_disk = {f"dcp/{p.name}" for p in (ckpt / "dcp").iterdir()}
        listed = {k for k in manifest if k.startswith("dcp/")}
        if "dcp/.metadata" not in listed:
            raise CheckpointError(f"{ckpt}: manifest.json lists no dcp/.metadata — not a complete sharded checkpoint")
        if on_disk - listed:
            raise CheckpointError(f"{ckpt}: {sorted(on_disk - listed)[:3]} not listed in manifest.json")
        names = (*SHARDED_FILES, *sorted(listed))
    for name in names:
        path = ckpt / name
        if name not in manifest or not path.is_file():
            raise CheckpointError(f"{ckpt}: file {name} is missing")
        if path.stat().st_size != manifest[name]["bytes"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != {manifest[name]['bytes']} (truncated?)")
        if _sha256(path) != manifest[name]["sha256"]:
            raise CheckpointError(f"{path}: sha256 does not match manifest.json (corrupted or tampered)")
    return manifest


def read_config(ckpt: str | Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "config.json").read_text())


def load_model_state(model: nn.Module, ckpt: str | Path, verified: bool = False) -> None:
    """Load model.safetensors into `model`, requiring the exact same names and shapes."""
    ckpt = Path(ckpt)
    if not verified:
        verify(ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: checkpoint does not fit this model (different config?): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{ckpt}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(expected[name].shape)} (different config?)")
    model.load_state_dict(tensors)


def read_training_state(ckpt: str | Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(optimizer state dict, trainer.json contents, RNG tensors) of a checkpoint."""
    ckpt = Path(ckpt)
    trainer = json.loads((ckpt / "trainer.json").read_text())
    flat = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    optim_state = {"state": state, "param_groups": trainer.pop("param_groups")}
    return optim_state, trainer, load_file(str(ckpt / "trainer.safetensors"))


def load_training_state(ckpt: str | Path, optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the optimizer; return (trainer.json contents, RNG tensors)."""
    optim_state, trainer, rng = read_training_state(ckpt)
    optimizer.load_state_dict(optim_state)
    return trainer, rng
