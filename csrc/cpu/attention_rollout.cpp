// attention_rollout on CPU, CLS row only (zslfast/ops/attention_rollout.py has the math and the backward).
//
//   attns   L tensors (B, H, N, N), first layer first        F^l = fuse_h(A^l[b, h])  (B, N, N), never stored
//   abnar     v = e_0;  for l = L-1 .. 0:  v <- v (F^l + I) / rowsum(F^l + I)      = row 0 of A'^L ... A'^1
//   residual  v = e_0;  v <- v F^0;  for l = 1 .. L-1:  v <- v + v F^l              = row 0 of W^L (SVIP Eq. 4)
//   out     (B, N) the final v;  states (L, B, N) the v entering layer l's step (what the backward needs)
//
// Each step is v_out[j] = sum_i coef_i (F[i, j] + [abnar or l > 0] delta_ij): the rows of F are formed one at a
// time from the H heads (a buffer of N), so every map is read exactly once and nothing (B, N, N) is written.
// Parallel over b; within b the sums run in a fixed order (deterministic). Accumulation in float (double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

namespace zslfast {
namespace {

enum Mode : int64_t { kAbnar = 0, kResidual = 1 };
enum Fusion : int64_t { kMean = 0, kSum = 1, kMax = 2, kMin = 3 };

template <typename scalar_t, typename acc_t>
void fuse_row(const scalar_t* head0_row, int64_t head_stride, int64_t H, int64_t N, int64_t fusion, acc_t* row) {
  for (int64_t j = 0; j < N; ++j) row[j] = static_cast<acc_t>(head0_row[j]);
  for (int64_t h = 1; h < H; ++h) {
    const scalar_t* src = head0_row + h * head_stride;
    if (fusion == kMax) {
      for (int64_t j = 0; j < N; ++j) row[j] = std::max(row[j], static_cast<acc_t>(src[j]));
    } else if (fusion == kMin) {
      for (int64_t j = 0; j < N; ++j) row[j] = std::min(row[j], static_cast<acc_t>(src[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) row[j] += static_cast<acc_t>(src[j]);
    }
  }
  if (fusion == kMean) {
    const acc_t inv = acc_t(1) / static_cast<acc_t>(H);
    for (int64_t j = 0; j < N; ++j) row[j] *= inv;
  }
}

template <typename scalar_t>
void rollout_kernel(const std::vector<const scalar_t*>& maps, scalar_t* out, at::opmath_type<scalar_t>* states,
                    int64_t B, int64_t H, int64_t N, int64_t mode, int64_t fusion) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = static_cast<int64_t>(maps.size());
  at::parallel_for(0, B, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<acc_t> v(N), v_next(N), row(N);
    for (int64_t b = b_begin; b < b_end; ++b) {
      std::fill(v.begin(), v.end(), acc_t(0));
      v[0] = acc_t(1);
      for (int64_t step = 0; step < L; ++step) {
        const int64_t l = mode == kAbnar ? L - 1 - step : step;
        std::copy(v.begin(), v.end(), states + (l * B + b) * N);
        const bool identity = mode == kAbnar || l > 0;
        std::fill(v_next.begin(), v_next.end(), acc_t(0));
        const scalar_t* a = maps[l] + b * H * N * N;
        for (int64_t i = 0; i < N; ++i) {
          if (v[i] == acc_t(0)) continue;  // rows with no weight contribute nothing (row 0 alone at the start)
          fuse_row(a + i * N, N * N, H, N, fusion, row.data());
          acc_t coef = v[i];
          if (mode == kAbnar) {
            acc_t row_sum = 1;
            for (int64_t j = 0; j < N; ++j) row_sum += row[j];
            coef /= row_sum;
          }
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) v_next[j] += coef * row[j];
          if (identity) v_next[i] += coef;
        }
        std::swap(v, v_next);
      }
      for (int64_t j = 0; j < N; ++j) out[b * N + j] = static_cast<scalar_t>(v[j]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_rollout_cls_fwd_cpu(at::TensorList attns_in, int64_t mode,
                                                                 int64_t fusion) {
  TORCH_CHECK(!attns_in.empty(), "zslfast::_attention_rollout_cls_fwd: no layers");
  TORCH_CHECK(mode == kAbnar || mode == kResidual, "zslfast::_attention_rollout_cls_fwd: bad mode");
  TORCH_CHECK(fusion >= kMean && fusion <= kMin, "zslfast::_attention_rollout_cls_fwd: bad fusion");
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
                             mode, fusion);
  });
  return {out, states};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) { m.impl("_attention_rollout_cls_fwd", &attention_rollout_cls_fwd_cpu); }

}  // namespace zslfast
