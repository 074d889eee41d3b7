"""The native backend (``cuda``, csrc/): its build, registration (opcheck, torch.compile) and its own
behaviour. Numerical agreement with the reference, forward and backward, is in test_ops.py, which
runs every test for each backend that can run here: the native CPU kernels on a CPU-only machine,
and its CUDA kernels too on a GPU. The model's parity with the original on it is in test_parity.py.

The CPU library is built (once, into the extension cache) when the backends are listed at
collection; the CUDA library is compiled here for sm_80 and sm_90 in a separate process (minutes).
"""
import contextlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastmae import ops
from fastmae.ops import fused, native, reference, registry
from fastmae.ops.native import build
from fastmae.testing import assert_close, backend_cases, fused_opcheck_args, fused_opcheck_cases

f = torch.ops.fastmae_native


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """The native kernels of each device here, loaded; a library that cannot be built fails the test."""
    reasons = native.unavailable_reasons(request.param) or native.prepare(request.param)
    assert not reasons, reasons
    with torch.device(request.param):
        yield request.param


def masking(n, L, k):
    return reference.random_masking(torch.rand(n, L), k)


# -- build and selection ----------------------------------------------------------------------------

def test_cpu_library_builds_and_is_tested_with_the_others():
    assert native.unavailable_reasons("cpu") == []
    assert ("native", "cpu") in [case.values[0] for case in backend_cases("kernels")]  # so test_ops.py runs it


def test_automatic_choice_never_takes_it_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTMAE_KERNELS", raising=False)
    monkeypatch.setattr(registry, "_resolved", {})
    assert ops.resolve("kernels", None, "cpu") == "torch"
    assert ops.resolve("kernels", "native", "cpu") == "native"


def test_asking_whether_it_can_run_builds_nothing(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("built")

    monkeypatch.setattr(native, "build_and_load", no_build)
    monkeypatch.setattr(native, "_load_errors", {})
    assert native.unavailable_reasons("cpu") == []  # the tools are here; nothing built
    monkeypatch.setattr(build.shutil, "which", lambda name: None if name == "ninja" else "/usr/bin/" + name)
    assert native.unavailable_reasons("cpu") == ["ninja is not installed (pip install ninja)"]


def test_a_failed_build_is_the_reason(monkeypatch):
    monkeypatch.setattr(registry, "_resolved", {})
    monkeypatch.setattr(native, "load", lambda target, verbose=False: f"building {target}: compiler exploded")
    assert native.prepare("cpu") == ["building cpu: compiler exploded"]
    with pytest.raises(ops.BackendUnavailableError, match="'native' was requested.*compiler exploded"):
        ops.gather_visible(torch.randn(1, 4, 2), torch.zeros(1, 2, dtype=torch.long), backend="native")


def test_a_killed_builds_lock_file_does_not_hang_the_next_load(tmp_path, caplog):
    """torch 2.11's build holds a lock file whose existence blocks every other load; a builder
    killed while holding it (SIGKILL here, a preempted job's SIGTERM alike) left it, and the next load
    waited forever. fastmae's own lock around the build dies with its holder, whose pid it names, and
    torch's is cleared."""
    from types import SimpleNamespace

    from torch.utils.file_baton import FileBaton

    old_torch = SimpleNamespace(FileBaton=FileBaton)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, sys, time, types\n"
        "from fastmae.ops.native.build import _no_stale_lock\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "with _no_stale_lock(d, types.SimpleNamespace(FileBaton=None)):\n"
        "    (d / 'lock').touch()\n"  # torch's, taken by the build this process runs
        "    print('building', flush=True)\n"
        "    time.sleep(120)\n"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "building\n"
    holder.kill()
    holder.wait()
    with build._no_stale_lock(tmp_path, old_torch):
        assert FileBaton(str(tmp_path / "lock")).try_acquire()  # torch's first step, where it would wait
    assert "left by a build that was killed" in caplog.text


@pytest.mark.parametrize("owner", ["this host, alive", "another host"])
def test_a_build_lock_that_may_be_live_is_left_alone(tmp_path, caplog, owner):
    """torch's lock file is removed only when fastmae.lock's last holder is a process of this host
    that is gone: another node's build (a shared cache on a file system whose flock is per node) or a
    live process may still be building."""
    import socket
    from types import SimpleNamespace

    from torch.utils.file_baton import FileBaton

    host, pid = (socket.gethostname(), os.getpid()) if owner == "this host, alive" else ("elsewhere-node-7", 1234)
    (tmp_path / "fastmae.lock").write_text(f"{host} {pid}\n")
    (tmp_path / "lock").touch()
    with build._no_stale_lock(tmp_path, SimpleNamespace(FileBaton=FileBaton)):
        assert (tmp_path / "lock").exists()
    assert f"waiting for torch's build lock {tmp_path / 'lock'} (last taken by {host} {pid})" in caplog.text


def test_a_file_system_without_locks_builds_as_before(monkeypatch, tmp_path, caplog):
    import fcntl
    from types import SimpleNamespace

    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with build._no_stale_lock(tmp_path, SimpleNamespace(FileBaton=None)):
        entered = True
    assert entered and "cannot lock" in caplog.text


def test_a_wrong_cuda_home_is_named(monkeypatch, tmp_path):
    if not torch.version.cuda:
        pytest.skip("this PyTorch has no CUDA")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(build.BuildError, match=f"{tmp_path}: no bin/nvcc"):
        build.find_cuda_home()


def test_cuda_architectures(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0+PTX")
    assert build.cuda_archs() == ["8.0", "9.0+PTX"]
    assert build._gencode_flags(build.cuda_archs()) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert build.cuda_library_name(["8.0", "9.0"]) == "fastmae_native_cuda_sm80_sm90"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    if not torch.cuda.is_available():
        assert build.cuda_archs() == ["8.0", "9.0"]
    with pytest.raises(build.BuildError, match="'Ampere'"):
        build._gencode_flags(["Ampere"])


@pytest.fixture(scope="module")
def cuda_library():
    """nvcc compiles the CUDA kernels for sm_80 and sm_90 and the library loads, GPU or not (minutes
    on 2 cores the first time; cached after), in a fresh process. CUDA_HOME is left to the toolkit
    search. -> (its report, its build folder)"""
    if not torch.version.cuda:
        pytest.skip("this PyTorch has no CUDA")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    result = subprocess.run([sys.executable, "-m", "fastmae.ops.native", "--cuda"], env=env, capture_output=True,
                            text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout, build.build_root() / build.cuda_library_name(["8.0", "9.0"])


@pytest.mark.slow
def test_cuda_library_compiles_for_a100_and_h100_and_loads(cuda_library):
    report, _ = cuda_library
    assert "CUDA library fastmae_native_cuda_sm80_sm90 for 8.0;9.0: loaded" in report
    for op in native.OP_NAMES:
        assert f"fastmae_native::{op}: CPU, CUDA\n" in report


@pytest.mark.slow
def test_cuda_kernels_move_rows_in_16_byte_vectors(cuda_library, tmp_path):
    """Read from the sm_90 PTX: every kernel instantiation that moves rows in V-element vectors (its
    last template argument) loads and stores 16 bytes at a time; the loss moves bf16 ``pred`` and its
    gradient so (its fp32 image is gathered 4 bytes at a time), as does its backward's scale."""
    _, build_dir = cuda_library
    script = pathlib.Path(__file__).with_name("compile_native_for_gpus.py")
    out = tmp_path / "widths.json"
    result = subprocess.run([sys.executable, str(script), str(build_dir), "--json", str(out)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = json.loads(out.read_text())
    wide = [r for r in rows if r["args"] and r["args"][-1].isdigit() and int(r["args"][-1]) > 1]
    assert {r["kernel"] for r in wide} >= {"gather_rows_kernel", "scatter_rows_kernel", "gather_patches_kernel",
                                          "encoder_input_kernel", "unshuffle_kernel", "unshuffle_backward_kernel",
                                          "masked_pixel_loss_kernel", "scale_loss_grad_kernel"}
    for r in wide:
        assert max(map(int, r["ld"])) == 16 and max(map(int, r["st"])) == 16, r
    (loss,) = [r for r in wide if r["kernel"] == "masked_pixel_loss_kernel" and r["args"][:2] == ["c10::BFloat16", "float"]]
    assert min(map(int, loss["ld"])) == 4 and set(map(int, loss["st"])) == {4, 16}, loss  # 4: the block's partial sum


# -- registration ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,variant", fused_opcheck_cases())
def test_opcheck(device, name, variant):
    torch.library.opcheck(getattr(native.OPS, name), fused_opcheck_args(name, variant, noise_dtype=torch.float64))


# -- the native kernels' own behaviour ---------------------------------------------------------------

def test_reductions_do_not_depend_on_the_thread_count():
    """The CPU kernels sum fixed chunks of rows, then the chunks in order."""
    n, L, d, k = 4, 196, 40, 49
    _, ids_restore, mask = masking(n, L, k)
    x = torch.randn(n, 1 + k, d, requires_grad=True)
    token = torch.randn(d, requires_grad=True)
    pred, imgs = torch.randn(n, L, 48, requires_grad=True), torch.randn(n, 3, 56, 56)
    dy = torch.randn(n, L + 1, d)

    def run(threads):
        torch.set_num_threads(threads)
        out = ops.unshuffle_with_mask_token(x, ids_restore, token, backend="native")
        loss = ops.masked_pixel_loss(pred, imgs, mask, 4, True, backend="native")
        return [loss, *torch.autograd.grad((out * dy).sum() + loss, (x, token, pred))]

    for a, b in zip(run(1), run(2)):
        assert torch.equal(a, b)


def test_autograd_is_the_librarys_own(device):
    """Each differentiable op's backward is a C++ autograd node of the library: no Python runs
    between the kernels of a native op's forward and backward."""
    ids_keep, ids_restore, mask = masking(2, 16, 4)
    ids_keep, ids_restore, mask = ids_keep.to(device), ids_restore.to(device), mask.to(device)
    x = torch.randn(2, 16, 8, device=device, requires_grad=True)
    imgs = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    outs = {
        "GatherVisible": ops.gather_visible(x, ids_keep, backend="native"),
        "GatherPatches": native.OPS.gather_patches(imgs, ids_keep, 4, imgs.dtype),
        "EncoderInput": ops.encoder_input(x[:, :4], ids_keep, x[0, :1], x[0], backend="native"),
        "Unshuffle": ops.unshuffle_with_mask_token(x[:, :5], ids_restore, x[0, 0], None, backend="native"),
        "MaskedPixelLoss": ops.masked_pixel_loss(x.repeat(1, 1, 6), imgs.detach(), mask, 4, True, backend="native"),
    }
    for name, out in outs.items():
        assert out.grad_fn.name().startswith("torch::autograd::CppNode<") and f"::{name}>" in out.grad_fn.name()


class FormulaContext:
    """What torch.library hands a Python autograd formula."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        self.materialize_grads = value


def autograd_cases(device):
    """(op, its arguments, which of them are differentiable, the gradient of its first output)"""
    n, L, k, d, p = 3, 16, 5, 24, 4
    ids_keep, ids_restore, mask = (t.to(device) for t in masking(n, L, k))
    imgs = torch.randn(n, 3, 16, 16)
    for x_dtype, param_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                 (torch.float16, torch.float64)]:
        x, pos = torch.randn(n, L, d, dtype=x_dtype), torch.randn(L, d, dtype=param_dtype)
        acc_dtype = torch.promote_types(param_dtype, torch.float32)  # the loss's
        visible, pos1 = torch.randn(n, k, d, dtype=x_dtype), torch.randn(L + 1, d, dtype=param_dtype)
        latent, token = torch.randn(n, 1 + k, d, dtype=x_dtype), torch.randn(d, dtype=param_dtype)
        # upstream gradients laid out as a transpose leaves them: not contiguous
        dy = torch.randn(d, k, n).permute(2, 1, 0).to(torch.promote_types(x_dtype, param_dtype))
        dy1 = torch.randn(d, k + 1, n).permute(2, 1, 0).to(dy.dtype)
        dyL = torch.randn(d, L + 1, n).permute(2, 1, 0).to(dy.dtype)
        yield "gather_visible", [x, ids_keep, pos], [0, 2], dy
        yield "gather_visible", [x, ids_keep, None], [0], dy.to(x_dtype)
        yield "encoder_input", [visible, ids_keep, torch.randn(d, dtype=param_dtype), pos1], [0, 2, 3], dy1
        yield "unshuffle", [latent, ids_restore, token, pos1], [0, 2, 3], dyL
        yield "unshuffle", [latent, ids_restore, token, None], [0, 2], dyL
        dpatches = torch.randn(n, k, 3 * p * p, dtype=x_dtype)
        yield "gather_patches", [imgs.to(param_dtype), ids_keep, p, x_dtype], [0], dpatches
        pred, loss_scale = torch.randn(n, L, 3 * p * p, dtype=x_dtype), torch.tensor(1024.0, dtype=acc_dtype)
        yield "masked_pixel_loss", [pred, imgs.to(param_dtype), mask, p, True, True], [0], loss_scale


def test_autograd_is_the_python_formulas_bit_for_bit(device):
    """The library's C++ autograd and the Python formulas that the Triton backend registers
    (fastmae/ops/fused.py), both run on the native kernels, give the same bits: for every subset of
    the differentiable inputs, dtype mixes, without pos_embed, with non-contiguous upstream gradients."""
    formulas = {op: (backward, setup) for op, backward, setup in fused.autograd_formulas(native.OPS)}
    for name, args, differentiable, dout in autograd_cases(device):
        op = getattr(native.OPS, name)
        backward, setup = formulas[op]
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        for needed in range(1, 2 ** len(differentiable)):
            needs = [i in differentiable and bool(needed >> differentiable.index(i) & 1) for i in range(len(args))]
            leaves = [a.detach().requires_grad_(need) if need else a for a, need in zip(args, needs)]
            out = op(*leaves)
            first = out[0] if isinstance(out, tuple) else out
            wanted = [t for t, need in zip(leaves, needs) if need]
            got = torch.autograd.grad(first, wanted, dout.to(device))
            with torch.no_grad():
                ctx = FormulaContext(tuple(needs))
                setup(ctx, tuple(args), op(*args))
                extra = (None, None) if isinstance(out, tuple) else ()
                want = [g for g, need in zip(backward(ctx, dout.to(device), *extra), needs) if need]
            for g, w, leaf in zip(got, want, wanted):
                assert torch.equal(g, w.to(leaf.dtype)), (name, needs, leaf.dtype)


def test_compiled_autograd_traces_the_librarys_autograd(device):
    """The C++ functions leave no state that compiled autograd refuses (it asserts that a function
    marks no output non-differentiable)."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    ids_keep, ids_restore, mask = (t.to(device) for t in masking(2, 16, 5))
    x, pos, token = torch.randn(2, 16, 8), torch.randn(16, 8), torch.randn(8)
    pred, imgs = torch.randn(2, 16, 48), torch.randn(2, 3, 16, 16)

    def grads(enable):
        leaves = [t.to(device).requires_grad_() for t in (x, pos, token, pred)]
        with enable():
            h = ops.gather_visible(leaves[0], ids_keep, leaves[1], backend="native")
            u = ops.unshuffle_with_mask_token(torch.cat([h[:, :1], h], 1), ids_restore, leaves[2], None,
                                              backend="native")
            loss = ops.masked_pixel_loss(leaves[3], imgs.to(device), mask, 4, True, backend="native")
            (u.square().sum() + loss).backward()
        return [t.grad for t in leaves]

    eager = grads(contextlib.nullcontext)
    compiled = grads(lambda: compiled_autograd._enable(torch.compile(backend="aot_eager")))
    for a, b in zip(compiled, eager):
        assert_close(a, b, backward=True)


def test_loss_does_not_read_kept_patches(device):
    pred, imgs = torch.randn(2, 16, 48), torch.randn(2, 3, 16, 16)
    _, _, mask = masking(2, 16, 4)
    pred[mask == 0] = float("nan")
    pred.requires_grad_()
    loss = ops.masked_pixel_loss(pred, imgs, mask, 4, True, backend="native")
    loss.backward()
    clean = pred.detach().nan_to_num().requires_grad_()
    assert_close(loss, reference.masked_pixel_loss(clean, imgs, mask, 4, True))
    assert torch.all(pred.grad[mask == 0] == 0)


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, requires_grad=True)
    token = torch.randn(4, requires_grad=True)
    out = ops.unshuffle_with_mask_token(x, torch.zeros(0, 8, dtype=torch.long), token, backend="native")
    assert out.shape == (0, 9, 4)
    dx, dtoken = torch.autograd.grad(out.sum(), (x, token))
    assert dx.shape == (0, 3, 4) and torch.equal(dtoken, torch.zeros(4))


def test_out_of_range_indices_raise():
    x = torch.randn(1, 4, 2)
    with pytest.raises(RuntimeError, match="outside"):
        ops.gather_visible(x, torch.tensor([[0, 4]]), backend="native")
    with pytest.raises(RuntimeError, match="outside"):
        ids_restore = torch.tensor([[0, 1, 2, 7]])
        ops.unshuffle_with_mask_token(torch.randn(1, 2, 2), ids_restore, torch.randn(2), backend="native")


def test_masking_takes_float64_noise(device):
    noise = torch.rand(3, 49, dtype=torch.float64)
    noise[:, 10] = noise[:, 20]  # a tie, broken by position
    for got, want in zip(ops.random_masking(noise, 12, backend="native"), reference.random_masking(noise, 12)):
        assert torch.equal(got, want)


@pytest.mark.cuda
def test_unaligned_rows_on_gpu():
    """Rows that cannot be read as 16-byte vectors (odd width, offset views) take the scalar path."""
    with torch.device("cuda"):
        n, L, K = 3, 49, 12
        ids_keep, ids_restore, _ = reference.random_masking(torch.rand(n, L), K)
        for d in (37, 64):
            x = torch.randn(n * L * d + 1)[1:].view(n, L, d)  # contiguous, 4 bytes off 16-byte alignment
            pos = torch.randn(L * d + 1)[1:].view(L, d)
            assert_close(ops.gather_visible(x, ids_keep, pos, backend="native"),
                         reference.gather_visible(x, ids_keep, pos))
            xv = torch.randn(n, 1 + K, d)
            token = torch.randn(d)
            assert_close(ops.unshuffle_with_mask_token(xv, ids_restore, token, backend="native"),
                         reference.unshuffle_with_mask_token(xv, ids_restore, token))
        imgs = torch.randn(2, 3, 28, 28)  # patch 14: rows of 14 pixels, not a multiple of 4
        weight, bias = torch.randn(32, 3, 14, 14), torch.randn(32)
        ids = reference.random_masking(torch.rand(2, 4), 2)[0]
        assert_close(ops.embed_visible_patches(imgs, ids, weight, bias, backend="native"),
                     reference.embed_visible_patches(imgs, ids, weight, bias))
