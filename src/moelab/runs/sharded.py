"""Sharded checkpoints: each rank writes its own shards with `torch.distributed.checkpoint` (DCP), nothing
is gathered; any mesh that divides the model (or one process) loads them, DCP resharding by global
offsets (the experts in their global [E, ...] layout: `moelab.parallel.mesh.checkpoint_view`).

Layout of `RUN/checkpoints/step_00000100/` (a sharded checkpoint is one that holds `dcp/`):
    config.json          {"model", "train", "data"} as plain JSON
    dcp/                 .metadata (DCP's index) + __R_0.distcp (rank R's shards: model, AdamW moments)
    trainer.safetensors  RNG states (torch CPU RNG, data sampler generator), rank 0's
    trainer.json         step, tokens seen, optimizer param groups, the mesh it was written on
    manifest.json        sha256 and size of every file above, dcp/* included — written last

Atomic as `moelab.runs.checkpoint`: rank 0 makes `.tmp-step_X-sharded`, every rank writes its shards in
it, then rank 0 writes the JSON, the manifest, fsyncs and renames it to `step_X`; a rank killed during
a save leaves only the `.tmp-*` directory (removed by the next save), so the newest complete checkpoint
is the one resumed.

Pickle: DCP stores only tensors here (the optimizer's param groups go to trainer.json, so DCP's
"bytes" items, which torch unpickles without restriction, are never written or read), but DCP's own
index `dcp/.metadata` is a pickle. moelab reads it with an allow-list unpickler (`SafeReader`: DCP's
metadata dataclasses, torch.Size, dtypes, layouts, paths — anything else is a CheckpointError), after
checking every file's sha256 against manifest.json. Still, load sharded checkpoints you or moelab
wrote; to share a model, `moelab convert --to-hf` writes safetensors.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException as DCPError
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from moelab.runs.checkpoint import SHARDED_FILES as FILES
from moelab.runs.checkpoint import CheckpointError, _fsync_dir, _sha256, list_checkpoints, verify

DCP_DIR = "dcp"


def is_sharded(ckpt: str | Path) -> bool:
    return (Path(ckpt) / DCP_DIR).is_dir()


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's index and nothing else (see the module doc)."""

    def find_class(self, module: str, name: str):
        ok = (module == "torch.distributed.checkpoint.metadata"
              or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                                    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                                    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}
              or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not ok:
            raise CheckpointError(f"dcp/.metadata refers to {module}.{name}, which a DCP index never holds: not a "
                                  "checkpoint moelab wrote (refusing to unpickle it)")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """DCP's file reader with the index read by `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


View = Callable[[dict], list]  # moelab.parallel.mesh.checkpoint_view bound to a mesh


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None, view: View | None) -> tuple[dict, dict, list]:
    """(the tensors DCP saves / loads into — parameter-name keyed, on a mesh the experts in their global
    layout (`view`) —, the optimizer's full state dict by parameter name, the views to undo after a load)."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    osd: dict[str, Any] = {}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        state["optim"] = {"state": osd["state"]}
    return state, osd, view(state) if view is not None else []


def save_sharded(run_dir: str | Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: dict[str, Any], trainer: dict[str, Any], rng: dict[str, torch.Tensor], keep: int = 2,
                 view: View | None = None, mesh_shape: dict[str, int] | None = None) -> Path:
    """Write RUN/checkpoints/step_XXXXXXXX as a sharded checkpoint (collective: every rank calls it);
    keep the newest `keep` complete checkpoints. Returns the final directory. On a mesh, `view` is
    `functools.partial(moelab.parallel.mesh.checkpoint_view, mesh=mesh)` (the experts' global layout)
    and `mesh_shape` {"dp_shard": D, "ep": N}, recorded in trainer.json."""
    parent = Path(run_dir) / "checkpoints"
    final = parent / f"step_{step:08d}"
    tmp = parent / f".tmp-{final.name}-sharded"
    if _rank() == 0:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state, _, _ = _state(model, optimizer, view)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / DCP_DIR, sync_files=True))  # every rank its shards
    pause = float(os.environ.get("MOELAB_TEST_CHECKPOINT_PAUSE", "0"))  # tests kill a rank mid-save here
    if pause and int(os.environ.get("MOELAB_TEST_CHECKPOINT_PAUSE_STEP", step)) == step:
        time.sleep(pause)
    _barrier()  # every rank's shards are on disk
    if _rank() == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "trainer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "param_groups": groups, "step": step,
                                                      "mesh": mesh_shape or {"dp_shard": 1, "ep": 1}}, indent=2))
        names = [*FILES, *(f"{DCP_DIR}/{p.name}" for p in sorted((tmp / DCP_DIR).iterdir()))]
        manifest = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for name in (*FILES, "manifest.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp / DCP_DIR)
        if final.exists():  # re-saving the same step (after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(parent)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_sharded(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 view: View | None = None, verified: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a sharded checkpoint (verified first) into `model` — one process, or sharded by
    `moelab.parallel.mesh.apply_fsdp` (collective then; `view` as for `save_sharded`) — and `optimizer`
    when given. Returns (trainer.json contents, RNG tensors)."""
    ckpt = Path(ckpt)
    if not verified:
        verify(ckpt)
    trainer = json.loads((ckpt / "trainer.json").read_text())
    SafeReader(ckpt / DCP_DIR).read_metadata()  # the index through the allow-list first: a clean error
    state, osd, swaps = _state(model, optimizer, view)
    try:
        dcp.load(state, storage_reader=SafeReader(ckpt / DCP_DIR))
    except (RuntimeError, ValueError, KeyError, DCPError) as e:
        raise CheckpointError(f"{ckpt}: the sharded checkpoint does not fit this model (different config?): "
                              f"{str(e)[:300]}") from None
    for container, key, original in swaps:  # the loaded bytes already sit in the originals' storage
        container[key] = original
    set_model_state_dict(model, state["model"])
    groups = trainer.pop("param_groups")
    if optimizer is not None:
        if len(groups) != len(osd["param_groups"]):
            raise CheckpointError(f"{ckpt}: {len(groups)} optimizer groups saved, this optimizer has "
                                  f"{len(osd['param_groups'])}")
        for current, saved in zip(osd["param_groups"], groups):
            current.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k != "params"})
        set_optimizer_state_dict(model, optimizer, osd)
    return trainer, load_file(str(ckpt / "trainer.safetensors"))
