"""Backend selection: argument, then environment, then automatic; explicit requests that cannot
run raise and say why."""
import logging
import subprocess
import sys

import pytest
import torch

from fastmae import ops
from fastmae.ops import registry
from fastmae.ops.spec import Inputs


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("FASTMAE_KERNELS", raising=False)
    monkeypatch.delenv("FASTMAE_ATTENTION", raising=False)
    monkeypatch.setattr(registry, "_resolved", {})
    monkeypatch.setattr(registry, "_chosen", {})


def test_automatic_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="fastmae"):
        assert ops.resolve("attention", None, "cpu") == "sdpa"
    assert "attention backend on cpu: sdpa (automatic" in caplog.text


def test_environment_selects(monkeypatch):
    monkeypatch.setenv("FASTMAE_ATTENTION", "math")
    assert ops.resolve("attention", None, "cpu") == "math"
    assert ops.resolve("attention", "sdpa", "cpu") == "sdpa"  # the argument wins


def test_unknown_backend_lists_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown kernels backend 'nope'.*torch"):
        ops.resolve("kernels", "nope", "cpu")
    monkeypatch.setenv("FASTMAE_KERNELS", "nope")
    with pytest.raises(ValueError, match="unknown kernels backend 'nope'"):
        ops.gather_visible(torch.randn(1, 4, 2), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_explicit_request_that_cannot_run_raises(monkeypatch):
    with pytest.raises(ops.BackendUnavailableError, match="'torch' was requested.*no CUDA device"):
        ops.resolve("kernels", "torch", "cuda")
    monkeypatch.setenv("FASTMAE_ATTENTION", "math")
    with pytest.raises(ops.BackendUnavailableError, match="environment variable FASTMAE_ATTENTION"):
        ops.resolve("attention", None, "cuda")


def test_unimportable_backend_reports_the_import_error(monkeypatch):
    broken = registry._backend("broken", "fastmae.no_such_module", auto_devices=("*",))
    monkeypatch.setitem(registry.BACKENDS, "kernels", (broken, *registry.BACKENDS["kernels"]))
    with pytest.raises(ops.BackendUnavailableError, match="cannot import fastmae.no_such_module"):
        ops.resolve("kernels", "broken", "cpu")
    assert ops.resolve("kernels", None, "cpu") == "torch"  # automatic skips it quietly


def test_a_missing_kernels_package_says_how_to_restore_it(monkeypatch):
    """A copy of the checkout that lost the link fastmae/kernels -> kernels/ cannot import
    fastmae.kernels: the reason says what to do."""
    def no_kernels(name):
        raise ModuleNotFoundError(f"No module named {name.rsplit('.', 1)[0]!r}", name="fastmae.kernels")

    monkeypatch.setattr(registry.importlib, "import_module", no_kernels)
    backend = registry._backend("triton", "fastmae.ops.triton_backend", auto_devices=("cuda",))
    assert "ln -s ../kernels fastmae/kernels" in backend.unavailable_reasons("cuda")[0]


def test_switching_the_backend_switches_the_model(monkeypatch):
    from fastmae.models import create_model

    calls = []
    math_module = registry._find("attention", "math").module
    math_attention = math_module.attention
    monkeypatch.setattr(math_module, "attention", lambda *a: calls.append(1) or math_attention(*a))
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, attention_backend="math")
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 2  # one encoder block, one decoder block


def test_every_backend_defines_its_familys_ops():
    for family, backends in registry.BACKENDS.items():
        for b in backends:
            assert b.module is not None, b.import_error
            assert all(callable(getattr(b.module, op, None)) for op in registry.OPS[family]), b.name


def test_availability_report_runs():
    out = subprocess.run([sys.executable, "-m", "fastmae.ops"], capture_output=True, text=True, check=True).stdout
    assert "kernels:" in out and "attention:" in out and "automatic on cpu: torch" in out
    if not torch.cuda.is_available():
        assert "adamw           cuda  no: no CUDA device is available" in out


def test_the_native_backends_old_name_is_refused_with_its_new_one(monkeypatch, capsys):
    from fastmae.pretrain import cli

    with pytest.raises(ValueError, match="'cuda' is now named 'native'"):
        ops.random_masking(torch.rand(2, 8), 2, backend="cuda")
    monkeypatch.setenv("FASTMAE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="'cuda' is now named 'native'"):
        ops.random_masking(torch.rand(2, 8), 2)
    with pytest.raises(SystemExit):
        cli(["--kernels", "cuda"])
    assert "'cuda' is now named 'native'" in capsys.readouterr().err


def test_apex_is_never_chosen_automatically(monkeypatch):
    """Installed, apex changes nothing until named (its LayerNorm rounds otherwise and breaks
    torch.compile's graph)."""
    from fastmae.ops import norm_backends

    monkeypatch.setattr(norm_backends, "FusedLayerNorm", torch.nn.LayerNorm)  # a stand-in: "installed"
    monkeypatch.setattr(registry, "_resolved", {})
    monkeypatch.delenv("FASTMAE_NORM", raising=False)
    assert ops.resolve("norm", None, "cpu") == "torch"
    assert ops.resolve("norm", "apex", "cpu") == "apex"


def test_importing_the_models_loads_no_backend_and_builds_nothing():
    """Backends load when asked for: import fastmae.models pulls in neither triton (nor torch's
    compiler, which imports it), nor a backend's module, nor the checkpoint files' layer."""
    code = ("import sys, fastmae.models; loaded = [m for m in ('triton', 'torch._dynamo', 'fastmae.kernels', "
            "'fastmae.ops.native', 'fastmae.ops.attention_xformers', 'fastmae.checkpoint') if m in sys.modules]; "
            "print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _triton_first_on_cpu(monkeypatch):
    """Automatic selection as on a GPU, on this CPU (Triton under the interpreter; see conftest.py)."""
    triton = registry._find("kernels", "triton")
    if triton.unavailable_reasons("cpu"):
        pytest.fail(f"the Triton backend must run here: {triton.unavailable_reasons('cpu')}")
    rows = tuple(registry.Backend(b.name, b.module_name, ("*",), b.options) if b.name == "triton" else b
                 for b in registry.BACKENDS["kernels"])
    monkeypatch.setitem(registry.BACKENDS, "kernels", rows)


def test_automatic_dispatch_looks_at_the_inputs(monkeypatch, caplog):
    """The backend the family chose runs the inputs it takes; inputs it refuses go to the next that
    takes them (logged), and each input class is decided once."""
    _triton_first_on_cpu(monkeypatch)
    noise = torch.rand(2, 8)
    key = ops.spec.SPECS["random_masking"].bind(noise, 2).key(registry.limit_dims("kernels", "random_masking"))
    assert registry.choose("kernels", None, key) == "triton"
    with caplog.at_level(logging.INFO, logger="fastmae"):
        got = ops.random_masking(noise.double(), 2)
    # (the native backend is automatic on CUDA only)
    assert "random_masking on cpu: torch for these inputs (triton: the Triton random_masking sorts 32-bit keys" in caplog.text
    for g, w in zip(got, ops.reference.random_masking(noise.double(), 2)):
        assert torch.equal(g, w)
    assert len(registry._chosen) == 2
    ops.random_masking(noise.double(), 2)
    ops.random_masking(torch.rand(5, 8, dtype=torch.float64), 2)  # another batch: the same input class
    assert len(registry._chosen) == 2


def test_an_explicit_backend_that_refuses_the_inputs_names_why(monkeypatch):
    monkeypatch.setenv("FASTMAE_KERNELS", "triton")
    with pytest.raises(ops.BackendUnavailableError, match=r"'triton' was requested \(environment variable "
                       r"FASTMAE_KERNELS\) but cannot take these random_masking inputs: .*float64 noise.*"
                       r"dtypes noise=float64, L=8\)"):
        ops.random_masking(torch.rand(2, 8, dtype=torch.float64), 2)


def test_native_cuda_limits_are_declared():
    """What the native CUDA kernels cannot take is known before a launch (and automatic selection
    passes over them), from the inputs' dims alone."""
    native = registry._find("kernels", "native")
    long_rows = Inputs("random_masking", "cuda", dims={"N": 2, "L": 20000, "K": 5}, dtypes={"noise": torch.float32})
    assert "shared memory" in native.not_supported_reasons("random_masking", long_rows)[0]
    assert not native.not_supported_reasons("random_masking", Inputs(
        "random_masking", "cuda", dims={"N": 2, "L": 196, "K": 49}, dtypes={"noise": torch.float32}))
    big_patches = Inputs("masked_pixel_loss", "cuda", dims={"N": 1, "C": 3, "H": 128, "W": 128, "p": 64}, dtypes={})
    assert "C*p*p=12288" in native.not_supported_reasons("masked_pixel_loss", big_patches)[0]
    assert not native.not_supported_reasons("masked_pixel_loss", Inputs(
        "masked_pixel_loss", "cuda", dims={"N": 1, "C": 3, "H": 96, "W": 96, "p": 48}, dtypes={}))
    assert not native.not_supported_reasons("random_masking", Inputs(
        "random_masking", "cpu", dims={"N": 2, "L": 20000, "K": 5}, dtypes={"noise": torch.float32}))


def test_the_kernels_import_nothing_above_them():
    """kernels/ is the bottom layer (the triton backend in fastmae.ops puts it behind the op
    interface): it imports only itself and fastmae's leaf modules."""
    import ast
    import pathlib

    allowed = ("fastmae.kernels", "fastmae.errors", "fastmae.numerics")
    for path in (pathlib.Path(__file__).parents[1] / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                assert not name.startswith("fastmae") or name.startswith(allowed), f"{path.name} imports {name}"
