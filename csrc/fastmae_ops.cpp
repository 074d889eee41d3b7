// The `fastmae_native` op library: the op schemas, and the CPU kernels (rows in parallel with
// at::parallel_for, fp32 accumulation for fp16/bf16). The CUDA kernels are a separate library
// (fastmae_ops_cuda.cu) that registers the same ops for the CUDA device. The ops' autograd, for
// both devices, is fastmae_autograd.cpp (built into this library); their fake (meta) kernels are
// registered from Python (fastmae/ops/native/__init__.py). (The backward ops' SymInt sizes reach
// the kernels as int64_t: the dispatcher converts them.)
#include "fastmae_ops.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace fastmae {
namespace {

// Rows per parallel task: enough work per task to amortize its start (D elements per row).
int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// Reductions sum fixed chunks of rows into partials, then the partials in chunk order: the result
// does not depend on the number of threads.
constexpr int64_t kRowsPerChunk = 64;

int64_t restore_index(int64_t r, int64_t L) {
  TORCH_CHECK(0 <= r && r < L, "unshuffle_with_mask_token: ids_restore holds ", r, ", outside [0, L=", L, ")");
  return r;
}

struct Cpu {
  template <typename T>
  static void random_masking(const T* noise, int64_t N, int64_t L, int64_t len_keep, int64_t* ids_keep,
                             int64_t* ids_restore, float* mask) {
    using A = acc_t<T>;
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(L);
      for (int64_t n = begin; n < end; ++n) {
        const T* row = noise + n * L;
        std::iota(order.begin(), order.end(), int64_t{0});
        std::sort(order.begin(), order.end(),
                  [row](int64_t a, int64_t b) { return sorts_before(A(row[a]), a, A(row[b]), b); });
        for (int64_t rank = 0; rank < L; ++rank) {
          const int64_t l = order[rank];
          if (rank < len_keep) ids_keep[n * len_keep + rank] = l;
          ids_restore[n * L + l] = rank;
          mask[n * L + l] = rank >= len_keep ? 1.0f : 0.0f;
        }
      }
    });
  }

  template <typename X, typename O>
  static void gather_rows(const X* x, const O* pos, const int64_t* ids, O* out, int64_t N, int64_t K, int64_t L,
                          int64_t D) {
    using A = acc_t<O>;
    at::parallel_for(0, N * K, grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // output row n*K + k
        const int64_t l = ids[r];
        TORCH_CHECK(0 <= l && l < L, "gather_visible: ids_keep holds ", l, ", outside [0, L=", L, ")");
        const X* src = x + ((r / K) * L + l) * D;
        O* dst = out + r * D;
        if (pos) {
          const O* p = pos + l * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<O>(A(src[d]) + A(p[d]));
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = to<O>(src[d]);
        }
      }
    });
  }

  template <typename G, typename X>
  static void scatter_rows(const G* dout, const int64_t* ids, X* dx, int64_t N, int64_t K, int64_t L, int64_t D) {
    at::parallel_for(0, N, grain(L * D), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> visible(L);  // the visible index of each position, -1 if removed
      for (int64_t n = begin; n < end; ++n) {
        std::fill(visible.begin(), visible.end(), -1);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t l = ids[n * K + k];
          TORCH_CHECK(0 <= l && l < L, "gather_visible_backward: ids_keep holds ", l, ", outside [0, L=", L, ")");
          visible[l] = k;
        }
        for (int64_t l = 0; l < L; ++l) {
          X* dst = dx + (n * L + l) * D;
          if (visible[l] < 0) {
            std::fill(dst, dst + D, X(0));
            continue;
          }
          const G* src = dout + (n * K + visible[l]) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = to<X>(src[d]);
        }
      }
    });
  }

  template <typename I, typename O>
  static void gather_patches(const I* imgs, const int64_t* ids, O* out, int64_t N, int64_t K, int64_t C, int64_t H,
                             int64_t W, int64_t p) {
    const int64_t GW = W / p, L = (H / p) * GW, P = C * p * p;
    at::parallel_for(0, N * K, grain(P), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // output row n*K + k
        const int64_t l = ids[r];
        TORCH_CHECK(0 <= l && l < L, "gather_patches: ids_keep holds ", l, ", outside [0, L=", L, ")");
        const I* corner = imgs + ((r / K) * C * H + (l / GW) * p) * W + (l % GW) * p;
        O* dst = out + r * P;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < p; ++i) {
            const I* src = corner + (c * H + i) * W;
            std::transform(src, src + p, dst + (c * p + i) * p, [](I v) { return to<O>(v); });
          }
      }
    });
  }

  template <typename X, typename O>
  static void encoder_input(const X* x, const int64_t* ids, const O* cls, const O* pos, O* out, int64_t N, int64_t K,
                            int64_t L, int64_t D) {
    using A = acc_t<O>;
    at::parallel_for(0, N * (K + 1), grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // output row n*(K+1) + j; j = 0: cls, 1 + k: visible patch k
        const int64_t n = r / (K + 1), j = r % (K + 1);
        O* dst = out + r * D;
        if (j == 0) {
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<O>(A(cls[d]) + A(pos[d]));
          continue;
        }
        const int64_t l = ids[r - n - 1];
        TORCH_CHECK(0 <= l && l < L, "encoder_input: ids_keep holds ", l, ", outside [0, L=", L, ")");
        const X* row = x + (r - n - 1) * D;  // x[n, j - 1]
        const O* p = pos + (1 + l) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<O>(A(row[d]) + A(p[d]));
      }
    });
  }

  template <typename X, typename O>
  static void unshuffle(const X* x, const int64_t* ids, const O* token, const O* pos, O* out, int64_t N, int64_t K,
                        int64_t L, int64_t D) {
    using A = acc_t<O>;
    at::parallel_for(0, N * (L + 1), grain(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // output row n*(L+1) + j; j = 0: cls, 1 + l: position l
        const int64_t n = r / (L + 1), j = r % (L + 1);
        const int64_t src = j == 0 ? 0 : 1 + restore_index(ids[n * L + j - 1], L);  // row of x; > K: removed
        O* dst = out + r * D;
        const O* p = pos ? pos + j * D : nullptr;
        if (src <= K) {
          const X* row = x + (n * (K + 1) + src) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = p ? static_cast<O>(A(row[d]) + A(p[d])) : to<O>(row[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = p ? static_cast<O>(A(token[d]) + A(p[d])) : token[d];
        }
      }
    });
  }

  template <typename G, typename X>
  static void unshuffle_backward(const G* dout, const int64_t* ids, X* dx, acc_t<G>* dtok, int64_t N, int64_t K,
                                 int64_t L, int64_t D, const at::TensorOptions&) {
    using A = acc_t<G>;
    const int64_t rows = N * (L + 1), chunks = ceil_div(rows, kRowsPerChunk);
    std::vector<A> partial(chunks * D);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        A* acc = partial.data() + c * D;
        std::fill(acc, acc + D, A(0));
        for (int64_t r = c * kRowsPerChunk; r < std::min(rows, (c + 1) * kRowsPerChunk); ++r) {
          const int64_t n = r / (L + 1), j = r % (L + 1);
          const int64_t dst = j == 0 ? 0 : 1 + restore_index(ids[n * L + j - 1], L);  // row of dx; > K: a mask token
          const G* g = dout + r * D;
          if (dst <= K) {
            X* row = dx + (n * (K + 1) + dst) * D;
            for (int64_t d = 0; d < D; ++d) row[d] = to<X>(g[d]);
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += A(g[d]);
          }
        }
      }
    });
    std::fill(dtok, dtok + D, A(0));
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t d = 0; d < D; ++d) dtok[d] += partial[c * D + d];
  }

  template <typename P, typename I>
  static void masked_pixel_loss(const P* pred, const I* imgs, const loss_acc_t<P, I>* mask, loss_acc_t<P, I>* msum,
                                loss_acc_t<P, I>* loss, P* dpred, int64_t N, int64_t L, int64_t C, int64_t H, int64_t W,
                                int64_t p, bool norm_pix, const at::TensorOptions&) {
    using A = loss_acc_t<P, I>;
    const int64_t E = p * p * C, GW = W / p, rows = N * L, chunks = ceil_div(rows, kRowsPerChunk);
    std::vector<A> partial(chunks), partial_mask(chunks);  // per chunk: the loss, the mask's sum
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> target(E);
      for (int64_t c = begin; c < end; ++c) {
        A sum = 0, msum_chunk = 0;
        for (int64_t r = c * kRowsPerChunk; r < std::min(rows, (c + 1) * kRowsPerChunk); ++r) {
          const A m = mask[r];
          msum_chunk += m;
          P* g = dpred ? dpred + r * E : nullptr;
          if (m == 0) {  // a kept patch: not read, no gradient
            if (g) std::fill(g, g + E, P(0));
            continue;
          }
          const int64_t n = r / L, l = r % L;
          const I* corner = imgs + (n * C * H + (l / GW) * p) * W + (l % GW) * p;
          // the target in pred's (i, j, c) order: patchify's nhwpqc
          for (int64_t i = 0; i < p; ++i)
            for (int64_t j = 0; j < p; ++j)
              for (int64_t ch = 0; ch < C; ++ch) target[(i * p + j) * C + ch] = A(corner[(ch * H + i) * W + j]);
          if (norm_pix) {
            A mean = 0, var = 0;
            for (A t : target) mean += t;
            mean /= A(E);
            for (A t : target) var += (t - mean) * (t - mean);
            const A stdev = std::sqrt(var / A(E - 1) + A(kNormPixEps));  // unbiased variance, as the original
            for (A& t : target) t = (t - mean) / stdev;
          }
          const P* x = pred + r * E;
          A sq = 0;
          for (int64_t e = 0; e < E; ++e) {
            const A diff = A(x[e]) - target[e];
            sq += diff * diff;
            if (g) g[e] = static_cast<P>(m * diff);
          }
          sum += m * (sq / A(E));
        }
        partial[c] = sum;
        partial_mask[c] = msum_chunk;
      }
    });
    A total = 0, count = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      total += partial[c];
      count += partial_mask[c];
    }
    *msum = count;
    *loss = total / clamp_count(count);
  }

  template <typename P, typename A>
  static void scale_loss_grad(const P* g, const A* dloss, const A* msum, P* dpred, int64_t n, int64_t E) {
    const A factor = loss_grad_factor(*dloss, *msum, E);
    at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dpred[i] = to<P>(A(g[i]) * factor);
    });
  }
};

}  // namespace
}  // namespace fastmae

TORCH_LIBRARY(fastmae_native, m) {
  m.def("random_masking(Tensor noise, int len_keep) -> (Tensor, Tensor, Tensor)");
  m.def("gather_visible(Tensor x, Tensor ids_keep, Tensor? pos_embed) -> Tensor");
  m.def("gather_visible_backward(Tensor dout, Tensor ids_keep, SymInt L, ScalarType dtype) -> Tensor");
  m.def("gather_patches(Tensor imgs, Tensor ids_keep, int patch_size, ScalarType dtype) -> Tensor");
  m.def("encoder_input(Tensor x, Tensor ids_keep, Tensor cls_token, Tensor pos_embed) -> Tensor");
  m.def("unshuffle_with_mask_token(Tensor x, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  m.def("unshuffle_with_mask_token_backward(Tensor dout, Tensor ids_restore, SymInt k1, ScalarType x_dtype) "
        "-> (Tensor, Tensor)");
  m.def("masked_pixel_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, bool with_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("masked_pixel_loss_backward(Tensor g, Tensor dloss, Tensor msum) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmae_native, CPU, m) {
  using fastmae::Cpu;
  m.impl("random_masking", TORCH_FN(fastmae::random_masking<Cpu>));
  m.impl("gather_visible", TORCH_FN(fastmae::gather_visible<Cpu>));
  m.impl("gather_visible_backward", TORCH_FN(fastmae::gather_visible_backward<Cpu>));
  m.impl("gather_patches", TORCH_FN(fastmae::gather_patches<Cpu>));
  m.impl("encoder_input", TORCH_FN(fastmae::encoder_input<Cpu>));
  m.impl("unshuffle_with_mask_token", TORCH_FN(fastmae::unshuffle_with_mask_token<Cpu>));
  m.impl("unshuffle_with_mask_token_backward", TORCH_FN(fastmae::unshuffle_with_mask_token_backward<Cpu>));
  m.impl("masked_pixel_loss", TORCH_FN(fastmae::masked_pixel_loss<Cpu>));
  m.impl("masked_pixel_loss_backward", TORCH_FN(fastmae::masked_pixel_loss_backward<Cpu>));
}
