import os
import pathlib

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU under the interpreter, which must be switched on
# before triton is imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmae.testing import backend_cases  # noqa: E402

# Full-precision fp32 references: TF32 (cuDNN's default for convolutions on Ampere and later) would
# leave the reference ~1e-3 off the fp32 result the kernels compute.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

SHARED = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared"
FIXTURES = SHARED / "fixtures"


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=["plain", "normpix"])
def official(request):
    """The original implementation's outputs for a tiny configuration (see ../shared/DESIGN.md)."""
    path = FIXTURES / f"official_tiny_{request.param}.pt"
    if not path.exists():
        pytest.fail(f"parity fixture missing: {path} (expected ../shared/fixtures beside the repository)")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(params=backend_cases("kernels", with_reference=False))
def backend(request):
    """Each fused kernel backend (compared with the reference) on each device it runs on here;
    tensors are created on that device."""
    name, device = request.param
    with torch.device(device):
        yield name


@pytest.fixture(params=backend_cases("kernels"))
def every_backend(request):
    """Each kernel backend, the reference included (for properties each must have on its own:
    gradients against finite differences, determinism)."""
    name, device = request.param
    with torch.device(device):
        yield name


@pytest.fixture(params=backend_cases("kernels", only="triton"))
def triton_device(request):
    """The devices the Triton kernels run on here (the interpreter on a CPU-only machine)."""
    name, device = request.param
    with torch.device(device):
        yield device


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _same_threads():
    """A test that changes torch's thread count must not change later tests' float rounding."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poison_empty(monkeypatch):
    """Freshly allocated tensors come filled with NaN (floats) or -1 (integers), so that a kernel
    that forgets to write part of its output fails the comparison. The native kernels allocate in
    C++ (``at::empty``): PyTorch's own filling of uninitialized memory (NaN, or the integer maximum)
    reaches those; it works only with deterministic algorithms on (warnings only, here)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
