// The clamped inverse norm of the cosine kernels, one definition for the C++ and the CUDA sources:
//
//   inv_norm(sum_sq, eps) = 1 / max(sqrt(sum_sq), eps)        sum_sq = |v|^2 of one row (a scalar), in acc_t
//   cos(x, y)             = <x, y> * inv_norm(|x|^2, eps) * inv_norm(|y|^2, eps)     (F.cosine_similarity's clamp)
//
// acc_t is the accumulator type (float for half/bfloat16/float inputs, double for double); eps is the op's argument,
// converted to acc_t by the caller. A clamped row (|v| <= eps) gets exactly inv_norm(0, eps) = 1 / eps, and its
// norm is then a constant with no derivative: backwards tell such rows apart from their saved inverse norm alone,
// with norm_clamped below.
//
// Norms never overflow: |v|^2 overflows acc_t for |v| beyond ~1.8e19 in float (F.normalize then returns
// 0 for a row whose true cosines are O(1)). row_norm takes the plain sum of squares and only when that is inf
// (a rare branch: the common case costs nothing more) takes it again scaled by the row's largest |v_d|:
// |v| = m * |v / m|. A NaN anywhere in the row still makes the norm NaN, and an inf element makes it inf.
#pragma once

#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "enums.h"

namespace zslfast {

// 1 / max(norm, eps)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_clamped(acc_t norm, acc_t eps) {
  // std::max(norm, eps) spelled out, so that host and device pick alike: a NaN norm stays NaN (CUDA's max would
  // return eps).
  return acc_t(1) / (norm < eps ? eps : norm);
}

// 1 / (norm + eps): GEM-ZSL's and PSVMA's x / (|x| + eps), eps added rather than clamped (eps_mode "add")
template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_added(acc_t norm, acc_t eps) {
  return acc_t(1) / (norm + eps);
}

// The inverse norm of eps_mode EpsMode::kClamp (F.normalize's) or EpsMode::kAdd.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_by_mode(acc_t norm, acc_t eps, int64_t eps_mode) {
  return eps_mode == EpsMode::kAdd ? inv_added(norm, eps) : inv_clamped(norm, eps);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t inv_norm(acc_t sum_sq, acc_t eps) {
  return inv_clamped(std::sqrt(sum_sq), eps);
}

// The norm of a row whose plain sum of squares came out as inf: m * sqrt(sum (v_d / m)^2), m = max |v_d|. An inf
// element gives m = inf and a NaN quotient inf / inf, so such a row's norm is NaN (F.normalize's cosine of it is NaN too).
template <typename acc_t, typename T>
inline acc_t rescaled_norm(const T* v, int64_t D) {
  acc_t m = 0;
  for (int64_t d = 0; d < D; ++d) m = std::max(m, static_cast<acc_t>(std::abs(static_cast<acc_t>(v[d]))));
  if (!(m > 0)) return std::sqrt(acc_t(0));
  acc_t sum_sq = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc_t scaled = static_cast<acc_t>(v[d]) / m;
    sum_sq += scaled * scaled;
  }
  return m * std::sqrt(sum_sq);
}

// |v| of a contiguous row of D values without overflow, given its plain sum of squares.
template <typename acc_t, typename T>
inline acc_t row_norm(const T* v, int64_t D, acc_t sum_sq) {
  return sum_sq == std::numeric_limits<acc_t>::infinity() ? rescaled_norm<acc_t>(v, D) : std::sqrt(sum_sq);
}

// Whether a row's norm was clamped to eps, from its inverse norm: the [|v| > eps] factor of the cosine gradients is
// !norm_clamped(inv_norm(|v|^2, eps), eps). A NaN row counts as clamped (its gradient is NaN through the other terms).
template <typename acc_t>
C10_HOST_DEVICE inline bool norm_clamped(acc_t inv, acc_t eps) {
  return !(inv < inv_norm(acc_t(0), eps));
}

// c of a cosine gradient's projection term, grad_v = s * iv * (A - v * c), from the saved inverse norm iv and
// r = iv * <v, A> (A the incoming gradient onto v's normalised row):
//   clamp  c = [|v| > eps] * iv * r                     (iv = 1 / |v| where the norm is not clamped)
//   add    c = r / |v| = iv * r / (1 - eps * iv)        (d/dv v / (|v| + eps) = (I - v v^T / (|v| (|v| + eps))) * iv)
// The add mode reads |v| off iv: 1 - eps * iv = |v| / (|v| + eps), so no norm is saved beside iv. Where |v| << eps
// that quotient loses its relative precision, but the term it scales is then O(|v| / eps) of A, so the absolute error
// stays O(ulp * |A|). A zero row (share <= 0, where rounding may leave 1 - eps * (1 / eps) a hair off 0) gets c = 0,
// its limit; a NaN row gets 0 too (its gradient is NaN through A). iv^2 is never formed: it underflows for |v| ~ 1e30.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t projection_coeff(acc_t iv, acc_t r, acc_t eps, int64_t eps_mode) {
  if (eps_mode == EpsMode::kAdd) {
    const acc_t share = acc_t(1) - eps * iv;
    return share > acc_t(0) ? iv * r / share : acc_t(0);
  }
  return norm_clamped(iv, eps) ? acc_t(0) : iv * r;
}

}  // namespace zslfast
