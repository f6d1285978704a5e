// prototype_scores on CPU: ILPG's instance-driven prototypes S_W = W (.) S + S scored by row-wise dot-sum
// (ILPG Eq. 5-6) without materialising S_W.
//
//   e (B, K) attribute scores, s (C, K) class semantics, w (B, C, K) instance weights
//   forward   out[b, c]    = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])                         out    (B, C)
//   backward  grad_w[b,c,k] = g[b, c] * e[b, k] * s[c, k]                                        grad_w (B, C, K)
//             grad_e[b, k]  = sum_c g[b, c] * s[c, k] * (1 + w[b, c, k])                         grad_e (B, K)
//             grad_s[c, k]  = sum_b g[b, c] * e[b, k] * (1 + w[b, c, k])                         grad_s (C, K)
//
// The op is bound by reading w (and writing grad_w), so both passes touch w exactly once, front to back. The
// backward walks fixed instance chunks: a chunk owns its rows of grad_e and leaves a partial grad_s that is summed
// over chunks in chunk order afterwards, so results do not depend on the thread count (no atomics, deterministic).
// Accumulation is in float for half/bfloat16/float inputs and in double for double.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <type_traits>

#include "cpu/simd.h"

namespace zslfast {
namespace {

constexpr int64_t kMaxInstanceChunks = 16;  // bounds the partial grad_s buffer to 16 * C * K

// Innermost loops for float and double, compiled per ISA (simd.h). Half and bfloat16 take the generic loops.
#define ZSLFAST_PROTOTYPE_ROWS(T)                                                                                      \
  ZSLFAST_SIMD_CLONES T forward_row(const T* e, const T* s, const T* w, int64_t K) {                                   \
    T acc = 0;                                                                                                         \
    _Pragma("omp simd reduction(+ : acc)") for (int64_t k = 0; k < K; ++k) acc += e[k] * s[k] * (T(1) + w[k]);        \
    return acc;                                                                                                        \
  }                                                                                                                    \
  ZSLFAST_SIMD_CLONES void backward_row(const T* e, const T* s, const T* w, T g, T* ge, T* gs, T* gw, int64_t K) {     \
    _Pragma("omp simd") for (int64_t k = 0; k < K; ++k) {                                                              \
      const T t = g * (T(1) + w[k]);                                                                                   \
      ge[k] += t * s[k];                                                                                               \
      gs[k] += t * e[k];                                                                                               \
      gw[k] = g * e[k] * s[k];                                                                                         \
    }                                                                                                                  \
  }                                                                                                                    \
  ZSLFAST_SIMD_CLONES void backward_row_no_grad_w(const T* e, const T* s, const T* w, T g, T* ge, T* gs, int64_t K) {  \
    _Pragma("omp simd") for (int64_t k = 0; k < K; ++k) {                                                              \
      const T t = g * (T(1) + w[k]);                                                                                   \
      ge[k] += t * s[k];                                                                                               \
      gs[k] += t * e[k];                                                                                               \
    }                                                                                                                  \
  }                                                                                                                    \
  /* Four consecutive classes at once: the grad_e row is loaded and stored once per four, not once per class. */      \
  /* s, w, gs and gw point at the first of four rows spaced K apart. */                                              \
  ZSLFAST_SIMD_CLONES void backward_rows4(const T* e, const T* s, const T* w, const T* g, T* ge, T* gs, T* gw,         \
                                          int64_t K) {                                                                 \
    const T g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];                                                                \
    _Pragma("omp simd") for (int64_t k = 0; k < K; ++k) {                                                              \
      const T ek = e[k];                                                                                               \
      const T s0 = s[k], s1 = s[K + k], s2 = s[2 * K + k], s3 = s[3 * K + k];                                          \
      const T t0 = g0 * (T(1) + w[k]), t1 = g1 * (T(1) + w[K + k]);                                                   \
      const T t2 = g2 * (T(1) + w[2 * K + k]), t3 = g3 * (T(1) + w[3 * K + k]);                                        \
      ge[k] += (t0 * s0 + t1 * s1) + (t2 * s2 + t3 * s3);                                                              \
      gs[k] += t0 * ek;                                                                                                \
      gs[K + k] += t1 * ek;                                                                                            \
      gs[2 * K + k] += t2 * ek;                                                                                        \
      gs[3 * K + k] += t3 * ek;                                                                                        \
      gw[k] = g0 * ek * s0;                                                                                            \
      gw[K + k] = g1 * ek * s1;                                                                                        \
      gw[2 * K + k] = g2 * ek * s2;                                                                                    \
      gw[3 * K + k] = g3 * ek * s3;                                                                                    \
    }                                                                                                                  \
  }                                                                                                                    \
  ZSLFAST_SIMD_CLONES void backward_rows4_no_grad_w(const T* e, const T* s, const T* w, const T* g, T* ge, T* gs,      \
                                                    int64_t K) {                                                       \
    const T g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];                                                                \
    _Pragma("omp simd") for (int64_t k = 0; k < K; ++k) {                                                              \
      const T ek = e[k];                                                                                               \
      const T t0 = g0 * (T(1) + w[k]), t1 = g1 * (T(1) + w[K + k]);                                                   \
      const T t2 = g2 * (T(1) + w[2 * K + k]), t3 = g3 * (T(1) + w[3 * K + k]);                                        \
      ge[k] += (t0 * s[k] + t1 * s[K + k]) + (t2 * s[2 * K + k] + t3 * s[3 * K + k]);                                  \
      gs[k] += t0 * ek;                                                                                                \
      gs[K + k] += t1 * ek;                                                                                            \
      gs[2 * K + k] += t2 * ek;                                                                                        \
      gs[3 * K + k] += t3 * ek;                                                                                        \
    }                                                                                                                  \
  }                                                                                                                    \
  /* Rows [0, n) of one instance b: out[c] = sum_k e[k] s[c, k] (1 + w[c, k]). Four rows per pass share the loads */ \
  /* of e and the loop overhead, which dominate at ZSL sizes (K ~ 100-300). */                                      \
  ZSLFAST_SIMD_CLONES void forward_rows(const T* e, const T* s, const T* w, T* out, int64_t n, int64_t K) {           \
    int64_t c = 0;                                                                                                     \
    for (; c + 4 <= n; c += 4) {                                                                                       \
      const T *s0 = s + c * K, *w0 = w + c * K;                                                                        \
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                                                \
      _Pragma("omp simd reduction(+ : a0, a1, a2, a3)") for (int64_t k = 0; k < K; ++k) {                              \
        const T ek = e[k];                                                                                             \
        a0 += ek * s0[k] * (T(1) + w0[k]);                                                                             \
        a1 += ek * s0[K + k] * (T(1) + w0[K + k]);                                                                     \
        a2 += ek * s0[2 * K + k] * (T(1) + w0[2 * K + k]);                                                             \
        a3 += ek * s0[3 * K + k] * (T(1) + w0[3 * K + k]);                                                             \
      }                                                                                                                \
      out[c] = a0;                                                                                                     \
      out[c + 1] = a1;                                                                                                 \
      out[c + 2] = a2;                                                                                                 \
      out[c + 3] = a3;                                                                                                 \
    }                                                                                                                  \
    for (; c < n; ++c) out[c] = forward_row(e, s + c * K, w + c * K, K);                                               \
  }
ZSLFAST_PROTOTYPE_ROWS(float)
ZSLFAST_PROTOTYPE_ROWS(double)
#undef ZSLFAST_PROTOTYPE_ROWS

template <typename scalar_t>
constexpr bool kHasSimdRows = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

template <typename scalar_t>
void forward_kernel(const scalar_t* e, const scalar_t* s, const scalar_t* w, scalar_t* out, int64_t B, int64_t C,
                    int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    if constexpr (kHasSimdRows<scalar_t>) {
      // Split [begin, end) at instance boundaries so each call sees rows of one b.
      for (int64_t bc = begin; bc < end;) {
        const int64_t b = bc / C;
        const int64_t stop = std::min(end, (b + 1) * C);
        forward_rows(e + b * K, s + (bc - b * C) * K, w + bc * K, out + bc, stop - bc, K);
        bc = stop;
      }
    } else {
      for (int64_t bc = begin; bc < end; ++bc) {
        const scalar_t* e_row = e + (bc / C) * K;
        const scalar_t* s_row = s + (bc % C) * K;
        const scalar_t* w_row = w + bc * K;
        acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) {
          acc += static_cast<acc_t>(e_row[k]) * static_cast<acc_t>(s_row[k]) * (acc_t(1) + static_cast<acc_t>(w_row[k]));
        }
        out[bc] = static_cast<scalar_t>(acc);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* e, const scalar_t* s, const scalar_t* w, scalar_t* grad_e,
                     scalar_t* grad_s, scalar_t* grad_w, int64_t B, int64_t C, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  // Instance chunks: each streams its w[b0:b1] (and grad_w) front to back, owns its rows of grad_e, and leaves a
  // partial grad_s (C, K) that is summed over chunks in chunk order. The chunk count is fixed, not the thread
  // count, so the sums' order (and the result) is the same on every machine.
  const int64_t chunks = std::min(B, kMaxInstanceChunks);
  const int64_t chunk_size = (B + chunks - 1) / chunks;
  std::vector<acc_t> grad_s_partial(static_cast<size_t>(chunks * C * K), acc_t(0));
  std::vector<acc_t> grad_e_acc(static_cast<size_t>(B * K), acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gs_chunk = grad_s_partial.data() + chunk * C * K;
      for (int64_t b = chunk * chunk_size; b < std::min(B, (chunk + 1) * chunk_size); ++b) {
        const scalar_t* e_row = e + b * K;
        acc_t* ge = grad_e_acc.data() + b * K;
        int64_t c = 0;
        if constexpr (kHasSimdRows<scalar_t>) {
          for (; c + 4 <= C; c += 4) {
            const int64_t row = b * C + c;
            if (grad_w != nullptr) {
              backward_rows4(e_row, s + c * K, w + row * K, grad + row, ge, gs_chunk + c * K, grad_w + row * K, K);
            } else {
              backward_rows4_no_grad_w(e_row, s + c * K, w + row * K, grad + row, ge, gs_chunk + c * K, K);
            }
          }
        }
        for (; c < C; ++c) {
          const acc_t g = static_cast<acc_t>(grad[b * C + c]);
          const scalar_t* s_row = s + c * K;
          const scalar_t* w_row = w + (b * C + c) * K;
          acc_t* gs = gs_chunk + c * K;
#pragma omp simd
          for (int64_t k = 0; k < K; ++k) {
            const acc_t ek = static_cast<acc_t>(e_row[k]);
            const acc_t sk = static_cast<acc_t>(s_row[k]);
            const acc_t t = g * (acc_t(1) + static_cast<acc_t>(w_row[k]));
            ge[k] += t * sk;
            gs[k] += t * ek;
          }
          if (grad_w != nullptr) {
            scalar_t* gw_row = grad_w + (b * C + c) * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) {
              gw_row[k] = static_cast<scalar_t>(g * static_cast<acc_t>(e_row[k]) * static_cast<acc_t>(s_row[k]));
            }
          }
        }
      }
    }
  });

  at::parallel_for(0, B * K, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) grad_e[i] = static_cast<scalar_t>(grad_e_acc[i]);
  });
  at::parallel_for(0, C * K, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t acc = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) acc += grad_s_partial[chunk * C * K + i];
      grad_s[i] = static_cast<scalar_t>(acc);
    }
  });
}

at::Tensor prototype_scores_fwd_cpu(const at::Tensor& e_in, const at::Tensor& s_in, const at::Tensor& w_in) {
  TORCH_CHECK(e_in.dim() == 2 && s_in.dim() == 2 && w_in.dim() == 3, "zslfast::_prototype_scores_fwd: bad ranks");
  const at::Tensor e = e_in.contiguous(), s = s_in.contiguous(), w = w_in.contiguous();
  const int64_t B = e.size(0), K = e.size(1), C = s.size(0);
  TORCH_CHECK(s.size(1) == K && w.size(0) == B && w.size(1) == C && w.size(2) == K,
              "zslfast::_prototype_scores_fwd: shapes do not match");
  at::Tensor out = at::empty({B, C}, e.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "prototype_scores_fwd_cpu", [&] {
    forward_kernel<scalar_t>(e.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), B, C, K);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_scores_bwd_cpu(const at::Tensor& grad_in,
                                                                        const at::Tensor& e_in,
                                                                        const at::Tensor& s_in,
                                                                        const at::Tensor& w_in, bool need_grad_w) {
  const at::Tensor grad = grad_in.contiguous(), e = e_in.contiguous(), s = s_in.contiguous(), w = w_in.contiguous();
  const int64_t B = e.size(0), K = e.size(1), C = s.size(0);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == C && w.size(0) == B && w.size(1) == C && w.size(2) == K,
              "zslfast::_prototype_scores_bwd: shapes do not match");
  at::Tensor grad_e = at::empty({B, K}, e.options());
  at::Tensor grad_s = at::empty({C, K}, e.options());
  at::Tensor grad_w = need_grad_w ? at::empty({B, C, K}, e.options()) : at::empty({0}, e.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "prototype_scores_bwd_cpu", [&] {
    backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                              w.data_ptr<scalar_t>(), grad_e.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(),
                              need_grad_w ? grad_w.data_ptr<scalar_t>() : nullptr, B, C, K);
  });
  return {grad_e, grad_s, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) {
  m.impl("_prototype_scores_fwd", &prototype_scores_fwd_cpu);
  m.impl("_prototype_scores_bwd", &prototype_scores_bwd_cpu);
}

}  // namespace zslfast
