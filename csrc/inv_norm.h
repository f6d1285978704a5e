// The clamped inverse norm of the cosine kernels, one definition for the C++ and the CUDA sources:
//
//   inv_norm(sum_sq, eps) = 1 / max(sqrt(sum_sq), eps)        sum_sq = |v|^2 of one row (a scalar), in acc_t
//   cos(x, y)             = <x, y> * inv_norm(|x|^2, eps) * inv_norm(|y|^2, eps)     (F.cosine_similarity's clamp)
//
// acc_t is the accumulator type (float for half/bfloat16/float inputs, double for double); eps is the op's argument,
// converted to acc_t by the caller. A clamped row (|v| <= eps) gets exactly inv_norm(0, eps) = 1 / eps, and its
// norm is then a constant with no derivative: backwards tell such rows apart from their saved inverse norm alone,
// with norm_clamped below.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace zslfast {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_norm(acc_t sum_sq, acc_t eps) {
  const acc_t norm = std::sqrt(sum_sq);
  // std::max(norm, eps) spelled out, so that host and device pick alike: a NaN norm stays NaN (CUDA's max would
  // return eps).
  return acc_t(1) / (norm < eps ? eps : norm);
}

// Whether a row's norm was clamped to eps, from its inverse norm: the [|v| > eps] factor of the cosine gradients is
// !norm_clamped(inv_norm(|v|^2, eps), eps). A NaN row counts as clamped (its gradient is NaN through the other terms).
template <typename acc_t>
C10_HOST_DEVICE inline bool norm_clamped(acc_t inv, acc_t eps) {
  return !(inv < inv_norm(acc_t(0), eps));
}

}  // namespace zslfast
