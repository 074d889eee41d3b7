"""Which implementation of each op runs.

Families of ops, each with its own backends:

- ``kernels``: random_masking, gather_visible, embed_visible_patches, unshuffle_with_mask_token,
  masked_pixel_loss; add_layer_norm and bias_gelu (the transformer block's elementwise work, which a
  backend that declares ``FUSES_LAYERS`` fuses: the model then calls them instead of its layers)
- ``attention``: attention
- ``norm``: layer_norm (the LayerNorm class the presets build)

A backend is a module that defines the family's ops under their own names and a function
``unavailable_reasons(device_type) -> list[str]`` (empty when it can run there: a check without side
effects), and may define ``prepare(device_type) -> list[str]``, run once at the first use on a
device (the native backend builds there; what it returns are the reasons it failed); a backend's
``options`` are passed to both (one module can serve several backends, e.g. the SDPA kernels). A
backend's module is imported at the first question about it (its availability, automatic
selection), never by ``import fastmae.ops`` or ``import fastmae.models``: triton, xformers and apex
load only when a run asks for them. torch.compile traces the dispatch without graph breaks:
resolution runs once at trace time (``assume_constant_result``) and has imported the module by then.

Selection, as DESIGN.md fixes it: an explicit ``backend=`` argument, else the family's environment
variable (``FASTMAE_KERNELS`` / ``FASTMAE_ATTENTION``), else automatic. A backend named explicitly
(argument or environment) that cannot run raises :class:`BackendUnavailableError` with the reasons;
automatic selection walks the priority list, takes the first that can run, and logs what it chose.

Dispatch then looks at each call's inputs (:class:`fastmae.ops.spec.Inputs`: dims and dtypes, checked
against the op's spec). A backend declares what it cannot take with ``not_supported_reasons(op,
inputs) -> list[str]`` (say, Triton's masking and float64 noise; the native CUDA masking and a row
longer than its shared memory). Automatic selection runs the first backend, in priority order, that
can run and takes the inputs, logging a fallback; an explicitly requested one that cannot take them
raises :class:`BackendUnavailableError` with its reasons. The choice is cached per input class (op,
device type, dtypes, and the dims the backends' limits read: never the batch size), so a training
step decides once.
"""
from __future__ import annotations

import importlib
import logging
import functools
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import torch

from fastmae.config import AUTO, BACKEND_TABLE, backend_names, renamed_backend_message
from fastmae.errors import BackendUnavailableError, UsageError
from fastmae.ops.spec import Inputs

logger = logging.getLogger("fastmae")



@dataclass
class Backend:
    name: str
    module_name: str
    # device types on which automatic selection may pick this backend ("*": any device)
    auto_devices: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    _module: ModuleType | None = field(default=None, repr=False)
    _import_error: str | None = field(default=None, repr=False)
    _imported: bool = field(default=False, repr=False)
    _limited: dict | None = field(default=None, repr=False)

    @property
    def module(self) -> ModuleType | None:
        """The backend's module, imported at the first question about the backend (``import
        fastmae.ops`` imports none: triton, xformers, apex load only when asked for); None if it
        cannot be imported (:attr:`import_error` says why)."""
        if not self._imported:
            self._imported = True
            try:
                self._module = importlib.import_module(self.module_name)
            except ImportError as e:
                reason = str(e)
                if e.name == "fastmae.kernels":  # the link fastmae/kernels -> kernels/ is missing
                    reason += (" (fastmae/kernels is a link to the checkout's kernels/: a copy that lost it "
                               "needs it back, ln -s ../kernels fastmae/kernels, or a reinstall with pip install .)")
                self._import_error = reason
        return self._module

    @property
    def import_error(self) -> str | None:
        return self._import_error if self.module is None else None

    def unavailable_reasons(self, device_type: str) -> list[str]:
        if self.module is None:
            return [f"cannot import {self.module_name}: {self.import_error}"]
        if device_type == "cuda" and not torch.cuda.is_available():
            return ["no CUDA device is available"]
        return list(self.module.unavailable_reasons(device_type, **dict(self.options)))

    def not_supported_reasons(self, op: str, inputs: Inputs) -> list[str]:
        """Why this backend cannot take ``inputs`` for ``op`` (empty: it can); asked after
        :meth:`unavailable_reasons` found it runs on the device."""
        reasons = getattr(self.module, "not_supported_reasons", None)
        return list(reasons(op, inputs, **dict(self.options))) if reasons else []

    def limits(self, op: str) -> tuple[str, ...] | None:
        """The dims this backend's reasons to refuse ``op``'s inputs read (besides the dtypes), or
        None when it takes every valid input: its module's ``LIMITED_OPS``, or
        ``limited_ops(**options)`` (the unpinned SDPA takes everything). Only calls of limited ops
        build an input class and consult :func:`choose`."""
        if self._limited is None:
            if self.module is None:
                return None
            limited = getattr(self.module, "limited_ops", None)
            self._limited = dict(limited(**dict(self.options)) if limited else getattr(self.module, "LIMITED_OPS", {}))
        return self._limited.get(op)

    def prepare(self, device_type: str) -> list[str]:
        """Make ready what the first use needs (the native backend builds its library here, not when
        asked whether it can run); the reasons it failed, else empty."""
        prepare = getattr(self.module, "prepare", None)
        return list(prepare(device_type)) if prepare else []

    def op(self, name: str) -> Callable:
        fn = getattr(self.module, name)
        return functools.partial(fn, **dict(self.options)) if self.options else fn

    def auto_eligible(self, device_type: str) -> bool:
        return "*" in self.auto_devices or device_type in self.auto_devices


def _backend(name: str, module_name: str, auto_devices: tuple[str, ...], **options: str) -> Backend:
    return Backend(name, module_name, auto_devices, tuple(options.items()))


ENV_VARS = {"kernels": "FASTMAE_KERNELS", "attention": "FASTMAE_ATTENTION", "norm": "FASTMAE_NORM"}
OPS = {
    "kernels": (
        "random_masking", "gather_visible", "embed_visible_patches", "encoder_input", "unshuffle_with_mask_token",
        "masked_pixel_loss", "add_layer_norm", "bias_gelu",
    ),
    "attention": ("attention",),
    "norm": ("layer_norm",),
}

# Priority order (fastmae.config.BACKEND_TABLE): automatic selection takes the first eligible backend
# that can run.
BACKENDS: dict[str, tuple[Backend, ...]] = {
    family: tuple(_backend(name, module, auto_devices, **options) for name, module, auto_devices, options in rows)
    for family, rows in BACKEND_TABLE.items()
}


def _find(family: str, name: str) -> Backend:
    for b in BACKENDS[family]:
        if b.name == name:
            return b
    raise UsageError(renamed_backend_message(family, name)
                     or f"unknown {family} backend {name!r}; choose one of {backend_names(family) + [AUTO]}")


_resolved: dict[tuple[str, str, str], str] = {}


def _constant_result(fn: Callable) -> Callable:
    # torch.compiler.assume_constant_result's mark, set without importing torch._dynamo (which
    # imports triton) when fastmae.ops is imported; tests/test_compile.py fails if it stops working
    fn._dynamo_marked_constant = True
    return fn


# Resolution is host-side bookkeeping (environment, logging): torch.compile runs it once while
# tracing and keeps the answer, so the graph holds only the chosen op.
def _request(family: str, requested: str | None) -> tuple[str, str]:
    """The backend asked for (an argument, else the family's environment variable, else automatic)
    and where the request came from."""
    if requested is not None:
        return requested, "argument"
    return os.environ.get(ENV_VARS[family]) or AUTO, f"environment variable {ENV_VARS[family]}"


@_constant_result
def resolve(family: str, requested: str | None, device_type: str) -> str:
    """The name of the backend that runs ``family``'s ops on ``device_type``."""
    requested, source = _request(family, requested)
    key = (family, requested, device_type)
    if key in _resolved:
        return _resolved[key]
    if requested == AUTO:
        skipped = []
        for b in BACKENDS[family]:
            if not b.auto_eligible(device_type):
                continue
            reasons = b.unavailable_reasons(device_type) or b.prepare(device_type)
            if not reasons:
                logger.info(
                    "%s backend on %s: %s (automatic%s)", family, device_type, b.name,
                    "; skipped " + "; ".join(skipped) if skipped else "",
                )
                _resolved[key] = b.name
                return b.name
            skipped.append(f"{b.name}: {', '.join(reasons)}")
        raise BackendUnavailableError(f"no {family} backend can run on {device_type}: " + "; ".join(skipped))
    backend = _find(family, requested)
    reasons = backend.unavailable_reasons(device_type) or backend.prepare(device_type)
    if reasons:
        raise BackendUnavailableError(
            f"{family} backend {requested!r} was requested ({source}) but cannot run on "
            f"{device_type}: {'; '.join(reasons)}"
        )
    _resolved[key] = requested
    return requested


_chosen: dict[tuple, str] = {}


@_constant_result
def choose(family: str, requested: str | None, key: tuple) -> str:
    """The name of the backend that runs the op of ``key`` (:meth:`fastmae.ops.spec.Inputs.key`) on
    those inputs: the family's backend (:func:`resolve`) when it takes them; automatic selection
    falls back to the next that runs and takes them, an explicit request raises."""
    op, device_type = key[0], key[1]
    request, source = _request(family, requested)
    cache_key = (family, request, key)
    if cache_key in _chosen:
        return _chosen[cache_key]
    name = resolve(family, requested, device_type)
    inputs = Inputs.from_key(key)
    reasons = _find(family, name).not_supported_reasons(op, inputs)
    if reasons and request != AUTO:
        raise BackendUnavailableError(
            f"{family} backend {name!r} was requested ({source}) but cannot take these {op} inputs: "
            f"{'; '.join(reasons)} (dtypes {_describe(inputs.dtypes)}{', ' if inputs.dims else ''}{_describe(inputs.dims)})"
        )
    if reasons:
        skipped = [f"{name}: {', '.join(reasons)}"]
        for b in BACKENDS[family]:
            if b.name == name or not b.auto_eligible(device_type):
                continue
            why = b.unavailable_reasons(device_type) or b.not_supported_reasons(op, inputs) or b.prepare(device_type)
            if not why:
                logger.info("%s on %s: %s for these inputs (%s)", op, device_type, b.name, "; ".join(skipped))
                name = b.name
                break
            skipped.append(f"{b.name}: {', '.join(why)}")
        else:
            raise BackendUnavailableError(f"no {family} backend can take these {op} inputs on {device_type}: "
                                          + "; ".join(skipped))
    _chosen[cache_key] = name
    return name


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in values.items())


@_constant_result
def limit_dims(family: str, op: str) -> tuple[str, ...]:
    """The dims that any of ``family``'s backends reads to refuse ``op``'s inputs: those that
    :func:`choose`'s input class holds (the batch size is in none, so a new batch decides nothing
    anew, and a compiled model sees no dynamic size there)."""
    key = (family, op)
    if key not in _limit_dims:
        _limit_dims[key] = tuple(sorted({d for b in BACKENDS[family] for d in (b.limits(op) or ())}))
    return _limit_dims[key]


_limit_dims: dict[tuple[str, str], tuple[str, ...]] = {}


@_constant_result
def is_limited(family: str, name: str, op: str) -> bool:
    """Whether the backend ``name`` may refuse some of ``op``'s inputs (see :meth:`Backend.limits`)."""
    return _find(family, name).limits(op) is not None


def implementation(family: str, op: str, requested: str | None, inputs: Inputs) -> Callable:
    """The function of the backend that runs ``op`` on these (checked) inputs."""
    name = resolve(family, requested, inputs.device_type)
    if is_limited(family, name, op):
        name = choose(family, requested, inputs.key(limit_dims(family, op)))
    return _find(family, name).op(op)


def chosen_backend(family: str, requested: str | None, device_type: str) -> Backend:
    """The family's backend on ``device_type`` (:func:`resolve`), whatever the inputs."""
    return _find(family, resolve(family, requested, device_type))


def fuses_layers(requested: str | None, device_type: str) -> bool:
    """Whether the kernel backend that runs on ``device_type`` fuses the transformer block's
    elementwise work (see ``OPS``)."""
    return getattr(chosen_backend("kernels", requested, device_type).module, "FUSES_LAYERS", False)


def availability(device_types: tuple[str, ...]) -> dict[str, dict[str, dict[str, list[str]]]]:
    """``{family: {backend: {device_type: reasons}}}``; empty reasons mean it can run there."""
    return {
        family: {b.name: {d: b.unavailable_reasons(d) for d in device_types} for b in backends}
        for family, backends in BACKENDS.items()
    }
