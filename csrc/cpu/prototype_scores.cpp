// prototype_scores on CPU: ILPG's instance-driven prototypes S_W = W (.) S + S scored by row-wise dot-sum
// (ILPG Eq. 5-6) without materialising S_W.
//
//   e (B, K) attribute scores, s (C, K) class semantics, w (B, C, K) instance weights
//   forward   out[b, c]    = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])                         out    (B, C)
//   backward  grad_w[b,c,k] = g[b, c] * e[b, k] * s[c, k]                                        grad_w (B, C, K)
//             grad_e[b, k]  = sum_c g[b, c] * s[c, k] * (1 + w[b, c, k])                         grad_e (B, K)
//             grad_s[c, k]  = sum_b g[b, c] * e[b, k] * (1 + w[b, c, k])                         grad_s (C, K)
//
// The op is bound by reading w (and writing grad_w), so both passes touch w exactly once. The backward walks fixed
// class chunks: a chunk owns its rows of grad_s and leaves a partial grad_e that is summed over chunks in chunk
// order afterwards; chunk counts and forward work units are fixed, not the thread count, so results do not depend
// on it (no atomics, deterministic). float, the type models train in, runs register-tiled kernels compiled per ISA
// (AVX-512 / AVX2, cpu/simd.h); the other types run plain loops. Accumulation is in float for half/bfloat16/float
// inputs and in double for double.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"

namespace zslfast {
namespace {

constexpr int64_t kMaxClassChunks = 64;  // bounds the partial grad_e buffer to 64 * B * K

// One float row, for rows outside the 8-row blocks and K < 16.
ZSLFAST_SIMD_CLONES float forward_row(const float* e, const float* s, const float* w, int64_t K) {
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; ++k) acc += e[k] * s[k] * (1.0f + w[k]);
  return acc;
}

// Register-tiled backward for float: a tile of 8 classes x 16 attributes keeps its grad_s in vector registers over
// the whole b loop and adds to grad_e once per 8 classes, instead of a load-modify-store per element of w.
// (GCC vector extensions: 64-byte vectors, AVX-512 registers in that clone, pairs of registers in the AVX2 one.)
typedef float float16v __attribute__((vector_size(64)));
constexpr int64_t kTileClasses = 8;
constexpr int64_t kTileWidth = 16;

inline float16v load16(const float* p) {
  float16v v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, float16v v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Forward for float, 8 rows of one instance at a time: out[c] = sum_k e[k] s[c, k] (1 + w[c, k]) with the sums in
// vector registers. When K % 16 != 0 the last 16-wide step overlaps the one before, its e masked to zero on the
// columns already summed, so no scalar tail loop runs. Needs K >= 16.
ZSLFAST_SIMD_CLONES void forward_rows8(const float* e, const float* s, const float* w, float* out, int64_t K,
                                       const float* last_mask) {
  float16v acc[kTileClasses];
  for (int64_t c = 0; c < kTileClasses; ++c) acc[c] = float16v{};
  int64_t k0 = 0;
  for (; k0 + kTileWidth <= K; k0 += kTileWidth) {
    const float16v e_v = load16(e + k0);
    for (int64_t c = 0; c < kTileClasses; ++c) acc[c] += e_v * load16(s + c * K + k0) * (1.0f + load16(w + c * K + k0));
  }
  if (k0 < K) {
    const int64_t k_last = K - kTileWidth;
    const float16v e_v = load16(e + k_last) * load16(last_mask);
    for (int64_t c = 0; c < kTileClasses; ++c) {
      acc[c] += e_v * load16(s + c * K + k_last) * (1.0f + load16(w + c * K + k_last));
    }
  }
  for (int64_t c = 0; c < kTileClasses; ++c) {
    float total = 0;
    for (int64_t i = 0; i < kTileWidth; ++i) total += acc[c][i];
    out[c] = total;
  }
}

// Rows [0, n) of one instance for float: blocks of 8 rows, then single rows.
void forward_rows_f32(const float* e, const float* s, const float* w, float* out, int64_t n, int64_t K) {
  int64_t c = 0;
  if (K >= kTileWidth) {
    float last_mask[kTileWidth];
    const int64_t k_full = K / kTileWidth * kTileWidth;
    for (int64_t k = 0; k < kTileWidth; ++k) last_mask[k] = (K - kTileWidth + k >= k_full) ? 1.0f : 0.0f;
    for (; c + kTileClasses <= n; c += kTileClasses) forward_rows8(e, s + c * K, w + c * K, out + c, K, last_mask);
  }
  for (; c < n; ++c) out[c] = forward_row(e, s + c * K, w + c * K, K);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* e, const scalar_t* s, const scalar_t* w, scalar_t* out, int64_t B, int64_t C,
                    int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Work units are fixed blocks of 8 rows of one instance, so every row takes the same code path (and the same
    // summation order) whatever the thread count.
    const int64_t blocks = (C + kTileClasses - 1) / kTileClasses;
    at::parallel_for(0, B * blocks, std::max<int64_t>(1, grain / kTileClasses), [&](int64_t begin, int64_t end) {
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / blocks, c = unit % blocks * kTileClasses;
        const int64_t row = b * C + c;
        forward_rows_f32(e + b * K, s + c * K, w + row * K, out + row, std::min(kTileClasses, C - c), K);
      }
    });
    return;
  }
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
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
  });
}

// Attributes [k0, k0 + 16) of classes [c0, c0 + 8) over every instance. ge: this chunk's partial grad_e (B, K);
// gs: grad_s accumulator rows; pointers are at class c0 / attribute 0 of instance 0.
// ge_mask (16 values, 0 or 1) keeps the last tile, which overlaps the one before it when K % 16 != 0, from adding
// to grad_e twice; its grad_s and grad_w values are recomputed identically, so writing them again is harmless.
ZSLFAST_SIMD_CLONES void backward_tile8(const float* e, const float* s, const float* w, const float* g, float* ge,
                                        float* gs, float* gw, int64_t B, int64_t C, int64_t K, int64_t k0,
                                        const float* ge_mask) {
  const float16v mask = load16(ge_mask);
  float16v s_c[kTileClasses], acc[kTileClasses];
  for (int64_t c = 0; c < kTileClasses; ++c) {
    s_c[c] = load16(s + c * K + k0);
    acc[c] = float16v{};
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* w_b = w + b * C * K + k0;
    const float* g_b = g + b * C;
    const float16v e_v = load16(e + b * K + k0);
    float16v ge_v{};
    for (int64_t c = 0; c < kTileClasses; ++c) {
      const float g_c = g_b[c];
      const float16v t = g_c * (1.0f + load16(w_b + c * K));
      acc[c] += t * e_v;
      ge_v += t * s_c[c];
      if (gw != nullptr) store16(gw + b * C * K + c * K + k0, g_c * e_v * s_c[c]);
    }
    store16(ge + b * K + k0, load16(ge + b * K + k0) + ge_v * mask);
  }
  for (int64_t c = 0; c < kTileClasses; ++c) store16(gs + c * K + k0, acc[c]);
}

// The same for any classes [0, n) and attributes [k_begin, k_end): the tiles' edges.
void backward_edge(const float* e, const float* s, const float* w, const float* g, float* ge, float* gs, float* gw,
                   int64_t B, int64_t C, int64_t K, int64_t n, int64_t k_begin, int64_t k_end) {
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < n; ++c) {
      const float g_c = g[b * C + c];
      for (int64_t k = k_begin; k < k_end; ++k) {
        const float ek = e[b * K + k], sk = s[c * K + k];
        const float t = g_c * (1.0f + w[b * C * K + c * K + k]);
        ge[b * K + k] += t * sk;
        gs[c * K + k] += t * ek;
        if (gw != nullptr) gw[b * C * K + c * K + k] = g_c * ek * sk;
      }
    }
  }
}

// Classes [c_begin, c_end) of the float backward: full tiles, then the edges. gs rows start at zero.
void backward_classes_f32(const float* grad, const float* e, const float* s, const float* w, float* ge, float* gs,
                          float* grad_w, int64_t B, int64_t C, int64_t K, int64_t c_begin, int64_t c_end) {
  const int64_t k_tiled = K / kTileWidth * kTileWidth;
  float ones[kTileWidth], last_mask[kTileWidth];
  for (int64_t k = 0; k < kTileWidth; ++k) {
    ones[k] = 1.0f;
    last_mask[k] = (K - kTileWidth + k >= k_tiled) ? 1.0f : 0.0f;  // only the columns no full tile covered
  }
  int64_t c = c_begin;
  for (; c + kTileClasses <= c_end; c += kTileClasses) {
    float* gw = grad_w != nullptr ? grad_w + c * K : nullptr;
    for (int64_t k0 = 0; k0 < k_tiled; k0 += kTileWidth) {
      backward_tile8(e, s + c * K, w + c * K, grad + c, ge, gs + c * K, gw, B, C, K, k0, ones);
    }
    if (k_tiled < K && K >= kTileWidth) {
      backward_tile8(e, s + c * K, w + c * K, grad + c, ge, gs + c * K, gw, B, C, K, K - kTileWidth, last_mask);
    } else if (k_tiled < K) {
      backward_edge(e, s + c * K, w + c * K, grad + c, ge, gs + c * K, gw, B, C, K, kTileClasses, k_tiled, K);
    }
  }
  if (c < c_end) {
    backward_edge(e, s + c * K, w + c * K, grad + c, ge, gs + c * K, grad_w != nullptr ? grad_w + c * K : nullptr,
                  B, C, K, c_end - c, 0, K);
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* e, const scalar_t* s, const scalar_t* w, scalar_t* grad_e,
                     scalar_t* grad_s, scalar_t* grad_w, int64_t B, int64_t C, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kTiled = std::is_same_v<scalar_t, float>;
  // Tiled chunks hold whole 8-class tiles.
  const int64_t unit = kTiled ? kTileClasses : 1;
  const int64_t chunks = std::min((C + unit - 1) / unit, kMaxClassChunks);
  const int64_t chunk_size = ((C + chunks - 1) / chunks + unit - 1) / unit * unit;
  std::vector<acc_t> grad_e_partial(static_cast<size_t>(chunks * B * K), acc_t(0));
  std::vector<acc_t> grad_s_acc(kTiled ? 0 : static_cast<size_t>(C * K), acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t c_begin = std::min(C, chunk * chunk_size), c_end = std::min(C, c_begin + chunk_size);
      acc_t* ge_chunk = grad_e_partial.data() + chunk * B * K;
      if constexpr (kTiled) {
        std::fill(grad_s + c_begin * K, grad_s + c_end * K, 0.0f);
        backward_classes_f32(grad, e, s, w, ge_chunk, grad_s, grad_w, B, C, K, c_begin, c_end);
      } else {
        for (int64_t b = 0; b < B; ++b) {
          acc_t* ge = ge_chunk + b * K;
          for (int64_t c = c_begin; c < c_end; ++c) {
            const acc_t g = static_cast<acc_t>(grad[b * C + c]);
            const scalar_t* e_row = e + b * K;
            const scalar_t* s_row = s + c * K;
            const scalar_t* w_row = w + (b * C + c) * K;
            acc_t* gs = grad_s_acc.data() + c * K;
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) {
              const acc_t ek = static_cast<acc_t>(e_row[k]);
              const acc_t sk = static_cast<acc_t>(s_row[k]);
              const acc_t t = g * (acc_t(1) + static_cast<acc_t>(w_row[k]));
              ge[k] += t * sk;
              gs[k] += t * ek;
              if (grad_w != nullptr) grad_w[(b * C + c) * K + k] = static_cast<scalar_t>(g * ek * sk);
            }
          }
        }
      }
    }
  });

  if constexpr (!kTiled) {
    at::parallel_for(0, C * K, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) grad_s[i] = static_cast<scalar_t>(grad_s_acc[i]);
    });
  }
  at::parallel_for(0, B * K, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t acc = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) acc += grad_e_partial[chunk * B * K + i];
      grad_e[i] = static_cast<scalar_t>(acc);
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
                                                                        const at::Tensor& w_in,
                                                                        std::array<bool, 3> output_mask) {
  // grad_e and grad_s come out of the pass that forms grad_w, so only grad_w is skipped when not asked for.
  const bool need_grad_w = output_mask[2];
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
  auto requested = [&](const at::Tensor& g, bool need) { return need ? g : at::empty({0}, e.options()); };
  return {requested(grad_e, output_mask[0]), requested(grad_s, output_mask[1]), grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) {
  m.impl("_prototype_scores_fwd", &prototype_scores_fwd_cpu);
  m.impl("_prototype_scores_bwd", &prototype_scores_bwd_cpu);
}

}  // namespace zslfast
