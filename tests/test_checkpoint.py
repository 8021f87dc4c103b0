"""Checkpoints: round trip, verification against tampering and truncation, shape/name checks."""

from __future__ import annotations

import json

import pytest
import torch

from moelab import ModelConfig, MoEConfig
from moelab.model.transformer import MoETransformer
from moelab.runs.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_model_state,
    load_training_state,
    save_checkpoint,
    verify,
)

CFG = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16,
                  moe=MoEConfig(d_model=16, d_expert=16, n_experts=4, top_k=2, router="sigmoid", expert_bias=True))


def trained_pair():
    torch.manual_seed(0)
    model = MoETransformer(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (2, 8))
    out = model(ids, targets=ids)
    (out.loss + out.aux_loss).backward()
    opt.step()
    model.update_expert_biases([a.load for a in out.aux])
    return model, opt


def save(tmp_path, model, opt, step=5, keep=2):
    return save_checkpoint(tmp_path, step, model=model, optimizer=opt, config={"model": CFG.to_dict()},
                           trainer={"train_tokens": 16}, rng={"torch": torch.get_rng_state()}, keep=keep)


def test_round_trip_restores_model_buffers_and_optimizer(tmp_path):
    model, opt = trained_pair()
    rng_at_save = torch.get_rng_state()
    path = save(tmp_path, model, opt)
    assert path.name == "step_00000005" and not list(path.parent.glob(".tmp-*"))
    fresh = MoETransformer(CFG)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_model_state(fresh, path)
    trainer, rng = load_training_state(path, fresh_opt)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert any(torch.any(m.router.bias != 0) for m in fresh.moe_layers())  # the expert bias buffer came back
    for p1, p2 in zip(model.parameters(), fresh.parameters()):
        s1, s2 = opt.state.get(p1, {}), fresh_opt.state.get(p2, {})
        assert s1.keys() == s2.keys()
        for key in s1:
            assert torch.equal(s1[key], s2[key])
    assert trainer["step"] == 5 and trainer["train_tokens"] == 16
    assert torch.equal(rng["torch"], rng_at_save)


def test_keep_prunes_old_checkpoints(tmp_path):
    model, opt = trained_pair()
    for step in (1, 2, 3):
        save(tmp_path, model, opt, step=step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    model, opt = trained_pair()
    path = save(tmp_path, model, opt)
    target = path / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
        pattern = "truncated"
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        pattern = "tampered"
    elif damage == "delete":
        target.unlink()
        pattern = "missing"
    else:
        (path / "manifest.json").write_text("{not json")
        pattern = "corrupt manifest"
    with pytest.raises(CheckpointError, match=pattern):
        verify(path)
    with pytest.raises(CheckpointError):
        load_model_state(MoETransformer(CFG), path)


def test_checkpoint_of_a_different_config_names_the_tensor(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, model, opt)
    other = MoETransformer(CFG.replace(moe=CFG.moe.replace(d_expert=32)))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.experts\.w_in has shape"):
        load_model_state(other, path)
    fewer = MoETransformer(CFG.replace(n_layers=1))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model_state(fewer, path)


def test_no_pickle_files_are_written(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, model, opt)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "manifest.json", "model.safetensors", "optimizer.safetensors",
                     "trainer.json", "trainer.safetensors"]
    assert json.loads((path / "trainer.json").read_text())["param_groups"][0]["lr"] == 1e-2
