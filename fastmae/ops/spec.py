"""Each op's contract, written once: its inputs' shapes and dtypes, the conditions between them, the
preconditions on index values, and its outputs' shapes and dtypes.

From a spec come:

- the checks of :mod:`fastmae.ops` (:meth:`OpSpec.bind`: a wrong input raises a :class:`UsageError`
  that names the op, the input and the rule, before any backend runs);
- the fake kernels of the fused backends' ``torch.library`` ops (:meth:`OpSpec.fake`: shapes and
  dtypes for ``torch.compile``);
- what dispatch looks at (:class:`Inputs`: the dims and dtypes that backends' limits are about);
- the tests' cases (:attr:`OpSpec.cases`, :func:`example_inputs`) and their bad inputs
  (:func:`bad_inputs`: every rule broken once).

A shape is a tuple of dimension names. A name is bound where first seen and must be equal wherever
else it appears; a name in ``derived``, or an expression (``"L + 1"``, ``"p * p * C"``), is computed
from bound names; a leading ``"*name"`` stands for any number of leading dimensions.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from fastmae.errors import UsageError

FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX = (torch.int64,)
# a 0/1 mask: floating as random_masking returns it, or boolean / integer (taken as float32)
MASK = FLOATING + (torch.bool, torch.uint8, torch.int32, torch.int64)


@dataclass(frozen=True)
class Index:
    """What an int64 input's values must be (stated, not checked: checking would wait for the
    device). ``distinct``: distinct positions in ``[0, upper)`` per row (a repeated one would get
    one gradient, not their sum); else a permutation of ``0..upper-1`` per row."""

    upper: str
    distinct: bool = True


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOATING
    optional: bool = False
    # only the number of elements is checked (one dim): the model's mask_token is [1, 1, D]
    any_shape: bool = False
    index: Index | None = None
    # 0/1 values (1 = removed), as random_masking returns the mask
    binary: bool = False
    # the op has a gradient for it (a flag's name: only when that flag is set)
    differentiable: bool | str = False


@dataclass(frozen=True)
class Scalar:
    """An int argument that is a dimension (``len_keep`` is K)."""

    name: str
    dim: str


@dataclass(frozen=True)
class Value:
    """Any other argument (a flag, eps, a dtype): passed through, not checked."""

    name: str


@dataclass(frozen=True)
class Require:
    condition: str  # an expression of dims
    message: str  # formatted with the dims


@dataclass(frozen=True)
class Output:
    dims: tuple[str, ...]
    # a dtype; an input's name (its dtype); ("promote", names...) over the inputs given; ("accumulate",
    # names...): fp32, fp64 when one is fp64; ("value", name): a dtype argument
    dtype: Any
    # the name of a flag: when False the output is empty ([0])
    when: str | None = None


_SCALAR = object()  # the plan of a Scalar argument


@dataclass(frozen=True)
class OpSpec:
    name: str
    params: tuple[Tensor | Scalar | Value, ...]
    outputs: tuple[Output, ...]
    requires: tuple[Require, ...] = ()
    derived: dict[str, str] = field(default_factory=dict)
    # the tests' cases: dims (and which optional inputs are given), odd sizes included
    cases: tuple[dict, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_memo", {})
        # Every expression compiled once into a plain function of the dims (no eval per call, and
        # torch.compile traces the checks without a graph break).
        plans = []
        for param in self.params:
            if not isinstance(param, Tensor):
                plans.append(_SCALAR if isinstance(param, Scalar) else None)
                continue
            lead = param.dims[0][1:] if param.dims and param.dims[0].startswith("*") else None
            fixed = param.dims[1:] if lead else param.dims
            plans.append((lead, tuple((d, None) if self._bindable(d) else (d, self.compiled(d)) for d in fixed)))
        object.__setattr__(self, "_plans", tuple(plans))
        object.__setattr__(self, "_requires", tuple((self.compiled(r.condition), r.message) for r in self.requires))

    def _bindable(self, dim: str) -> bool:
        return dim.isidentifier() and dim not in self.derived

    def compiled(self, expression: str):
        """``expression`` (of dims, derived ones substituted) as a function of the dims dict."""
        if expression in self._memo:
            return self._memo[expression]
        derived = self.derived

        class Substitute(ast.NodeTransformer):
            def visit_Name(self, node):
                if node.id in derived:
                    return self.visit(ast.parse(derived[node.id], mode="eval").body)
                return ast.Subscript(ast.Name("d", ast.Load()), ast.Constant(node.id), ast.Load())

        body = Substitute().visit(ast.parse(expression, mode="eval").body)
        args = ast.arguments(posonlyargs=[], args=[ast.arg("d")], kwonlyargs=[], kw_defaults=[], defaults=[])
        tree = ast.fix_missing_locations(ast.Expression(ast.Lambda(args, body)))
        fn = self._memo[expression] = eval(compile(tree, f"<{self.name}: {expression}>", "eval"), {"__builtins__": {}})  # noqa: S307
        return fn

    # -- checks ------------------------------------------------------------------------------

    def bind(self, *args) -> "Inputs":
        """Checks ``args`` (the op's arguments in order) against the spec; their dims and dtypes."""
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        dims: dict[str, Any] = {}
        dtypes: dict[str, torch.dtype] = {}
        deferred = []  # (param, tensor, size, expression): checked once everything is bound
        device = None
        for param, plan, value in zip(self.params, self._plans, args):
            if plan is None:  # a Value
                continue
            if plan is _SCALAR:
                if param.dim in dims and dims[param.dim] != value:
                    self._fail(f"{param.name} is {value}, expected {param.dim}={dims[param.dim]}")
                dims[param.dim] = value
                continue
            if value is None:
                if not param.optional:
                    self._fail(f"{param.name} is required")
                continue
            if not isinstance(value, torch.Tensor):
                self._fail(f"{param.name} must be a tensor, got {type(value).__name__}")
            if device is None:
                device, first = value.device, param.name
            elif value.device != device:
                # a kernel launched for one device would read the others' memory as its own
                self._fail(f"{param.name} is on {value.device}, {first} on {device}: all must be on one device")
            dtype = value.dtype
            if dtype not in param.dtypes:
                self._fail(f"{param.name} must be {_names(param.dtypes)}, got {dtype}")
            dtypes[param.name] = dtype
            lead, entries = plan
            shape = (value.numel(),) if param.any_shape else value.shape
            if lead is not None:
                n_lead = len(shape) - len(entries)
                if n_lead < 0 or dims.setdefault(lead, tuple(shape[:n_lead])) != tuple(shape[:n_lead]):
                    self._fail(self._shape_message(param, value, dims))
                shape = shape[n_lead:]
            if len(shape) != len(entries):
                self._fail(self._shape_message(param, value, dims))
            for size, (dim, computed) in zip(shape, entries):
                if computed is not None:
                    deferred.append((param, value, size, computed))
                elif dims.setdefault(dim, size) != size:
                    self._fail(self._shape_message(param, value, dims))
        for condition, message in self._requires:
            if not condition(dims):
                self._fail(message.format_map(_Dims(self, dims)))
        for param, value, size, computed in deferred:
            if size != computed(dims):
                self._fail(self._shape_message(param, value, dims))
        return Inputs(self.name, device.type if device is not None else "cpu", dims, dtypes, args)

    def _shape_message(self, param: Tensor, value: torch.Tensor, dims: dict) -> str:
        known = _Dims(self, dims)
        parts = []
        for dim in param.dims:
            try:
                size = known[dim.lstrip("*")] if self._bindable(dim.lstrip("*")) or dim in self.derived else self.compiled(dim)(known)
                parts.append(f"{dim}={size}")
            except (KeyError, ZeroDivisionError):
                parts.append(dim)
        what = "have" if param.any_shape else "be"
        got = f"{value.numel()} ({tuple(value.shape)})" if param.any_shape else tuple(value.shape)
        return f"{param.name} must {what} [{', '.join(parts)}]{' elements' if param.any_shape else ''}, got {got}"

    def _fail(self, message: str):
        raise UsageError(f"{self.name}: {message}")

    # -- outputs -----------------------------------------------------------------------------

    def output_dtypes(self, inputs: "Inputs") -> list[torch.dtype]:
        return [_dtype(out.dtype, inputs, self) for out in self.outputs]

    def output_shapes(self, inputs: "Inputs") -> list[tuple[int, ...]]:
        shapes = []
        for out in self.outputs:
            if out.when is not None and not inputs.value(self, out.when):
                shapes.append((0,))
                continue
            shape: list[int] = []
            for dim in out.dims:
                size = self.compiled(dim.lstrip("*"))(inputs.dims)
                shape.extend(size if isinstance(size, tuple) else (size,))
            shapes.append(tuple(shape))
        return shapes

    def fake(self, *args):
        """The fake kernel: empty outputs of the right shapes and dtypes, on the first input's device."""
        inputs = self.bind(*args)
        device = next(v.device for v in args if isinstance(v, torch.Tensor))
        outs = tuple(torch.empty(s, dtype=d, device=device)
                     for s, d in zip(self.output_shapes(inputs), self.output_dtypes(inputs)))
        return outs[0] if len(outs) == 1 else outs


class _Dims(dict):
    """The bound dims, with the derived ones computed on demand (for messages)."""

    def __init__(self, spec: OpSpec, dims: dict):
        super().__init__(dims)
        self.spec = spec

    def __missing__(self, name):
        if name in self.spec.derived:
            return self.spec.compiled(name)(self)
        raise KeyError(name)


def _names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _dtype(rule, inputs: "Inputs", spec: OpSpec) -> torch.dtype:
    if isinstance(rule, torch.dtype):
        return rule
    if isinstance(rule, str):
        return inputs.dtypes[rule]
    kind, *names = rule
    if kind == "value":
        return inputs.value(spec, names[0])
    given = [inputs.dtypes[n] for n in names if n in inputs.dtypes]
    if kind == "promote":
        out = given[0]
        for d in given[1:]:
            out = torch.promote_types(out, d)
        return out
    if kind == "accumulate":
        return torch.float64 if torch.float64 in given else torch.float32
    raise ValueError(f"unknown dtype rule {rule!r}")


class Inputs:
    """One call's checked arguments: what a backend's limits and the dispatch cache look at."""

    __slots__ = ("op", "device_type", "dims", "dtypes", "args")

    def __init__(self, op: str, device_type: str, dims: dict, dtypes: dict, args: tuple = ()):
        self.op, self.device_type, self.dims, self.dtypes, self.args = op, device_type, dims, dtypes, args

    @classmethod
    def from_key(cls, key: tuple) -> "Inputs":
        """The input class of :meth:`key`: its dims and dtypes, no arguments."""
        op, device_type, dtypes, dims = key
        return cls(op, device_type, dict(dims), dict(dtypes))

    def under_autocast(self, dtype: torch.dtype) -> "Inputs":
        """The inputs as an op that autocast runs in ``dtype`` sees them: float32 ones cast."""
        dtypes = {n: dtype if d == torch.float32 else d for n, d in self.dtypes.items()}
        return Inputs(self.op, self.device_type, self.dims, dtypes, self.args)

    def value(self, spec: OpSpec, name: str):
        return self.args[[p.name for p in spec.params].index(name)]

    def key(self, dims: tuple[str, ...]) -> tuple:
        """The input class dispatch is cached by: the op, the device type, the dtypes of the tensors
        given (by name) and ``dims`` (those the backends' limits read; a symbolic size under
        torch.compile is specialized to its value, with a guard: ``operator.index``, which Dynamo
        specializes where ``int()`` stays symbolic)."""
        return (self.op, self.device_type, tuple(self.dtypes.items()),
                tuple((d, operator.index(self.dims[d])) for d in dims))


# -- MAE's ops -------------------------------------------------------------------------------------

_RANDOM_MASKING = OpSpec(
    "random_masking",
    params=(Tensor("noise", ("N", "L")), Scalar("len_keep", "K")),
    requires=(Require("0 <= K <= L", "len_keep must be in [0, L={L}], got {K}"),),
    outputs=(Output(("N", "K"), torch.int64), Output(("N", "L"), torch.int64), Output(("N", "L"), torch.float32)),
    cases=({"N": 1, "L": 16}, {"N": 3, "L": 49}, {"N": 2, "L": 50}, {"N": 1, "L": 63}, {"N": 3, "L": 196}),
)

_IDS_KEEP = Tensor("ids_keep", ("N", "K"), INDEX, index=Index("L"))
_IDS_RESTORE = Tensor("ids_restore", ("N", "L"), INDEX, index=Index("L", distinct=False))
_PATCH_SIZE = Require("p > 0", "the patch size must be positive, got {p}")
_PATCH_GRID = Require("H % p == 0 and W % p == 0", "image size {H}x{W} is not divisible by the patch size {p}")
_KEEP_AT_MOST_L = Require("K <= L", "ids_keep keeps {K} rows of L={L}")

_GATHER_VISIBLE = OpSpec(
    "gather_visible",
    params=(Tensor("x", ("N", "L", "D"), differentiable=True), _IDS_KEEP,
            Tensor("pos_embed", ("L", "D"), optional=True, differentiable=True)),
    requires=(_KEEP_AT_MOST_L,),
    outputs=(Output(("N", "K", "D"), ("promote", "x", "pos_embed")),),
    cases=({"N": 1, "L": 16, "D": 40}, {"N": 3, "L": 49, "D": 40}, {"N": 2, "L": 50, "D": 588},
           {"N": 3, "L": 63, "D": 768}, {"N": 1, "L": 196, "D": 40}),
)

_EMBED_VISIBLE_PATCHES = OpSpec(
    "embed_visible_patches",
    params=(Tensor("imgs", ("N", "C", "H", "W"), differentiable=True), _IDS_KEEP,
            Tensor("weight", ("D", "C", "p", "p"), differentiable=True),
            Tensor("bias", ("D",), optional=True, differentiable=True),
            Tensor("pos_embed", ("L", "D"), optional=True, differentiable=True)),
    derived={"L": "(H // p) * (W // p)"},
    requires=(_PATCH_SIZE, _PATCH_GRID, _KEEP_AT_MOST_L),
    outputs=(Output(("N", "K", "D"), ("promote", "imgs", "weight", "bias", "pos_embed")),),
    cases=({"N": 1, "C": 3, "p": 4, "H": 16, "W": 16, "D": 40}, {"N": 3, "C": 3, "p": 4, "H": 28, "W": 28, "D": 64},
           {"N": 2, "C": 1, "p": 7, "H": 14, "W": 21, "D": 40}),
)

_ENCODER_INPUT = OpSpec(
    "encoder_input",
    # pos_embed [1+L, D]: its row 0 is the cls token's
    params=(Tensor("x", ("N", "K", "D"), differentiable=True), _IDS_KEEP,
            Tensor("cls_token", ("D",), any_shape=True, differentiable=True),
            Tensor("pos_embed", ("L1", "D"), differentiable=True)),
    derived={"L": "L1 - 1"},
    requires=(Require("L1 >= 1", "pos_embed needs a row for the cls token, got none"), _KEEP_AT_MOST_L),
    outputs=(Output(("N", "K + 1", "D"), ("promote", "x", "cls_token", "pos_embed")),),
    cases=({"N": 1, "L1": 17, "D": 40}, {"N": 3, "L1": 50, "D": 40}, {"N": 2, "L1": 51, "D": 588},
           {"N": 3, "L1": 64, "D": 768}, {"N": 1, "L1": 197, "D": 40}),
)

_UNSHUFFLE_WITH_MASK_TOKEN = OpSpec(
    "unshuffle_with_mask_token",
    params=(Tensor("x", ("N", "K1", "D"), differentiable=True), _IDS_RESTORE,
            Tensor("mask_token", ("D",), any_shape=True, differentiable=True),
            Tensor("pos_embed", ("L + 1", "D"), optional=True, differentiable=True)),
    requires=(Require("1 <= K1 <= L + 1", "x has {K1} rows; expected 1 + K with 0 <= K <= L={L}"),),
    outputs=(Output(("N", "L + 1", "D"), ("promote", "x", "mask_token", "pos_embed")),),
    cases=_GATHER_VISIBLE.cases,
)

_MASKED_PIXEL_LOSS = OpSpec(
    "masked_pixel_loss",
    # the fused backends differentiate pred only (the reference imgs and mask too)
    params=(Tensor("pred", ("N", "L", "p * p * C"), differentiable=True), Tensor("imgs", ("N", "C", "H", "W")),
            Tensor("mask", ("N", "L"), MASK, binary=True), Scalar("patch_size", "p"), Value("norm_pix")),
    derived={"L": "(H // p) * (W // p)"},
    requires=(_PATCH_SIZE, _PATCH_GRID),
    outputs=(Output((), ("accumulate", "pred", "imgs")),),
    cases=({"N": 1, "C": 3, "p": 4, "H": 16, "W": 16}, {"N": 3, "C": 3, "p": 4, "H": 28, "W": 28},
           {"N": 2, "C": 1, "p": 7, "H": 14, "W": 21}, {"N": 1, "C": 3, "p": 14, "H": 28, "W": 14}),
)

_ADD_LAYER_NORM = OpSpec(
    "add_layer_norm",
    params=(Tensor("x", ("*B", "D"), differentiable=True), Tensor("branch", ("*B", "D"), optional=True, differentiable=True),
            Tensor("weight", ("D",), optional=True, differentiable=True),
            Tensor("bias", ("D",), optional=True, differentiable=True), Value("eps")),
    outputs=(Output(("*B", "D"), ("promote", "x", "branch")), Output(("*B", "D"), ("promote", "x", "branch"))),
    cases=({"B": (3, 17), "D": 40}, {"B": (2, 5), "D": 768}, {"B": (1, 3), "D": 1000}),
)

_BIAS_GELU = OpSpec(
    "bias_gelu",
    params=(Tensor("x", ("*B", "D"), differentiable=True), Tensor("bias", ("D",), differentiable=True)),
    outputs=(Output(("*B", "D"), "x"),),
    cases=({"B": (3, 17), "D": 40}, {"B": (2, 5), "D": 3072}, {"B": (1,), "D": 130}),
)

_ATTENTION = OpSpec(
    "attention",
    params=tuple(Tensor(n, ("B", "heads", "S", "head_dim"), differentiable=True) for n in "qkv"),
    outputs=(Output(("B", "heads", "S", "head_dim"), "q"),),
    cases=({"B": 2, "heads": 3, "S": 17, "head_dim": 64}, {"B": 1, "heads": 2, "S": 50, "head_dim": 32}),
)

# The public ops (fastmae.ops), by name.
SPECS: dict[str, OpSpec] = {s.name: s for s in (
    _RANDOM_MASKING, _GATHER_VISIBLE, _EMBED_VISIBLE_PATCHES, _ENCODER_INPUT, _UNSHUFFLE_WITH_MASK_TOKEN,
    _MASKED_PIXEL_LOSS, _ADD_LAYER_NORM, _BIAS_GELU, _ATTENTION,
)}

# The fused backends' torch.library ops (triton: kernels/; native: csrc/), whose fake kernels come
# from these. Their checks run once, at the op interface, as the public ops' specs.
FUSED_SPECS: dict[str, OpSpec] = {s.name: s for s in (
    _RANDOM_MASKING,
    _GATHER_VISIBLE,
    OpSpec("gather_visible_backward",
           # dtype: dout's or narrower (x's, when only x has a gradient)
           params=(Tensor("dout", ("N", "K", "D")), _IDS_KEEP, Scalar("L", "L"), Value("dtype")),
           outputs=(Output(("N", "L", "D"), ("value", "dtype")),)),
    OpSpec("gather_patches",
           # dtype: imgs's, or narrower (the embedding GEMM's under autocast: the patches are cast as
           # they are copied, not in a pass of their own)
           params=(Tensor("imgs", ("N", "C", "H", "W"), differentiable=True), _IDS_KEEP, Scalar("patch_size", "p"),
                   Value("dtype")),
           derived={"L": "(H // p) * (W // p)"}, requires=(_PATCH_SIZE, _PATCH_GRID),
           outputs=(Output(("N", "K", "C * p * p"), ("value", "dtype")),)),
    _ENCODER_INPUT,
    OpSpec("unshuffle",
           params=_UNSHUFFLE_WITH_MASK_TOKEN.params, requires=_UNSHUFFLE_WITH_MASK_TOKEN.requires,
           outputs=_UNSHUFFLE_WITH_MASK_TOKEN.outputs),
    OpSpec("unshuffle_backward",
           # x_dtype: dout's or narrower
           params=(Tensor("dout", ("N", "L + 1", "D")), _IDS_RESTORE, Scalar("k1", "K1"), Value("x_dtype")),
           outputs=(Output(("N", "K1", "D"), ("value", "x_dtype")), Output(("D",), ("accumulate", "dout")))),
    OpSpec("masked_pixel_loss",
           params=(Tensor("pred", ("N", "L", "p * p * C"), differentiable="with_grad"), *_MASKED_PIXEL_LOSS.params[1:],
                   Value("with_grad")),
           derived=_MASKED_PIXEL_LOSS.derived, requires=_MASKED_PIXEL_LOSS.requires,
           # the loss; g = mask * (pred - target) (when with_grad) and mask.sum() for the backward
           outputs=(*_MASKED_PIXEL_LOSS.outputs, Output(("N", "L", "p * p * C"), "pred", when="with_grad"),
                    *_MASKED_PIXEL_LOSS.outputs)),
    OpSpec("masked_pixel_loss_backward",
           # the forward's g and mask.sum(), the loss's gradient -> d loss / d pred, in g's dtype
           params=(Tensor("g", ("N", "L", "P")), Tensor("dloss", ()), Tensor("msum", ())),
           outputs=(Output(("N", "L", "P"), "g"),)),
)}


# -- tests' inputs ---------------------------------------------------------------------------------

def example_inputs(spec: OpSpec, dims: dict, *, dtype: torch.dtype = torch.float32, optional: bool = True,
                   values: dict | None = None, requires_grad: bool = False) -> list:
    """Random valid arguments for ``spec`` with ``dims`` (K defaults to L // 4, K1 to 1 + K): index
    inputs as random_masking makes them, floating inputs in ``dtype``, optional inputs given or not,
    ``values`` for the other arguments; with ``requires_grad`` the differentiable inputs require it."""
    values = values or {}
    dims = _Dims(spec, dims)
    order = None
    if "L" in dims or "L" in spec.derived:
        dims.setdefault("K", max(1, dims["L"] // 4))
        order = torch.rand(dims["N"], dims["L"]).argsort(dim=1)
    dims.setdefault("K1", 1 + dims.get("K", 0))
    args = []
    for param in spec.params:
        if isinstance(param, Value):
            args.append(values.get(param.name))
        elif isinstance(param, Scalar):
            args.append(dims[param.dim])
        elif param.optional and not optional:
            args.append(None)
        elif param.index is not None:
            args.append(order[:, :dims["K"]].clone() if param.index.distinct else order.argsort(dim=1))
        elif param.binary:
            args.append(torch.ones(dims["N"], dims["L"]).scatter_(1, order[:, :dims["K"]], 0.0))
        else:
            shape: list[int] = []
            for dim in param.dims:
                size = spec.compiled(dim.lstrip("*"))(dims)
                shape.extend(size if isinstance(size, tuple) else (size,))
            if param.any_shape:
                shape = [math.prod(shape)]
            grad = param.differentiable if isinstance(param.differentiable, bool) else values.get(param.differentiable)
            args.append(torch.randn(shape).to(dtype).requires_grad_(requires_grad and bool(grad)))
    return args


def bad_inputs(spec: OpSpec, dims: dict) -> Iterator[tuple[str, list]]:
    """``(what was broken, arguments)``: from valid arguments, each tensor's rank and dtype, and each
    dimension that a rule ties to another, broken once in turn."""
    valid = example_inputs(spec, dims)
    seen: dict[str, int] = {}
    for param in spec.params:
        for dim in param.dims if isinstance(param, Tensor) else (param.dim,) if isinstance(param, Scalar) else ():
            seen[dim] = seen.get(dim, 0) + 1
    for i, param in enumerate(spec.params):
        t = valid[i]
        if not isinstance(param, Tensor):
            continue
        if not param.any_shape and not param.dims[0].startswith("*"):
            yield f"{param.name} with a dimension too many", _replace(valid, i, t.unsqueeze(0))
        wrong = next(d for d in (torch.int32, torch.int16) if d not in param.dtypes)
        yield f"{param.name} as {wrong}", _replace(valid, i, t.to(wrong))
        for j, dim in enumerate(param.dims):
            if dim.startswith("*") or (spec._bindable(dim) and seen[dim] == 1):
                continue  # free: any size is valid
            shape = [t.numel()] if param.any_shape else list(t.shape)
            shape[0 if param.any_shape else j - len(param.dims)] += 1
            yield f"{param.name}'s {dim} one larger", _replace(valid, i, torch.zeros(shape, dtype=t.dtype))


def _replace(args: list, i: int, value) -> list:
    return [value if j == i else a for j, a in enumerate(args)]
