// The native (`cuda` backend) ops, host side: argument handling, output allocation and dtype rules,
// written once for both devices. Each op is a template over a device `Dev` (`Cpu` in
// fastmae_ops.cpp, `Cuda` in fastmae_ops_cuda.cu) whose static member templates are the kernels;
// so the CPU and CUDA kernels see the same, already validated and contiguous, arguments.
//
// The semantics are fastmae/ops/reference.py's. Dtype rules, as there:
// - gather_visible's output is promote(x, pos_embed); unshuffle's promote(x, mask_token, pos_embed).
//   The small operands (pos_embed, mask_token) are cast to the output dtype first: exact, since
//   promotion only widens, and it leaves each kernel one input and one output type.
// - arithmetic in fp32 for fp16/bf16/fp32, in fp64 for fp64 (acc_t); the loss in fp64 when pred or
//   imgs is fp64, else fp32.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fastmae {

constexpr double kNormPixEps = 1e-6;  // fastmae.ops.reference.NORM_PIX_EPS

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename P, typename I>
using loss_acc_t = std::conditional_t<std::is_same_v<P, double> || std::is_same_v<I, double>, double, float>;

// value -> O through O's accumulator type (how PyTorch converts, e.g. fp64 -> fp16 via fp32)
template <typename O, typename T>
C10_HOST_DEVICE inline O to(T v) {
  return static_cast<O>(static_cast<acc_t<O>>(v));
}

// The order of argsort(noise, stable=True): ascending, NaN last, ties in position order. A strict
// total order on (value, position), so any sort (or counting the elements before) agrees with it.
template <typename A>
C10_HOST_DEVICE inline bool sorts_before(A a, int64_t i, A b, int64_t j) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a < b;
  return i < j;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// -- dtype dispatch: f(Tag<T>{}) with T the C++ type of a floating dtype --------------------------

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<c10::Half>{});
    case at::kBFloat16: return f(Tag<c10::BFloat16>{});
    default: TORCH_CHECK(false, op, ": expected a floating tensor (fp32, fp64, fp16, bf16), got ", t);
  }
}

// f(Tag<Narrow>{}, Tag<Wide>{}) where `wide` is `narrow` or a promotion of it (fp32 over fp16/bf16,
// fp64 over any): the input and output types of a row copy that may add a wider operand (forward),
// and of the gradient going back (backward). Only these pairs are instantiated.
template <typename F>
void dispatch_widening(at::ScalarType narrow, at::ScalarType wide, const char* op, F&& f) {
  dispatch_float(narrow, op, [&](auto n) {
    using N = typename decltype(n)::type;
    if (wide == narrow) return f(n, n);
    if constexpr (std::is_same_v<N, c10::Half> || std::is_same_v<N, c10::BFloat16>) {
      if (wide == at::kFloat) return f(n, Tag<float>{});
    }
    if constexpr (!std::is_same_v<N, double>) {
      if (wide == at::kDouble) return f(n, Tag<double>{});
    }
    TORCH_CHECK(false, op, ": unsupported pair of dtypes ", narrow, " and ", wide);
  });
}

// -- the ops ------------------------------------------------------------------------------------

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking(const at::Tensor& noise_, int64_t len_keep) {
  TORCH_CHECK(noise_.dim() == 2, "random_masking: noise must be [N, L]");
  TORCH_CHECK(0 <= len_keep && len_keep <= noise_.size(1), "random_masking: len_keep must be in [0, L]");
  const c10::OptionalDeviceGuard guard(noise_.device());
  const at::Tensor noise = noise_.contiguous();
  const int64_t N = noise.size(0), L = noise.size(1);
  const auto opts = noise.options();
  at::Tensor ids_keep = at::empty({N, len_keep}, opts.dtype(at::kLong));
  at::Tensor ids_restore = at::empty({N, L}, opts.dtype(at::kLong));
  at::Tensor mask = at::empty({N, L}, opts.dtype(at::kFloat));
  if (noise.numel() == 0) return {ids_keep, ids_restore, mask};
  dispatch_float(noise.scalar_type(), "random_masking", [&](auto t) {
    using T = typename decltype(t)::type;
    Dev::template random_masking<T>(noise.data_ptr<T>(), N, L, len_keep, ids_keep.data_ptr<int64_t>(),
                                    ids_restore.data_ptr<int64_t>(), mask.data_ptr<float>());
  });
  return {ids_keep, ids_restore, mask};
}

template <class Dev>
at::Tensor gather_visible(const at::Tensor& x_, const at::Tensor& ids_keep_,
                          const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x_.dim() == 3 && ids_keep_.dim() == 2 && ids_keep_.size(0) == x_.size(0),
              "gather_visible: x must be [N, L, D] and ids_keep [N, K]");
  TORCH_CHECK(ids_keep_.scalar_type() == at::kLong, "gather_visible: ids_keep must be int64");
  const c10::OptionalDeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), ids = ids_keep_.contiguous();
  const int64_t N = x.size(0), L = x.size(1), D = x.size(2), K = ids.size(1);
  const auto out_dtype = pos_embed ? c10::promoteTypes(x.scalar_type(), pos_embed->scalar_type()) : x.scalar_type();
  at::Tensor pos;
  if (pos_embed) {
    TORCH_CHECK(pos_embed->numel() == L * D, "gather_visible: pos_embed must be [L, D]");
    pos = pos_embed->to(out_dtype).contiguous();
  }
  at::Tensor out = at::empty({N, K, D}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  dispatch_widening(x.scalar_type(), out_dtype, "gather_visible", [&](auto xt, auto ot) {
    using X = typename decltype(xt)::type;
    using O = typename decltype(ot)::type;
    Dev::template gather_rows<X, O>(x.data_ptr<X>(), pos.defined() ? pos.data_ptr<O>() : nullptr,
                                    ids.data_ptr<int64_t>(), out.data_ptr<O>(), N, K, L, D);
  });
  return out;
}

// dx [N, L, D] in `dtype`: every row written once, the gradient row for a kept position and zeros
// for a removed one (no memset, no atomics), each row finding its visible index among its sample's
// kept positions (no inverse map built beforehand).
template <class Dev>
at::Tensor gather_visible_backward(const at::Tensor& dout_, const at::Tensor& ids_keep_, int64_t L,
                                   at::ScalarType dtype) {
  TORCH_CHECK(dout_.dim() == 3 && ids_keep_.dim() == 2 && ids_keep_.size(0) == dout_.size(0) &&
                  ids_keep_.size(1) == dout_.size(1),
              "gather_visible_backward: dout must be [N, K, D] and ids_keep [N, K]");
  const c10::OptionalDeviceGuard guard(dout_.device());
  const at::Tensor dout = dout_.contiguous(), ids = ids_keep_.contiguous();
  const int64_t N = dout.size(0), K = dout.size(1), D = dout.size(2);
  at::Tensor dx = at::empty({N, L, D}, dout.options().dtype(dtype));
  if (dx.numel() == 0) return dx;
  dispatch_widening(dtype, dout.scalar_type(), "gather_visible_backward", [&](auto xt, auto gt) {
    using X = typename decltype(xt)::type;
    using G = typename decltype(gt)::type;
    Dev::template scatter_rows<G, X>(dout.data_ptr<G>(), ids.data_ptr<int64_t>(), dx.data_ptr<X>(), N, K, L, D);
  });
  return dx;
}

// The visible patches of imgs [N, C, H, W], each flattened in the patch-embedding weight's
// (c, i, j) order -> [N, K, C*p*p] in `dtype`: imgs's, or narrower (the embedding GEMM's under
// autocast, so that the copy is the cast).
template <class Dev>
at::Tensor gather_patches(const at::Tensor& imgs_, const at::Tensor& ids_keep_, int64_t patch_size,
                          at::ScalarType dtype) {
  TORCH_CHECK(imgs_.dim() == 4 && ids_keep_.dim() == 2 && ids_keep_.size(0) == imgs_.size(0),
              "gather_patches: imgs must be [N, C, H, W] and ids_keep [N, K]");
  const int64_t p = patch_size;
  TORCH_CHECK(p > 0 && imgs_.size(2) % p == 0 && imgs_.size(3) % p == 0,
              "gather_patches: the image size must be divisible by the patch size");
  const c10::OptionalDeviceGuard guard(imgs_.device());
  const at::Tensor imgs = imgs_.contiguous(), ids = ids_keep_.contiguous();
  const int64_t N = imgs.size(0), C = imgs.size(1), H = imgs.size(2), W = imgs.size(3), K = ids.size(1);
  at::Tensor out = at::empty({N, K, C * p * p}, imgs.options().dtype(dtype));
  if (out.numel() == 0) return out;
  dispatch_widening(dtype, imgs.scalar_type(), "gather_patches", [&](auto ot, auto it) {
    using O = typename decltype(ot)::type;
    using I = typename decltype(it)::type;
    Dev::template gather_patches<I, O>(imgs.data_ptr<I>(), ids.data_ptr<int64_t>(), out.data_ptr<O>(), N, K, C, H, W,
                                       p);
  });
  return out;
}

// The encoder's input -> [N, 1+K, D] in promote(x, cls_token, pos_embed): row 0 of each sample is
// cls_token + pos_embed[0], row 1 + k is x[n, k] + pos_embed[1 + ids_keep[n, k]].
template <class Dev>
at::Tensor encoder_input(const at::Tensor& x_, const at::Tensor& ids_keep_, const at::Tensor& cls_token,
                         const at::Tensor& pos_embed) {
  TORCH_CHECK(x_.dim() == 3 && ids_keep_.dim() == 2 && ids_keep_.size(0) == x_.size(0) &&
                  ids_keep_.size(1) == x_.size(1),
              "encoder_input: x must be [N, K, D] and ids_keep [N, K]");
  const c10::OptionalDeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), ids = ids_keep_.contiguous();
  const int64_t N = x.size(0), K = x.size(1), D = x.size(2);
  TORCH_CHECK(cls_token.numel() == D, "encoder_input: cls_token must have D elements");
  TORCH_CHECK(pos_embed.dim() == 2 && pos_embed.size(0) >= K + 1 && pos_embed.size(1) == D,
              "encoder_input: pos_embed must be [1+L, D] with K <= L");
  const int64_t L = pos_embed.size(0) - 1;
  const auto out_dtype =
      c10::promoteTypes(c10::promoteTypes(x.scalar_type(), cls_token.scalar_type()), pos_embed.scalar_type());
  const at::Tensor cls = cls_token.to(out_dtype).contiguous(), pos = pos_embed.to(out_dtype).contiguous();
  at::Tensor out = at::empty({N, K + 1, D}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  dispatch_widening(x.scalar_type(), out_dtype, "encoder_input", [&](auto xt, auto ot) {
    using X = typename decltype(xt)::type;
    using O = typename decltype(ot)::type;
    Dev::template encoder_input<X, O>(x.data_ptr<X>(), ids.data_ptr<int64_t>(), cls.data_ptr<O>(), pos.data_ptr<O>(),
                                      out.data_ptr<O>(), N, K, L, D);
  });
  return out;
}

template <class Dev>
at::Tensor unshuffle_with_mask_token(const at::Tensor& x_, const at::Tensor& ids_restore_, const at::Tensor& mask_token,
                                     const std::optional<at::Tensor>& pos_embed) {
  TORCH_CHECK(x_.dim() == 3 && ids_restore_.dim() == 2 && ids_restore_.size(0) == x_.size(0),
              "unshuffle_with_mask_token: x must be [N, 1+K, D] and ids_restore [N, L]");
  const c10::OptionalDeviceGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), ids = ids_restore_.contiguous();
  const int64_t N = x.size(0), K = x.size(1) - 1, D = x.size(2), L = ids.size(1);
  TORCH_CHECK(0 <= K && K <= L, "unshuffle_with_mask_token: x must have 1 + K rows, 0 <= K <= L");
  TORCH_CHECK(mask_token.numel() == D, "unshuffle_with_mask_token: mask_token must have D elements");
  auto out_dtype = c10::promoteTypes(x.scalar_type(), mask_token.scalar_type());
  if (pos_embed) out_dtype = c10::promoteTypes(out_dtype, pos_embed->scalar_type());
  const at::Tensor token = mask_token.to(out_dtype).contiguous();
  at::Tensor pos;
  if (pos_embed) {
    TORCH_CHECK(pos_embed->numel() == (L + 1) * D, "unshuffle_with_mask_token: pos_embed must be [1+L, D]");
    pos = pos_embed->to(out_dtype).contiguous();
  }
  at::Tensor out = at::empty({N, L + 1, D}, x.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  dispatch_widening(x.scalar_type(), out_dtype, "unshuffle_with_mask_token", [&](auto xt, auto ot) {
    using X = typename decltype(xt)::type;
    using O = typename decltype(ot)::type;
    Dev::template unshuffle<X, O>(x.data_ptr<X>(), ids.data_ptr<int64_t>(), token.data_ptr<O>(),
                                  pos.defined() ? pos.data_ptr<O>() : nullptr, out.data_ptr<O>(), N, K, L, D);
  });
  return out;
}

// -> (dx [N, k1, D] in x_dtype, the mask token's gradient [D] in the accumulator dtype). Each dx row
// is written once (ids_restore is a permutation); the removed rows are summed per block of rows into
// partial rows, and those in block order: the same bits on every run.
template <class Dev>
std::tuple<at::Tensor, at::Tensor> unshuffle_with_mask_token_backward(const at::Tensor& dout_,
                                                                      const at::Tensor& ids_restore_, int64_t k1,
                                                                      at::ScalarType x_dtype) {
  TORCH_CHECK(dout_.dim() == 3 && ids_restore_.dim() == 2 && ids_restore_.size(0) == dout_.size(0) &&
                  ids_restore_.size(1) + 1 == dout_.size(1),
              "unshuffle_with_mask_token_backward: dout must be [N, 1+L, D] and ids_restore [N, L]");
  TORCH_CHECK(1 <= k1 && k1 <= dout_.size(1), "unshuffle_with_mask_token_backward: k1 must be in [1, 1+L]");
  const c10::OptionalDeviceGuard guard(dout_.device());
  const at::Tensor dout = dout_.contiguous(), ids = ids_restore_.contiguous();
  const int64_t N = dout.size(0), L = ids.size(1), D = dout.size(2);
  const auto acc = dout.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dx = at::empty({N, k1, D}, dout.options().dtype(x_dtype));
  at::Tensor dtok = at::empty({D}, dout.options().dtype(acc));
  if (N == 0 || D == 0) return {dx, dtok.zero_()};  // the token's gradient sums over no rows
  dispatch_widening(x_dtype, dout.scalar_type(), "unshuffle_with_mask_token_backward", [&](auto xt, auto gt) {
    using X = typename decltype(xt)::type;
    using G = typename decltype(gt)::type;
    Dev::template unshuffle_backward<G, X>(dout.data_ptr<G>(), ids.data_ptr<int64_t>(), dx.data_ptr<X>(),
                                           dtok.data_ptr<acc_t<G>>(), N, k1 - 1, L, D, dout.options());
  });
  return {dx, dtok};
}

// -> (loss, g, mask.sum()): the loss as a 0-dim tensor in the accumulator dtype, and, when with_grad
// (else an empty tensor), g = mask * (pred - target) in pred's dtype, computed in the same pass:
// d loss / d pred is g * 2 / (p*p*C * mask.sum()), one scale in the backward (where the loss scale of
// fp16 training joins it before anything is rounded: g itself is of the size of the pixels, never
// subnormal), which takes the mask's sum from here (summed in the same pass, not in a launch of its
// own). Kept patches (mask 0) are not read.
template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_pixel_loss(const at::Tensor& pred_, const at::Tensor& imgs_,
                                                                 const at::Tensor& mask_, int64_t patch_size,
                                                                 bool norm_pix, bool with_grad) {
  TORCH_CHECK(imgs_.dim() == 4 && pred_.dim() == 3, "masked_pixel_loss: imgs must be [N, C, H, W], pred [N, L, p*p*C]");
  const int64_t p = patch_size, N = imgs_.size(0), C = imgs_.size(1), H = imgs_.size(2), W = imgs_.size(3);
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0,
              "masked_pixel_loss: the image size must be divisible by the patch size");
  const int64_t L = (H / p) * (W / p);
  TORCH_CHECK(pred_.size(0) == N && pred_.size(1) == L && pred_.size(2) == p * p * C,
              "masked_pixel_loss: pred must be [N, L, p*p*C]");
  TORCH_CHECK(mask_.numel() == N * L, "masked_pixel_loss: mask must be [N, L]");
  const c10::OptionalDeviceGuard guard(pred_.device());
  const at::Tensor pred = pred_.contiguous(), imgs = imgs_.contiguous();
  const bool fp64 = pred.scalar_type() == at::kDouble || imgs.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor mask = mask_.to(acc).contiguous();
  at::Tensor msum = at::empty({}, pred.options().dtype(acc));
  at::Tensor loss = at::empty({}, pred.options().dtype(acc));
  at::Tensor dpred = with_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  dispatch_float(pred.scalar_type(), "masked_pixel_loss", [&](auto pt) {
    dispatch_float(imgs.scalar_type(), "masked_pixel_loss", [&](auto it) {
      using P = typename decltype(pt)::type;
      using I = typename decltype(it)::type;
      using A = loss_acc_t<P, I>;
      Dev::template masked_pixel_loss<P, I>(pred.data_ptr<P>(), imgs.data_ptr<I>(), mask.data_ptr<A>(),
                                            msum.data_ptr<A>(), loss.data_ptr<A>(),
                                            with_grad ? dpred.data_ptr<P>() : nullptr, N, L, C, H, W, p, norm_pix,
                                            pred.options());
    });
  });
  return {loss, dpred, msum};
}

// The loss's denominator, max(mask sum, tiny), as the reference's clamp_min: a NaN sum stays NaN
// (kernels/masked_pixel_loss.py's _clamp_count is the same).
template <typename A>
C10_HOST_DEVICE inline A clamp_count(A msum) {
  const A tiny = std::numeric_limits<A>::min();
  return msum < tiny ? tiny : msum;
}

// The backward's factor, 2 * dloss / (E * max(msum, tiny)), as every implementation forms it (the
// Triton kernel too).
template <typename A>
C10_HOST_DEVICE inline A loss_grad_factor(A dloss, A msum, int64_t E) {
  return (A(2) * dloss) / (clamp_count(msum) * A(E));
}

// -> d loss / d pred = g * (2 * dloss / (E * max(msum, tiny))), E = p*p*C (g's last dim), in g's dtype:
// the factor formed in the accumulator dtype (fp64 when any input is fp64, else fp32) and each element
// rounded once. One launch where ATen's formula would take five; and on CUDA, ATen's g * factor
// rounds a factor held in device memory to g's dtype before multiplying (without a loss scale, fp16's
// factor at MAE sizes is near its smallest subnormal).
template <class Dev>
at::Tensor masked_pixel_loss_backward(const at::Tensor& g_, const at::Tensor& dloss_, const at::Tensor& msum_) {
  TORCH_CHECK(g_.dim() == 3 && dloss_.dim() == 0 && msum_.dim() == 0,
              "masked_pixel_loss_backward: g must be [N, L, p*p*C], dloss and msum 0-dim");
  TORCH_CHECK(dloss_.device() == g_.device() && msum_.device() == g_.device(),
              "masked_pixel_loss_backward: g, dloss and msum must be on one device (the kernel reads all three)");
  const c10::OptionalDeviceGuard guard(g_.device());
  const at::Tensor g = g_.contiguous();
  const bool fp64 = g.scalar_type() == at::kDouble || dloss_.scalar_type() == at::kDouble ||
                    msum_.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  const at::Tensor dloss = dloss_.to(acc), msum = msum_.to(acc);
  at::Tensor dpred = at::empty_like(g);
  if (g.numel() == 0) return dpred;
  dispatch_float(g.scalar_type(), "masked_pixel_loss_backward", [&](auto gt) {
    using P = typename decltype(gt)::type;
    const auto scale = [&](auto at_) {
      using A = typename decltype(at_)::type;
      Dev::template scale_loss_grad<P, A>(g.data_ptr<P>(), dloss.data_ptr<A>(), msum.data_ptr<A>(), dpred.data_ptr<P>(),
                                          g.numel(), g.size(2));
    };
    if (fp64) scale(Tag<double>{});
    else if constexpr (!std::is_same_v<P, double>) scale(Tag<float>{});
  });
  return dpred;
}

}  // namespace fastmae
