"""Fused Triton kernels for MAE's hot paths, one file per op (kernels, launcher and
``torch.library`` registration together). They import nothing of fastmae above them:
:mod:`fastmae.ops.triton_backend` puts them behind the op interface as the ``triton`` backend."""
