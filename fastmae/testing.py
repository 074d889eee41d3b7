"""Tolerances for comparing a backend with the reference: one table for the whole project.

Forward outputs are compared with ``FORWARD``; gradients with ``BACKWARD``, looser because they
sum over more terms (a scatter-add or a reduction over the batch accumulates more rounding).
bf16 keeps 8 bits of mantissa: its tolerances are those of one or two roundings of an fp32 result.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmae.errors import UsageError
from fastmae.ops.registry import BACKENDS

FORWARD = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
BACKWARD = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}

# Parity with the original implementation's own outputs (fp32): relative error, max |a-b| / max |b|.
PARITY_FORWARD_REL = 1e-5
PARITY_GRAD_REL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, backward: bool = False, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the project's tolerance for ``expected``'s dtype."""
    tol = (BACKWARD if backward else FORWARD)[expected.dtype]
    torch.testing.assert_close(actual, expected, **tol, msg=(lambda m: f"{msg}: {m}") if msg else None)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


class RecordOps(TorchDispatchMode):
    """A context that records the name of every op dispatched while it is active (``ops``, e.g.
    ``"aten::mm"``, ``"fastmae::masked_pixel_loss_backward"``): what a call asks the device to run."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def fused_ops(backend: str, device_type: str | None = None):
    """A fused backend's ``torch.library`` ops (:class:`fastmae.ops.fused.FusedOps`), its library
    loaded for ``device_type`` (default: the default device's)."""
    module = next(b for b in BACKENDS["kernels"] if b.name == backend).module
    reasons = getattr(module, "prepare", lambda _: [])(device_type or torch.get_default_device().type)
    assert not reasons, reasons
    return module.OPS


REFERENCE_BACKEND = "torch"  # what every other backend of a family is compared with


def backend_cases(family: str, only: str | None = None, *, with_reference: bool = True) -> list:
    """pytest parameters ``(backend, device)`` for every backend of ``family`` and every device it
    runs on here; CUDA cases carry the ``cuda`` mark. ``with_reference`` False leaves the reference
    out (a comparison with the reference would compare it with itself). A backend that cannot run is
    left out: what must run here is asserted once, by the tests of :func:`expected_backends`."""
    import pytest

    return [
        pytest.param((b.name, d), id=f"{b.name}-{d}", marks=[pytest.mark.cuda] if d == "cuda" else [])
        for b in BACKENDS[family]
        if only in (None, b.name) and (with_reference or b.name != REFERENCE_BACKEND)
        for d in ("cpu", "cuda")
        if not b.unavailable_reasons(d)
    ]


def expected_backends(family: str, device_type: str) -> set[str]:
    """The ``kernels`` backends that must run on ``device_type`` wherever the tests run: the
    reference, Triton (on a CPU under its interpreter, which the tests switch on) and the native
    kernels (their CPU build needs only a C++ compiler)."""
    if family != "kernels":
        raise UsageError(f"no expectation for the {family} family: its backends depend on optional libraries")
    return {REFERENCE_BACKEND, "triton", "native"}


# The fused backends' ops checked by torch.library.opcheck (schema, fake kernel against the real
# outputs, autograd registration), from their specs: each op with its optional inputs given and in
# fp32, then without them and in bf16 (float64 for random_masking, whose noise Triton takes in 32 bits
# at most: the native kernels take it).
OPCHECK_DIMS = {"N": 2, "L": 16, "L1": 17, "D": 24, "C": 3, "H": 16, "W": 16, "p": 4, "P": 48}  # L1: 1 + L, P: p*p*C
OPCHECK_VARIANTS = (
    dict(dtype=torch.float32, optional=True,
         values={"dtype": torch.bfloat16, "x_dtype": torch.bfloat16, "norm_pix": True, "with_grad": True}),
    dict(dtype=torch.bfloat16, optional=False,
         values={"dtype": torch.bfloat16, "x_dtype": torch.bfloat16, "norm_pix": False, "with_grad": False}),
)


def fused_opcheck_cases() -> list[tuple[str, int]]:
    """``(op name, variant)`` for every fused op: pytest parameters collected without the ops."""
    from fastmae.ops.spec import FUSED_SPECS

    return [(name, v) for name in FUSED_SPECS for v in range(len(OPCHECK_VARIANTS))]


def fused_opcheck_args(name: str, variant: int, *, noise_dtype: torch.dtype | None = None) -> list:
    from fastmae.ops.spec import FUSED_SPECS, example_inputs

    v = OPCHECK_VARIANTS[variant]
    dtype = noise_dtype if name == "random_masking" and noise_dtype is not None else v["dtype"]
    return example_inputs(FUSED_SPECS[name], OPCHECK_DIMS, dtype=dtype, optional=v["optional"], values=v["values"],
                          requires_grad=True)
