"""A whole decode step on moelab's kernels: every layer's kernel arguments gathered once and checked cheaply at
each step, so that a step is one kernel call (`native.decode_layers`) instead of a walk over the layers.

    plan = decode_plan(model, dtype)   # the model's DecodePlan (rebuilt when stale); plan.table None: not applicable

A plan applies where every block is an MoE block whose attention and MoE layer each take one kernel call
(`Attention.native_args`, `MoE.native_args`) and which adds both halves to the residual stream as they are (no
residual scale, no dropout). It holds pointers into the model's tensors, so it is rebuilt when they could have
moved: when torch registers a parameter, buffer or submodule anywhere (counted through torch's global
registration hooks: a weight or module replaced), when a tensor it points into has new storage (a `.data`
swap, as `Module.to` makes), when a router's weight changed in place (the kernel reads a float32 copy of it), and
when the model's training flag flips. Changes in place are seen by the kernels directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.inference import native

_registrations = 0


def _count(*_) -> None:
    global _registrations
    _registrations += 1


for _hook in (nn.modules.module.register_module_parameter_registration_hook,
              nn.modules.module.register_module_buffer_registration_hook,
              nn.modules.module.register_module_module_registration_hook):
    _hook(_count)


class DecodePlan:
    """The layers of `model` as `native.decode_layers` takes them for activations of `dtype` (`table`; None where
    the model does not take one call), and what tells when they are stale (`valid`)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype, self.training, self.registrations = dtype, model.training, _registrations
        self.table: native.LayerTable | None = None
        self.tensors: list[tuple[Tensor, int]] = []
        self.routers: list[tuple[Tensor, int]] = []
        blocks = []
        for block in model.blocks:
            attn_args = getattr(block.attn, "native_args", None)  # grouped-query attention only
            if not block.is_moe or not block.fusable() or attn_args is None:
                return
            attn, moe = attn_args(block.attn_norm), block.ffn.native_args(block.ffn_norm)
            if attn is None or moe is None or attn.dtype != dtype or moe.dtype != dtype:
                return
            blocks.append((attn, moe))
            self.tensors += [(t, t.data_ptr()) for t in (*attn.keep, *moe.keep) if isinstance(t, Tensor)]
            self.routers.append((block.ffn.router.weight, block.ffn.router.weight._version))
        self.table = native.LayerTable(blocks) if blocks else None

    def valid(self, model: nn.Module, dtype: torch.dtype) -> bool:
        return (self.registrations == _registrations and self.dtype == dtype and self.training == model.training
                and all(t.data_ptr() == p for t, p in self.tensors) and all(w._version == v for w, v in self.routers))

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy's tensors live elsewhere: it builds its own


def decode_plan(model: nn.Module, dtype: torch.dtype) -> DecodePlan:
    """model's DecodePlan for activations of `dtype`, built on first use and whenever it is stale."""
    plan = model.__dict__.get("_decode_plan")
    if plan is None or not plan.valid(model, dtype):
        plan = DecodePlan(model, dtype)
        model.__dict__["_decode_plan"] = plan
    return plan
