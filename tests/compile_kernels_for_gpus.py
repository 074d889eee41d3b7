"""Compile every Triton kernel for A100 (sm_80) and H100 (sm_90) without a GPU: the lowering to
PTX and ptxas run on the CPU, so errors that the interpreter cannot see (types, layouts, register
allocation) show up here. Run by tests/test_kernels.py in a process without TRITON_INTERPRET.

Each kernel is compiled as Triton specializes it at ViT-L/16 batch 256 (pointers 16-byte aligned,
and the arguments that are multiples of 16 there: D, H, W, n_rows), and its PTX is read for the width
of its global loads and stores: 16 bytes (``ld.global.v4.b32``) is what a bandwidth-bound kernel
needs on its contiguous rows; for the rounding of its conversions from fp32 to bf16/fp16 (``rn``,
to nearest even, as PyTorch rounds: the Triton interpreter truncates instead); for 64-bit integer
divisions (none where the tensors allow 32-bit offsets); and for fp32 divisions and square roots
that are not correctly rounded (the interpreter's numpy rounds every one correctly).

    python tests/compile_kernels_for_gpus.py [--json PATH]   # prints the table of access widths
"""
import collections
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the interpreter replaces the compiler: unset TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastmae.kernels._launch import FP_FUSION  # noqa: E402
from fastmae.kernels import (  # noqa: E402
    add_layer_norm, bias_gelu, gather_visible, masked_pixel_loss, random_masking, resized_crop, unshuffle,
)

ROWS = dict(n_rows="i32", K="i32", L="i32", D="i32", tiles_per_program="i32")

# (kernel, argument types, constexpr values, num_warps): the specializations MAE training launches
CASES = [
    (random_masking._random_masking,
     dict(noise_ptr="*fp32", keep_ptr="*i64", restore_ptr="*i64", mask_ptr="*fp32", L="i32", len_keep="i32"),
     dict(BLOCK_L=256), 4),
    *[(gather_visible._gather_rows_fwd,
       dict(x_ptr=f"*{x}", pos_ptr="*fp32", ids_ptr="*i64", out_ptr=f"*{out}", **ROWS),
       dict(HAS_POS=has_pos, FP64=x == "fp64", INT64=int64, BLOCK_R=4, BLOCK_W=1024), 8)
      for x, out, has_pos, int64 in [("bf16", "fp32", True, False), ("fp32", "fp32", False, False),
                                     ("fp64", "fp64", True, False), ("bf16", "fp32", True, True)]],
    (gather_visible._gather_rows_bwd,
     dict(dout_ptr="*fp32", ids_ptr="*i64", dx_ptr="*bf16", **ROWS),
     dict(INT64=False, BLOCK_R=4, BLOCK_W=1024, BLOCK_K=64), 8),
    # fp32 patches, and the bf16 patches of a GEMM under autocast (the training step's)
    *[(gather_visible._gather_patches_fwd,
       dict(img_ptr="*fp32", ids_ptr="*i64", out_ptr=f"*{out}", n_rows="i32", K="i32", C="i32", H="i32", W="i32",
            GW="i32", tiles_per_program="i32"), dict(P=16, INT64=False, BLOCK_R=4, BLOCK_W=1024), 8)
      for out in ("fp32", "bf16")],
    # the encoder's input from bf16 embeddings (the GEMM's under autocast), fp32 out
    (gather_visible._encoder_input_fwd,
     dict(x_ptr="*bf16", ids_ptr="*i64", cls_ptr="*fp32", pos_ptr="*fp32", out_ptr="*fp32", n_rows="i32", K="i32",
          D="i32", tiles_per_program="i32"), dict(FP64=False, INT64=False, BLOCK_R=4, BLOCK_W=1024), 8),
    *[(unshuffle._unshuffle_fwd,
       dict(x_ptr=f"*{x}", ids_ptr="*i64", tok_ptr="*fp32", pos_ptr="*fp32", out_ptr=f"*{out}", **ROWS),
       dict(HAS_POS=True, FP64=x == "fp64", INT64=False, BLOCK_R=8, BLOCK_W=512), 8)
      for x, out in [("bf16", "fp32"), ("fp64", "fp64")]],
    *[(unshuffle._unshuffle_bwd,
       dict(dout_ptr=f"*{g}", ids_ptr="*i64", dx_ptr=f"*{x}", dtok_partial_ptr=f"*{acc}", **ROWS),
       dict(FP64=g == "fp64", INT64=False, BLOCK_R=8, BLOCK_W=512), 8)
      for g, x, acc in [("fp32", "bf16", "fp32"), ("fp64", "fp64", "fp64")]],
    *[(masked_pixel_loss._masked_pixel_loss_fwd,
       dict(pred_ptr=f"*{pred}", img_ptr=f"*{img}", mask_ptr="*fp32", partial_ptr=f"*{acc}",
            dpred_ptr=f"*{pred}", n_rows="i32", L="i32", H="i32", W="i32", GW="i32", tiles_per_program="i32",
            n_programs="i32"),
       dict(C=3, PATCH=patch, EPS=1e-6, NORM_PIX=norm_pix, WITH_GRAD=grad, FP64=acc == "fp64", INT64=False,
            BLOCK_R=4, BLOCK_E=1024), 8)
      for pred, img, acc, patch, norm_pix, grad in [
          ("bf16", "fp32", "fp32", 16, True, True), ("bf16", "fp32", "fp32", 14, False, False),
          ("fp16", "bf16", "fp32", 16, True, True), ("fp64", "fp64", "fp64", 16, True, True)]],
    *[(masked_pixel_loss._finish_loss,
       dict(partial_ptr=f"*{acc}", loss_ptr=f"*{acc}", msum_ptr=f"*{acc}", n_programs="i32"),
       dict(TINY=tiny, FP64=acc == "fp64", BLOCK=1024), 4)
      for acc, tiny in [("fp32", torch.finfo(torch.float32).tiny), ("fp64", torch.finfo(torch.float64).tiny)]],
    *[(masked_pixel_loss._masked_pixel_loss_bwd,
       dict(g_ptr=f"*{g}", dloss_ptr=f"*{acc}", msum_ptr=f"*{acc}", dpred_ptr=f"*{g}", n_elements="i32", P="i32"),
       dict(TINY=torch.finfo(torch.float64 if acc == "fp64" else torch.float32).tiny, FP64=acc == "fp64", INT64=False,
            BLOCK=4096), 8)
      for g, acc in [("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")]],
    *[(add_layer_norm._add_layer_norm_fwd,
       dict(x_ptr="*fp32", branch_ptr=f"*{branch}", w_ptr="*fp32", b_ptr="*fp32", h_ptr="*fp32", y_ptr=f"*{y}",
            mean_ptr="*fp32", rstd_ptr="*fp32", n_rows="i32", D="i32", eps="fp32", tiles_per_program="i32"),
       dict(HAS_BRANCH=True, HAS_W=True, HAS_B=True, FP64=False, BLOCK_R=4, BLOCK_W=1024), 8)
      for branch, y in [("bf16", "bf16"), ("fp32", "fp32")]],
    (add_layer_norm._add_layer_norm_bwd,
     dict(dy_ptr="*bf16", dh_ptr="*fp32", h_ptr="*fp32", w_ptr="*fp32", mean_ptr="*fp32", rstd_ptr="*fp32",
          dx_ptr="*fp32", dbranch_ptr="*bf16", dw_partial_ptr="*fp32", db_partial_ptr="*fp32", n_rows="i32", D="i32",
          tiles_per_program="i32"),
     dict(HAS_DH=True, HAS_BRANCH=True, HAS_W=True, FP64=False, BLOCK_R=4, BLOCK_W=1024), 8),
    (bias_gelu._bias_gelu_fwd, dict(x_ptr="*bf16", b_ptr="*fp32", y_ptr="*bf16", n_rows="i32", D="i32",
                                    tiles_per_program="i32"), dict(FP64=False, BLOCK_R=1, BLOCK_W=4096), 8),
    (bias_gelu._bias_gelu_bwd, dict(dy_ptr="*bf16", x_ptr="*bf16", b_ptr="*fp32", dx_ptr="*bf16", db_partial_ptr="*fp32",
                                    n_rows="i32", D="i32", tiles_per_program="i32"),
     dict(FP64=False, BLOCK_R=1, BLOCK_W=4096), 8),
    *[(resized_crop._resized_crop_kernel,
       dict(table_ptr="*i64", out_ptr=f"*{out}",
            mean0="fp32", mean1="fp32", mean2="fp32", std0="fp32", std1="fp32", std2="fp32"),
       dict(S=224, BLOCK=256), 4)
      for out in ("fp32", "bf16")],
]


# integer arguments that are multiples of 16 at ViT-L/16 batch 256 (D=1024, H=W=224, N*L=50176, the
# loss's 12544 programs, its P=768 and its gradient's N*L*P elements), which Triton's launcher marks
# divisible by 16 (L=196, K=49 and the grid width 14 are not)
DIVISIBLE_INTS = ("D", "H", "W", "n_rows", "n_programs", "n_elements", "P")
ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.b(\d+)\b")
# fp32 -> bf16/fp16 conversions and their rounding (rn: to nearest even, as torch's .to())
# 64-bit integer divisions and remainders (tens of instructions each on a GPU)
INT64_DIVISION = re.compile(r"\b(?:div|rem)\.[su]64\b")
NARROWING = re.compile(r"\bcvt\.(r[nzmp])(?:\.[a-z]+)*?\.(bf16|f16)(?:x2)?\.f32\b")
# fp32 divisions, reciprocals and square roots that are not correctly rounded (torch's are, on a GPU
# too): a kernel's `/` compiles to div.full.f32 (2 ulp), a division by a constant to a multiplication
# by an approximate reciprocal, tl.sqrt to sqrt.approx
APPROXIMATE = re.compile(r"\b(?:div\.(?:approx|full)|rcp\.approx|sqrt\.approx|rsqrt\.approx)(?:\.ftz)?\.f32\b")


def specialization(fn, types: dict) -> dict:
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name in types and (types[name].startswith("*") or name in DIVISIBLE_INTS)}


def access_widths(ptx: str) -> dict:
    """``{"ld": {bytes: count}, "st": {bytes: count}}`` of the global memory instructions."""
    widths = {"ld": collections.Counter(), "st": collections.Counter()}
    for kind, vec, bits in ACCESS.findall(ptx):
        widths[kind][int(vec or 1) * int(bits) // 8] += 1
    return {kind: dict(sorted(c.items())) for kind, c in widths.items()}


def narrowing_roundings(ptx: str) -> dict:
    """``{"rn.bf16": count, ...}``: the rounding modes of the fp32 -> 16-bit float conversions."""
    return dict(sorted(collections.Counter(f"{mode}.{to}" for mode, to in NARROWING.findall(ptx)).items()))


def main() -> int:
    rows = []
    for arch in (80, 90):
        for fn, types, constexprs, num_warps in CASES:
            signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=specialization(fn, types)),
                                    target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": num_warps, "enable_fp_fusion": FP_FUSION})
            dtypes = ",".join(sorted({t for n, t in types.items() if t.startswith("*") and t != "*i64"}))
            rows.append(dict(arch=f"sm_{arch}", kernel=fn.__name__, dtypes=dtypes,
                             constexprs={k: v for k, v in constexprs.items() if k.isupper() and "BLOCK" not in k},
                             **access_widths(kernel.asm["ptx"]), narrowing=narrowing_roundings(kernel.asm["ptx"]),
                             int64_divisions=len(INT64_DIVISION.findall(kernel.asm["ptx"])),
                             approximate_fp32=len(APPROXIMATE.findall(kernel.asm["ptx"]))))
    print("| arch | kernel | pointers | specialization | global loads (bytes: count) | global stores (bytes: count) "
          "| fp32 -> 16-bit conversions (rounding: count) | 64-bit integer div/rem | approximate fp32 div/sqrt |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        spec = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"| {r['arch']} | {r['kernel']} | {r['dtypes']} | {spec} | {_fmt(r['ld'])} | {_fmt(r['st'])} "
              f"| {_fmt(r['narrowing'])} | {r['int64_divisions']} | {r['approximate_fp32']} |")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _fmt(widths: dict) -> str:
    return ", ".join(f"{b}: {n}" for b, n in widths.items()) or "-"


if __name__ == "__main__":
    sys.exit(main())
