"""The Triton backend's registration (opcheck), its compilation for GPUs, and its own errors; the
fused backends' reads past 2^31 elements. (Numerical agreement with the reference is in test_ops.py,
for every backend.)"""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastmae import ops
from fastmae.ops import reference
from fastmae.testing import (
    RecordOps, assert_close, backend_cases, fused_opcheck_args, fused_opcheck_cases, fused_ops,
)


def masking(n, L, k):
    return reference.random_masking(torch.rand(n, L), k)


def layer_opcheck_cases():
    """The Triton backend's own ops (the transformer block's fused elementwise work)."""
    n, L, d = 2, 16, 24
    f = torch.ops.fastmae
    x = torch.randn(n, L, d, requires_grad=True)
    return [
        (f.add_layer_norm.default, (x, torch.randn(n, L, d, dtype=torch.bfloat16, requires_grad=True),
                                    torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True), 1e-6, None)),
        (f.add_layer_norm.default, (x, None, torch.randn(d, requires_grad=True), None, 1e-6, torch.bfloat16)),
        (f.add_layer_norm_backward.default, (torch.randn(n, L, d), torch.randn(n, L, d), torch.randn(n, L, d),
                                             torch.randn(d), torch.randn(n, L), torch.rand(n, L), torch.float32,
                                             torch.bfloat16)),
        (f.bias_gelu.default, (torch.randn(n, L, d, requires_grad=True), torch.randn(d, requires_grad=True))),
        (f.bias_gelu_backward.default, (torch.randn(n, L, d), torch.randn(n, L, d, dtype=torch.bfloat16), torch.randn(d))),
    ]


@pytest.mark.parametrize("name,variant", fused_opcheck_cases())
def test_opcheck_mae_ops(triton_device, name, variant):
    from fastmae.ops.triton_backend import OPS

    torch.library.opcheck(getattr(OPS, name), fused_opcheck_args(name, variant, noise_dtype=torch.float32))


LAYER_OPCHECK_CASES = 5  # len(layer_opcheck_cases()), written out: collecting must not need the Triton ops


@pytest.mark.parametrize("case", range(LAYER_OPCHECK_CASES))
def test_opcheck_layer_ops(triton_device, case):
    cases = layer_opcheck_cases()
    assert len(cases) == LAYER_OPCHECK_CASES
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_backward_fills_no_zero_gradients(triton_device):
    """An eager backward of the MAE model on the Triton kernels launches no fill of zeros: the outputs
    that get no gradient (the loss's g and mask sum, add_layer_norm's statistics, the final norm's
    residual) stay None in the autograd formulas instead of being materialized, one of them of the
    prediction's size and one of the residual stream's (then read by the kernel)."""
    from fastmae.models import mae_vit_tiny_patch4

    model = mae_vit_tiny_patch4(norm_pix_loss=True, kernel_backend="triton")
    with torch.autocast(triton_device, dtype=torch.bfloat16):
        loss, _, _ = model(torch.randn(2, 3, 32, 32))
    with RecordOps() as record:
        loss.backward()
    assert "fastmae::add_layer_norm_backward" in record.ops and "fastmae::masked_pixel_loss_backward" in record.ops
    fills = [op for op in record.ops if op.split("::")[1].split(".")[0] in ("zeros", "zeros_like", "fill_", "zero_")]
    assert not fills, fills


@pytest.fixture(scope="module")
def ptx_widths(tmp_path_factory):
    """Every Triton kernel lowered to PTX and assembled for sm_80 and sm_90 on this machine, GPU or
    not (as Triton specializes it at ViT-L/16 batch 256): the widths of its global accesses."""
    script = pathlib.Path(__file__).with_name("compile_kernels_for_gpus.py")
    out = tmp_path_factory.mktemp("ptx") / "widths.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script), "--json", str(out)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


# kernels that stream contiguous rows (D wide, or an image row of a patch): 16-byte loads and stores
# (and the loss's backward, one elementwise pass over the gradient)
CONTIGUOUS = {"_gather_rows_fwd", "_gather_rows_bwd", "_gather_patches_fwd", "_encoder_input_fwd", "_unshuffle_fwd",
              "_unshuffle_bwd", "_masked_pixel_loss_bwd", "_add_layer_norm_fwd", "_add_layer_norm_bwd",
              "_bias_gelu_fwd", "_bias_gelu_bwd"}


def test_kernels_compile_for_a100_and_h100_with_16_byte_accesses(ptx_widths):
    assert {r["arch"] for r in ptx_widths} == {"sm_80", "sm_90"}
    assert CONTIGUOUS <= {r["kernel"] for r in ptx_widths}
    for r in ptx_widths:
        if r["kernel"] in CONTIGUOUS:
            assert max(map(int, r["ld"])) == 16 and max(map(int, r["st"])) == 16, r


def test_compiled_kernels_round_to_nearest_even_into_16_bit_floats(ptx_widths):
    """Every fp32 -> bf16/fp16 conversion a GPU runs rounds to nearest even, as PyTorch's ``.to()``:
    the bf16 patches the gather writes under autocast are autocast's own. (The Triton interpreter
    truncates instead, so on a CPU the Triton kernels' bf16 outputs are within a bf16 ulp.)"""
    bf16_patches = [r for r in ptx_widths if r["kernel"] == "_gather_patches_fwd" and "*bf16" in r["dtypes"]]
    assert bf16_patches and all(r["narrowing"] for r in bf16_patches)
    for r in ptx_widths:
        assert all(k.startswith("rn.") for k in r["narrowing"]), r


def test_compiled_kernels_divide_as_pytorch_does(ptx_widths):
    """A GPU runs every fp32 division and square root of the MAE kernels and the crop correctly
    rounded, as the native kernels and PyTorch on a CPU (the interpreter's numpy always does, so only
    the PTX can show a kernel's `/` compiled to an approximate division): the loss's per-patch
    normalization and mean, the crop's scales and normalization. Only LayerNorm's statistics are
    approximate, as in PyTorch's own CUDA LayerNorm (rsqrtf)."""
    for r in ptx_widths:
        if r["kernel"] not in ("_add_layer_norm_fwd", "_add_layer_norm_bwd"):
            assert r["approximate_fp32"] == 0, r


def test_row_kernels_divide_in_32_bits_at_training_shapes(ptx_widths):
    """Where every tensor allows 32-bit offsets (ViT-L/16 batch 256), the row kernels find a row's
    sample and position without a 64-bit integer division; past 2^30 elements they switch to 64 bits."""
    for r in ptx_widths:
        if r["constexprs"].get("INT64") is not True:
            assert r["int64_divisions"] == 0, r
    assert any(r["constexprs"].get("INT64") is True and r["int64_divisions"] > 0 for r in ptx_widths)


def test_the_loss_kernel_moves_pred_and_its_gradient_in_16_byte_vectors(ptx_widths):
    """The loss's tile is in pred's own (i, j, c) order: the bf16 prediction and gradient move as
    16-byte vectors; the fp32 image is gathered 4 bytes at a time (never narrower) from the cache."""
    rows = [r for r in ptx_widths if r["kernel"] == "_masked_pixel_loss_fwd" and r["dtypes"] == "*bf16,*fp32"
            and r["constexprs"]["PATCH"] == 16 and r["constexprs"]["WITH_GRAD"]]
    assert len(rows) == 2, ptx_widths  # sm_80 and sm_90
    for r in rows:
        assert max(map(int, r["ld"])) == 16 and min(map(int, r["ld"])) == 4, r
        assert max(map(int, r["st"])) == 16, r


def test_64_bit_offsets_compute_the_same(triton_device, monkeypatch):
    """Past 2^30 elements the row kernels index in 64 bits: forced here on small tensors, every MAE
    op, forward and backward, gives the same bits as with 32-bit offsets."""
    from fastmae.kernels import _launch

    n, L, k, d, p = 2, 16, 5, 24, 4
    ids_keep, ids_restore, mask = masking(n, L, k)
    x, pos, imgs = torch.randn(n, L, d), torch.randn(L, d), torch.randn(n, 3, 16, 16)
    latent, token, dpos = torch.randn(n, 1 + k, d), torch.randn(d), torch.randn(1 + L, d)
    pred, visible = torch.randn(n, L, p * p * 3), torch.randn(n, k, d)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, latent, token, pred, visible)]
        outs = [ops.gather_visible(leaves[0], ids_keep, pos, backend="triton"),
                ops.embed_visible_patches(imgs, ids_keep, torch.ones(d, 3, p, p), None, backend="triton"),
                ops.encoder_input(leaves[4], ids_keep, token, dpos, backend="triton"),
                ops.unshuffle_with_mask_token(leaves[1], ids_restore, leaves[2], dpos, backend="triton"),
                ops.masked_pixel_loss(leaves[3], imgs, mask, p, True, backend="triton")]
        sum(o.sum() for o in outs).backward()
        return outs + [t.grad for t in leaves]

    narrow = run()
    monkeypatch.setattr(_launch, "INT32_OFFSETS_BELOW", 0)
    wide = run()
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)


def reserve(*shape, dtype=torch.float32):
    """An uninitialized tensor whose pages the OS commits only where written; skipped on a host that
    refuses to reserve that much (no overcommit, or too little memory and swap)."""
    try:
        return torch.empty(shape, dtype=dtype)
    except RuntimeError as e:
        pytest.skip(f"cannot reserve {math.prod(shape) * dtype.itemsize / 2**30:.1f} GiB: {e}")


@pytest.mark.parametrize("backend", [b for b, device in (c.values[0] for c in backend_cases("kernels", with_reference=False))
                                     if device == "cpu"])
def test_gathers_read_past_2_31_elements(backend):
    """Rows and patches read at element offsets past 2^31 (a 4.3 GB activation, an 8.6 GB image
    batch), on the visible rows only: the 64-bit path the launcher picks past 2^30 elements. (With
    32-bit offsets forced the interpreter's addresses wrap and the process crashes.) The tensors are
    allocated but never filled: only the pages of the rows read are touched, a few MB."""
    fused = fused_ops(backend, "cpu")
    n, L, d = 2, 2**20 + 3, 1024
    x = reserve(n, L, d, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 5, L - 1], [L - 1, 7, L - 2]])
    rows = torch.randn(n, 3, d).to(torch.bfloat16)
    for i in range(n):
        x[i, ids[i]] = rows[i]
    assert torch.equal(fused.gather_visible(x, ids, None), rows)
    del x
    p, H, W = 16, 32768, 32784
    imgs = reserve(n, 1, H, W)
    grid_w = W // p
    ids = torch.tensor([[0, 3, H // p * grid_w - 1], [H // p * grid_w - 1, grid_w + 1, 2]])
    patches = torch.randn(n, 3, p * p)
    for i in range(n):
        for k, l in enumerate(ids[i].tolist()):
            r, c = divmod(l, grid_w)
            imgs[i, 0, r * p:(r + 1) * p, c * p:(c + 1) * p] = patches[i, k].view(p, p)
    assert torch.equal(fused.gather_patches(imgs, ids, p, torch.float32), patches)


def test_loss_without_grad_skips_the_gradient(triton_device):
    pred, imgs = torch.randn(2, 16, 48), torch.randn(2, 3, 16, 16)
    _, _, mask = masking(2, 16, 4)
    with torch.no_grad():
        got = ops.masked_pixel_loss(pred.requires_grad_(), imgs, mask, 4, True, backend="triton")
    assert_close(got, reference.masked_pixel_loss(pred, imgs, mask, 4, True))


def test_loss_refuses_gradients_it_does_not_compute(triton_device):
    pred, imgs = torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        ops.masked_pixel_loss(pred, imgs, torch.ones(1, 4), 4, False, backend="triton")


def test_masking_refuses_float64_noise(triton_device):
    with pytest.raises(ops.BackendUnavailableError, match=r"'triton' was requested \(argument\) but cannot take.*float64 noise"):
        ops.random_masking(torch.rand(2, 8, dtype=torch.float64), 2, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("enc_dim,patch", [(768, 16), (1024, 16), (1280, 14)])
def test_mae_sizes_on_gpu(backend, enc_dim, patch):
    """Each fused backend's ops at ViT-B/16, ViT-L/16 and ViT-H/14 training shapes (batch 16, bf16
    activations) against the reference, and the reductions bit-identical across runs."""
    with torch.device("cuda"):
        n, dec = 16, 512
        L = (224 // patch) ** 2
        K = L // 4
        noise = torch.rand(n, L)
        noise[:, 1] = noise[:, 0]  # a tie
        got = ops.random_masking(noise, K, backend=backend)
        want = reference.random_masking(noise, K)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        ids_keep, ids_restore, mask = want

        imgs = torch.randn(n, 3, 224, 224)
        weight = torch.randn(enc_dim, 3, patch, patch, requires_grad=True)
        bias = torch.randn(enc_dim, requires_grad=True)
        pos = torch.randn(L, enc_dim)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = [ops.embed_visible_patches(imgs, ids_keep, weight, bias, pos, backend=b) for b in (backend, "torch")]
        assert_close(outs[0].bfloat16(), outs[1].bfloat16())
        dy = torch.randn_like(outs[1])
        grads = [torch.autograd.grad(o, (weight, bias), dy) for o in outs]
        for g, w in zip(*grads):  # bf16 products summed in another order: compared at bf16's tolerance
            assert_close((g / w.abs().max()).bfloat16(), (w / w.abs().max()).bfloat16(), backward=True)

        x = torch.randn(n, L, enc_dim, dtype=torch.bfloat16, requires_grad=True)
        outs = [ops.gather_visible(x, ids_keep, pos, backend=b) for b in (backend, "torch")]
        assert_close(outs[0], outs[1])
        dy = torch.randn_like(outs[1])
        g, w = (torch.autograd.grad(o, x, dy)[0] for o in outs)
        assert_close(g, w, backward=True)

        x = torch.randn(n, 1 + K, dec, dtype=torch.bfloat16, requires_grad=True)
        token = torch.randn(dec, requires_grad=True)
        dpos = torch.randn(L + 1, dec)
        outs = [ops.unshuffle_with_mask_token(x, ids_restore, token, dpos, backend=b) for b in (backend, "torch")]
        assert_close(outs[0], outs[1])
        dy = torch.randn_like(outs[1])
        grads = [torch.autograd.grad(o, (x, token), dy, retain_graph=True) for o in outs]
        for g, w in zip(*grads):
            assert_close(g, w, backward=True)
        again = torch.autograd.grad(outs[0], (x, token), dy)
        assert all(torch.equal(a, b) for a, b in zip(grads[0], again))

        pred = torch.randn(n, L, patch * patch * 3, dtype=torch.bfloat16, requires_grad=True)
        losses = [ops.masked_pixel_loss(pred, imgs, mask, patch, True, backend=b) for b in (backend, "torch")]
        assert_close(losses[0], losses[1])
        g, w = (torch.autograd.grad(loss, pred)[0] for loss in losses)
        assert_close(g, w, backward=True)
        assert torch.equal(ops.masked_pixel_loss(pred, imgs, mask, patch, True, backend=backend), losses[0])
