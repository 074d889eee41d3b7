"""``python -m fastmae.profile``: the categories of ops and kernels, and a profile of the default run's
step on the CPU whose parts add up to the step."""
import pytest

from fastmae.profile import CATEGORIES, categorize, cli, summarize


@pytest.mark.parametrize("names, category", [
    (["aten::mm", "aten::linear"], "GEMM"),
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "cudaLaunchKernel", "aten::mm"], "GEMM"),
    (["nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", "cudaGraphLaunch"], "GEMM"),
    (["aten::copy_", "aten::_to_copy", "aten::to"], "casts"),
    (["triton_poi_fused__to_copy_12", "cudaGraphLaunch"], "casts"),
    (["triton_per_fused__to_copy_add_native_layer_norm_3", "cudaGraphLaunch"], "norm/elementwise"),
    (["void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::launch_clamp_scalar("
      "at::TensorIteratorBase&)::{lambda()#1}::operator()() const::{lambda()#8}>", "aten::clamp"], "norm/elementwise"),
    (["pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "aten::_flash_attention_forward",
      "aten::scaled_dot_product_attention"], "attention"),
    (["void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
      "aten::_fused_adamw_", "Optimizer.step#AdamW.step"], "optimizer"),
    (["_masked_pixel_loss_fwd", "fastmae::masked_pixel_loss"], "MAE ops"),
    (["aten::sort", "aten::argsort"], "MAE ops"),
    (["ncclDevKernel_AllReduce_Sum_f32_RING_LL", "c10d::allreduce_"], "communication"),
    (["aten::add_", "autograd::engine::evaluate_function: AddBackward0"], "norm/elementwise"),
])
def test_categories(names, category):
    assert categorize(names) == category


def test_profile_of_the_default_step_on_the_cpu(tmp_path, capsys):
    assert cli(["--output_dir", str(tmp_path), "--batch_size", "8", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "step eager" in out and "mae_vit_tiny_patch4" in out
    header, _, *rows = [line for line in out.splitlines() if line.startswith("|")]
    assert [cell.strip() for cell in header.strip("|").split("|")][5:-1] == list(CATEGORIES)
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "mean"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        step_ms = float(cells[2])
        parts = sum(float(cell.split()[0]) for cell in cells[5:])
        assert parts == pytest.approx(step_ms, rel=1e-3, abs=0.05)  # the categories and the host's work add up
        assert int(cells[4]) > 100  # ops dispatched


def test_gpu_step_counts_an_ops_kernels_and_a_cuda_graphs():
    """On a GPU the profiler attaches a kernel to the op that launched it; a CUDA graph's replay is
    no op, so its kernels belong to nothing and are categorized by their names."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval, Kernel

    def event(name, start, end, device=DeviceType.CPU, kernels=(), parent=None):
        return SimpleNamespace(name=name, device_type=device, time_range=Interval(start, end), kernels=list(kernels),
                               cpu_parent=parent)

    step = event("ProfilerStep#0", 0, 1000)
    linear = event("aten::linear", 10, 20)
    mm = event("aten::mm", 11, 19, kernels=[Kernel("ampere_bf16_s16816gemm", "cuda", 100.0)], parent=linear)
    launches = [event("cudaLaunchKernel", 12, 13, parent=mm), event("cudaGraphLaunch", 30, 40)]
    kernels = [event("ampere_bf16_s16816gemm", 50, 150, DeviceType.CUDA),  # mm's
               event("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", 200, 500, DeviceType.CUDA),  # the graph's
               event("triton_poi_fused__to_copy_12", 500, 550, DeviceType.CUDA),
               event("_masked_pixel_loss_fwd", 600, 620, DeviceType.CUDA),
               event("ampere_bf16_s16816gemm", 1100, 1200, DeviceType.CUDA)]  # after the step
    (p,) = summarize([step, linear, mm, *launches, *kernels], "cuda")
    assert p.by_category["GEMM"] == pytest.approx(0.4)  # 100 us launched by aten::mm + 300 us in the graph
    assert p.by_category["casts"] == pytest.approx(0.05)
    assert p.by_category["MAE ops"] == pytest.approx(0.02)
    assert p.busy_ms == pytest.approx(0.47) and p.step_ms == pytest.approx(1.0)
    assert sum(p.by_category.values()) == pytest.approx(p.busy_ms)  # every kernel in the step counted once
    assert p.launches == 2
