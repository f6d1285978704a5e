// attention_rollout on CPU, CLS row only (zslfast/ops/attention_rollout.py has the math and the backward).
//
//   attns   L tensors (B, H, N, N), first layer first        F^l = fuse_h(A^l[b, h])  (B, N, N), never stored
//   abnar     v = e_0;  for l = L-1 .. 0:  v <- v (F^l + I) / rowsum(F^l + I)      = row 0 of A'^L ... A'^1
//             normalize 1 ("none"): v <- v (F^l + I), no division       (Transformer-Explainability's products)
//   residual  v = e_0;  v <- v F^0;  for l = 1 .. L-1:  v <- v + v F^l              = row 0 of W^L (SVIP Eq. 4)
//   out     (B, N) the final v;  states (L, B, N) the v entering layer l's step (what the backward needs)
//
// Each step is v_out[j] = sum_i coef_i (F[i, j] + [abnar or l > 0] delta_ij), coef_i = v[i] / rowsum_i (abnar with
// normalize 0) or v[i] (otherwise). The discard option of zslfast.attention_rollout never reaches this kernel: it
// hands over maps already fused and discarded in PyTorch, as one "head" with fusion sum. The rows of F are formed one
// at a time from the H heads (a buffer of N), so every map is read exactly once and nothing (B, N, N) is written.
// Parallel over b; within b the sums run in a fixed order (deterministic). Accumulation in float (double for double).
//
// NaN: max/min fusion propagates a NaN head as torch.max/amax do (std::max and a plain compare-select
// drop it), and a NaN reaches exactly the outputs the reference's full products reach: the first step reads row 0
// of its map only (v = e_0, the reference's selection of row 0), later steps read every row, zero weight or not
// (the reference's GEMMs multiply 0 * NaN too).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "enums.h"

namespace zslfast {
namespace {

// max / min that return NaN when either argument is NaN (torch.max's rule; std::max(a, NaN) returns a). Plain
// compare-selects, so that the loops calling them still vectorise.
template <typename T>
inline T nan_max(T a, T b) { return (b > a || b != b) ? b : a; }
template <typename T>
inline T nan_min(T a, T b) { return (b < a || b != b) ? b : a; }

// One row of the fused map, F[i, :] = fuse_h A[h, i, :], heads outer and columns inner (each loop a contiguous,
// vectorisable stream; the row stays in L1), compiled per ISA for float and double. Returns the row sum.
#define ZSLFAST_FUSE_ROW(T)                                                                                            \
  ZSLFAST_SIMD_CLONES T fuse_row_simd(const T* a, int64_t head_stride, int64_t H, int64_t N, int64_t fusion, T* row) { \
    _Pragma("omp simd") for (int64_t j = 0; j < N; ++j) row[j] = a[j];                                                \
    int64_t h = 1;                                                                                                     \
    if (fusion == HeadFusion::kMean || fusion == HeadFusion::kSum) {                                                   \
      for (; h + 4 <= H; h += 4) { /* four heads per pass: a quarter of the row's read-modify-writes */              \
        const T *s0 = a + h * head_stride, *s1 = s0 + head_stride, *s2 = s1 + head_stride, *s3 = s2 + head_stride;     \
        _Pragma("omp simd") for (int64_t j = 0; j < N; ++j) row[j] += (s0[j] + s1[j]) + (s2[j] + s3[j]);              \
      }                                                                                                                \
    }                                                                                                                  \
    for (; h < H; ++h) {                                                                                               \
      const T* src = a + h * head_stride;                                                                              \
      if (fusion == HeadFusion::kMax) {                                                                                \
        _Pragma("omp simd") for (int64_t j = 0; j < N; ++j) row[j] = nan_max(row[j], src[j]);                         \
      } else if (fusion == HeadFusion::kMin) {                                                                         \
        _Pragma("omp simd") for (int64_t j = 0; j < N; ++j) row[j] = nan_min(row[j], src[j]);                         \
      } else {                                                                                                         \
        _Pragma("omp simd") for (int64_t j = 0; j < N; ++j) row[j] += src[j];                                         \
      }                                                                                                                \
    }                                                                                                                  \
    const T scale = fusion == HeadFusion::kMean ? T(1) / static_cast<T>(H) : T(1);                                     \
    T total = 0;                                                                                                       \
    _Pragma("omp simd reduction(+ : total)") for (int64_t j = 0; j < N; ++j) {                                         \
      row[j] *= scale;                                                                                                 \
      total += row[j];                                                                                                 \
    }                                                                                                                  \
    return total;                                                                                                      \
  }                                                                                                                    \
  ZSLFAST_SIMD_CLONES void axpy(T coef, const T* row, T* out, int64_t N) {                                             \
    _Pragma("omp simd") for (int64_t j = 0; j < N; ++j) out[j] += coef * row[j];                                       \
  }
ZSLFAST_FUSE_ROW(float)
ZSLFAST_FUSE_ROW(double)
#undef ZSLFAST_FUSE_ROW

// Half and bfloat16 maps: converted element by element, accumulated in float.
template <typename scalar_t, typename acc_t>
acc_t fuse_row(const scalar_t* a, int64_t head_stride, int64_t H, int64_t N, int64_t fusion, acc_t* row) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return fuse_row_simd(a, head_stride, H, N, fusion, row);
  } else {
    acc_t total = 0;
    for (int64_t j = 0; j < N; ++j) {
      acc_t value = static_cast<acc_t>(a[j]);
      for (int64_t h = 1; h < H; ++h) {
        const acc_t x = static_cast<acc_t>(a[h * head_stride + j]);
        value = fusion == HeadFusion::kMax   ? nan_max(value, x)
                : fusion == HeadFusion::kMin ? nan_min(value, x)
                                             : value + x;
      }
      if (fusion == HeadFusion::kMean) value /= static_cast<acc_t>(H);
      row[j] = value;
      total += value;
    }
    return total;
  }
}

template <typename scalar_t>
void rollout_kernel(const std::vector<const scalar_t*>& maps, scalar_t* out, at::opmath_type<scalar_t>* states,
                    int64_t B, int64_t H, int64_t N, int64_t mode, int64_t fusion, int64_t normalize) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = static_cast<int64_t>(maps.size());
  const bool row_norm = mode == Mode::kAbnar && normalize == Normalize::kRow;  // residual never normalises
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> v(N), v_next(N), row(N);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(v.begin(), v.end(), acc_t(0));
      v[0] = acc_t(1);
      for (int64_t step = 0; step < L; ++step) {
        const int64_t l = mode == Mode::kAbnar ? L - 1 - step : step;
        std::copy(v.begin(), v.end(), states + (l * B + b) * N);
        const bool identity = mode == Mode::kAbnar || l > 0;
        std::fill(v_next.begin(), v_next.end(), acc_t(0));
        const scalar_t* a = maps[l] + b * H * N * N;
        for (int64_t i = 0; i < N; ++i) {
          if (step == 0 && i != 0) continue;  // v = e_0: the first step selects row 0 (see the header on NaN)
          const acc_t row_sum = fuse_row(a + i * N, N * N, H, N, fusion, row.data());
          const acc_t coef = row_norm ? v[i] / (row_sum + acc_t(1)) : v[i];
          axpy(coef, row.data(), v_next.data(), N);
          if (identity) v_next[i] += coef;
        }
        std::swap(v, v_next);
      }
      for (int64_t j = 0; j < N; ++j) out[b * N + j] = static_cast<scalar_t>(v[j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_rollout_cls_fwd_cpu(at::TensorList attns_in, int64_t mode,
                                                                 int64_t head_fusion, int64_t normalize) {
  TORCH_CHECK(!attns_in.empty(), "zslfast::_attention_rollout_cls_fwd: no layers");
  TORCH_CHECK(mode == Mode::kAbnar || mode == Mode::kResidual, "zslfast::_attention_rollout_cls_fwd: bad mode");
  TORCH_CHECK(head_fusion >= HeadFusion::kMean && head_fusion <= HeadFusion::kMin,
              "zslfast::_attention_rollout_cls_fwd: bad head_fusion");
  TORCH_CHECK(normalize == Normalize::kRow || normalize == Normalize::kNone,
              "zslfast::_attention_rollout_cls_fwd: bad normalize");
  std::vector<at::Tensor> attns;
  for (const auto& a : attns_in) attns.push_back(a.contiguous());
  const int64_t L = static_cast<int64_t>(attns.size());
  const int64_t B = attns[0].size(0), H = attns[0].size(1), N = attns[0].size(2);
  for (const auto& a : attns) {
    TORCH_CHECK(a.dim() == 4 && a.size(0) == B && a.size(1) == H && a.size(2) == N && a.size(3) == N &&
                    a.scalar_type() == attns[0].scalar_type(),
                "zslfast::_attention_rollout_cls_fwd: layers differ in shape or dtype");
  }
  at::Tensor out = at::empty({B, N}, attns[0].options());
  const auto acc_type = attns[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor states = at::empty({L, B, N}, attns[0].options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attns[0].scalar_type(), "attention_rollout_cls_cpu", [&] {
    std::vector<const scalar_t*> maps;
    for (const auto& a : attns) maps.push_back(a.data_ptr<scalar_t>());
    rollout_kernel<scalar_t>(maps, out.data_ptr<scalar_t>(), states.data_ptr<at::opmath_type<scalar_t>>(), B, H, N,
                             mode, head_fusion, normalize);
  });
  return {out, states};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) { m.impl("_attention_rollout_cls_fwd", &attention_rollout_cls_fwd_cpu); }

}  // namespace zslfast
