"""The ``norm`` backends: which LayerNorm class the presets build (``torch`` or apex's fused one).

apex's ``FusedLayerNorm`` computes on CPU tensors through ``F.layer_norm``, so either class works
on any device; its parameters are named as ``nn.LayerNorm``'s, so checkpoints do not change.
"""
from __future__ import annotations

from torch import nn

try:
    from apex.normalization import FusedLayerNorm

    _IMPORT_ERROR = None
except Exception as e:  # ImportError, or apex built without its CUDA extensions
    FusedLayerNorm = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def unavailable_reasons(device_type: str, impl: str = "torch") -> list[str]:
    if impl == "apex" and FusedLayerNorm is None:
        return [f"apex is not installed (build it from https://github.com/NVIDIA/apex, see README; {_IMPORT_ERROR})"]
    return []


def layer_norm(impl: str = "torch") -> type[nn.Module]:
    return FusedLayerNorm if impl == "apex" else nn.LayerNorm
