"""The training step in its modes: compiled computes what eager computes over several updates (gradient
accumulation, clipping, fp16 with a gradient scaler), the model compiles without a graph break, and
the step never synchronizes the host with the device."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmae.models import create_model
from fastmae.optim import build_optimizer, param_groups_weight_decay
from fastmae.step import TrainStep, step_mode_unavailable_reasons
from fastmae.testing import assert_close

BATCH = 4
aten = torch.ops.aten


def tiny_mae(device="cpu", **kwargs):
    return create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, norm_pix_loss=True, **kwargs).to(device)


def pretrain_loss(m, imgs, labels):
    return m(imgs, mask_ratio=0.75)[0]


def train_steps(mode, *, accum_iter=1, clip_grad=None, precision=None, updates=3, device="cpu", **step_kwargs):
    """Losses of ``updates`` optimizer steps and the parameters after them (same seeds, same data)."""
    torch.manual_seed(0)
    model = tiny_mae(device)
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-3, torch.device(device),
                                   capturable=mode == "graphed")
    scaler = torch.amp.GradScaler(device) if precision == torch.float16 else None
    step = TrainStep(model, optimizer, pretrain_loss, accum_iter=accum_iter, autocast_dtype=precision,
                     clip_grad=clip_grad, scaler=scaler, mode=mode, **step_kwargs)
    data = torch.Generator().manual_seed(1)
    batches = [torch.randn(BATCH, 3, 32, 32, generator=data).to(device) for _ in range(updates * accum_iter)]
    labels = torch.zeros(BATCH, dtype=torch.long, device=device)
    torch.manual_seed(2)  # the masks
    losses = [step(x, labels, update=(i + 1) % accum_iter == 0).clone() for i, x in enumerate(batches)]
    return torch.stack(losses) if losses else None, torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


@pytest.mark.parametrize("accum_iter,clip_grad,precision", [
    (1, None, None), (2, 0.05, None), (1, 1.0, torch.float16),
], ids=["plain", "accum2-clip", "fp16-scaler-clip"])
def test_compiled_step_matches_eager(accum_iter, clip_grad, precision):
    kwargs = dict(accum_iter=accum_iter, clip_grad=clip_grad, precision=precision)
    eager_losses, eager_params = train_steps("eager", **kwargs)
    compiled_losses, compiled_params = train_steps("compiled", **kwargs)
    tol = dict(atol=2e-3, rtol=2e-3) if precision == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_losses, eager_losses, **tol)
    assert_same_updates(compiled_params, eager_params, 1e-2 if precision is None else 3e-2)


def assert_same_updates(params, reference, rel):
    """The parameters moved as the reference's did, up to ``rel`` of the reference's movement (Adam
    turns rounding noise in a near-zero gradient into an lr-sized step: single entries may differ)."""
    _, initial = train_steps("eager", updates=0)
    moved = (reference - initial).norm()
    assert moved > 0
    assert (params - reference).norm() / moved < rel


def test_compiled_model_has_no_graph_break():
    model = tiny_mae()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_step_compiles_once():
    """Nothing the model caches on its first call (the attention backend) changes under the compiled
    graph's guards: a recompile in the warm-up would cost minutes at ViT-L and break CUDA-graph capture."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_steps("compiled", accum_iter=2, compile_backend="aot_eager")


class CountHostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (a synchronization on a GPU)."""

    READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.equal.default}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", [None, torch.float16], ids=["fp32", "fp16-scaler"])
def test_step_reads_nothing_on_the_host(precision):
    torch.manual_seed(0)
    model = tiny_mae()
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-3, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu") if precision else None
    step = TrainStep(model, optimizer, pretrain_loss, accum_iter=2, autocast_dtype=precision, clip_grad=1.0, scaler=scaler)
    imgs, labels = torch.randn(BATCH, 3, 32, 32), torch.zeros(BATCH, dtype=torch.long)
    step(imgs, labels, update=False)
    step(imgs, labels, update=True)  # the first update allocates the optimizer state
    with CountHostReads() as counter:
        step(imgs, labels, update=False)
        step(imgs, labels, update=True)
    assert counter.reads == []


def test_graphs_need_cuda_one_process_and_a_fused_optimizer():
    assert step_mode_unavailable_reasons("graphed", torch.device("cuda"), distributed=False) == []
    assert "CUDA graphs need a CUDA device" in step_mode_unavailable_reasons("graphed", torch.device("cpu"), distributed=False)
    assert any("DDP" in r for r in step_mode_unavailable_reasons("graphed", torch.device("cuda"), distributed=True))
    assert any("fused" in r for r in step_mode_unavailable_reasons("graphed", torch.device("cuda"), distributed=False,
                                                                   fused_optimizer=False))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TrainStep(tiny_mae(), torch.optim.SGD(tiny_mae().parameters(), lr=0.1), pretrain_loss, mode="graphed")
    model = tiny_mae()
    fused_float_lr = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    with pytest.raises(ValueError, match="not capturable with a device-tensor lr"):
        TrainStep(model, fused_float_lr, pretrain_loss, mode="graphed")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_graphed_step_matches_eager_on_gpu(precision):
    kwargs = dict(accum_iter=2, clip_grad=1.0, precision=precision, updates=5, device="cuda")
    eager_losses, eager_params = train_steps("eager", **kwargs)
    graphed_losses, graphed_params = train_steps("graphed", **kwargs)
    torch.testing.assert_close(graphed_losses, eager_losses, atol=2e-2, rtol=2e-2)
    assert_same_updates(graphed_params, eager_params, 5e-2)


@pytest.mark.cuda
def test_graphed_step_never_synchronizes():
    torch.manual_seed(0)
    model = tiny_mae("cuda")
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-3, torch.device("cuda"),
                                   capturable=True)
    step = TrainStep(model, optimizer, pretrain_loss, autocast_dtype=torch.bfloat16, clip_grad=1.0, mode="graphed")
    imgs, labels = torch.randn(BATCH, 3, 32, 32, device="cuda"), torch.zeros(BATCH, dtype=torch.long, device="cuda")
    for _ in range(4):  # warmup and capture
        step(imgs, labels, update=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(imgs, labels, update=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(step.graphs) == 1


def eager_bf16_steps(kernels, *, working_copies, updates=2, accum_iter=2):
    torch.manual_seed(0)
    model = tiny_mae(kernel_backend=kernels)
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-3, torch.device("cpu"))
    step = TrainStep(model, optimizer, pretrain_loss, accum_iter=accum_iter, autocast_dtype=torch.bfloat16)
    assert step.working_copies is not None
    if not working_copies:
        step.working_copies.remove()
        step.working_copies = None
    data = torch.Generator().manual_seed(1)
    labels = torch.zeros(BATCH, dtype=torch.long)
    torch.manual_seed(2)
    losses = [step(torch.randn(BATCH, 3, 32, 32, generator=data), labels, update=(i + 1) % accum_iter == 0)
              for i in range(updates * accum_iter)]
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], model, step


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_working_copies_compute_what_autocast_computes(kernels):
    """bf16 working copies refreshed after each update, instead of autocast's casts at every call:
    the same bf16 weights, the same fp32 gradients (accumulated in fp32), bit for bit."""
    losses, params, _, _ = eager_bf16_steps(kernels, working_copies=True)
    want_losses, want_params, _, _ = eager_bf16_steps(kernels, working_copies=False)
    assert torch.equal(losses, want_losses)
    for p, w in zip(params, want_params):
        assert torch.equal(p, w)


class CountCasts(TorchDispatchMode):
    """The casts of the given tensors (by storage)."""

    def __init__(self, tensors):
        super().__init__()
        self.ptrs, self.casts = {t.data_ptr() for t in tensors}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == aten._to_copy.default and args[0].data_ptr() in self.ptrs:
            self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_working_copies_leave_no_weight_cast_in_the_step(kernels):
    _, _, model, step = eager_bf16_steps(kernels, working_copies=True, updates=1, accum_iter=1)
    weights = [p for p in model.parameters() if p.dim() > 1 and p.shape[0] > 1]  # the matmuls' (and more)
    imgs, labels = torch.randn(BATCH, 3, 32, 32), torch.zeros(BATCH, dtype=torch.long)
    with CountCasts(weights) as counter:
        step(imgs, labels, update=True)
    assert counter.casts == 0
    step.working_copies.remove()
    step.working_copies = None
    with CountCasts(weights) as counter:
        step(imgs, labels, update=True)
    assert counter.casts == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) + 1  # + the patch embedding


def test_a_non_finite_loss_stops_the_compiled_step_too():
    """The NaN guard reads the loss summed on the device when a log line is due, whatever the mode."""
    from fastmae.engine import EpochConfig, NonFiniteLossError, train_one_epoch

    torch.manual_seed(0)
    model = tiny_mae()
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-3, torch.device("cpu"))
    poison = torch.zeros(())  # becomes NaN after two steps, outside the compiled model
    step = TrainStep(model, optimizer, lambda m, x, y: pretrain_loss(m, x, y) + poison, mode="compiled",
                     compile_backend="aot_eager")
    batches = [(torch.randn(BATCH, 3, 32, 32), torch.zeros(BATCH, dtype=torch.long)) for _ in range(4)]

    def loader():
        for i, batch in enumerate(batches):
            if i == 2:
                poison.fill_(float("nan"))
            yield batch

    cfg = EpochConfig(schedule=dict(lr=1e-3, min_lr=0, warmup_epochs=0, epochs=1), print_freq=1)
    with pytest.raises(NonFiniteLossError, match="batch 2"):
        train_one_epoch(step, loader(), 0, cfg, device=torch.device("cpu"), steps_per_epoch=4)
