"""The ``native`` kernel backend of :mod:`fastmae.ops`: native C++/CUDA kernels (``csrc/``).

The same ops as the Triton backend, as a cross-check of it on GPUs, a fallback where Triton is
unavailable, and the C++ side of the kernel benchmarks. Its CPU kernels run on the CPU device too
(``backend="native"`` with CPU tensors), which is how they are tested without a GPU; automatic
selection never picks it on a CPU, and on CUDA only after ``triton``.

The ops live in the ``torch.ops.fastmae_native`` namespace, defined by the native library
(``TORCH_LIBRARY``), with their autograd in C++ (``csrc/fastmae_autograd.cpp``: the formulas of
:mod:`fastmae.ops.fused`, which the Triton backend registers in Python); their fake (meta) kernels,
shared with the Triton backend, are registered once the library is loaded, so ``torch.compile``
traces them and ``torch.library.opcheck`` passes.

Neither importing this module nor asking whether it can run (``unavailable_reasons``: the
availability report, the tests' backend list) builds anything: that checks for a C++ compiler,
ninja and, for CUDA, a toolkit of PyTorch's CUDA version. The first use on a device builds what it
needs (:func:`prepare`, from the op dispatch; see :mod:`fastmae.ops.native.build`), saying so and how
long it took: about a minute for the CPU library, minutes for the CUDA one, once; later processes
load the cached build in about a second. A build that fails is the reason: automatic selection
passes over the backend and an explicit request raises with it. ``python -m fastmae.ops.native
build`` builds ahead of time.
"""
from __future__ import annotations

import torch

from fastmae.ops.fused import FusedBackend, FusedOps, register_fakes
from fastmae.ops.native.build import (
    BuildError, build_and_load, cuda_archs, cuda_library_name, find_cuda_home, missing_build_tools,
)

NAMESPACE = "fastmae_native"
# the library's ops (torch.ops.fastmae_native.*), as csrc/fastmae_ops.cpp defines them
OP_NAMES = ("random_masking", "gather_visible", "gather_visible_backward", "gather_patches", "encoder_input",
            "unshuffle_with_mask_token", "unshuffle_with_mask_token_backward", "masked_pixel_loss",
            "masked_pixel_loss_backward")


def unavailable_reasons(device_type: str) -> list[str]:
    """What keeps the native kernels from running on ``device_type``, without building them: a
    build that already failed in this process, or a missing build tool."""
    if device_type not in ("cpu", "cuda"):
        return [f"the native kernels run on CPU and CUDA, not {device_type}"]
    targets = ("cpu", "cuda") if device_type == "cuda" else ("cpu",)
    failed = [_load_errors[t] for t in targets if _load_errors.get(t)]
    if failed:
        return failed
    return [problem for t in targets if t not in _load_errors for problem in missing_build_tools(t)]


# The native CUDA kernels' limits (csrc/fastmae_ops_cuda.cu checks them again before a launch).
_SHARED_MEMORY = 48 * 1024
MAX_LOSS_PATCH = 12000  # kMaxLossPatch in csrc/fastmae_ops_cuda.cu
# the ops whose inputs this backend may refuse, with the dims its reasons read (besides the dtypes)
LIMITED_OPS = {"random_masking": ("L",), "masked_pixel_loss": ("C", "H", "W", "p")}


def not_supported_reasons(op: str, inputs) -> list[str]:
    if inputs.device_type != "cuda":
        return []
    d = inputs.dims
    if op == "random_masking":
        row_bytes = d["L"] * (8 if inputs.dtypes["noise"] == torch.float64 else 4)
        if row_bytes > _SHARED_MEMORY:
            return [f"the native CUDA random_masking holds a row of noise in 48 KiB of shared memory: L={d['L']} "
                    f"is too long for {str(inputs.dtypes['noise']).removeprefix('torch.')}"]
    if op == "masked_pixel_loss":
        image, patch = d["C"] * d["H"] * d["W"], d["C"] * d["p"] * d["p"]
        if image > 2**31 - 1:
            return [f"the native CUDA masked_pixel_loss takes images of under 2^31 values (C*H*W={image})"]
        if patch > MAX_LOSS_PATCH:
            return [f"the native CUDA masked_pixel_loss takes patches of at most {MAX_LOSS_PATCH} values "
                    f"(C*p*p={patch})"]
    return []


def prepare(device_type: str) -> list[str]:
    """Build (once, or find cached) and load the libraries ``device_type`` needs; why not, else []."""
    error = load("cpu") or (load("cuda") if device_type == "cuda" else None)
    return [error] if error else []


_load_errors: dict[str, str | None] = {}


def load(target: str, verbose: bool = False) -> str | None:
    """Builds if needed and loads the ``cpu`` library (schemas and CPU kernels) or the ``cuda`` one
    (CUDA kernels; needs the ``cpu`` one first): None once loaded, else why it cannot be. Once per
    process: a failing build is not tried again."""
    if target not in _load_errors:
        try:
            if target == "cpu":
                build_and_load("fastmae_native", ["fastmae_ops.cpp", "fastmae_autograd.cpp"], verbose=verbose)
                _attach_ops()
            else:
                archs = cuda_archs()
                build_and_load(cuda_library_name(archs), ["fastmae_ops_cuda.cu"], cuda_home=find_cuda_home(),
                               archs=archs, verbose=verbose)
            _load_errors[target] = None
        except BuildError as e:
            _load_errors[target] = str(e)
    return _load_errors[target]


_backend: FusedBackend | None = None
OPS: FusedOps | None = None  # once the library is loaded


def _attach_ops() -> None:
    """The ops the native library has just defined: registered, and behind the op interface."""
    global _backend, OPS
    native = torch.ops.fastmae_native
    OPS = ops = FusedOps(
        name="native", random_masking=native.random_masking.default, gather_visible=native.gather_visible.default,
        gather_visible_backward=native.gather_visible_backward.default, gather_patches=native.gather_patches.default,
        encoder_input=native.encoder_input.default,
        unshuffle=native.unshuffle_with_mask_token.default,
        unshuffle_backward=native.unshuffle_with_mask_token_backward.default,
        masked_pixel_loss=native.masked_pixel_loss.default,
        masked_pixel_loss_backward=native.masked_pixel_loss_backward.default,
    )
    register_fakes(ops)  # (its autograd is the library's own, in C++: csrc/fastmae_autograd.cpp)
    _backend = FusedBackend(ops)


# -- the op interface (called only after unavailable_reasons found the library loaded) -------------

def random_masking(noise, len_keep):
    return _backend.random_masking(noise, len_keep)


def gather_visible(x, ids_keep, pos_embed=None):
    return _backend.gather_visible(x, ids_keep, pos_embed)


def embed_visible_patches(imgs, ids_keep, weight, bias, pos_embed=None):
    return _backend.embed_visible_patches(imgs, ids_keep, weight, bias, pos_embed)


def encoder_input(x, ids_keep, cls_token, pos_embed):
    return _backend.encoder_input(x, ids_keep, cls_token, pos_embed)


def unshuffle_with_mask_token(x, ids_restore, mask_token, pos_embed=None):
    return _backend.unshuffle_with_mask_token(x, ids_restore, mask_token, pos_embed)


def masked_pixel_loss(pred, imgs, mask, patch_size, norm_pix):
    return _backend.masked_pixel_loss(pred, imgs, mask, patch_size, norm_pix)


# The transformer block's add + LayerNorm and bias + GELU have no native kernels: the reference's ops
# (and the model keeps its unfused layers, as with the torch backend).
from fastmae.ops.reference import add_layer_norm, bias_gelu  # noqa: E402, F401
