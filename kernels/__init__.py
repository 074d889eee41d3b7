"""Fused Triton kernels for MAE's hot paths, one file per op (kernels, launcher and
``torch.library`` registration together); :mod:`fastmae.kernels.backend` is the ``triton`` backend
of :mod:`fastmae.ops` built from them."""
