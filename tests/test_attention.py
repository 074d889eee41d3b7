"""Every attention backend against the explicit-softmax reference (``math``)."""
import functools

import pytest
import torch

from fastmae import ops
from fastmae.ops.spec import Inputs
from fastmae.testing import assert_close, backend_cases

# PyTorch's flash and cuDNN kernels take fp16/bf16 only on CUDA
NO_FP32 = {("sdpa_flash", "cuda"), ("sdpa_cudnn", "cuda")}


@pytest.fixture(params=[c for c in backend_cases("attention") if c.values[0][0] != "math"])
def attention_case(request):
    name, device = request.param
    with torch.device(device):
        yield name, device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,head_dim", [(50, 64), (197, 64), (257, 80)])
def test_matches_math(attention_case, dtype, n, head_dim):
    name, device = attention_case
    if dtype == torch.float32 and (name, device) in NO_FP32:
        pytest.skip(f"{name} takes no fp32 on {device}")
    q, k, v = (torch.randn(2, 3, n, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
    got = ops.attention(q, k, v, backend=name)
    want = ops.attention(q, k, v, backend="math")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want)
    dy = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dy), torch.autograd.grad(want, (q, k, v), dy)):
        assert_close(g, w, backward=True)


def test_mask_and_dropout_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="MAE uses neither"):
        ops.attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="no dropout"):
        ops.attention(q, q, q, dropout_p=0.1)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"attention: v must be \[B=1, heads=2, S=3, head_dim=4\], got \(1, 2, 4, 4\)"):
        ops.attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU messages")
def test_cuda_only_kernels_say_so():
    for name, message in [("sdpa_efficient", "CUDA only"), ("sdpa_cudnn", "CUDA only"), ("xformers", "xformers")]:
        with pytest.raises(ops.BackendUnavailableError, match=message):
            ops.resolve("attention", name, "cpu")


def test_a_pinned_kernel_is_the_only_one_enabled_and_the_flags_come_back(monkeypatch):
    from fastmae.ops import attention_sdpa

    seen = {}
    real = attention_sdpa.F.scaled_dot_product_attention

    def spy(q, k, v):
        seen.update({name: getter() for name, (getter, _) in attention_sdpa._FLAGS.items()})
        return real(q, k, v)

    monkeypatch.setattr(attention_sdpa.F, "scaled_dot_product_attention", spy)
    before = {name: getter() for name, (getter, _) in attention_sdpa._FLAGS.items()}
    q = torch.randn(1, 2, 4, 8)
    ops.attention(q, q, q, backend="sdpa_flash")
    assert [name for name, enabled in seen.items() if enabled] == ["flash"]
    assert {name: getter() for name, (getter, _) in attention_sdpa._FLAGS.items()} == before


def test_a_layer_resolves_its_backend_once(monkeypatch):
    from fastmae.models.layers import Attention

    calls = []
    real = ops.attention_function
    monkeypatch.setattr(ops, "attention_function", lambda *a: calls.append(a) or real(*a))
    layer = Attention(16, 2, attention_backend="math")
    x = torch.randn(2, 5, 16)
    layer(x)
    layer(x)
    assert calls == [("math", "cpu")]
    layer.attention_backend = "sdpa"  # a new backend is resolved anew
    layer(x)
    assert calls[-1] == ("sdpa", "cpu")


def test_pinned_kernels_declare_what_they_take():
    """PyTorch's flash and cuDNN kernels take fp16/bf16 on CUDA: pinned, an fp32 input is refused
    with that reason before PyTorch sees it; a layer with a pinned kernel checks each call."""
    from fastmae.models.layers import Attention
    from fastmae.ops import registry

    flash = registry._find("attention", "sdpa_flash")
    dims = {"B": 1, "heads": 2, "S": 4, "head_dim": 64}
    fp32 = Inputs("attention", "cuda", dims, {n: torch.float32 for n in "qkv"})
    assert "float16 or bfloat16" in flash.not_supported_reasons("attention", fp32)[0]
    bf16 = Inputs("attention", "cuda", dims, {n: torch.bfloat16 for n in "qkv"})
    assert not flash.not_supported_reasons("attention", bf16)
    assert not flash.not_supported_reasons("attention", Inputs("attention", "cpu", dims, fp32.dtypes))
    layer = Attention(16, 2, attention_backend="sdpa_flash")
    assert layer.attention_function("cpu").func is ops.attention  # checked per call
    for name in ("math", "sdpa"):  # nothing to check: called directly
        assert not isinstance(Attention(16, 2, attention_backend=name).attention_function("cpu"), functools.partial)


def test_under_autocast_the_input_class_is_the_autocast_dtype():
    """SDPA under autocast runs in the autocast dtype: a pinned half-only kernel takes fp32 inputs
    there (their input class is what the kernel sees)."""
    from fastmae.ops import registry
    from fastmae.ops.spec import SPECS

    q = torch.randn(1, 2, 4, 8)
    inputs = SPECS["attention"].bind(q, q, q).under_autocast(torch.bfloat16)
    assert set(inputs.dtypes.values()) == {torch.bfloat16}
    flash = registry._find("attention", "sdpa_flash")
    assert not flash.not_supported_reasons("attention", Inputs.from_key(
        ("attention", "cuda", tuple(inputs.dtypes.items()), ())))
