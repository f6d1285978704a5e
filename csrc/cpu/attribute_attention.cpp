// attribute_attention on CPU: attribute->region cross-attention with a fused cosine/dot epilogue (the math and its
// derivation: zslfast/ops/attribute_attention.py).
//
//   q (K, D) shared or (B, K, D), k (B, R, D), v (B, R, Dv), ref (K, Dv) | (B, K, Dv) | none, mask (B, R) bool | none,
//   bias (B', H, K, R) | none, B'·H = B (the op's heads folded into the batch; strides 0 where broadcast)
//   S = scale * act(q k[b]^T) + bias[b / H, b % H] (K, R),  P = softmax of S over the kept r (a row with none kept
//   is all 0), over the queries, or S on the kept r (SoftmaxOver::kNone),  E = P v[b] (K, Dv)
//   out[b, i] = E[b, i]                                          Score::kNone        out (B, K, Dv)
//             = <E[b, i], ref[i]>                                Score::kDot         out (B, K)
//             = <E, ref> iE iR, iE = 1 / max(|E|, eps), iR likewise  Score::kCosine, F.cosine_similarity's clamp
//   also e = E (B, K, Dv) for the backward, lse (B, K) = log sum_{kept r} exp(S) (0 for a fully masked row), and
//   attn = P or S (masked -inf) (B, K, R) only when asked for.
//
//   Masked tokens are selected away, never multiplied by 0 (a NaN or inf in padding would survive 0 * x): k and v
//   are read with their masked rows zeroed, P and dS are 0 there by a select, and dk, dv rows of masked tokens are
//   set to 0 after their GEMMs (a NaN query row would otherwise reach them as 0 * NaN). A NaN logit makes its row
//   NaN (softmax_row does not take an all-NaN row for a fully masked one).
//   The cosine's norms and <E, ref> never overflow: plain sums where finite, rescaled by the rows' largest
//   |x_d| where one overflowed (cosine_row); its gradient never forms iE iR or iE^2 (they underflow for |E| ~ 1e30 in
//   float), see score_grad.
//
//   forward, one work unit per (b, tile of query rows), at::parallel_for over the units (forward_unit):
//       S = q_tile @ k[b]^T, then scale, bias    at::mm into a (rows x R) scratch tile (single-threaded inside the
//       P = softmax(S) over kept r               parallel region, as ATen runs nested ops), softmax in place,
//       E_tile = P @ v[b]                        at::mm straight into E (or a scratch tile when no backward comes),
//       out[b, i] = score(E[b, i], ref[i])       then the cosine/dot epilogue per row.
//   backward, one work unit per b (its dk[b], dv[b] need every query row; backward_sample):
//       dE from the epilogue's gradient, P recomputed as the softmax of the whole row (the saved lse is not read),
//       or the forward's P where the op kept it (the probs argument: see the op's "Memory and the backward"),
//       dP = dE @ v[b]^T (+ grad_attn), dS = P * ((dP - shift) - delta) (= dbias) with shift = dP at the row's
//       arg-max and delta = sum_r P (dP - shift) from the row (SoftmaxGrad: exact on near one-hot rows, where
//       dP - sum_r P dP keeps nothing of the true gradient, in float or double; <dE, E> cancels worse still),
//       dT = scale * dS, dv[b] = P^T @ dE, dk[b] = dT^T @ q_b, dq[b] = dT @ k[b] (per-sample q).
//   Shared q: each unit writes its dS into a (K, B, R) buffer, then one GEMM dq = buf (K, B*R) @ k (B*R, D) sums
//   over b and one more gives every dk = buf^T (B*R, K) @ q (K, D); shared ref: per-row coefficients, then a pass
//   over rows that sums over b in order. No atomics, every sum in a fixed order: deterministic. Nothing of size (B, K, R) is kept between forward and backward but the
//   P the op chose to keep (probs).
// Accumulation in float (double for double); fp16/bf16 inputs are converted to float first.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/fixed_gemm.h"
#include "cpu/simd.h"
#include "enums.h"
#include "inv_norm.h"

namespace zslfast {
namespace {

// The options' ids (csrc/enums.h): ReturnAttention, SoftmaxOver, LogitActivation, ReturnMax.
struct Options {
  int64_t return_attention, softmax_over, logit_activation, return_max;
};

Options check_options(int64_t return_attention, int64_t softmax_over, int64_t logit_activation, int64_t return_max,
                      const char* op) {
  TORCH_CHECK(return_attention >= ReturnAttention::kNone && return_attention <= ReturnAttention::kLogits, op,
              ": bad return_attention id ", return_attention);
  TORCH_CHECK(softmax_over >= SoftmaxOver::kKeys && softmax_over <= SoftmaxOver::kNone, op, ": bad softmax_over id ",
              softmax_over);
  TORCH_CHECK(logit_activation == LogitActivation::kNone || logit_activation == LogitActivation::kRelu, op,
              ": bad logit_activation id ", logit_activation);
  TORCH_CHECK(return_max >= ReturnMax::kNone && return_max <= ReturnMax::kLogits, op, ": bad return_max id ",
              return_max);
  return {return_attention, softmax_over, logit_activation, return_max};
}

// ------------------------------------------------------------------------------------------------------ row loops

// exp for float rows through exp_poly (cpu/simd.h), which vectorises; exp(-inf) = 0 for masked scores, and anything
// below -87.3 flushes to 0 as well.
ZSLFAST_SIMD_CLONES
void exp_rows_float(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = v < -87.3f ? 0.0f : exp_poly(v);
  }
}

template <typename acc_t>
void exp_rows(acc_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    exp_rows_float(x, n);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
  }
}

template <typename acc_t>
acc_t row_dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// Softmax of the logits s over the kept entries of one row, in place; returns the row's log-sum-exp (0 when no entry
// is kept, or every kept logit is -inf (a -inf bias): the row is all zeros then, as torch's SDPA gives it). Masked
// entries become exactly 0, whatever their logits (a NaN or inf bias there); a NaN kept logit makes the kept
// entries and the lse NaN (std::max skips NaN, so an all-NaN row must not pass for a fully masked one).
template <typename acc_t>
acc_t softmax_row(acc_t* s, const bool* keep, int64_t R) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t r = 0; r < R; ++r) {
    if (keep == nullptr || keep[r]) {
      m = std::max(m, s[r]);
      nan |= std::isnan(s[r]);
    }
  }
  if (m == -std::numeric_limits<acc_t>::infinity() && !nan) {
    std::fill(s, s + R, acc_t(0));
    return acc_t(0);
  }
  for (int64_t r = 0; r < R; ++r) s[r] = (keep == nullptr || keep[r]) ? s[r] - m : -std::numeric_limits<acc_t>::infinity();
  exp_rows(s, R);
  acc_t sum = 0;
  for (int64_t r = 0; r < R; ++r) sum += s[r];
  const acc_t inv = acc_t(1) / sum;
  if (keep == nullptr) {
    for (int64_t r = 0; r < R; ++r) s[r] *= inv;
  } else {
    for (int64_t r = 0; r < R; ++r) s[r] = keep[r] ? s[r] * inv : acc_t(0);  // 0, not 0 * a NaN inv
  }
  return m + std::log(sum);
}

// relu in place, as torch.relu: NaN stays NaN (a select, not std::max, which would turn NaN into 0).
template <typename acc_t>
void relu_rows(acc_t* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] < acc_t(0) ? acc_t(0) : x[j];
}

// The max over the kept entries of a row and its index, as torch.max(dim) returns them: the first index reaching
// it, a NaN winning (the first NaN). (0, -1) for a row with no kept entry.
template <typename acc_t>
std::pair<acc_t, int32_t> row_max(const acc_t* x, const bool* keep, int64_t R) {
  int64_t index = -1;
  acc_t best = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (keep != nullptr && !keep[r]) continue;
    if (std::isnan(x[r])) return {x[r], static_cast<int32_t>(r)};
    if (index < 0 || x[r] > best) {
      best = x[r];
      index = r;
    }
  }
  return {index < 0 ? acc_t(0) : best, static_cast<int32_t>(index)};
}

// Softmax over the rows of each kept column of the logits s (rows, R) (softmax_over "queries"), in place;
// lse[r] = log sum_i exp(s[i, r]) of each kept column, 0 for a masked one, whose entries become 0 (a select), and
// for a column of -inf logits alone (a -inf bias), all 0 as well, as softmax_row's rows. A NaN in a kept column
// makes that column and its lse NaN (the running max carries it).
template <typename acc_t>
void softmax_columns(acc_t* s, const bool* keep, int64_t rows, int64_t R, acc_t* lse) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> col_max(R, -inf), col_sum(R, acc_t(0));
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row = s + i * R;
    for (int64_t r = 0; r < R; ++r) {
      col_max[r] = (row[r] > col_max[r] || std::isnan(row[r])) ? row[r] : col_max[r];
    }
  }
  std::vector<uint8_t> live(R);  // kept, and not all -inf
  for (int64_t r = 0; r < R; ++r) live[r] = (keep == nullptr || keep[r]) && col_max[r] != -inf;
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row = s + i * R;
    for (int64_t r = 0; r < R; ++r) row[r] = live[r] ? row[r] - col_max[r] : -inf;
    exp_rows(row, R);
    for (int64_t r = 0; r < R; ++r) col_sum[r] += row[r];
  }
  for (int64_t r = 0; r < R; ++r) {
    lse[r] = live[r] ? col_max[r] + std::log(col_sum[r]) : acc_t(0);
    col_sum[r] = live[r] ? acc_t(1) / col_sum[r] : acc_t(0);
  }
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row = s + i * R;
    for (int64_t r = 0; r < R; ++r) row[r] = live[r] ? row[r] * col_sum[r] : acc_t(0);
  }
}

// sums[r] += p[r] * (dp[r] - shift[r]): one row's share of the column sums delta (softmax over the queries, the
// columns' SoftmaxGrad), rows in order.
template <typename acc_t>
void axpy_columns(acc_t* sums, const acc_t* p, const acc_t* dp, const acc_t* shift, int64_t R) {
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) sums[r] += p[r] * (dp[r] - shift[r]);
}

// out[j] = s * (a * x[j] - c * y[j])
template <typename acc_t>
void combine_rows(acc_t* out, acc_t s, acc_t a, const acc_t* x, acc_t c, const acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = s * (a * x[j] - c * y[j]);
}

// out[j] += a * x[j]
template <typename acc_t>
void axpy_row(acc_t* out, acc_t a, const acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += a * x[j];
}

// The index of the largest kept p (the first among equals), -1 when none is kept: the softmax's dominant entry,
// whose dP shifts the backward (SoftmaxGrad).
template <typename acc_t>
int64_t row_argmax(const acc_t* p, const bool* keep, int64_t R) {
  int64_t top = -1;
  for (int64_t r = 0; r < R; ++r) {
    if ((keep == nullptr || keep[r]) && (top < 0 || p[r] > p[top])) top = r;
  }
  return top;
}

// The softmax backward dS = P (dP - Delta), Delta = sum_r P dP, taken as dS = P ((dP - shift) - delta) with
// shift = dP at the arg-max of P and delta = sum_r P (dP - shift) (the same number, since sum_r P = 1). Where P is
// near one-hot, Delta = P_top dP_top + (tiny terms) rounds to dP_top in any precision, and dP_top - Delta keeps
// nothing of the true dS_top = -sum_{r != top} P_r (dP_r - dP_top); shifted, the top's own term is exactly 0 and
// delta is a sum of the small terms alone, so every dS keeps its relative accuracy whatever the accumulator.
template <typename acc_t>
struct SoftmaxGrad {
  acc_t shift, delta;
};

// dP row in place: dp[r] += ga[r] (the returned attention's gradient); then its shift and delta (SoftmaxGrad) for
// the row's arg-max top (-1, none kept: shift 0).
template <typename acc_t>
SoftmaxGrad<acc_t> grad_probs_row(acc_t* dp, const acc_t* p, const acc_t* ga, int64_t top, int64_t R) {
  if (ga != nullptr) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) dp[r] += ga[r];
  }
  const acc_t shift = top >= 0 ? dp[top] : acc_t(0);
  acc_t delta = 0;
#pragma omp simd reduction(+ : delta)
  for (int64_t r = 0; r < R; ++r) delta += p[r] * (dp[r] - shift);
  return {shift, delta};
}

// dS row in place over dP: ds[r] = p[r] * ((dp[r] - shift) - delta) on kept r, and 0 (a select: delta may be NaN)
// on masked ones.
template <typename acc_t>
void softmax_grad_row(acc_t* dp, const acc_t* p, const bool* keep, SoftmaxGrad<acc_t> g, int64_t R) {
  const acc_t shift = g.shift, delta = g.delta;
  if (keep == nullptr) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) dp[r] = p[r] * ((dp[r] - shift) - delta);
  } else {
    for (int64_t r = 0; r < R; ++r) dp[r] = keep[r] ? p[r] * ((dp[r] - shift) - delta) : acc_t(0);
  }
}

// x = keep ? x : 0 over rows (rows, R): the kept logits as they are (softmax_over "none"), or a gradient with its
// masked entries zeroed (a select: they may hold NaN).
template <typename acc_t>
void keep_only(acc_t* x, const bool* keep, int64_t rows, int64_t R) {
  if (keep == nullptr) return;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t r = 0; r < R; ++r) x[i * R + r] = keep[r] ? x[i * R + r] : acc_t(0);
  }
}

// Rows of masked tokens set to 0 in a (R, n) gradient: exact zeros even where a NaN query row met them in a GEMM.
template <typename acc_t>
void zero_masked_rows(acc_t* grad, const bool* keep, int64_t R, int64_t n) {
  if (keep == nullptr) return;
  for (int64_t r = 0; r < R; ++r) {
    if (!keep[r]) std::fill(grad + r * n, grad + (r + 1) * n, acc_t(0));
  }
}

// ------------------------------------------------------------------------------------------------------ logits

// The bias (B, H, K, R) as the kernels read it: batch n = b H + h, row i reads bias[b, h, i, :] with stride s3.
template <typename acc_t>
struct BiasRows {
  const acc_t* data;  // null without a bias
  int64_t heads, s0, s1, s2, s3;

  const acc_t* row(int64_t n, int64_t i) const { return data + (n / heads) * s0 + (n % heads) * s1 + i * s2; }
};

// The bias in acc_t without its broadcast: each dimension of stride 0 narrowed to one element first, so that the
// conversion (and contiguous()) copies only the caller's own tensor, never the (B, H, K, R) view.
at::Tensor compact_bias(const c10::optional<at::Tensor>& bias, at::ScalarType acc_type) {
  if (!bias.has_value()) return at::Tensor();
  at::Tensor t = *bias;
  for (int64_t dim = 0; dim < 4; ++dim) {
    if (t.stride(dim) == 0 && t.size(dim) > 1) t = t.narrow(dim, 0, 1);
  }
  return t.to(acc_type).contiguous();
}

// Its rows (the broadcast dimensions at stride 0 again), for a compact bias of the view's shape (heads: its H).
template <typename acc_t>
BiasRows<acc_t> bias_rows(const at::Tensor& compact, int64_t heads) {
  if (!compact.defined()) return {nullptr, 1, 0, 0, 0, 0};
  auto stride = [&](int64_t dim) { return compact.size(dim) == 1 ? int64_t(0) : compact.stride(dim); };
  return {compact.data_ptr<acc_t>(), heads, stride(0), stride(1), stride(2), stride(3)};
}

// The logits of rows [i0, i0 + rows) of batch n in place of T = q k^T in s (rows, R): S = scale * act(T) + bias.
template <typename acc_t>
void form_logits(acc_t* s, int64_t rows, int64_t R, acc_t scale, bool relu, const BiasRows<acc_t>& bias, int64_t n,
                 int64_t i0) {
  if (relu) relu_rows(s, rows * R);
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row = s + i * R;
    if (bias.data == nullptr) {
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) row[r] *= scale;
    } else {
      const acc_t* b = bias.row(n, i0 + i);
      const int64_t step = bias.s3;
      for (int64_t r = 0; r < R; ++r) row[r] = row[r] * scale + b[r * step];
    }
  }
}

// The probabilities of the logits s (rows, R), rows [i0, i0 + rows) of one batch, in place: the softmax of each row
// (its lse into lse_rows[i]), of each column (every row of the batch: lse_columns (R,)), or the kept logits
// themselves (softmax_over "none": no lse).
template <typename acc_t>
void probabilities(acc_t* s, const bool* keep, int64_t rows, int64_t R, int64_t softmax_over, acc_t* lse_rows,
                   acc_t* lse_columns) {
  if (softmax_over == SoftmaxOver::kQueries) {
    softmax_columns<acc_t>(s, keep, rows, R, lse_columns);
  } else if (softmax_over == SoftmaxOver::kKeys) {
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t lse = softmax_row<acc_t>(s + i * R, keep, R);
      if (lse_rows != nullptr) lse_rows[i] = lse;
    }
  } else {
    keep_only(s, keep, rows, R);
  }
}

// ------------------------------------------------------------------------------------------------- the epilogue

// The cosine of one row and its clamped inverse norms iE = 1 / max(|E|, eps), iR = 1 / max(|ref|, eps), without
// overflow: the plain sums |E|^2, |ref|^2, <E, ref> where all are finite (the common case, no extra cost); where
// one overflowed (|x| beyond ~1.8e19 in float), the sums of x / max|x_d| instead, so |E| = m_e |E / m_e| and
// cos = <E/m_e, ref/m_r> (m_e iE) (m_r iR). A NaN in either row makes the cosine NaN.
template <typename acc_t>
struct Cosine {
  acc_t cos, ie, ir;
};

template <typename acc_t>
acc_t row_abs_max(const acc_t* x, int64_t n) {
  acc_t m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, std::abs(x[j]));
  return m > 0 ? m : acc_t(1);  // (1 for a zero row; a NaN row stays NaN through its sums)
}

template <typename acc_t>
Cosine<acc_t> cosine_row(const acc_t* e_row, const acc_t* r_row, int64_t Dv, acc_t eps) {
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t e_sq = row_dot(e_row, e_row, Dv), r_sq = row_dot(r_row, r_row, Dv), dot = row_dot(e_row, r_row, Dv);
  if (e_sq != inf && r_sq != inf && std::abs(dot) != inf) {
    const acc_t ie = inv_norm(e_sq, eps), ir = inv_norm(r_sq, eps);
    return {dot * ie * ir, ie, ir};
  }
  const acc_t m_e = row_abs_max(e_row, Dv), m_r = row_abs_max(r_row, Dv);
  acc_t se = 0, sr = 0, sd = 0;
  for (int64_t j = 0; j < Dv; ++j) {
    const acc_t x = e_row[j] / m_e, y = r_row[j] / m_r;
    se += x * x;
    sr += y * y;
    sd += x * y;
  }
  const acc_t ie = inv_clamped(m_e * std::sqrt(se), eps), ir = inv_clamped(m_r * std::sqrt(sr), eps);
  return {sd * (m_e * ie) * (m_r * ir), ie, ir};
}

// The score of one row: <E, ref> (dot) or cos(E, ref) (cosine_row).
template <typename acc_t>
acc_t score_row(const acc_t* e_row, const acc_t* r_row, int64_t Dv, int64_t mode, acc_t eps) {
  if (mode != Score::kCosine) return row_dot(e_row, r_row, Dv);
  return cosine_row(e_row, r_row, Dv, eps).cos;
}

// The score's gradient for one row as linear combinations of E and ref, g = dL/dout:
//   dE = s_e (a_e ref - c_e E),   dref = n_r (a_r E - c_r ref)
//   dot     s_e = a_r = g,  a_e = n_r = 1,  c_e = c_r = 0
//   cosine  s_e = g iE, a_e = iR, c_e = [|E| > eps] cos iE;   n_r = iR, a_r = g iE, c_r = [|ref| > eps] g cos iR
// (a clamped norm is the constant eps: it has no derivative, hence the indicators). Neither iE iR nor iE^2 is ever
// formed: for |E| ~ |ref| ~ 1e30 they underflow float while every factor above stays in range. n_r is the part
// of dref common to every b for a shared ref (its iR), which shared_ref_grad applies once after the sum over b.
template <typename acc_t>
struct ScoreGrad {
  acc_t s_e, a_e, c_e, n_r, a_r, c_r;
};

template <typename acc_t>
ScoreGrad<acc_t> score_grad(const acc_t* e_row, const acc_t* r_row, int64_t Dv, int64_t mode, acc_t g, acc_t eps) {
  if (mode == Score::kDot) return {g, acc_t(1), acc_t(0), acc_t(1), g, acc_t(0)};
  const Cosine<acc_t> c = cosine_row(e_row, r_row, Dv, eps);
  return {g * c.ie, c.ir, norm_clamped(c.ie, eps) ? acc_t(0) : c.cos * c.ie,
          c.ir, g * c.ie, norm_clamped(c.ir, eps) ? acc_t(0) : g * c.cos * c.ir};
}

// ------------------------------------------------------------------------------------------------------- checks

struct Dims {
  int64_t B, K, R, D, Dv;
  bool shared_q, shared_ref;
};

Dims check_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& ref,
                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias, int64_t mode,
                const char* op) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && (q.dim() == 2 || q.dim() == 3), op,
              ": expected q (K, D) or (B, K, D), k (B, R, D), v (B, R, Dv), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  Dims d{k.size(0), q.size(-2), k.size(1), k.size(2), v.size(2), q.dim() == 2, true};
  TORCH_CHECK(v.size(0) == d.B && v.size(1) == d.R && q.size(-1) == d.D && (q.dim() == 2 || q.size(0) == d.B), op,
              ": shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(mode == Score::kNone || mode == Score::kDot || mode == Score::kCosine, op, ": bad score id ", mode);
  if (mode != Score::kNone) {
    TORCH_CHECK(ref.has_value(), op, ": score id ", mode, " needs ref");
    const auto& r = *ref;
    TORCH_CHECK((r.dim() == 2 && r.size(0) == d.K && r.size(1) == d.Dv) ||
                    (r.dim() == 3 && r.size(0) == d.B && r.size(1) == d.K && r.size(2) == d.Dv),
                op, ": ref must be (K, Dv) or (B, K, Dv), got ", r.sizes());
    d.shared_ref = r.dim() == 2;
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == d.B && mask->size(1) == d.R, op, ": mask must be (B, R), got ",
                mask->sizes());
  }
  if (bias.has_value()) {
    const auto& t = *bias;
    TORCH_CHECK(t.dim() == 4 && t.size(0) * t.size(1) == d.B && t.size(2) == d.K && t.size(3) == d.R &&
                    t.scalar_type() == q.scalar_type(),
                op, ": bias must be a (B, H, K, R) view with B·H = ", d.B, ", K = ", d.K, ", R = ", d.R,
                " in q's dtype, got ", t.sizes(), " ", t.scalar_type());
  }
  return d;
}

// The backward's own inputs: e (B, K, Dv), lse (B, K), grad like the forward's out.
void check_backward_inputs(const Dims& d, int64_t mode, const Options& options, const at::Tensor& grad,
                           const at::Tensor& e, const at::Tensor& lse, const char* op) {
  TORCH_CHECK(e.dim() == 3 && e.size(0) == d.B && e.size(1) == d.K && e.size(2) == d.Dv, op,
              ": e must be (B, K, Dv), got ", e.sizes());
  const int64_t lse_size = options.softmax_over == SoftmaxOver::kQueries ? d.R : d.K;
  TORCH_CHECK(options.softmax_over == SoftmaxOver::kNone ||
                  (lse.dim() == 2 && lse.size(0) == d.B && lse.size(1) == lse_size),
              op, ": lse must be (B, ", options.softmax_over == SoftmaxOver::kQueries ? "R" : "K", "), got ",
              lse.sizes());
  if (mode == Score::kNone) {
    TORCH_CHECK(grad.dim() == 3 && grad.sizes() == e.sizes(), op, ": grad must be (B, K, Dv), got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == d.B && grad.size(1) == d.K, op, ": grad must be (B, K), got ",
                grad.sizes());
  }
}

// The inputs in the accumulator type, contiguous: the kernels read raw rows and run at::mm in acc_t.
at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc_type) { return t.to(acc_type).contiguous(); }

// k or v (B, R, n) in acc_t with the rows of masked tokens selected to 0: whatever padding holds (NaN, inf) then
// never reaches a GEMM, where a 0 weight would not stop it (0 * NaN = NaN).
at::Tensor to_acc_kept(const at::Tensor& t, const at::Tensor& mask, at::ScalarType acc_type) {
  if (!mask.defined()) return to_acc(t, acc_type);
  return at::where(mask.unsqueeze(-1), t.to(acc_type), at::zeros({}, t.options().dtype(acc_type))).contiguous();
}

// ------------------------------------------------------------------------------------------------------ forward

// What every forward work unit reads and writes.
template <typename scalar_t>
struct Forward {
  using acc_t = at::opmath_type<scalar_t>;
  Dims d;
  int64_t mode;
  Options options;
  acc_t scale, eps;
  at::Tensor q, k, v;  // acc_t, contiguous; k, v with masked rows 0 (to_acc_kept)
  const acc_t* ref;    // (K, Dv) or (B, K, Dv); null for Score::kNone
  const bool* keep;    // mask (B, R), or null
  BiasRows<acc_t> bias;  // data null without a bias
  acc_t* lse;          // (B, K), or (B, R) for the softmax over the queries; null for softmax_over kNone
  scalar_t* out;       // the scores (B, K); null for Score::kNone, whose out is E
  scalar_t* attn;      // P or S (B, K, R) when return_attention, else null
  acc_t* best;         // the max over kept r of P or S (B, K) when asked for (return_max), else null
  int32_t* best_index; // its r (B, K), -1 for a row with no kept r
};

// The max (return_max) of rows [i0, i0 + rows) of sample b over the kept r of x (rows, R).
template <typename scalar_t>
void store_row_max(const Forward<scalar_t>& f, int64_t b, int64_t i0, int64_t rows, const at::opmath_type<scalar_t>* x,
                   const bool* keep) {
  const Dims& d = f.d;
  for (int64_t i = 0; i < rows; ++i) {
    const auto [best, index] = row_max(x + i * d.R, keep, d.R);
    f.best[b * d.K + i0 + i] = best;
    f.best_index[b * d.K + i0 + i] = index;
  }
}

// The map returned (return_attention) for rows [i0, i0 + rows) of sample b: x (rows, R), masked entries -inf
// (the logits; keep null for P, already 0 there).
template <typename scalar_t>
void store_map(const Forward<scalar_t>& f, int64_t b, int64_t i0, int64_t rows, const at::opmath_type<scalar_t>* x,
               const bool* keep) {
  const int64_t R = f.d.R;
  scalar_t* a = f.attn + (b * f.d.K + i0) * R;
  const scalar_t masked = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t r = 0; r < R; ++r) {
      a[i * R + r] = keep == nullptr || keep[r] ? static_cast<scalar_t>(x[i * R + r]) : masked;
    }
  }
}

// P for query rows [i0, i0 + rows) of sample b (every row for the softmax over the queries), in place of their
// T = q k^T in s (rows, R): the logits S formed, their max and map taken, then P, its lse saved, its max and map.
template <typename scalar_t>
void attention_tile(const Forward<scalar_t>& f, int64_t b, int64_t i0, int64_t rows, at::Tensor& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = f.d;
  at::mm_out(s, (d.shared_q ? f.q : f.q.select(0, b)).narrow(0, i0, rows), f.k.select(0, b).t());
  acc_t* p = s.data_ptr<acc_t>();
  const bool* keep = f.keep != nullptr ? f.keep + b * d.R : nullptr;
  form_logits(p, rows, d.R, f.scale, f.options.logit_activation == LogitActivation::kRelu, f.bias, b, i0);
  if (f.options.return_max == ReturnMax::kLogits) store_row_max(f, b, i0, rows, p, keep);
  if (f.options.return_attention == ReturnAttention::kLogits) store_map(f, b, i0, rows, p, keep);
  acc_t* lse_rows = f.lse != nullptr ? f.lse + b * d.K + i0 : nullptr;
  acc_t* lse_columns = f.lse != nullptr ? f.lse + b * d.R : nullptr;
  probabilities(p, keep, rows, d.R, f.options.softmax_over, lse_rows, lse_columns);
  if (f.options.return_max == ReturnMax::kAttention) store_row_max(f, b, i0, rows, p, keep);
  if (f.options.return_attention == ReturnAttention::kAttention) store_map(f, b, i0, rows, p, nullptr);
}

// One work unit, rows [i0, i0 + rows) of sample b: P into s_buf, E_tile = P @ v[b] into e_tile (rows of E, or a
// scratch tile when nothing keeps E), then the scores of those rows (modes 1 and 2).
template <typename scalar_t>
void forward_unit(const Forward<scalar_t>& f, int64_t b, int64_t i0, int64_t rows, const at::Tensor& s_buf,
                  at::Tensor& e_tile) {
  using acc_t = at::opmath_type<scalar_t>;
  const Dims& d = f.d;
  at::Tensor s = s_buf.narrow(0, 0, rows);
  attention_tile(f, b, i0, rows, s);
  at::mm_out(e_tile, s, f.v.select(0, b));
  if (f.mode == Score::kNone) return;
  const acc_t* e_rows = e_tile.data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* r_row = f.ref + ((d.shared_ref ? 0 : b * d.K) + i0 + i) * d.Dv;
    f.out[b * d.K + i0 + i] = static_cast<scalar_t>(score_row(e_rows + i * d.Dv, r_row, d.Dv, f.mode, f.eps));
  }
}

// Query rows per forward unit: whole rows of K when the batch alone keeps every thread busy, else K split so that
// there are a few units per thread.
int64_t query_tile(const Dims& d, const Options& options) {
  if (options.softmax_over == SoftmaxOver::kQueries) return d.K;  // each token's softmax runs over every query row
  const int64_t threads = at::get_num_threads();
  const int64_t per_b = std::max<int64_t>(1, (4 * threads + d.B - 1) / d.B);
  return std::max<int64_t>(std::min<int64_t>(d.K, 16), (d.K + per_b - 1) / per_b);
}

// The units (b, query tile) over the threads; each thread owns one scratch tile for S/P and, when E is not kept
// (e undefined: scores without a backward), one for E.
template <typename scalar_t>
void run_forward(const Forward<scalar_t>& f, const at::Tensor& e) {
  const Dims& d = f.d;
  const int64_t tile = query_tile(d, f.options), tiles = (d.K + tile - 1) / tile;
  at::parallel_for(0, d.B * tiles, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: on again in the pool's threads
    const SequentialBlas sequential;       // a unit's GEMMs on one thread: results independent of the thread count
    const at::Tensor s_buf = at::empty({tile, d.R}, f.q.options());
    const at::Tensor e_buf = e.defined() ? at::Tensor() : at::empty({tile, d.Dv}, f.q.options());
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / tiles, i0 = (unit % tiles) * tile, rows = std::min(tile, d.K - i0);
      at::Tensor e_tile = e.defined() ? e.select(0, b).narrow(0, i0, rows) : e_buf.narrow(0, 0, rows);
      forward_unit(f, b, i0, rows, s_buf, e_tile);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attribute_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& ref_in,
    const c10::optional<at::Tensor>& mask_in, const c10::optional<at::Tensor>& bias_in, double scale, int64_t mode,
    double eps, int64_t return_attention, bool save_e, int64_t softmax_over, int64_t logit_activation,
    int64_t return_max) {
  const char* op = "zslfast::_attribute_attention_fwd";
  const Dims d = check_dims(q_in, k_in, v_in, ref_in, mask_in, bias_in, mode, op);
  const Options options = check_options(return_attention, softmax_over, logit_activation, return_max, op);
  const at::NoGradGuard no_grad;  // the at::mm_out calls reject inputs that require grad
  const auto acc_type = at::toOpMathType(q_in.scalar_type());
  const auto in_opts = q_in.options(), acc_opts = in_opts.dtype(acc_type);
  const at::Tensor ref = mode != Score::kNone ? to_acc(*ref_in, acc_type) : at::Tensor();
  const at::Tensor mask = mask_in.has_value() ? mask_in->to(at::kBool).contiguous() : at::Tensor();
  // Scores without a backward to come: E lives in per-thread scratch tiles, never in a (B, K, Dv) tensor.
  const bool keep_e = mode == Score::kNone || save_e;
  at::Tensor e = keep_e ? at::empty({d.B, d.K, d.Dv}, acc_opts) : at::Tensor();
  const at::Tensor bias = compact_bias(bias_in, acc_type);
  const bool normalised = options.softmax_over != SoftmaxOver::kNone;
  at::Tensor lse = normalised ? at::empty({d.B, options.softmax_over == SoftmaxOver::kQueries ? d.R : d.K}, acc_opts)
                              : at::empty({0}, acc_opts);
  const bool pooled = return_max != ReturnMax::kNone;
  const std::vector<int64_t> pooled_shape = pooled ? std::vector<int64_t>{d.B, d.K} : std::vector<int64_t>{0};
  at::Tensor best = at::empty(pooled_shape, acc_opts);
  at::Tensor best_index = at::empty(best.sizes(), in_opts.dtype(at::kInt));
  const bool returned = return_attention != ReturnAttention::kNone;
  at::Tensor attn = returned ? at::empty({d.B, d.K, d.R}, in_opts) : at::empty({0}, in_opts);
  at::Tensor out = mode != Score::kNone ? at::empty({d.B, d.K}, in_opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "attribute_attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Forward<scalar_t> f{d,
                              mode,
                              options,
                              static_cast<acc_t>(scale),
                              static_cast<acc_t>(eps),
                              to_acc(q_in, acc_type),
                              to_acc_kept(k_in, mask, acc_type),
                              to_acc_kept(v_in, mask, acc_type),
                              ref.defined() ? ref.data_ptr<acc_t>() : nullptr,
                              mask.defined() ? mask.data_ptr<bool>() : nullptr,
                              bias_rows<acc_t>(bias, bias_in.has_value() ? bias_in->size(1) : 1),
                              normalised ? lse.data_ptr<acc_t>() : nullptr,
                              out.defined() ? out.data_ptr<scalar_t>() : nullptr,
                              returned ? attn.data_ptr<scalar_t>() : nullptr,
                              pooled ? best.data_ptr<acc_t>() : nullptr,
                              pooled ? best_index.data_ptr<int32_t>() : nullptr};
    run_forward(f, e);
  });
  if (mode == Score::kNone) return {e.scalar_type() == q_in.scalar_type() ? e : e.to(q_in.scalar_type()),
                             at::empty({0}, acc_opts), lse, attn, best, best_index};
  return {out, e.defined() ? e : at::empty({0}, acc_opts), lse, attn, best, best_index};
}

// ----------------------------------------------------------------------------------------------------- backward

// What every backward unit reads and writes; all in acc_t, contiguous.
template <typename acc_t>
struct Backward {
  Dims d;
  int64_t mode;
  Options options;
  acc_t scale, eps;
  bool need_q, need_k, need_v, need_ref, need_bias;
  at::Tensor q, k, v;       // the forward's inputs (k, v with masked rows 0, to_acc_kept)
  at::Tensor g;             // dL/dout: (B, K) for the scores, (B, K, Dv) = dE for Score::kNone
  const acc_t* g_data;      // g's data
  const acc_t* e;           // E (B, K, Dv)
  const acc_t* lse;         // (B, K): not read (P is recomputed as a whole-row softmax, softmax_backward)
  const acc_t* probs;       // the forward's P (B, K, R) when the op kept it, else null (recomputed)
  const acc_t* ref;         // (K, Dv) or (B, K, Dv); null for Score::kNone
  const bool* keep;         // mask (B, R), or null
  BiasRows<acc_t> bias;     // data null without a bias
  const acc_t* grad_attn;   // (B, K, R), or null: of P (ReturnAttention::kAttention) or of S (kLogits)
  at::Tensor grad_q, grad_k, grad_v;  // like q, k, v; undefined when not needed
  acc_t* grad_bias;         // dS (B, K, R) when need_bias, else null
  acc_t* grad_ref;          // like ref when needed; a shared ref's is written after the units (shared_ref_grad)
  acc_t* coef_a;            // shared ref: a_r, c_r of every (b, i), (B, K) each (score_grad)
  acc_t* coef_c;
  at::Tensor ds_all;        // shared q and need_q or need_k: every b's dS, (K, B, R)
  const acc_t* grad_max;    // dL/dmax (B, K) (return_max), or null
  const int32_t* best_index;  // the forward's arg-max r (B, K), -1 for a row with no kept r; null without return_max
};

// Row i of sample b of a score: dE[i] = s_e (a_e ref - c_e E) into de_row, and its share of the ref gradient (the
// row of grad_ref for a per-sample ref; the coefficients, summed over b later, for a shared one).
template <typename acc_t>
void score_backward_row(const Backward<acc_t>& w, int64_t b, int64_t i, const acc_t* e_row, acc_t* de_row) {
  const Dims& d = w.d;
  const int64_t row = b * d.K + i;
  const acc_t* r_row = w.ref + ((d.shared_ref ? 0 : b * d.K) + i) * d.Dv;
  const ScoreGrad<acc_t> c = score_grad(e_row, r_row, d.Dv, w.mode, w.g_data[row], w.eps);
  combine_rows(de_row, c.s_e, c.a_e, r_row, c.c_e, e_row, d.Dv);
  if (!w.need_ref) return;
  if (d.shared_ref) {
    w.coef_a[row] = c.a_r;
    w.coef_c[row] = c.c_r;
  } else {
    combine_rows(w.grad_ref + row * d.Dv, c.n_r, c.a_r, e_row, c.c_r, r_row, d.Dv);
  }
}

// dE of sample b into de (for Score::kNone de is the incoming grad itself, left as is).
template <typename acc_t>
void epilogue_backward(const Backward<acc_t>& w, int64_t b, acc_t* de) {
  const Dims& d = w.d;
  if (w.mode == Score::kNone) return;
  for (int64_t i = 0; i < d.K; ++i) score_backward_row(w, b, i, w.e + (b * d.K + i) * d.Dv, de + i * d.Dv);
}

// Whether the backward of sample b needs S and P recomputed: always with a softmax or the relu; without them (dS = dP),
// for dv = P^T dE alone.
template <typename acc_t>
bool needs_probabilities(const Backward<acc_t>& w) {
  return w.options.softmax_over != SoftmaxOver::kNone || w.options.logit_activation == LogitActivation::kRelu ||
         w.need_v;
}

// dT (of T = q k^T, before the activation) of sample b, written over dp, with dS (of the logits S) on the way:
// P is the forward's, when the op kept it (w.probs: one GEMM and the softmax fewer; never with the relu, whose
// backward reads T), else S = scale * act(T) + bias recomputed into p (K, R), then P as the softmax of each whole
// row or of each whole column (softmax over the queries), or S itself on the kept r (no softmax). dP = dE @ v[b]^T
// (+ the gradient of the returned P) (+ dL/dmax at the arg-max for the attention's max); dS = P * ((dP - shift) -
// delta) on the kept r with the row's (or the column's) SoftmaxGrad, or dP itself without a softmax (+ dL/dmax at
// the arg-max for the logits' max) (+ the gradient of the returned S), 0 on masked r; dS is dbias; dT = scale * dS [not T <= 0 for the relu]
// (torch's rule: NaN passes).
template <typename acc_t>
void softmax_backward(const Backward<acc_t>& w, int64_t b, const at::Tensor& de, at::Tensor& p, at::Tensor& dp,
                      std::vector<uint8_t>& positive) {
  const Dims& d = w.d;
  const bool relu = w.options.logit_activation == LogitActivation::kRelu;
  const bool kept_p = w.probs != nullptr;
  at::mm_out(dp, de, w.v.select(0, b).t());
  acc_t* p_data = p.data_ptr<acc_t>();
  acc_t* dp_data = dp.data_ptr<acc_t>();
  const bool* keep = w.keep != nullptr ? w.keep + b * d.R : nullptr;
  if (kept_p) {
    std::memcpy(p_data, w.probs + b * d.K * d.R, d.K * d.R * sizeof(acc_t));
  } else if (needs_probabilities(w)) {
    at::mm_out(p, d.shared_q ? w.q : w.q.select(0, b), w.k.select(0, b).t());
    if (relu) {
      // relu's backward as torch's threshold_backward: zero where T <= 0, so a NaN T passes its gradient on.
      for (int64_t j = 0; j < d.K * d.R; ++j) positive[j] = !(p_data[j] <= acc_t(0));
    }
    form_logits(p_data, d.K, d.R, w.scale, relu, w.bias, b, 0);
  }
  const int32_t* best_index = w.best_index != nullptr ? w.best_index + b * d.K : nullptr;
  const acc_t* grad_max = w.grad_max != nullptr && best_index != nullptr ? w.grad_max + b * d.K : nullptr;
  const acc_t* grad_attn = w.grad_attn != nullptr ? w.grad_attn + b * d.K * d.R : nullptr;
  const acc_t* grad_p = w.options.return_attention == ReturnAttention::kAttention ? grad_attn : nullptr;
  // dL/dmax of the attention's max: one more entry of dP, at the arg-max.
  auto add_max_grad = [&](int64_t i, acc_t* dp_row) {
    if (w.options.return_max == ReturnMax::kAttention && grad_max != nullptr && best_index[i] >= 0)
      dp_row[best_index[i]] += grad_max[i];
  };
  if (w.options.softmax_over == SoftmaxOver::kQueries) {
    std::vector<acc_t> column(d.R, acc_t(0));  // the lse (not kept), then the columns' delta
    if (!kept_p) softmax_columns<acc_t>(p_data, keep, d.K, d.R, column.data());
    for (int64_t i = 0; i < d.K; ++i) {
      acc_t* dp_row = dp_data + i * d.R;
      if (grad_p != nullptr) axpy_row(dp_row, acc_t(1), grad_p + i * d.R, d.R);
      add_max_grad(i, dp_row);
    }
    // Each column's SoftmaxGrad: shift = dP at the column's arg-max row (the first among equals), then delta.
    std::vector<acc_t> shift(d.R), top_p(d.R, acc_t(-1));
    for (int64_t i = 0; i < d.K; ++i) {
      const acc_t* p_row = p_data + i * d.R;
      const acc_t* dp_row = dp_data + i * d.R;
      for (int64_t r = 0; r < d.R; ++r) {
        if (p_row[r] > top_p[r]) {
          top_p[r] = p_row[r];
          shift[r] = dp_row[r];
        }
      }
    }
    std::fill(column.begin(), column.end(), acc_t(0));
    for (int64_t i = 0; i < d.K; ++i) {
      axpy_columns(column.data(), p_data + i * d.R, dp_data + i * d.R, shift.data(), d.R);
    }
    for (int64_t i = 0; i < d.K; ++i) {
      acc_t* dp_row = dp_data + i * d.R;
      const acc_t* p_row = p_data + i * d.R;
      for (int64_t r = 0; r < d.R; ++r) {
        const bool kept = keep == nullptr || keep[r];
        dp_row[r] = kept ? p_row[r] * ((dp_row[r] - shift[r]) - column[r]) : acc_t(0);
      }
    }
  } else if (w.options.softmax_over == SoftmaxOver::kKeys) {
    for (int64_t i = 0; i < d.K; ++i) {
      acc_t* p_row = p_data + i * d.R;
      acc_t* dp_row = dp_data + i * d.R;
      if (!kept_p) softmax_row<acc_t>(p_row, keep, d.R);
      add_max_grad(i, dp_row);
      const acc_t* ga = grad_p != nullptr ? grad_p + i * d.R : nullptr;
      const SoftmaxGrad<acc_t> g = grad_probs_row(dp_row, p_row, ga, row_argmax(p_row, keep, d.R), d.R);
      softmax_grad_row(dp_row, p_row, keep, g, d.R);
    }
  } else {  // no softmax: P = S on the kept r (when needed), dS = dP there
    if (needs_probabilities(w)) keep_only(p_data, keep, d.K, d.R);
    for (int64_t i = 0; i < d.K; ++i) {
      acc_t* dp_row = dp_data + i * d.R;
      if (grad_p != nullptr) axpy_row(dp_row, acc_t(1), grad_p + i * d.R, d.R);
      add_max_grad(i, dp_row);
    }
    keep_only(dp_data, keep, d.K, d.R);
  }
  if (w.options.return_max == ReturnMax::kLogits && grad_max != nullptr) {
    for (int64_t i = 0; i < d.K; ++i) {
      if (best_index[i] >= 0) dp_data[i * d.R + best_index[i]] += grad_max[i];
    }
  }
  if (w.options.return_attention == ReturnAttention::kLogits && grad_attn != nullptr) {
    for (int64_t j = 0; j < d.K * d.R; ++j) {
      if (keep == nullptr || keep[j % d.R]) dp_data[j] += grad_attn[j];  // masked: S was -inf, a constant
    }
  }
  if (w.need_bias) std::memcpy(w.grad_bias + b * d.K * d.R, dp_data, d.K * d.R * sizeof(acc_t));
  const acc_t scale = w.scale;
  if (relu) {
    for (int64_t j = 0; j < d.K * d.R; ++j) dp_data[j] = positive[j] ? scale * dp_data[j] : acc_t(0);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < d.K * d.R; ++j) dp_data[j] *= scale;
  }
}

// The attention inputs' gradients of sample b: dv[b] = P^T dE, and for a per-sample q dk[b] = dS^T q_b and
// dq[b] = dS k[b]; a shared q's dS is parked in ds_all instead, for one GEMM over every b after the units for each
// of dq and dk (one (K, B·R) GEMM runs faster than B small ones).
template <typename acc_t>
void attention_input_grads(const Backward<acc_t>& w, int64_t b, const at::Tensor& p, const at::Tensor& ds,
                           const at::Tensor& de) {
  const Dims& d = w.d;
  const bool* keep = w.keep != nullptr ? w.keep + b * d.R : nullptr;
  if (w.need_v) {
    at::Tensor gv = w.grad_v.select(0, b);
    at::mm_out(gv, p.t(), de);
    zero_masked_rows(gv.data_ptr<acc_t>(), keep, d.R, d.Dv);
  }
  if (w.need_k && !d.shared_q) {
    at::Tensor gk = w.grad_k.select(0, b);
    at::mm_out(gk, ds.t(), w.q.select(0, b));
    zero_masked_rows(gk.data_ptr<acc_t>(), keep, d.R, d.D);
  }
  if (d.shared_q) {
    if (!(w.need_q || w.need_k)) return;
    const acc_t* ds_data = ds.data_ptr<acc_t>();
    acc_t* dst = w.ds_all.template data_ptr<acc_t>() + b * d.R;
    for (int64_t i = 0; i < d.K; ++i) std::memcpy(dst + i * d.B * d.R, ds_data + i * d.R, d.R * sizeof(acc_t));
  } else if (w.need_q) {
    at::Tensor gq = w.grad_q.select(0, b);
    at::mm_out(gq, ds, w.k.select(0, b));
  }
}

// Per-thread scratch of the backward units, reused from one sample to the next.
struct BackwardScratch {
  at::Tensor de, p, dp;           // dE (K, Dv) (scores only), P and dP/dS (K, R)
  std::vector<uint8_t> positive;  // [T > 0] (K, R) for the relu, else empty
};

// One backward unit, sample b.
template <typename acc_t>
void backward_sample(const Backward<acc_t>& w, int64_t b, BackwardScratch& s) {
  const at::Tensor de = w.mode == Score::kNone ? w.g.select(0, b) : s.de;
  epilogue_backward(w, b, de.data_ptr<acc_t>());
  if (!(w.need_q || w.need_k || w.need_v || w.need_bias)) return;
  softmax_backward(w, b, de, s.p, s.dp, s.positive);
  attention_input_grads(w, b, s.p, s.dp, de);
}

// A shared ref's gradient: grad_ref[i] = n_r[i] sum_b (a_r[b, i] E[b, i] - c_r[b, i] ref[i]) (score_grad; n_r = iR
// for the cosine, 1 for dot), the b sum in order (deterministic without atomics), parallel over the rows i.
template <typename acc_t>
void shared_ref_grad(const Backward<acc_t>& w) {
  const Dims& d = w.d;
  at::parallel_for(0, d.K, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d.B * d.Dv)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* gr = w.grad_ref + i * d.Dv;
      const acc_t* r_row = w.ref + i * d.Dv;
      acc_t c_total = 0;
      for (int64_t b = 0; b < d.B; ++b) c_total += w.coef_c[b * d.K + i];
      for (int64_t j = 0; j < d.Dv; ++j) gr[j] = -c_total * r_row[j];
      for (int64_t b = 0; b < d.B; ++b) axpy_row(gr, w.coef_a[b * d.K + i], w.e + (b * d.K + i) * d.Dv, d.Dv);
      if (w.mode == Score::kCosine) {
        const acc_t ir = inv_clamped(row_norm(r_row, d.Dv, row_dot(r_row, r_row, d.Dv)), w.eps);
        for (int64_t j = 0; j < d.Dv; ++j) gr[j] *= ir;
      }
    }
  });
}

// The units (one sample each) over the threads, then the sums over b that shared inputs need.
template <typename acc_t>
void run_backward(const Backward<acc_t>& w) {
  const Dims& d = w.d;
  const auto acc_opts = w.q.options();
  at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard worker_no_grad;
    const SequentialBlas sequential;
    BackwardScratch s{w.mode != Score::kNone ? at::empty({d.K, d.Dv}, acc_opts) : at::Tensor(),
                      at::empty({d.K, d.R}, acc_opts), at::empty({d.K, d.R}, acc_opts),
                      std::vector<uint8_t>(w.options.logit_activation == LogitActivation::kRelu ? d.K * d.R : 0)};
    for (int64_t b = begin; b < end; ++b) backward_sample(w, b, s);
  });
  if (w.need_q && d.shared_q) {
    at::Tensor grad_q = w.grad_q;
    mm_fixed(w.ds_all.view({d.K, d.B * d.R}), w.k.view({d.B * d.R, d.D}), grad_q);
  }
  if (w.need_k && d.shared_q) {
    at::Tensor grad_k = w.grad_k.view({d.B * d.R, d.D});
    mm_fixed(w.ds_all.view({d.K, d.B * d.R}).t(), w.q, grad_k);
    acc_t* gk = w.grad_k.template data_ptr<acc_t>();
    for (int64_t b = 0; b < d.B && w.keep != nullptr; ++b) {
      zero_masked_rows(gk + b * d.R * d.D, w.keep + b * d.R, d.R, d.D);
    }
  }
  if (w.need_ref && d.shared_ref) shared_ref_grad(w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attribute_attention_bwd_cpu(
    const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_attn_in,
    const c10::optional<at::Tensor>& grad_max_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const c10::optional<at::Tensor>& ref_in, const c10::optional<at::Tensor>& mask_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& e_in, const at::Tensor& lse_in,
    const at::Tensor& best_in, const at::Tensor& best_index_in, const c10::optional<at::Tensor>& probs_in,
    double scale, int64_t mode, double eps, std::array<bool, 5> output_mask, int64_t return_attention, int64_t softmax_over, int64_t logit_activation,
    int64_t return_max) {
  const char* op = "zslfast::_attribute_attention_bwd";
  const Dims d = check_dims(q_in, k_in, v_in, ref_in, mask_in, bias_in, mode, op);
  const Options options = check_options(return_attention, softmax_over, logit_activation, return_max, op);
  check_backward_inputs(d, mode, options, grad_in, e_in, lse_in, op);
  (void)best_in;  // P is recomputed here, so its max is too (the Triton kernels read it)
  const bool has_grad_max = return_max != ReturnMax::kNone && grad_max_in.has_value() && grad_max_in->numel() > 0;
  TORCH_CHECK(!has_grad_max || (grad_max_in->dim() == 2 && grad_max_in->size(0) == d.B && grad_max_in->size(1) == d.K),
              op, ": grad_max must be (B, K), got ", grad_max_in->sizes());
  TORCH_CHECK(!has_grad_max || (best_index_in.scalar_type() == at::kInt && best_index_in.dim() == 2 &&
                                best_index_in.size(0) == d.B && best_index_in.size(1) == d.K),
              op, ": best_index must be int32 (B, K) with grad_max");
  const at::NoGradGuard no_grad;
  const auto in_opts = q_in.options();
  const auto acc_type = at::toOpMathType(q_in.scalar_type());
  const auto acc_opts = in_opts.dtype(acc_type);
  const at::Tensor mask = mask_in.has_value() ? mask_in->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor q = to_acc(q_in, acc_type), k = to_acc_kept(k_in, mask, acc_type), v = to_acc_kept(v_in, mask, acc_type);
  const at::Tensor ref = mode != Score::kNone ? to_acc(*ref_in, acc_type) : at::Tensor();
  const at::Tensor e = to_acc(e_in, acc_type), lse = to_acc(lse_in, acc_type), g = to_acc(grad_in, acc_type);
  const at::Tensor bias = compact_bias(bias_in, acc_type);
  const at::Tensor grad_attn =
      grad_attn_in.has_value() && grad_attn_in->numel() > 0 ? to_acc(*grad_attn_in, acc_type) : at::Tensor();
  // The forward's P, kept by the op (float/double only: a rounded fp16/bf16 P would cost the backward accuracy).
  const at::Tensor probs = probs_in.has_value() && probs_in->numel() > 0 ? probs_in->contiguous() : at::Tensor();
  TORCH_CHECK(!probs.defined() || (probs.scalar_type() == acc_type && probs.dim() == 3 && probs.size(0) == d.B &&
                                   probs.size(1) == d.K && probs.size(2) == d.R),
              op, ": probs must be the forward's P (B, K, R) in float or double, got ", probs.sizes(), " ",
              probs.defined() ? probs.scalar_type() : acc_type);
  TORCH_CHECK(!probs.defined() || options.logit_activation == LogitActivation::kNone,
              op, ": probs cannot stand for the relu's logits (its backward reads T)");
  TORCH_CHECK(!grad_attn.defined() || (grad_attn.dim() == 3 && grad_attn.size(0) == d.B && grad_attn.size(1) == d.K &&
                                       grad_attn.size(2) == d.R),
              op, ": grad_attn must be (B, K, R), got ", grad_attn.sizes());

  const bool need_q = output_mask[0], need_k = output_mask[1], need_v = output_mask[2];
  const bool need_ref = output_mask[3] && mode != Score::kNone;
  const bool need_bias = output_mask[4] && bias_in.has_value();
  at::Tensor grad_q = need_q ? at::empty(q.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_k = need_k ? at::empty(k.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_v = need_v ? at::empty(v.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_ref = need_ref ? at::empty(ref.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_bias = need_bias ? at::empty({d.B, d.K, d.R}, acc_opts) : at::Tensor();
  at::Tensor ds_all = (need_q || need_k) && d.shared_q ? at::empty({d.K, d.B, d.R}, acc_opts) : at::Tensor();
  at::Tensor coef = need_ref && d.shared_ref ? at::empty({2, d.B, d.K}, acc_opts) : at::Tensor();
  const at::Tensor grad_max = has_grad_max ? to_acc(*grad_max_in, acc_type) : at::Tensor();
  const at::Tensor best_index = has_grad_max ? best_index_in.contiguous() : at::Tensor();

  if (need_q || need_k || need_v || need_ref || need_bias) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "attribute_attention_bwd_cpu", [&] {
      using acc_t = scalar_t;  // the kernels run in the accumulator type only
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
      const Backward<acc_t> w{d, mode, options, static_cast<acc_t>(scale), static_cast<acc_t>(eps),
                              need_q, need_k, need_v, need_ref, need_bias,
                              q, k, v, g, ptr(g),
                              ptr(e), ptr(lse), ptr(probs), ptr(ref), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                              bias_rows<acc_t>(bias, bias_in.has_value() ? bias_in->size(1) : 1),
                              ptr(grad_attn),
                              grad_q, grad_k, grad_v, ptr(grad_bias),
                              ptr(grad_ref), coef.defined() ? ptr(coef[0]) : nullptr,
                              coef.defined() ? ptr(coef[1]) : nullptr, ds_all,
                              ptr(grad_max), best_index.defined() ? best_index.data_ptr<int32_t>() : nullptr};
      run_backward(w);
    });
  }
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? (t.scalar_type() == q_in.scalar_type() ? t : t.to(q_in.scalar_type())) : at::empty({0}, in_opts);
  };
  return {finish(grad_q), finish(grad_k), finish(grad_v), finish(grad_ref), finish(grad_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) {
  m.impl("_attribute_attention_fwd", &attribute_attention_fwd_cpu);
  m.impl("_attribute_attention_bwd", &attribute_attention_bwd_cpu);
}

}  // namespace zslfast
