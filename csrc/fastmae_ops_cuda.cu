// The CUDA kernels of the `fastmae_native` ops (the schemas are in fastmae_ops.cpp, loaded first).
//
// Row copies (gather, unshuffle and their backwards, the patch gather) run one warp per row, each
// lane moving 16-byte vectors when the row width and the pointers allow it (else one element at
// a time). The reductions are deterministic: no atomics; each block sums a fixed range of rows in
// order into its own partial, and the partials are summed in block order.
#include "fastmae_ops.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fastmae {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;  // rows per block of the row kernels
constexpr int kThreads = kWarp * kWarpsPerBlock;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ inline Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ inline void store(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Elements per lane and access: 16 bytes of the narrower of the two types.
template <typename A, typename B>
constexpr int vec_width() {
  return 16 / (sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));
}

template <int V, typename T>
bool vec_aligned(const T* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0;
}

// Row r's pointers are its base plus a multiple of `width` elements: aligned when the base is.
template <int V, typename... T>
bool can_vectorize(int64_t width, const T*... ptrs) {
  return width % V == 0 && (vec_aligned<V>(ptrs) && ...);
}

template <typename A>
__device__ inline A warp_sum(A v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // the same butterfly on every run, and the same total in every lane
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

template <typename T>
struct NotDeduced {
  using type = T;
};

// A kernel's V-wide instantiation `wide` where the row width and the pointers allow vectors, else
// the element-wise `narrow`.
template <typename... Args>
void launch_either(int64_t blocks, size_t shared_bytes, bool vectorize, void (*wide)(Args...),
                   void (*narrow)(Args...), typename NotDeduced<Args>::type... args) {
  const auto kernel = vectorize ? wide : narrow;
  kernel<<<static_cast<unsigned>(blocks), kThreads, shared_bytes, stream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A row kernel: one warp per row, kWarpsPerBlock rows per block.
template <typename... Args>
void launch_rows(int64_t rows, bool vectorize, void (*wide)(Args...), void (*narrow)(Args...),
                 typename NotDeduced<Args>::type... args) {
  launch_either(ceil_div(rows, kWarpsPerBlock), 0, vectorize, wide, narrow, args...);
}

// -- masking: one block per sample; each position's rank is the number of positions sorting before
// it (O(L^2) comparisons from shared memory, L is a few hundred), which is argsort(stable=True).

template <typename T>
__global__ void random_masking_kernel(const T* __restrict__ noise, int64_t L, int64_t len_keep,
                                      int64_t* __restrict__ ids_keep, int64_t* __restrict__ ids_restore,
                                      float* __restrict__ mask) {
  using A = acc_t<T>;
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  A* key = reinterpret_cast<A*>(smem);
  const int64_t n = blockIdx.x;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) key[l] = A(noise[n * L + l]);
  __syncthreads();
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
    const A v = key[l];
    int64_t rank = 0;
    for (int64_t j = 0; j < L; ++j) rank += sorts_before(key[j], j, v, l);
    if (rank < len_keep) ids_keep[n * len_keep + rank] = l;
    ids_restore[n * L + l] = rank;
    mask[n * L + l] = rank >= len_keep ? 1.0f : 0.0f;
  }
}

// -- row copies, one warp per row ------------------------------------------------------------------

template <typename X, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const X* __restrict__ x, const O* __restrict__ pos, const int64_t* __restrict__ ids,
                       O* __restrict__ out, int64_t rows, int64_t K, int64_t L, int64_t D) {
  using A = acc_t<O>;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;  // output row n*K + k
  if (r >= rows) return;
  const int64_t l = ids[r];
  CUDA_KERNEL_ASSERT(0 <= l && l < L);
  const X* src = x + ((r / K) * L + l) * D;
  const O* p = pos ? pos + l * D : nullptr;
  O* dst = out + r * D;
  for (int64_t d = (threadIdx.x % kWarp) * V; d < D; d += kWarp * V) {
    const Vec<X, V> a = load<V>(src + d);
    Vec<O, V> b;
    if (p) {
      const Vec<O, V> q = load<V>(p + d);
#pragma unroll
      for (int k = 0; k < V; ++k) b.v[k] = static_cast<O>(A(a.v[k]) + A(q.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) b.v[k] = to<O>(a.v[k]);
    }
    store<V>(dst + d, b);
  }
}

template <typename G, typename X, int V>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const G* __restrict__ dout, const int64_t* __restrict__ ids, X* __restrict__ dx, int64_t rows,
                        int64_t K, int64_t L, int64_t D) {
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;  // dx row n*L + l
  if (r >= rows) return;
  const int64_t n = r / L, l = r % L;
  // the visible index of position l (ids_keep[n, k] == l), -1 if removed: the warp's lanes search
  // the sample's K kept positions, then agree on the one found
  long long k = -1;
  for (int64_t i = threadIdx.x % kWarp; i < K; i += kWarp) {
    const int64_t id = ids[n * K + i];
    CUDA_KERNEL_ASSERT(0 <= id && id < L);
    if (id == l) k = i;
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) k = max(k, __shfl_xor_sync(0xffffffffu, k, offset));
  const G* src = k >= 0 ? dout + (n * K + k) * D : nullptr;
  X* dst = dx + r * D;
  for (int64_t d = (threadIdx.x % kWarp) * V; d < D; d += kWarp * V) {
    Vec<X, V> b;
    if (src) {
      const Vec<G, V> a = load<V>(src + d);
#pragma unroll
      for (int i = 0; i < V; ++i) b.v[i] = to<X>(a.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) b.v[i] = X(0);
    }
    store<V>(dst + d, b);
  }
}

template <typename I, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    gather_patches_kernel(const I* __restrict__ imgs, const int64_t* __restrict__ ids, O* __restrict__ out,
                          int64_t rows, int64_t K, int64_t C, int64_t H, int64_t W, int p) {
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;  // output row n*K + k
  if (r >= rows) return;
  const int64_t GW = W / p, l = ids[r];
  CUDA_KERNEL_ASSERT(0 <= l && l < (H / p) * GW);
  const I* corner = imgs + ((r / K) * C * H + (l / GW) * p) * W + (l % GW) * p;
  const int pp = p * p, E = static_cast<int>(C) * pp;
  O* dst = out + r * E;
  // element e = (c, i, j) of the patch; V divides p, so a vector stays within one image row
  for (int e = (threadIdx.x % kWarp) * V; e < E; e += kWarp * V) {
    const int c = e / pp, i = (e % pp) / p, j = e % p;
    const Vec<I, V> v = load<V>(corner + (c * H + i) * W + j);
    Vec<O, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = to<O>(v.v[k]);
    store<V>(dst + e, o);
  }
}

// dst = (row, or fill where row is null) + add (where given), in O's accumulator type and rounded
// once: the warp's lanes take V columns each.
template <int V, typename X, typename O>
__device__ inline void copy_row_adding(O* __restrict__ dst, const X* __restrict__ row, const O* __restrict__ fill,
                                       const O* __restrict__ add, int64_t D) {
  using A = acc_t<O>;
  for (int64_t d = (threadIdx.x % kWarp) * V; d < D; d += kWarp * V) {
    A a[V];
    if (row) {
      const Vec<X, V> v = load<V>(row + d);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = A(v.v[k]);
    } else {
      const Vec<O, V> v = load<V>(fill + d);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] = A(v.v[k]);
    }
    if (add) {
      const Vec<O, V> q = load<V>(add + d);
#pragma unroll
      for (int k = 0; k < V; ++k) a[k] += A(q.v[k]);
    }
    Vec<O, V> b;
#pragma unroll
    for (int k = 0; k < V; ++k) b.v[k] = static_cast<O>(a[k]);
    store<V>(dst + d, b);
  }
}

template <typename X, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    encoder_input_kernel(const X* __restrict__ x, const int64_t* __restrict__ ids, const O* __restrict__ cls,
                         const O* __restrict__ pos, O* __restrict__ out, int64_t rows, int64_t K, int64_t L, int64_t D) {
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;  // output row n*(K+1) + j
  if (r >= rows) return;
  const int64_t n = r / (K + 1), j = r % (K + 1);  // j = 0: cls, 1 + k: visible patch k
  const int64_t l = j == 0 ? -1 : ids[r - n - 1];  // position; -1: the cls token's row of pos
  CUDA_KERNEL_ASSERT(j == 0 || (0 <= l && l < L));
  const X* row = j == 0 ? nullptr : x + (r - n - 1) * D;  // x[n, j - 1]
  const O* p = pos + (l + 1) * D;
  copy_row_adding<V>(out + r * D, row, cls, p, D);
}

template <typename X, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    unshuffle_kernel(const X* __restrict__ x, const int64_t* __restrict__ ids, const O* __restrict__ token,
                     const O* __restrict__ pos, O* __restrict__ out, int64_t rows, int64_t K, int64_t L, int64_t D) {
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;  // output row n*(L+1) + j
  if (r >= rows) return;
  const int64_t n = r / (L + 1), j = r % (L + 1);  // j = 0: cls, 1 + l: position l
  const int64_t src = j == 0 ? 0 : 1 + ids[n * L + j - 1];  // row of x; > K: removed
  CUDA_KERNEL_ASSERT(j == 0 || (1 <= src && src <= L));
  const X* row = src <= K ? x + (n * (K + 1) + src) * D : nullptr;
  copy_row_adding<V>(out + r * D, row, token, pos ? pos + j * D : nullptr, D);
}

// -- unshuffle backward: block b owns rows [b*R, (b+1)*R) of dout, each thread V columns of them;
// kept rows go to their dx row, removed ones are summed in row order into partial[b].

template <typename G, typename X, int V>
__global__ void unshuffle_backward_kernel(const G* __restrict__ dout, const int64_t* __restrict__ ids,
                                          X* __restrict__ dx, acc_t<G>* __restrict__ partial, int64_t rows,
                                          int64_t rows_per_block, int64_t K, int64_t L, int64_t D) {
  using A = acc_t<G>;
  const int64_t first = int64_t(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  for (int64_t d = int64_t(threadIdx.x) * V; d < D; d += int64_t(blockDim.x) * V) {
    A acc[V] = {};
    for (int64_t r = first; r < last; ++r) {
      const int64_t n = r / (L + 1), j = r % (L + 1);
      const int64_t dst = j == 0 ? 0 : 1 + ids[n * L + j - 1];  // row of dx; > K: a mask token
      CUDA_KERNEL_ASSERT(j == 0 || (1 <= dst && dst <= L));
      const Vec<G, V> g = load<V>(dout + r * D + d);
      if (dst <= K) {
        Vec<X, V> b;
#pragma unroll
        for (int k = 0; k < V; ++k) b.v[k] = to<X>(g.v[k]);
        store<V>(dx + (n * (K + 1) + dst) * D + d, b);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] += A(g.v[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) partial[blockIdx.x * D + d + k] = acc[k];
  }
}

// out[d] = sum over b of partial[b, d], in a fixed order: a block of kWarp x kWarpsPerBlock threads
// per kWarp columns; thread (x, y) sums rows b = y, y + kWarpsPerBlock, ... of column x in order,
// then thread (x, 0) adds the kWarpsPerBlock sums in order.
template <typename A>
__global__ void sum_partial_rows_kernel(const A* __restrict__ partial, int64_t blocks, int64_t D, A* __restrict__ out) {
  __shared__ A sums[kWarpsPerBlock][kWarp];
  const int64_t d = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  A s = 0;
  if (d < D)
    for (int64_t b = threadIdx.y; b < blocks; b += kWarpsPerBlock) s += partial[b * D + d];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    for (int y = 1; y < kWarpsPerBlock; ++y) s += sums[y][threadIdx.x];
    out[d] = s;
  }
}

// -- the loss: one warp per patch, walking pred's row in its own (i, j, c) order (patchify's nhwpqc)
// so that pred and the gradient, the 2-byte streams, move as V-wide vectors; each element's pixel is
// gathered from the patch's C * p image rows through a table (the same for every patch, one per
// block). Three passes (mean, variance, error) read the image, the later two from cache; in each, a
// lane takes the same V consecutive elements. The mask's sum comes from the same pass: partial[b] is
// block b's loss, partial[blocks + b] its mask sum.

template <typename P, typename I, int V>
__global__ void __launch_bounds__(kThreads)
    masked_pixel_loss_kernel(const P* __restrict__ pred, const I* __restrict__ imgs,
                             const loss_acc_t<P, I>* __restrict__ mask, P* __restrict__ dpred,
                             loss_acc_t<P, I>* __restrict__ partial, int64_t rows, int64_t rows_per_block, int64_t L,
                             int64_t C, int64_t H, int64_t W, int p, bool norm_pix) {
  using A = loss_acc_t<P, I>;
  __shared__ A warp_loss[kWarpsPerBlock], warp_mask[kWarpsPerBlock];
  // element q = (i, j, c) of pred's row -> its pixel's offset from the patch's corner, at
  // [q % V][q / V]: the lanes, each reading element k of its own vector, read consecutive words
  // (stored by q, lane after lane would read V words apart: a V-way bank conflict)
  extern __shared__ int img_offset[];
  const int E = static_cast<int>(C) * p * p, columns = E / V;  // E % V == 0 (launch_either's check)
  for (int q = threadIdx.x; q < E; q += blockDim.x) {
    const int c = q % static_cast<int>(C), i = q / static_cast<int>(C) / p, j = q / static_cast<int>(C) % p;
    img_offset[(q % V) * columns + q / V] = (c * static_cast<int>(H) + i) * static_cast<int>(W) + j;
  }
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t GW = W / p;
  const int64_t first = int64_t(blockIdx.x) * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  A loss = 0, msum = 0;  // this warp's rows, in order
  for (int64_t r = first + warp; r < last; r += kWarpsPerBlock) {  // row n*L + l
    const A m = mask[r];
    msum += m;
    P* g = dpred ? dpred + r * E : nullptr;
    if (m == 0) {  // a kept patch: not read, no gradient
      if (g)
        for (int q = lane * V; q < E; q += kWarp * V) store<V>(g + q, Vec<P, V>{});
      continue;
    }
    const int64_t l = r % L;
    const I* corner = imgs + ((r / L) * C * H + (l / GW) * p) * W + (l % GW) * p;
    // element k of the vector at column u (elements u*V .. u*V + V-1)
    auto pixel = [&](int u, int k) { return A(corner[img_offset[k * columns + u]]); };
    A mean = 0, stdev = 1;
    if (norm_pix) {
      A s = 0;
      for (int u = lane; u < columns; u += kWarp) {
#pragma unroll
        for (int k = 0; k < V; ++k) s += pixel(u, k);
      }
      mean = warp_sum(s) / A(E);
      A v = 0;
      for (int u = lane; u < columns; u += kWarp) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A t = pixel(u, k) - mean;
          v += t * t;
        }
      }
      stdev = ::sqrt(warp_sum(v) / A(E - 1) + A(kNormPixEps));  // unbiased variance, as the original
    }
    A sq = 0;
    for (int u = lane; u < columns; u += kWarp) {
      const Vec<P, V> x = load<V>(pred + r * E + u * V);
      Vec<P, V> d;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A t = norm_pix ? (pixel(u, k) - mean) / stdev : pixel(u, k);
        const A diff = A(x.v[k]) - t;
        sq += diff * diff;
        d.v[k] = static_cast<P>(m * diff);
      }
      if (g) store<V>(g + u * V, d);
    }
    loss += m * (warp_sum(sq) / A(E));
  }
  if (lane == 0) {
    warp_loss[warp] = loss;
    warp_mask[warp] = msum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A s = 0, ms = 0;
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      s += warp_loss[w];
      ms += warp_mask[w];
    }
    partial[blockIdx.x] = s;
    partial[gridDim.x + blockIdx.x] = ms;  // gridDim.x: the launch's `blocks`, as finish_loss_kernel reads them
  }
}

// The loss kernel's table (one int per element of a patch) and its per-warp sums fit the 48 KiB of
// shared memory a block may have without opting in: patches of up to 12,000 values (C*p*p).
constexpr int64_t kMaxLossPatch = 12000;
static_assert(kMaxLossPatch * sizeof(int) + 2 * kWarpsPerBlock * sizeof(double) <= 48 * 1024);

// msum = the mask's partial sums' total, loss = the losses' total / max(msum, tiny): strided sums,
// then a fixed tree (one block)
template <typename A>
__global__ void finish_loss_kernel(const A* __restrict__ partial, int64_t blocks, A* __restrict__ msum,
                                   A* __restrict__ loss) {
  __shared__ A s[2][kThreads];
  A v = 0, m = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += kThreads) {
    v += partial[b];
    m += partial[blocks + b];
  }
  s[0][threadIdx.x] = v;
  s[1][threadIdx.x] = m;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      s[0][threadIdx.x] += s[0][threadIdx.x + stride];
      s[1][threadIdx.x] += s[1][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    *msum = s[1][0];
    *loss = s[0][0] / clamp_count(s[1][0]);
  }
}

// d loss / d pred: one elementwise pass, V elements per thread and access; the factor is formed by
// every thread from the two 0-dim tensors (cached loads) rather than read on the host.
template <typename P, typename A, int V>
__global__ void __launch_bounds__(kThreads)
    scale_loss_grad_kernel(const P* __restrict__ g, const A* __restrict__ dloss, const A* __restrict__ msum,
                           P* __restrict__ dpred, int64_t n, int64_t E) {
  const A factor = loss_grad_factor(*dloss, *msum, E);
  const int64_t stride = int64_t(gridDim.x) * kThreads * V;
  for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V; i < n; i += stride) {
    const Vec<P, V> a = load<V>(g + i);
    Vec<P, V> b;
#pragma unroll
    for (int k = 0; k < V; ++k) b.v[k] = to<P>(A(a.v[k]) * factor);
    store<V>(dpred + i, b);
  }
}

// Reductions use at most about this many blocks (partials), whatever the batch: the row ranges
// depend on the shapes only, so the sums are the same on every run and every GPU.
constexpr int64_t kMaxPartials = 2048;

struct Cuda {
  template <typename T>
  static void random_masking(const T* noise, int64_t N, int64_t L, int64_t len_keep, int64_t* ids_keep,
                             int64_t* ids_restore, float* mask) {
    const size_t shared = L * sizeof(acc_t<T>);
    TORCH_CHECK(shared <= 48 * 1024, "random_masking: the native CUDA kernel holds a row of noise in shared memory, "
                "up to L = ", 48 * 1024 / sizeof(acc_t<T>), " (got L = ", L, "); use another backend");
    const int threads = static_cast<int>(std::min<int64_t>(1024, ceil_div(L, kWarp) * kWarp));
    random_masking_kernel<T><<<static_cast<unsigned>(N), threads, shared, stream()>>>(noise, L, len_keep, ids_keep,
                                                                                     ids_restore, mask);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename X, typename O>
  static void gather_rows(const X* x, const O* pos, const int64_t* ids, O* out, int64_t N, int64_t K, int64_t L,
                          int64_t D) {
    constexpr int V = vec_width<X, O>();
    const int64_t rows = N * K;
    launch_rows(rows, can_vectorize<V>(D, x, pos, out), gather_rows_kernel<X, O, V>, gather_rows_kernel<X, O, 1>, x, pos,
                ids, out, rows, K, L, D);
  }

  template <typename G, typename X>
  static void scatter_rows(const G* dout, const int64_t* ids, X* dx, int64_t N, int64_t K, int64_t L, int64_t D) {
    constexpr int V = vec_width<G, X>();
    const int64_t rows = N * L;
    launch_rows(rows, can_vectorize<V>(D, dout, dx), scatter_rows_kernel<G, X, V>, scatter_rows_kernel<G, X, 1>, dout,
                ids, dx, rows, K, L, D);
  }

  template <typename I, typename O>
  static void gather_patches(const I* imgs, const int64_t* ids, O* out, int64_t N, int64_t K, int64_t C, int64_t H,
                             int64_t W, int64_t p) {
    constexpr int V = vec_width<I, O>();
    const int64_t rows = N * K;
    const int ip = static_cast<int>(p);
    launch_rows(rows, p % V == 0 && can_vectorize<V>(W, imgs, out), gather_patches_kernel<I, O, V>,
                gather_patches_kernel<I, O, 1>, imgs, ids, out, rows, K, C, H, W, ip);
  }

  template <typename X, typename O>
  static void encoder_input(const X* x, const int64_t* ids, const O* cls, const O* pos, O* out, int64_t N, int64_t K,
                            int64_t L, int64_t D) {
    constexpr int V = vec_width<X, O>();
    const int64_t rows = N * (K + 1);
    launch_rows(rows, can_vectorize<V>(D, x, cls, pos, out), encoder_input_kernel<X, O, V>, encoder_input_kernel<X, O, 1>,
                x, ids, cls, pos, out, rows, K, L, D);
  }

  template <typename X, typename O>
  static void unshuffle(const X* x, const int64_t* ids, const O* token, const O* pos, O* out, int64_t N, int64_t K,
                        int64_t L, int64_t D) {
    constexpr int V = vec_width<X, O>();
    const int64_t rows = N * (L + 1);
    launch_rows(rows, can_vectorize<V>(D, x, token, pos, out), unshuffle_kernel<X, O, V>, unshuffle_kernel<X, O, 1>, x,
                ids, token, pos, out, rows, K, L, D);
  }

  template <typename G, typename X>
  static void unshuffle_backward(const G* dout, const int64_t* ids, X* dx, acc_t<G>* dtok, int64_t N, int64_t K,
                                 int64_t L, int64_t D, const at::TensorOptions& options) {
    using A = acc_t<G>;
    constexpr int V = vec_width<G, X>();
    const int64_t rows = N * (L + 1);
    const int64_t rows_per_block = std::max<int64_t>(16, ceil_div(rows, kMaxPartials));
    const int64_t blocks = ceil_div(rows, rows_per_block);
    at::Tensor partial = at::empty({blocks, D}, options.dtype(c10::CppTypeToScalarType<A>::value));
    const bool vec = can_vectorize<V>(D, dout, dx);
    const int64_t lanes = ceil_div(D, vec ? V : 1);  // threads that own columns
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(lanes, kWarp) * kWarp));
    const auto grid = static_cast<unsigned>(blocks);
    if (vec)
      unshuffle_backward_kernel<G, X, V><<<grid, threads, 0, stream()>>>(dout, ids, dx, partial.data_ptr<A>(), rows,
                                                                         rows_per_block, K, L, D);
    else
      unshuffle_backward_kernel<G, X, 1><<<grid, threads, 0, stream()>>>(dout, ids, dx, partial.data_ptr<A>(), rows,
                                                                         rows_per_block, K, L, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partial_rows_kernel<A><<<static_cast<unsigned>(ceil_div(D, kWarp)), dim3(kWarp, kWarpsPerBlock), 0, stream()>>>(
        partial.data_ptr<A>(), blocks, D, dtok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename P, typename I>
  static void masked_pixel_loss(const P* pred, const I* imgs, const loss_acc_t<P, I>* mask, loss_acc_t<P, I>* msum,
                                loss_acc_t<P, I>* loss, P* dpred, int64_t N, int64_t L, int64_t C, int64_t H, int64_t W,
                                int64_t p, bool norm_pix, const at::TensorOptions& options) {
    using A = loss_acc_t<P, I>;
    const int64_t rows = N * L;
    const int64_t rows_per_block = kWarpsPerBlock * std::max<int64_t>(1, ceil_div(rows, kWarpsPerBlock * kMaxPartials));
    const int64_t blocks = ceil_div(rows, rows_per_block);
    at::Tensor partial = at::empty({std::max<int64_t>(2 * blocks, 1)}, options.dtype(c10::CppTypeToScalarType<A>::value));
    const int64_t E = C * p * p;
    TORCH_CHECK(C * H * W <= std::numeric_limits<int>::max() && E <= kMaxLossPatch,
                "masked_pixel_loss: the native CUDA kernel takes images of fewer than 2^31 pixels and patches of "
                "at most ", kMaxLossPatch, " values (C*p*p); use another backend");
    if (blocks > 0) {
      constexpr int V = vec_width<P, P>();
      launch_either(blocks, E * sizeof(int), can_vectorize<V>(E, pred, dpred), masked_pixel_loss_kernel<P, I, V>,
                    masked_pixel_loss_kernel<P, I, 1>, pred, imgs, mask, dpred, partial.data_ptr<A>(),
                    rows, rows_per_block, L, C, H, W, static_cast<int>(p), norm_pix);
    }
    finish_loss_kernel<A><<<1, kThreads, 0, stream()>>>(partial.data_ptr<A>(), blocks, msum, loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename P, typename A>
  static void scale_loss_grad(const P* g, const A* dloss, const A* msum, P* dpred, int64_t n, int64_t E) {
    constexpr int V = vec_width<P, P>();
    // at most 65,536 blocks, each thread looping on over the rest (n may pass 2^31)
    const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreads * V), 65536);
    launch_either(blocks, 0, can_vectorize<V>(n, g, dpred), scale_loss_grad_kernel<P, A, V>,
                  scale_loss_grad_kernel<P, A, 1>, g, dloss, msum, dpred, n, E);
  }
};

}  // namespace
}  // namespace fastmae

TORCH_LIBRARY_IMPL(fastmae_native, CUDA, m) {
  using fastmae::Cuda;
  m.impl("random_masking", TORCH_FN(fastmae::random_masking<Cuda>));
  m.impl("gather_visible", TORCH_FN(fastmae::gather_visible<Cuda>));
  m.impl("gather_visible_backward", TORCH_FN(fastmae::gather_visible_backward<Cuda>));
  m.impl("gather_patches", TORCH_FN(fastmae::gather_patches<Cuda>));
  m.impl("encoder_input", TORCH_FN(fastmae::encoder_input<Cuda>));
  m.impl("unshuffle_with_mask_token", TORCH_FN(fastmae::unshuffle_with_mask_token<Cuda>));
  m.impl("unshuffle_with_mask_token_backward", TORCH_FN(fastmae::unshuffle_with_mask_token_backward<Cuda>));
  m.impl("masked_pixel_loss", TORCH_FN(fastmae::masked_pixel_loss<Cuda>));
  m.impl("masked_pixel_loss_backward", TORCH_FN(fastmae::masked_pixel_loss_backward<Cuda>));
}
