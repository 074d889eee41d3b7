"""torch.compile traces the whole model without graph breaks, with every kernel backend, and the
compiled model's loss and gradients match eager (inductor on the CPU here)."""
import pytest
import torch

from fastmae.models import create_model
from fastmae.ops import registry
from fastmae.testing import assert_close


@pytest.mark.parametrize("kernels,attention", [("torch", "sdpa"), ("torch", "math"), ("triton", "sdpa"), ("native", "sdpa")])
def test_compiled_model_matches_eager(kernels, attention):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, norm_pix_loss=True,
                         kernel_backend=kernels, attention_backend=attention).to(device)
    imgs, noise = torch.randn(2, 3, 32, 32, device=device), torch.rand(2, 64, device=device)

    def loss_and_grads(m):
        model.zero_grad()
        loss, pred, mask = m(imgs, noise=noise)
        loss.backward()
        return [loss, pred, mask] + [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager = loss_and_grads(model)
    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True))  # fullgraph: a graph break is an error
    for c, e in zip(compiled, eager):
        assert_close(c, e, backward=True)


@pytest.mark.parametrize("kernels,attention", [("triton", "sdpa"), ("torch", "sdpa_flash")])
def test_a_new_batch_size_compiles_without_a_break(kernels, attention, monkeypatch):
    """A backend that may refuse some inputs is chosen per input class, from the dims its limits
    read: the batch size is not one, so a second batch size (dynamic after the first recompile)
    traces without a graph break. Nothing is known before tracing (a fresh process): the tracer
    itself asks which dims the backends read (once, a constant to it, not a guard on their tables)."""
    for backend in (b for family in ("kernels", "attention") for b in registry.BACKENDS[family]):
        monkeypatch.setattr(backend, "_limited", None)
    monkeypatch.setattr(registry, "_limit_dims", {})
    monkeypatch.setattr(registry, "_chosen", {})
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, kernel_backend=kernels,
                         attention_backend=attention)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for n in (2, 3, 4):
        loss, _, _ = compiled(torch.randn(n, 3, 32, 32), noise=torch.rand(n, 64))
        loss.backward()


@pytest.mark.parametrize("kernels,attention", [("native", "sdpa"), ("torch", "sdpa_flash")])
def test_every_size_dynamic_compiles_without_a_break(kernels, attention):
    """With ``dynamic=True`` the image, patch and sequence sizes are symbolic too; the dims that the
    backends' limits read are specialized (with guards) where the backend is chosen, instead of
    breaking the graph there."""
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, norm_pix_loss=True,
                         kernel_backend=kernels, attention_backend=attention)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    eager, _, _ = model(imgs, noise=noise)
    torch._dynamo.reset()
    compiled, _, _ = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")(imgs, noise=noise)
    compiled.backward()
    assert_close(compiled, eager)
