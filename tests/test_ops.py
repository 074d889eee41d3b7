"""Every kernel backend that runs here against the reference, and the reference against the
original's formulas written out as loops."""
import pytest
import torch

from fastmae import ops
from fastmae.kernels._launch import INTERPRET
from fastmae.ops import reference
from fastmae.ops.registry import BACKENDS
from fastmae.ops.spec import FUSED_SPECS, SPECS, bad_inputs, example_inputs
from fastmae.testing import FORWARD, RecordOps, assert_close, expected_backends, fused_ops



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_the_expected_backends_run_here(device):
    """The tests below run for each backend that runs here; those that must (the reference, Triton --
    under TRITON_INTERPRET=1 on a CPU: see conftest.py -- and the native kernels) are asserted here,
    so that one that fails to load fails this test instead of silently dropping its cases."""
    missing = {b.name: b.unavailable_reasons(device) for b in BACKENDS["kernels"]
               if b.name in expected_backends("kernels", device) and b.unavailable_reasons(device)}
    assert not missing, missing


@pytest.fixture(autouse=True)
def _poisoned(poison_empty):
    """Every test here runs with freshly allocated outputs poisoned."""
DTYPES = [torch.float32, torch.bfloat16]


def cases(op: str, *names: str) -> list[tuple]:
    """The op's test cases (its spec's: batch 1 and 3, awkward sizes) as tuples of ``names``."""
    return [tuple(case[n] for n in names) for case in SPECS[op].cases]


def keep_counts(L):
    return sorted({1, L // 4, L - 1})


def masking_inputs(n, L, len_keep):
    noise = torch.rand(n, L)
    return noise, *reference.random_masking(noise, len_keep)


# -- the reference, against the original's formulas -------------------------------------------------

def original_random_masking(noise, len_keep):
    # the original, with ties in position order (it leaves their order to the sort algorithm)
    n, L = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, L)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], ids_restore, torch.gather(mask, 1, ids_restore)


def naive_unshuffle(x, ids_restore, mask_token, pos_embed):
    n, k1, d = x.shape
    L = ids_restore.shape[1]
    out = torch.empty(n, L + 1, d, dtype=torch.result_type(x, mask_token))
    for i in range(n):
        out[i, 0] = x[i, 0]
        for l in range(L):
            r = ids_restore[i, l]
            out[i, 1 + l] = x[i, 1 + r] if r < k1 - 1 else mask_token
    return out + pos_embed


def naive_loss(pred, imgs, mask, p, norm_pix):
    n, c, H, W = imgs.shape
    w = W // p
    total, count = 0.0, 0.0
    for i in range(n):
        for l in range(pred.shape[1]):
            hi, wi = divmod(l, w)
            t = imgs[i, :, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p].permute(1, 2, 0).reshape(-1).double()
            if norm_pix:
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
            total += ((pred[i, l].double() - t) ** 2).mean() * mask[i, l]
            count += mask[i, l]
    return total / count


@pytest.mark.parametrize("n,L", [(1, 16), (3, 49), (2, 196)])
def test_reference_masking_is_the_originals(n, L):
    for len_keep in keep_counts(L):
        noise = torch.rand(n, L)
        for got, want in zip(reference.random_masking(noise, len_keep), original_random_masking(noise, len_keep)):
            assert torch.equal(got, want)


def test_reference_unshuffle_matches_loops():
    n, L, d, k = 3, 16, 8, 5
    _, ids_keep, ids_restore, _ = masking_inputs(n, L, k)
    x, token, pos = torch.randn(n, 1 + k, d), torch.randn(d), torch.randn(L + 1, d)
    assert_close(reference.unshuffle_with_mask_token(x, ids_restore, token, pos), naive_unshuffle(x, ids_restore, token, pos))


def test_reference_unshuffle_inverts_the_gather():
    n, L, d, k = 2, 16, 4, 6
    _, ids_keep, ids_restore, mask = masking_inputs(n, L, k)
    x = torch.randn(n, L, d)
    visible = torch.cat([torch.zeros(n, 1, d), reference.gather_visible(x, ids_keep)], 1)
    out = reference.unshuffle_with_mask_token(visible, ids_restore, torch.full((d,), 7.0))[:, 1:]
    kept = mask == 0
    assert torch.equal(out[kept], x[kept])
    assert torch.all(out[~kept] == 7.0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_reference_loss_matches_loops(norm_pix):
    n, c, p, hw = 2, 3, 4, 12
    imgs = torch.randn(n, c, hw, hw)
    L = (hw // p) ** 2
    pred = torch.randn(n, L, p * p * c)
    _, _, _, mask = masking_inputs(n, L, 4)
    got = reference.masked_pixel_loss(pred, imgs, mask, p, norm_pix)
    torch.testing.assert_close(got.double(), naive_loss(pred, imgs, mask, p, norm_pix), atol=1e-6, rtol=1e-5)


def test_reference_loss_with_nothing_removed_is_zero():
    imgs, pred = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 48, requires_grad=True)
    loss = reference.masked_pixel_loss(pred, imgs, torch.zeros(1, 4), 4, True)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)


def test_patchify_layout_and_inverse():
    imgs = torch.randn(2, 3, 8, 12)
    x = ops.patchify(imgs, 4)
    assert x.shape == (2, 6, 48)
    # patch (row 1, col 2), pixel (p=3, q=1), channel 2
    assert x[1, 1 * 3 + 2, (3 * 4 + 1) * 3 + 2] == imgs[1, 2, 4 + 3, 8 + 1]
    assert torch.equal(ops.unpatchify(x, 4, (2, 3), 3), imgs)


# -- every backend against the reference ---------------------------------------------------------

@pytest.mark.parametrize("n,L", cases("random_masking", "N", "L"))
def test_random_masking(backend, n, L):
    for len_keep in keep_counts(L):
        for noise in (torch.rand(n, L), torch.randint(0, 4, (n, L)) / 4.0, torch.randn(n, L)):  # ties, negatives
            got = ops.random_masking(noise, len_keep, backend=backend)
            for g, w in zip(got, reference.random_masking(noise, len_keep)):
                assert g.dtype == w.dtype and torch.equal(g, w)


def test_random_masking_orders_special_noise_as_argsort(backend):
    """Noise a caller may pass (torch.rand draws none of it): -0.0 ties +0.0 (broken by position), NaN
    of either sign sorts after +inf, as torch.argsort(stable=True) orders them."""
    nan = float("nan")
    noise = torch.tensor([[0.0, -0.0, 0.5, -nan, float("inf"), nan, -0.0, float("-inf"), 0.0, -1.0, nan],
                          [-nan, -0.0, 0.0, 1.0, -0.0, 0.25, -nan, 0.0, -2.0, 0.25, 3.0]])
    assert torch.signbit(noise[0, 3]) and torch.signbit(noise[0, 1])
    for len_keep in (0, 4, 11):
        got = ops.random_masking(noise, len_keep, backend=backend)
        for g, w in zip(got, reference.random_masking(noise, len_keep)):
            assert torch.equal(g, w), (len_keep, g, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,L,d", cases("gather_visible", "N", "L", "D"))
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_visible(backend, dtype, n, L, d, with_pos):
    for len_keep in keep_counts(L):
        _, ids_keep, _, _ = masking_inputs(n, L, len_keep)
        x = torch.randn(n, L, d, dtype=dtype, requires_grad=True)
        pos = torch.randn(L, d, requires_grad=True) if with_pos else None
        got = ops.gather_visible(x, ids_keep, pos, backend=backend)
        want = reference.gather_visible(x, ids_keep, pos)
        assert got.dtype == want.dtype and got.shape == (n, len_keep, d)
        assert_close(got, want)
        dy = torch.randn_like(want)
        inputs = (x, pos) if with_pos else (x,)
        for g, w in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
            assert_close(g, w, backward=True)


def test_reference_encoder_input_is_the_originals():
    """The original: the position embedding added to every patch, the masking gather, the cls token
    with its position embedding, a concatenation; bf16 patches (autocast's embedding) and fp32 rest."""
    n, L, d, k = 3, 16, 8, 5
    _, ids_keep, _, _ = masking_inputs(n, L, k)
    patches = torch.randn(n, L, d).to(torch.bfloat16)
    cls, pos = torch.randn(1, 1, d), torch.randn(1, 1 + L, d)
    visible = torch.gather(patches + pos[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    original = torch.cat(((cls + pos[:, :1]).expand(n, -1, -1), visible), dim=1)
    got = reference.encoder_input(torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d)), ids_keep, cls,
                                  pos[0])
    assert got.dtype == original.dtype == torch.float32 and torch.equal(got, original)


# MAE's (fp32, bf16 embeddings with fp32 parameters, all bf16), and mixes where the original rounds
# one sum in a narrower dtype than the output's
ENCODER_INPUT_DTYPES = [(torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32), (torch.bfloat16,) * 3,
                        (torch.float32, torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32, torch.bfloat16),
                        (torch.float64, torch.float32, torch.float32), (torch.float16, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,cls_dtype,pos_dtype", ENCODER_INPUT_DTYPES)
@pytest.mark.parametrize("n,L1,d", cases("encoder_input", "N", "L1", "D"))
def test_encoder_input(backend, x_dtype, cls_dtype, pos_dtype, n, L1, d):
    L = L1 - 1
    for len_keep in keep_counts(L):
        _, ids_keep, _, _ = masking_inputs(n, L, len_keep)
        x = torch.randn(n, len_keep, d, dtype=x_dtype, requires_grad=True)
        cls = torch.randn(1, 1, d, dtype=cls_dtype, requires_grad=True)
        pos = torch.randn(L1, d, dtype=pos_dtype, requires_grad=True)
        got = ops.encoder_input(x, ids_keep, cls, pos, backend=backend)
        want = reference.encoder_input(x, ids_keep, cls, pos)
        assert got.dtype == want.dtype and got.shape == (n, 1 + len_keep, d)
        if got.dtype == torch.bfloat16 and backend == "triton" and INTERPRET:
            assert_close(got, want)  # the interpreter truncates to bf16 where a GPU rounds
        else:
            assert torch.equal(got, want)  # one addition of the same two values: the same bits
        dy = torch.randn_like(want)
        for g, w in zip(torch.autograd.grad(got, (x, cls, pos), dy), torch.autograd.grad(want, (x, cls, pos), dy)):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert_close(g, w, backward=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,L,d", cases("unshuffle_with_mask_token", "N", "L", "D"))
@pytest.mark.parametrize("with_pos", [False, True])
def test_unshuffle_with_mask_token(backend, dtype, n, L, d, with_pos):
    for len_keep in keep_counts(L):
        _, _, ids_restore, _ = masking_inputs(n, L, len_keep)
        x = torch.randn(n, 1 + len_keep, d, dtype=dtype, requires_grad=True)
        token = torch.randn(d, requires_grad=True)
        pos = torch.randn(L + 1, d, requires_grad=True) if with_pos else None
        got = ops.unshuffle_with_mask_token(x, ids_restore, token, pos, backend=backend)
        want = reference.unshuffle_with_mask_token(x, ids_restore, token, pos)
        assert got.dtype == want.dtype and got.shape == (n, L + 1, d)
        assert_close(got, want)
        dy = torch.randn_like(want)
        inputs = (x, token, pos) if with_pos else (x, token)
        for g, w in zip(torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy)):
            assert_close(g, w, backward=True)


def differentiable_call(op):
    """(the op's arguments as a function of its differentiable inputs, those inputs)"""
    n, L, k, d, p = 2, 16, 5, 8, 4
    _, ids_keep, ids_restore, mask = masking_inputs(n, L, k)
    bf16 = dict(dtype=torch.bfloat16)
    return {
        "gather_visible": (lambda x, pos: (x, ids_keep, pos), [torch.randn(n, L, d, **bf16), torch.randn(L, d)]),
        "gather_visible without pos": (lambda x: (x, ids_keep, None), [torch.randn(n, L, d, **bf16)]),
        "encoder_input": (lambda x, cls, pos: (x, ids_keep, cls, pos),
                          [torch.randn(n, k, d, **bf16), torch.randn(1, 1, d), torch.randn(L + 1, d)]),
        "unshuffle_with_mask_token": (lambda x, tok, pos: (x, ids_restore, tok, pos),
                                      [torch.randn(n, 1 + k, d, **bf16), torch.randn(d), torch.randn(L + 1, d)]),
        "unshuffle_with_mask_token without pos": (lambda x, tok: (x, ids_restore, tok, None),
                                                  [torch.randn(n, 1 + k, d, **bf16), torch.randn(d)]),
        "embed_visible_patches": (lambda imgs, w, b: (imgs, ids_keep, w, b),
                                  [torch.randn(n, 3, 16, 16), torch.randn(d, 3, p, p), torch.randn(d)]),
        "masked_pixel_loss": (lambda pred: (pred, torch.randn(n, 3, 16, 16), mask, p, True),
                              [torch.randn(n, L, 3 * p * p, **bf16)]),
    }[op]


@pytest.mark.parametrize("call", ["gather_visible", "gather_visible without pos", "encoder_input",
                                  "unshuffle_with_mask_token", "unshuffle_with_mask_token without pos",
                                  "embed_visible_patches", "masked_pixel_loss"])
def test_gradients_for_every_subset_of_inputs_that_need_them(backend, call):
    """Whichever of an op's inputs need a gradient, those get the reference's (the backwards skip
    work by what autograd asks for)."""
    op = call.split()[0]
    inputs, leaves = differentiable_call(call)
    for needed in range(1, 2 ** len(leaves)):
        ts = [t.clone().requires_grad_(bool(needed >> i & 1)) for i, t in enumerate(leaves)]
        args = inputs(*ts)
        got = getattr(ops, op)(*args, backend=backend)
        want = getattr(reference, op)(*args)
        dy = torch.randn_like(want)
        wanted = [t for t in ts if t.requires_grad]
        for g, w in zip(torch.autograd.grad(got, wanted, dy), torch.autograd.grad(want, wanted, dy)):
            assert_close(g, w, backward=True)


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # the reference's, on no patches
def test_an_empty_batch_has_a_loss_and_a_gradient(backend):
    pred = torch.randn(0, 16, 48, requires_grad=True)
    _, _, _, mask = masking_inputs(0, 16, 4)
    loss = ops.masked_pixel_loss(pred, torch.randn(0, 3, 16, 16), mask, 4, True, backend=backend)
    assert_close(loss, reference.masked_pixel_loss(pred, torch.randn(0, 3, 16, 16), mask, 4, True))
    (dpred,) = torch.autograd.grad(loss, pred)
    assert dpred.shape == pred.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c,p,h,w,d", cases("embed_visible_patches", "N", "C", "p", "H", "W", "D"))
def test_embed_visible_patches(backend, dtype, n, c, p, h, w, d):
    L = (h // p) * (w // p)
    for len_keep in keep_counts(L):
        _, ids_keep, _, _ = masking_inputs(n, L, len_keep)
        imgs = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
        weight = torch.randn(d, c, p, p, dtype=dtype, requires_grad=True)
        bias = torch.randn(d, dtype=dtype, requires_grad=True)
        pos = torch.randn(L, d, requires_grad=True)
        got = ops.embed_visible_patches(imgs, ids_keep, weight, bias, pos, backend=backend)
        want = reference.embed_visible_patches(imgs, ids_keep, weight, bias, pos)
        assert got.dtype == want.dtype and got.shape == (n, len_keep, d)
        # a GEMM over the visible patches against a convolution over all: the same sums, in
        # another order, so bf16 may differ by a rounding of the (large) embedding
        assert_close(got / d**0.5, want / d**0.5)
        dy = torch.randn_like(want)
        for g, r in zip(torch.autograd.grad(got, (imgs, weight, bias, pos), dy),
                        torch.autograd.grad(want, (imgs, weight, bias, pos), dy)):
            assert_close(g / r.abs().max(), r / r.abs().max(), backward=True)


def test_embed_visible_patches_under_autocast(backend):
    """Under autocast the fused backends gather the visible patches straight into the GEMM's dtype:
    the same bits as gathering fp32 and letting autocast cast (no cast pass), and the embedding the
    reference's within bf16 rounding."""
    n, c, p, h, w, d = 3, 3, 4, 12, 20, 24
    L = (h // p) * (w // p)
    _, ids_keep, _, _ = masking_inputs(n, L, L // 4 + 1)
    imgs, weight, bias = torch.randn(n, c, h, w), torch.randn(d, c, p, p), torch.randn(d)
    pos = torch.randn(L, d)
    device = imgs.device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ops.embed_visible_patches(imgs, ids_keep, weight, bias, pos, backend=backend)
        want = reference.embed_visible_patches(imgs, ids_keep, weight, bias, pos)
    fused = next(b for b in BACKENDS["kernels"] if b.name == backend).module.OPS  # loaded by the call
    patches_fp32 = fused.gather_patches(imgs, ids_keep, p, torch.float32)
    patches_bf16 = fused.gather_patches(imgs, ids_keep, p, torch.bfloat16)
    assert patches_bf16.dtype == torch.bfloat16
    with torch.autocast(device, dtype=torch.bfloat16):
        cast_after = torch.nn.functional.linear(patches_fp32, weight.reshape(d, -1), bias) + pos[ids_keep]
    assert got.dtype == want.dtype == torch.float32
    if backend == "triton" and INTERPRET:
        # the interpreter truncates to bf16 where a GPU rounds to nearest even (test_kernels.py
        # checks the compiled kernel's rounding): one bf16 ulp apart
        ulp = patches_fp32.abs() * 2.0**-7
        assert ((patches_bf16.float() - patches_fp32).abs() <= ulp).all()
    else:
        assert torch.equal(patches_bf16, patches_fp32.to(torch.bfloat16))
        assert torch.equal(got, cast_after)
    torch.testing.assert_close(got / d**0.5, want / d**0.5, **FORWARD[torch.bfloat16])  # bf16 GEMMs


@pytest.mark.parametrize("dtype,img_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("n,c,p,h,w", cases("masked_pixel_loss", "N", "C", "p", "H", "W"))
@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_pixel_loss(backend, dtype, img_dtype, n, c, p, h, w, norm_pix):
    L = (h // p) * (w // p)
    for len_keep in keep_counts(L):
        _, _, _, mask = masking_inputs(n, L, len_keep)
        imgs = torch.randn(n, c, h, w, dtype=img_dtype)
        pred = torch.randn(n, L, p * p * c, dtype=dtype, requires_grad=True)
        got = ops.masked_pixel_loss(pred, imgs, mask, p, norm_pix, backend=backend)
        want = reference.masked_pixel_loss(pred, imgs, mask, p, norm_pix)
        assert got.dtype == torch.float32 and got.shape == ()
        assert_close(got, want)
        (g,) = torch.autograd.grad(got, pred)
        (wg,) = torch.autograd.grad(want, pred)
        assert g.dtype == dtype
        assert_close(g, wg, backward=True)


@pytest.mark.parametrize("dtype,branch_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.bfloat16), (torch.float32, None)])
@pytest.mark.parametrize("shape", [(*b, d) for b, d in cases("add_layer_norm", "B", "D")])
@pytest.mark.parametrize("autocast", [False, True])
def test_add_layer_norm(backend, dtype, branch_dtype, shape, autocast):
    d = shape[-1]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    branch = torch.randn(shape, dtype=branch_dtype, requires_grad=True) if branch_dtype else None
    weight, bias = torch.randn(d, requires_grad=True), torch.randn(d, requires_grad=True)
    device_type = x.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        h, y = ops.add_layer_norm(x, branch, weight, bias, 1e-6, backend=backend)
        wh, wy = reference.add_layer_norm(x, branch, weight, bias, 1e-6, torch.bfloat16 if autocast else None)
    assert h.dtype == wh.dtype and y.dtype == wy.dtype == (torch.bfloat16 if autocast else wh.dtype)
    if branch is None:
        assert h is x
    assert_close(h, wh)
    assert_close(y, wy)
    # the residual's gradient comes from the next block (dh) and from the norm (dy)
    dh, dy = torch.randn_like(wh), torch.randn_like(wy)
    inputs = [t for t in (x, branch, weight, bias) if t is not None]
    outputs = (h, y) if branch is not None else (y,)
    grads = (dh, dy) if branch is not None else (dy,)
    want_outputs = (wh, wy) if branch is not None else (wy,)
    # the parameters' fp32 gradients sum bf16 activations: compared at the activations' precision
    low = torch.bfloat16 if torch.bfloat16 in (dtype, branch_dtype) else torch.float32
    for g, w in zip(torch.autograd.grad(outputs, inputs, grads), torch.autograd.grad(want_outputs, inputs, grads)):
        assert g.dtype == w.dtype
        assert_close((g / w.abs().max()).to(low), (w / w.abs().max()).to(low), backward=True)


@pytest.mark.parametrize("branch_dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_with_one_output_read(backend, branch_dtype):
    """Only the norm read on (the final norm: its residual h goes nowhere), or only the residual: the
    output without a gradient contributes nothing (the fused backend passes no tensor of zeros)."""
    x = torch.randn(3, 17, 40, requires_grad=True)
    branch = torch.randn(3, 17, 40, dtype=branch_dtype, requires_grad=True)
    weight, bias = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    inputs = (x, branch, weight, bias)
    got = ops.add_layer_norm(x, branch, weight, bias, 1e-6, backend=backend)
    want = reference.add_layer_norm(x, branch, weight, bias, 1e-6)
    for read in (1, 0):  # y alone, then h alone
        g = torch.autograd.grad(got[read], inputs, torch.ones_like(want[read]), retain_graph=True, allow_unused=True)
        w = torch.autograd.grad(want[read], inputs, torch.ones_like(want[read]), retain_graph=True, allow_unused=True)
        for a, b in zip(g, w):
            if a is None and b is None:
                continue
            b = torch.zeros_like(a) if b is None else b  # h alone: the weight and bias get zeros, or None
            a = torch.zeros_like(b) if a is None else a
            assert_close(a / b.abs().max().clamp_min(1), b / b.abs().max().clamp_min(1), backward=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(*b, d) for b, d in cases("bias_gelu", "B", "D")])
def test_bias_gelu(backend, dtype, shape):
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], requires_grad=True)
    got = ops.bias_gelu(x, bias, backend=backend)
    want = reference.bias_gelu(x, bias.to(dtype))  # the op takes the bias in x's precision
    assert got.dtype == want.dtype == dtype
    assert_close(got, want)
    dy = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (x, bias), dy), torch.autograd.grad(want, (x, bias), dy)):
        assert g.dtype == w.dtype
        assert_close(g / w.abs().max(), w / w.abs().max(), backward=True)


def test_reference_bias_gelu_is_the_mlps_activation():
    x, bias = torch.randn(4, 9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    torch.testing.assert_close(reference.bias_gelu(x, bias), torch.nn.GELU()(x + bias))


def test_gradcheck_float64(every_backend):
    backend = every_backend
    n, L, d, k = 2, 8, 3, 3
    _, ids_keep, ids_restore, mask = masking_inputs(n, L, k)
    x = torch.randn(n, L, d, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(L, d, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ops.gather_visible(x, ids_keep, pos, backend=backend), (x,))
    xv = torch.randn(n, 1 + k, d, dtype=torch.float64, requires_grad=True)
    token = torch.randn(d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, t: ops.unshuffle_with_mask_token(x, ids_restore, t, backend=backend), (xv, token)
    )
    xk = torch.randn(n, k, d, dtype=torch.float64, requires_grad=True)
    cls, pos1 = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((d,), (1 + L, d)))
    assert torch.autograd.gradcheck(lambda *a: ops.encoder_input(a[0], ids_keep, *a[1:], backend=backend),
                                    (xk, cls, pos1))
    imgs = torch.randn(n, 2, 2, 4, dtype=torch.float64)
    pred = torch.randn(n, 2, 8, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    for norm_pix in (False, True):
        f = lambda pr: ops.masked_pixel_loss(pr, imgs, m, 2, norm_pix, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (pred,))
    x, branch = (torch.randn(3, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm(*a, 1e-5, backend=backend), (x, branch, w, b))
    assert torch.autograd.gradcheck(lambda x, b: ops.bias_gelu(x, b, backend=backend), (x, w))


def test_deterministic(every_backend):
    """The same inputs twice give bit-identical outputs and gradients."""
    backend = every_backend
    n, L, d, k = 3, 49, 40, 12
    noise, ids_keep, ids_restore, mask = masking_inputs(n, L, k)

    def run():
        torch.manual_seed(1)
        x = torch.randn(n, 1 + k, d, requires_grad=True)
        token = torch.randn(d, requires_grad=True)
        out = ops.unshuffle_with_mask_token(x, ids_restore, token, backend=backend)
        pred = torch.randn(n, L, 48, requires_grad=True)
        imgs = torch.randn(n, 3, 28, 28)
        loss = ops.masked_pixel_loss(pred, imgs, mask, 4, True, backend=backend)
        (out.sum() + loss).backward()
        return [*ops.random_masking(noise, k, backend=backend), out, loss, x.grad, token.grad, pred.grad]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# -- input validation (shared by every backend) ----------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.random_masking(torch.rand(2, 8), 9), "len_keep"),
        (lambda: ops.random_masking(torch.rand(8), 2), "noise"),
        (lambda: ops.random_masking(torch.arange(8).view(2, 4), 2), "noise"),
        (lambda: ops.gather_visible(torch.randn(2, 8), torch.zeros(2, 3, dtype=torch.long)), "x must be"),
        (lambda: ops.gather_visible(torch.randn(2, 8, 4), torch.zeros(3, 3, dtype=torch.long)), "ids_keep"),
        (lambda: ops.gather_visible(torch.randn(2, 8, 4), torch.zeros(2, 3, dtype=torch.int32)), "int64"),
        (lambda: ops.gather_visible(torch.randn(2, 8, 4), torch.zeros(2, 3, dtype=torch.long), torch.randn(9, 4)), "pos_embed"),
        (lambda: ops.unshuffle_with_mask_token(torch.randn(2, 10, 4), torch.zeros(2, 8, dtype=torch.long), torch.randn(4)), "rows"),
        (lambda: ops.unshuffle_with_mask_token(torch.randn(2, 3, 4), torch.zeros(2, 8, dtype=torch.long), torch.randn(5)), "mask_token"),
        (lambda: ops.masked_pixel_loss(torch.randn(1, 4, 48), torch.randn(1, 3, 8, 9), torch.ones(1, 4), 4, False), "not divisible"),
        (lambda: ops.masked_pixel_loss(torch.randn(1, 4, 47), torch.randn(1, 3, 8, 8), torch.ones(1, 4), 4, False), "pred"),
        (lambda: ops.masked_pixel_loss(torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8), torch.ones(1, 5), 4, False), "mask"),
        (lambda: ops.embed_visible_patches(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), torch.randn(4, 3, 3, 3), None), "not divisible"),
        (lambda: ops.embed_visible_patches(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), torch.randn(4, 1, 4, 4), None), "weight"),
        (lambda: ops.embed_visible_patches(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), torch.randn(4, 3, 4, 4), torch.randn(5)), "bias"),
        (lambda: ops.gather_visible(torch.randn(2, 8, 4), torch.zeros(2, 3, dtype=torch.long, device="meta")), "ids_keep is on meta"),
        (lambda: ops.unshuffle_with_mask_token(torch.randn(2, 3, 4), torch.zeros(2, 8, dtype=torch.long), torch.randn(4, device="meta")), "mask_token is on meta"),
        (lambda: ops.masked_pixel_loss(torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8, device="meta"), torch.ones(1, 4), 4, False), "imgs is on meta"),
        (lambda: ops.embed_visible_patches(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), torch.randn(4, 3, 4, 4, device="meta"), None), "weight is on meta"),
        (lambda: ops.embed_visible_patches(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), torch.randn(4, 3, 0, 0), None), "patch size must be positive"),
        (lambda: ops.add_layer_norm(torch.randn(2, 8), torch.randn(2, 7), None, None, 1e-6), "branch must be"),
        (lambda: ops.add_layer_norm(torch.randn(2, 8), None, torch.randn(7), None, 1e-6), "weight must be"),
        (lambda: ops.bias_gelu(torch.randn(2, 8), torch.randn(9)), "bias must be"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


BAD_INPUT_VALUES = {"norm_pix": True, "eps": 1e-6}


@pytest.mark.parametrize("op", list(SPECS))
def test_every_rule_of_the_spec_is_checked(op):
    """Each input of each op broken in turn (rank, dtype, every dimension a rule ties to another),
    from the op's spec: each call fails with an error that names the op and the input, and valid
    arguments pass."""
    spec = SPECS[op]
    call = getattr(ops, op)
    dims = spec.cases[0]
    call(*example_inputs(spec, dims, values=BAD_INPUT_VALUES))
    broken = list(bad_inputs(spec, dims))
    assert broken
    for what, args in broken:
        args = [BAD_INPUT_VALUES.get(p.name, a) for p, a in zip(spec.params, args)]
        with pytest.raises(ValueError, match=f"^{op}: ") as info:
            call(*args)
        assert any(p.name in str(info.value) for p in spec.params), (what, info.value)


@pytest.mark.parametrize("op", [op for op in SPECS if op != "attention"])  # attention: tests/test_attention.py
def test_outputs_are_as_the_spec_says(every_backend, op):
    """Every backend's outputs have the shapes and dtypes the op's spec gives (the fused backends'
    fake kernels come from the same specs: tests/test_kernels.py and test_native.py opcheck them)."""
    spec = SPECS[op]
    for case in spec.cases:
        for dtype in DTYPES:
            args = example_inputs(spec, case, dtype=dtype, values=BAD_INPUT_VALUES)
            out = getattr(ops, op)(*args, backend=every_backend)
            out = out if isinstance(out, tuple) else (out,)
            inputs = spec.bind(*args)
            assert [tuple(o.shape) for o in out] == spec.output_shapes(inputs)
            assert [o.dtype for o in out] == spec.output_dtypes(inputs)


def test_the_fused_specs_are_the_public_ones_where_shared():
    for name in ("random_masking", "gather_visible"):
        assert FUSED_SPECS[name] is SPECS[name]


def test_masked_pixel_loss_fp16_gradient_under_a_loss_scale(backend):
    """fp16 training (GradScaler): at MAE sizes d loss / d pred is ~1e-7 before the scale multiplies
    it, below fp16's normal range. The fused loss must apply the scale before rounding, as the
    reference's fp32 chain does, or it loses the small entries."""
    n, p = 64, 16
    L, K = 196, 49
    _, _, _, mask = masking_inputs(n, L, K)
    imgs = torch.randn(n, 3, 224, 224)
    pred = torch.randn(n, L, p * p * 3, dtype=torch.float16, requires_grad=True)
    scale = torch.tensor(65536.0)
    got = torch.autograd.grad(ops.masked_pixel_loss(pred, imgs, mask, p, True, backend=backend), pred, scale)[0]
    want = torch.autograd.grad(reference.masked_pixel_loss(pred, imgs, mask, p, True), pred, scale)[0]
    # nothing flushed to zero (entries at fp16's subnormal floor may round either way)
    assert ((got == 0) & (want.abs() > 1e-6)).sum() == 0
    assert_close(got / want.abs().max(), want / want.abs().max(), backward=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 / tiny: inf, as wanted
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masked_pixel_loss_backward_rounds_each_element_once(backend, g_dtype):
    """The loss's backward kernel: g * (2 * dloss / (P * max(msum, tiny))), the factor formed in fp32
    (fp64 for fp64) and each element rounded once to g's dtype, whatever ATen's rules for mixed
    dtypes on the device. Sizes no vector width divides, a transposed g, an empty batch; a loss
    scale; an fp16 factor below fp16's normal range (no scale); no removed patch (the count clamps
    to tiny); a NaN count stays NaN, as the reference's."""
    fused = fused_ops(backend)
    acc = torch.promote_types(g_dtype, torch.float32)
    gs = [torch.randn(3, 7, 75).to(g_dtype), torch.randn(2, 75, 9).to(g_dtype).transpose(1, 2),
          torch.randn(0, 7, 75).to(g_dtype)]
    for g in gs:
        for dloss, msum in [(1.0, 15.0), (65536.0, 37632.0), (1.0, 37632.0), (1.0, 0.0), (2.0, float("nan"))]:
            dloss, msum = torch.tensor(dloss, dtype=acc), torch.tensor(msum, dtype=acc)
            got = fused.masked_pixel_loss_backward(g, dloss, msum)
            factor = 2 * dloss / (msum.clamp_min(torch.finfo(acc).tiny) * g.shape[-1])
            want = (g.to(acc) * factor).to(g_dtype)
            if backend == "triton" and INTERPRET and g_dtype == torch.bfloat16:
                # the interpreter truncates to bf16 where a GPU rounds (tests/test_kernels.py reads the PTX)
                torch.testing.assert_close(got, want, rtol=2**-7, atol=0, equal_nan=True)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_fused_ops_have_first_derivatives_only(backend):
    """A second differentiation through a fused op raises, naming the problem, instead of silently
    giving no gradient (the reference, plain PyTorch, has them all)."""
    _, ids_keep, _, mask = masking_inputs(2, 16, 4)
    pred = torch.randn(2, 16, 48, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    loss = ops.masked_pixel_loss(pred, torch.randn(2, 3, 16, 16), mask, 4, True, backend=backend)
    with pytest.raises(RuntimeError, match="differentiate twice|no second derivative"):
        (dpred,) = torch.autograd.grad(loss, pred, scale, create_graph=True)
        dpred.sum().backward()
    x = torch.randn(2, 16, 8, requires_grad=True)
    out = ops.gather_visible(x, ids_keep, backend=backend)
    dout = torch.randn_like(out, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiate twice|no second derivative"):
        (dx,) = torch.autograd.grad(out, x, dout, create_graph=True)
        dx.sum().backward()


def test_loss_op_without_its_gradient_backpropagates_past_it(backend):
    """The loss's library op called with with_grad=False, in a graph that needs no gradient of pred:
    its backward has nothing to compute (it used to fail on the native backend's empty g)."""
    _, _, _, mask = masking_inputs(2, 16, 4)
    imgs = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss, _, _ = fused_ops(backend).masked_pixel_loss(torch.randn(2, 16, 48), imgs, mask, 4, True, False)
    (loss * 2).backward()
    assert imgs.grad is None


def test_masked_pixel_loss_backward_is_one_op(backend):
    """d loss / d pred is one op of the backend's library (one launch): not the few ATen ops that
    would scale g on the host's orders."""
    _, _, _, mask = masking_inputs(2, 16, 4)
    pred = torch.randn(2, 16, 48, dtype=torch.bfloat16, requires_grad=True)
    loss = ops.masked_pixel_loss(pred, torch.randn(2, 3, 16, 16), mask, 4, True, backend=backend)
    scale = torch.tensor(1024.0)
    with RecordOps() as record:
        torch.autograd.grad(loss, pred, scale)
    launched = [name for name in record.ops if name != "aten::detach"]  # a view: no launch
    assert [name.split("::")[1] for name in launched] == ["masked_pixel_loss_backward"], record.ops


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int64])
def test_a_boolean_or_integer_mask_is_taken_as_float(backend, dtype):
    n, c, p, h, w = 2, 3, 4, 16, 16
    _, _, _, mask = masking_inputs(n, 16, 4)
    pred, imgs = torch.randn(n, 16, 48, requires_grad=True), torch.randn(n, c, h, w)
    got = ops.masked_pixel_loss(pred, imgs, mask.to(dtype), p, True, backend=backend)
    assert_close(got, reference.masked_pixel_loss(pred, imgs, mask, p, True))
