"""Low-precision working copies of the matmul weights, for eager autocast steps.

Under autocast every matmul casts its fp32 weight and bias to bf16 (fp16) at every call: a ViT-L
step launches ~260 such casts in its forward, one per parameter, each re-reading the fp32 weights.
:class:`WorkingCopies` keeps those bf16 copies beside the fp32 parameters instead, refreshes them
in one multi-tensor copy after each optimizer step (once per update, not once per micro-batch), and
hands them to the layers at the start of each block's forward. Nothing else changes: the copies
are what autocast would have made, the gradients come back to the fp32 parameters (cast to fp32 by
the autograd engine as they arrive, accumulated in fp32, all-reduced by DDP as before), and the
optimizer updates the fp32 master weights. A compiled step does not need them: Inductor generates
its casts within the captured step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fastmae.models.layers import Block, Linear, PatchEmbed

CASTS = (Linear, PatchEmbed)  # the layers whose weights autocast casts for their matmul


class _HandOut(torch.autograd.Function):
    """The working copies of a group's parameters, as differentiable functions of them: no
    computation forward; backward, each gradient goes to its parameter (the engine casts it to the
    parameter's dtype)."""

    @staticmethod
    def forward(ctx, copies, *params):
        return tuple(c.detach() for c in copies)  # new tensors on the copies' storage: one graph per step

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


class WorkingCopies:
    """bf16 / fp16 working copies of ``model``'s matmul weights, handed out while :meth:`enabled`.

    One group per transformer block (its gradients arrive together when its backward is done, as
    DDP's buckets expect them) and one for the model's other matmuls (patch embedding, decoder
    embedding and prediction)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        in_blocks = {id(m) for b in blocks for m in b.modules()}
        self.groups: list[tuple[list[nn.Module], list[torch.Tensor], list[torch.Tensor]]] = []
        self.hooks = []
        for owner in blocks + [model]:
            members = [m for m in owner.modules() if isinstance(m, CASTS) and (owner is not model or id(m) not in in_blocks)]
            params = [p for m in members for p in m.own_weights() if p is not None]
            if not params:
                continue
            copies = [torch.empty_like(p, dtype=dtype) for p in params]
            index = len(self.groups)
            self.groups.append((members, params, copies))
            self.hooks.append(owner.register_forward_pre_hook(lambda module, args, i=index: self._hand_out(i)))
            self.hooks.append(owner.register_forward_hook(lambda module, args, out, i=index: self._take_back(i)))
        self.active = False
        self.refresh()

    @contextmanager
    def enabled(self):
        """Hand the copies out in the forwards run inside (the step's, under autocast)."""
        self.active = True
        try:
            yield
        finally:
            self.active = False

    @torch.no_grad()
    def refresh(self) -> None:
        """The copies from the parameters (after each optimizer step)."""
        params = [p for _, ps, _ in self.groups for p in ps]
        copies = [c for _, _, cs in self.groups for c in cs]
        torch._foreach_copy_(copies, params)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def _hand_out(self, index: int) -> None:
        if not self.active:
            return
        members, params, copies = self.groups[index]
        tensors = iter(_HandOut.apply(copies, *params))
        for m in members:
            weight, bias = m.own_weights()
            m.working = (next(tensors), next(tensors) if bias is not None else None)

    def _take_back(self, index: int) -> None:
        if not self.active:
            return
        for m in self.groups[index][0]:
            m.working = None
