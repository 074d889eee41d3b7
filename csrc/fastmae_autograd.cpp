// Autograd of the `fastmae_native` ops, in C++: registered for the Autograd key, so a call and its
// backward go from the dispatcher to the kernels without entering Python (the Python formulas of
// fastmae/ops/fused.py, which the Triton backend registers, cost an eager step tens of microseconds
// of host time per op). The formulas are fused.py's, op for op, so both backends round alike
// (tests/test_native.py runs both on the native kernels and compares the bits).
//
// Sizes are kept as SymInts (the backward ops take SymInt sizes) and dtypes as ScalarTypes, so
// torch.compile traces through these functions with symbolic shapes and without specializing them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>

namespace fastmae {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;

// The op `fastmae_native::name` as a typed handle (looked up once).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

c10::SymInt saved_size(AutogradContext* ctx, const std::string& key) {
  return ctx->saved_data[key].toSymInt();
}

at::ScalarType saved_dtype(AutogradContext* ctx, const std::string& key) {
  return ctx->saved_data[key].toScalarType();
}

// The native ops have first derivatives only. A backward asked to build a graph (create_graph=True)
// through a gradient that requires one fails here, naming the op, instead of returning a gradient
// that silently has none; otherwise it runs without recording (no warnings from the kernels, which
// have no autograd of their own).
void first_derivative_only(const variable_list& grads, const char* name) {
  if (!at::GradMode::is_enabled()) return;
  for (const Tensor& g : grads)
    TORCH_CHECK(!g.defined() || !g.requires_grad(), name, ": the native kernels have no second derivative "
                "(a backward with create_graph=True through this op); use backend='torch'");
}

Tensor gather_visible_backward(const Tensor& dout, const Tensor& ids_keep, const c10::SymInt& L, at::ScalarType dtype) {
  static const auto handle = op<Tensor(const Tensor&, const Tensor&, c10::SymInt, at::ScalarType)>(
      "fastmae_native::gather_visible_backward");
  return handle.call(dout, ids_keep, L, dtype);
}

struct GatherVisible : torch::autograd::Function<GatherVisible> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& ids_keep,
                        const std::optional<Tensor>& pos_embed) {
    static const auto handle = op<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>(
        "fastmae_native::gather_visible");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({ids_keep});
    ctx->saved_data["L"] = x.sym_size(1);
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["has_pos"] = pos_embed.has_value();
    if (pos_embed) ctx->saved_data["pos_dtype"] = pos_embed->scalar_type();
    return handle.call(x, ids_keep, pos_embed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    first_derivative_only(grads, "gather_visible");
    const at::NoGradGuard no_grad;
    const Tensor& dout = grads[0];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_pos = ctx->saved_data["has_pos"].toBool() && ctx->needs_input_grad(2);
    if (!need_x && !need_pos) return {Tensor(), Tensor(), Tensor()};
    const auto x_dtype = saved_dtype(ctx, "x_dtype");
    // with pos_embed to differentiate, dx stays in dout's (wider) dtype for the sum over the batch
    const Tensor dx = gather_visible_backward(dout, ctx->get_saved_variables()[0], saved_size(ctx, "L"),
                                              need_pos ? dout.scalar_type() : x_dtype);
    return {need_x ? dx.to(x_dtype) : Tensor(), Tensor(),
            need_pos ? dx.sum(0).to(saved_dtype(ctx, "pos_dtype")) : Tensor()};
  }
};

struct GatherPatches : torch::autograd::Function<GatherPatches> {
  static Tensor forward(AutogradContext* ctx, const Tensor& imgs, const Tensor& ids_keep, int64_t patch_size,
                        at::ScalarType dtype) {
    static const auto handle =
        op<Tensor(const Tensor&, const Tensor&, int64_t, at::ScalarType)>("fastmae_native::gather_patches");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({ids_keep});
    ctx->saved_data["shape"] = imgs.sym_sizes();
    ctx->saved_data["patch_size"] = patch_size;
    ctx->saved_data["imgs_dtype"] = imgs.scalar_type();
    return handle.call(imgs, ids_keep, patch_size, dtype);
  }

  // Images rarely need a gradient; this path is plain PyTorch (scatter the rows, fold the patches).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    first_derivative_only(grads, "embed_visible_patches");
    const at::NoGradGuard no_grad;
    const Tensor& dpatches = grads[0];
    const auto shape = ctx->saved_data["shape"].toSymIntVector();
    const c10::SymInt &n = shape[0], &c = shape[1], &H = shape[2], &W = shape[3];
    const int64_t p = ctx->saved_data["patch_size"].toInt();
    const Tensor ids_keep = ctx->get_saved_variables()[0];
    Tensor full = at::zeros_symint({n, (H / p) * (W / p), c * p * p}, dpatches.options());
    full.scatter_(1, ids_keep.unsqueeze(-1).expand_symint({-1, -1, full.sym_size(2)}), dpatches);
    const Tensor dimgs =
        full.reshape_symint({n, H / p, W / p, c, p, p}).permute({0, 3, 1, 4, 2, 5}).reshape_symint({n, c, H, W});
    return {dimgs.to(saved_dtype(ctx, "imgs_dtype")), Tensor(), Tensor(), Tensor()};
  }
};

struct EncoderInput : torch::autograd::Function<EncoderInput> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& ids_keep, const Tensor& cls_token,
                        const Tensor& pos_embed) {
    static const auto handle =
        op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>("fastmae_native::encoder_input");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({ids_keep});
    ctx->saved_data["L"] = pos_embed.sym_size(0) - 1;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["cls_dtype"] = cls_token.scalar_type();
    ctx->saved_data["pos_dtype"] = pos_embed.scalar_type();
    return handle.call(x, ids_keep, cls_token, pos_embed);
  }

  // what the original's add, expand and cat give back: the rows after the first to x (in its
  // dtype), the first row summed over the batch to the cls token
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    first_derivative_only(grads, "encoder_input");
    const at::NoGradGuard no_grad;
    const Tensor& dout = grads[0];
    const bool need_x = ctx->needs_input_grad(0), need_cls = ctx->needs_input_grad(2),
               need_pos = ctx->needs_input_grad(3);
    const Tensor rows = dout.slice(1, 1);
    const Tensor dx = need_x ? rows.to(saved_dtype(ctx, "x_dtype")) : Tensor();
    const Tensor dfirst = need_cls || need_pos ? dout.select(1, 0).sum(0) : Tensor();
    Tensor dpos;
    if (need_pos) {  // MAE's is fixed; the position rows' gradient is the gather's
      const Tensor drows =
          gather_visible_backward(rows, ctx->get_saved_variables()[0], saved_size(ctx, "L"), dout.scalar_type()).sum(0);
      dpos = at::cat({dfirst.unsqueeze(0), drows}).to(saved_dtype(ctx, "pos_dtype"));
    }
    return {dx, Tensor(), need_cls ? dfirst.to(saved_dtype(ctx, "cls_dtype")) : Tensor(), dpos};
  }
};

struct Unshuffle : torch::autograd::Function<Unshuffle> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& ids_restore, const Tensor& mask_token,
                        const std::optional<Tensor>& pos_embed) {
    static const auto handle = op<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&)>(
        "fastmae_native::unshuffle_with_mask_token");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({ids_restore});
    ctx->saved_data["k1"] = x.sym_size(1);
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["tok_dtype"] = mask_token.scalar_type();
    ctx->saved_data["has_pos"] = pos_embed.has_value();
    if (pos_embed) ctx->saved_data["pos_dtype"] = pos_embed->scalar_type();
    return handle.call(x, ids_restore, mask_token, pos_embed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    first_derivative_only(grads, "unshuffle_with_mask_token");
    const at::NoGradGuard no_grad;
    static const auto handle =
        op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymInt, at::ScalarType)>(
            "fastmae_native::unshuffle_with_mask_token_backward");
    const Tensor& dout = grads[0];
    auto [dx, dtok] = handle.call(dout, ctx->get_saved_variables()[0], saved_size(ctx, "k1"),
                                  saved_dtype(ctx, "x_dtype"));
    const bool need_pos = ctx->saved_data["has_pos"].toBool() && ctx->needs_input_grad(3);
    return {dx, Tensor(), dtok.to(saved_dtype(ctx, "tok_dtype")),
            need_pos ? dout.sum(0).to(saved_dtype(ctx, "pos_dtype")) : Tensor()};
  }
};

struct MaskedPixelLoss : torch::autograd::Function<MaskedPixelLoss> {
  static variable_list forward(AutogradContext* ctx, const Tensor& pred, const Tensor& imgs, const Tensor& mask,
                               int64_t patch_size, bool norm_pix, bool with_grad) {
    static const auto handle =
        op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, bool, bool)>(
            "fastmae_native::masked_pixel_loss");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, g, msum] = handle.call(pred, imgs, mask, patch_size, norm_pix, with_grad);
    ctx->save_for_backward({g, msum});
    ctx->saved_data["with_grad"] = with_grad;
    ctx->set_materialize_grads(false);  // only the loss has a gradient (g and msum leave detached)
    return {loss, g, msum};
  }

  // the forward wrote g = mask * (pred - target) and summed the mask: d loss / d pred =
  // g * 2 / (P * mask.sum()), the loss scale in dloss; one kernel, as fastmae/ops/fused.py's formula
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    first_derivative_only(grads, "masked_pixel_loss");
    const at::NoGradGuard no_grad;
    static const auto handle =
        op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("fastmae_native::masked_pixel_loss_backward");
    const Tensor& dloss = grads[0];
    if (!dloss.defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    TORCH_CHECK(ctx->saved_data["with_grad"].toBool(),
                "masked_pixel_loss was computed without its gradient (with_grad=False)");
    const auto saved = ctx->get_saved_variables();
    return {handle.call(saved[0], dloss, saved[1]), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// the ops' Autograd kernels
Tensor gather_visible(const Tensor& x, const Tensor& ids_keep, const std::optional<Tensor>& pos_embed) {
  return GatherVisible::apply(x, ids_keep, pos_embed);
}

Tensor gather_patches(const Tensor& imgs, const Tensor& ids_keep, int64_t patch_size, at::ScalarType dtype) {
  return GatherPatches::apply(imgs, ids_keep, patch_size, dtype);
}

Tensor encoder_input(const Tensor& x, const Tensor& ids_keep, const Tensor& cls_token, const Tensor& pos_embed) {
  return EncoderInput::apply(x, ids_keep, cls_token, pos_embed);
}

Tensor unshuffle_with_mask_token(const Tensor& x, const Tensor& ids_restore, const Tensor& mask_token,
                                 const std::optional<Tensor>& pos_embed) {
  return Unshuffle::apply(x, ids_restore, mask_token, pos_embed);
}

std::tuple<Tensor, Tensor, Tensor> masked_pixel_loss(const Tensor& pred, const Tensor& imgs, const Tensor& mask,
                                                     int64_t patch_size, bool norm_pix, bool with_grad) {
  auto out = MaskedPixelLoss::apply(pred, imgs, mask, patch_size, norm_pix, with_grad);
  // g and msum are not differentiable: detached rather than marked so (compiled autograd asserts
  // that a C++ function marks none)
  return {out[0], out[1].detach(), out[2].detach()};
}

}  // namespace
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_native, Autograd, m) {
  m.impl("gather_visible", TORCH_FN(fastmae::gather_visible));
  m.impl("gather_patches", TORCH_FN(fastmae::gather_patches));
  m.impl("encoder_input", TORCH_FN(fastmae::encoder_input));
  m.impl("unshuffle_with_mask_token", TORCH_FN(fastmae::unshuffle_with_mask_token));
  m.impl("masked_pixel_loss", TORCH_FN(fastmae::masked_pixel_loss));
}
