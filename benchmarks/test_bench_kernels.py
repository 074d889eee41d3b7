"""Each kernel op: the fused backends (``triton``, ``native``) against the ``torch`` reference at MAE sizes (bf16
activations as under autocast), forward, backward and both; achieved GB/s over the bytes the op must
move at least, and that as a fraction of the device's copy bandwidth.

    pytest benchmarks/test_bench_kernels.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, PRESETS, measure, on_bench_stream
from fastmae import ops
from fastmae.ops import reference
from fastmae.ops.registry import BACKENDS

BF16, F32, I64 = 2, 4, 8


def runnable(name: str) -> list[str]:
    backend = next(b for b in BACKENDS["kernels"] if b.name == name)
    return backend.unavailable_reasons(DEVICE.type)


PROVIDERS = [
    pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {'; '.join(runnable(name))}") if runnable(name) else [])
    for name in ("triton", "native", "torch")
]
if not ON_GPU:  # interpreted Triton timings mean nothing
    PROVIDERS[0] = pytest.param("triton", marks=pytest.mark.skip(reason="Triton timings need a GPU"))


def skip_unfused(provider: str) -> None:
    if provider != "torch" and not ops.fuses_layers(provider, DEVICE.type):
        pytest.skip(f"the {provider} backend runs the reference's ops for the block's elementwise work")


def inputs(preset, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n, L, K = preset.batch, preset.L, preset.K
    noise = torch.rand(n, L, device=DEVICE, generator=g)
    ids_keep, ids_restore, mask = reference.random_masking(noise, K)
    return noise, ids_keep, ids_restore, mask


def record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, design_bytes=None, **extra):
    """``nbytes``: the least the op must move (the GB/s and the fraction of the copy bandwidth are over
    it); ``design_bytes``: what a fused backend's kernels move where that is more (the fraction over it
    says how near the kernels run to the limit)."""
    seconds = measure(benchmark, fn, calls_per_round=20 if ON_GPU else 1, device_time=True, preset=preset.name,
                      provider=provider, mode=mode, batch=preset.batch, **extra)
    gbps = nbytes / seconds / 1e9
    benchmark.extra_info.update(bytes=nbytes, gbps=gbps, copy_gbps=copy_bandwidth,
                                fraction_of_copy_bandwidth=gbps / copy_bandwidth)
    if design_bytes is not None and provider != "torch":
        benchmark.extra_info.update(design_bytes=design_bytes,
                                    design_fraction_of_copy_bandwidth=design_bytes / seconds / 1e9 / copy_bandwidth)


def forward_backward(forward, grad_inputs, mode):
    """The timed function for ``mode``: fwd, bwd (through a retained graph) or fwd+bwd."""
    if mode == "fwd":
        return lambda: forward()
    with on_bench_stream():  # where the device timing captures the backward (autograd follows the forward)
        out = forward()
    dy = torch.randn_like(out) if out.dim() else torch.ones_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, grad_inputs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), grad_inputs, dy)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_random_masking(benchmark, preset, provider, copy_bandwidth):
    noise, *_ = inputs(preset)
    n, L, K = preset.batch, preset.L, preset.K
    nbytes = n * L * F32 + n * K * I64 + n * L * I64 + n * L * F32
    record(benchmark, lambda: ops.random_masking(noise, K, backend=provider), preset, provider, "fwd",
           nbytes, copy_bandwidth, op="random_masking", shape=[n, L])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_gather_visible(benchmark, preset, provider, mode, copy_bandwidth):
    _, ids_keep, _, _ = inputs(preset)
    n, L, K, D = preset.batch, preset.L, preset.K, preset.enc_dim
    x = torch.randn(n, L, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.randn(L, D, device=DEVICE)
    fn = forward_backward(lambda: ops.gather_visible(x, ids_keep, pos, backend=provider), (x,), mode)
    fwd = n * K * D * (BF16 + F32) + L * D * F32
    bwd = n * K * D * F32 + n * L * D * BF16
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, op="gather_visible", shape=[n, L, K, D])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_embed_visible_patches(benchmark, preset, provider, mode, copy_bandwidth):
    _, ids_keep, _, _ = inputs(preset)
    n, L, K, D, p = preset.batch, preset.L, preset.K, preset.enc_dim, preset.patch
    imgs = torch.randn(n, 3, preset.img, preset.img, device=DEVICE)
    weight = torch.randn(D, 3, p, p, device=DEVICE, requires_grad=True)
    bias = torch.zeros(D, device=DEVICE, requires_grad=True)

    def forward():  # as the model calls it: the position embedding is encoder_input's
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return ops.embed_visible_patches(imgs, ids_keep, weight, bias, backend=provider)

    fn = forward_backward(forward, (weight, bias), mode)
    # the visible pixels read, the (bf16) embeddings written (and their gradient read in the backward)
    nbytes = n * K * (preset.P * F32 + D * BF16) * (1 if mode == "fwd" else 2)
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, op="embed_visible_patches",
           shape=[n, 3, preset.img, preset.img, D])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_encoder_input(benchmark, preset, provider, mode, copy_bandwidth):
    """The encoder's input from the bf16 embeddings of the visible patches: fp32 [N, 1+K, D] with the
    position embeddings and the cls token."""
    _, ids_keep, _, _ = inputs(preset)
    n, L, K, D = preset.batch, preset.L, preset.K, preset.enc_dim
    x = torch.randn(n, K, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    cls = torch.randn(D, device=DEVICE, requires_grad=True)
    pos = torch.randn(L + 1, D, device=DEVICE)
    fn = forward_backward(lambda: ops.encoder_input(x, ids_keep, cls, pos, backend=provider), (x, cls), mode)
    fwd = n * K * D * BF16 + (L + 1) * D * F32 + n * (1 + K) * D * F32
    bwd = n * (1 + K) * D * F32 + n * K * D * BF16
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, op="encoder_input", shape=[n, L, K, D])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_unshuffle_with_mask_token(benchmark, preset, provider, mode, copy_bandwidth):
    _, _, ids_restore, _ = inputs(preset)
    n, L, K, D = preset.batch, preset.L, preset.K, preset.dec_dim
    x = torch.randn(n, 1 + K, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    token = torch.randn(D, device=DEVICE, requires_grad=True)
    pos = torch.randn(L + 1, D, device=DEVICE)
    fn = forward_backward(lambda: ops.unshuffle_with_mask_token(x, ids_restore, token, pos, backend=provider),
                          (x, token), mode)
    fwd = n * (1 + K) * D * BF16 + (L + 1) * D * F32 + n * (L + 1) * D * F32
    bwd = n * (L + 1) * D * F32 + n * (1 + K) * D * BF16
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, op="unshuffle_with_mask_token",
           shape=[n, L, K, D])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_masked_pixel_loss(benchmark, preset, provider, mode, copy_bandwidth):
    _, _, _, mask = inputs(preset)
    n, L, K, P, p = preset.batch, preset.L, preset.K, preset.P, preset.patch
    pred = torch.randn(n, L, P, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    imgs = torch.randn(n, 3, preset.img, preset.img, device=DEVICE)
    fn = forward_backward(lambda: ops.masked_pixel_loss(pred, imgs, mask, p, True, backend=provider), (pred,), mode)
    removed = n * (L - K) * P * (BF16 + F32) + n * L * F32
    nbytes = removed if mode == "fwd" else removed + n * L * P * BF16
    # the fused forward also writes g (pred's size) for the backward, which reads it and writes the
    # gradient: at most 69% (fwd) and 62% (fwd+bwd) of the copy bandwidth over the minimum at ViT-L/16
    design = removed + n * L * P * BF16 * (1 if mode == "fwd" else 3)
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, design_bytes=design, op="masked_pixel_loss",
           shape=[n, L, P])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_add_layer_norm(benchmark, preset, provider, mode, copy_bandwidth):
    """A decoder block's residual step (197 tokens x 512): fp32 residual + bf16 branch -> fp32 residual,
    bf16 normalized output (under autocast)."""
    skip_unfused(provider)
    n, T, D = preset.batch, preset.L + 1, preset.dec_dim
    x = torch.randn(n, T, D, device=DEVICE, requires_grad=True)
    branch = torch.randn(n, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.ones(D, device=DEVICE, requires_grad=True), torch.zeros(D, device=DEVICE, requires_grad=True)

    def forward():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            h, y = ops.add_layer_norm(x, branch, weight, bias, 1e-6, backend=provider)
        return h.float().sum() + y.float().sum() if mode != "fwd" else y

    fn = forward_backward(forward, (x, branch, weight, bias), mode)
    fwd = n * T * D * (F32 + BF16 + F32 + BF16)  # x, branch read; h, y written
    bwd = n * T * D * (BF16 + F32 + F32 + F32 + BF16)  # dy, dh, h read; dx, dbranch written
    nbytes = fwd if mode == "fwd" else fwd + bwd
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, op="add_layer_norm", shape=[n, T, D])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bias_gelu(benchmark, preset, provider, mode, copy_bandwidth):
    """The encoder MLP's activation (1 + K tokens x 4 * dim), bf16."""
    skip_unfused(provider)
    n, T, D = preset.batch, preset.K + 1, 4 * preset.enc_dim
    x = torch.randn(n, T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    fn = forward_backward(lambda: ops.bias_gelu(x, bias, backend=provider), (x, bias), mode)
    fwd = 2 * n * T * D * BF16
    nbytes = fwd if mode == "fwd" else fwd + 3 * n * T * D * BF16  # dy, x read; dx written
    record(benchmark, fn, preset, provider, mode, nbytes, copy_bandwidth, op="bias_gelu", shape=[n, T, D])


# -- the host's cost of an op call ----------------------------------------------------------------

HOST_DIMS = {"N": 2, "L": 16, "L1": 17, "D": 32, "C": 3, "H": 16, "W": 16, "p": 4}  # tiny: the device's work is negligible
HOST_OPS = ("random_masking", "gather_visible", "embed_visible_patches", "encoder_input", "unshuffle_with_mask_token",
            "masked_pixel_loss")
_host_us: dict = {}


@pytest.mark.parametrize("op", HOST_OPS)
@pytest.mark.parametrize("provider", ["torch", *PROVIDERS[:2]])
def test_host_us_per_op(benchmark, op, provider):
    """Microseconds of host time per call, forward and backward, on inputs so small that the device
    keeps up with the launches (on a GPU, calls are queued back to back with one synchronization per
    round): the checks, the dispatch, the autograd glue and the launches themselves. Compared with the
    reference's own cost per call."""
    from fastmae.ops.spec import SPECS, example_inputs

    spec = SPECS[op]
    with torch.device(DEVICE):
        args = example_inputs(spec, HOST_DIMS, values={"norm_pix": True}, requires_grad=True)
    call = getattr(ops, op)

    def fn():
        out = call(*args, backend=provider)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    seconds = measure(benchmark, fn, calls_per_round=100 if ON_GPU else 20, op=op, provider=provider,
                      mode="host fwd+bwd", preset="host_dims", shape=HOST_DIMS)
    _host_us[op, provider] = seconds * 1e6
    reference_us = _host_us.get((op, "torch"))
    benchmark.extra_info.update(host_us_per_call=seconds * 1e6,
                                host_cost_vs_reference=seconds * 1e6 / reference_us if reference_us else None)


def test_ptx_access_widths(benchmark, capsys):
    """CPU-side evidence, GPU or not: every Triton kernel compiled for sm_80 and sm_90 as Triton
    specializes it at ViT-L/16 batch 256, and the widths of its global loads and stores read from the
    PTX (16 bytes on the contiguous rows of a bandwidth-bound kernel). The table is printed and kept
    in the benchmark's extra_info; tests/test_kernels.py asserts the 16-byte accesses."""
    import json
    import os
    import pathlib
    import subprocess
    import sys
    import tempfile

    script = pathlib.Path(__file__).parents[1] / "tests" / "compile_kernels_for_gpus.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "ptx.json"
        result = benchmark.pedantic(subprocess.run, args=([sys.executable, str(script), "--json", str(out)],),
                                    kwargs=dict(env=env, capture_output=True, text=True), rounds=1, iterations=1)
        assert result.returncode == 0, result.stderr[-4000:]
        benchmark.extra_info["ptx_access_widths"] = json.loads(out.read_text())
    with capsys.disabled():
        print("\n" + result.stdout)
