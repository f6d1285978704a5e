// attribute_attention on CPU: attribute->region cross-attention with a fused cosine/dot epilogue (math and shapes:
// zslfast/ops/attribute_attention.py).
//
//   q (K, D) shared or (B, K, D), k (B, R, D), v (B, R, Dv), ref (K, Dv) | (B, K, Dv) | none, mask (B, R) bool | none
//   cosine score <E, ref> * inv_norm(|E|^2, eps) * inv_norm(|ref|^2, eps) (inv_norm.h), eps an argument (default 1e-8)
//   forward, one work unit per (b, tile of query rows), at::parallel_for over the units:
//       S = q_tile @ k[b]^T                      at::mm into a (rows x R) scratch tile (single-threaded inside the
//       P = softmax(S * scale) over kept r       parallel region, as ATen runs nested ops), softmax in place,
//       E_tile = P @ v[b]                        at::mm straight into E, then the cosine/dot epilogue per row.
//       lse[b, i] = log sum_r exp(S * scale)     saved for the backward; 0 for a fully masked row (P = 0 there)
//   backward, one work unit per b (its dk[b], dv[b] need every query row):
//       dE from the epilogue's gradient, Delta[i] = <dE[i], E[i]>, P recomputed from lse,
//       dP = dE @ v[b]^T (+ grad_attn), dS = scale * P * (dP - Delta),
//       dv[b] = P^T @ dE, dk[b] = dS^T @ q_b, dq[b] = dS @ k[b] (per-sample q).
//   Shared q: each unit writes its dS into a (K, B, R) buffer, then one GEMM dq = buf (K, B*R) @ k (B*R, D) sums
//   over b; shared ref: per-row coefficients, then a pass over rows that sums over b in order. No atomics, every
//   sum in a fixed order: deterministic. Nothing of size (B, K, R) is kept between forward and backward.
// Accumulation in float (double for double); fp16/bf16 inputs are converted to float first.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/simd.h"
#include "inv_norm.h"

namespace zslfast {
namespace {

enum ScoreMode : int64_t { kNone = 0, kDot = 1, kCosine = 2 };

// exp for float rows through exp_poly (simd.h), which vectorises; exp(-inf) = 0 for masked scores, and anything
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

// Softmax of scale * s over the kept entries of one row, in place; returns the row's log-sum-exp (0 when no entry
// is kept: the row is all zeros then). Masked entries become exactly 0.
template <typename acc_t>
acc_t softmax_row(acc_t* s, const bool* keep, int64_t R, acc_t scale) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < R; ++r) {
    s[r] *= scale;
    if (keep == nullptr || keep[r]) m = std::max(m, s[r]);
  }
  if (m == -std::numeric_limits<acc_t>::infinity()) {
    std::fill(s, s + R, acc_t(0));
    return acc_t(0);
  }
  for (int64_t r = 0; r < R; ++r) s[r] = (keep == nullptr || keep[r]) ? s[r] - m : -std::numeric_limits<acc_t>::infinity();
  exp_rows(s, R);
  acc_t sum = 0;
  for (int64_t r = 0; r < R; ++r) sum += s[r];
  const acc_t inv = acc_t(1) / sum;
  for (int64_t r = 0; r < R; ++r) s[r] *= inv;
  return m + std::log(sum);
}

// P recomputed from the saved log-sum-exp: p = exp(scale * s - lse) on kept entries, 0 elsewhere.
template <typename acc_t>
void recompute_row(acc_t* s, const bool* keep, int64_t R, acc_t scale, acc_t lse) {
  for (int64_t r = 0; r < R; ++r) {
    s[r] = (keep == nullptr || keep[r]) ? s[r] * scale - lse : -std::numeric_limits<acc_t>::infinity();
  }
  exp_rows(s, R);
}

// out[j] = a * x[j] - c * y[j]
template <typename acc_t>
void combine_rows(acc_t* out, acc_t a, const acc_t* x, acc_t c, const acc_t* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = a * x[j] - c * y[j];
}

// out[j] += a * x[j]
template <typename acc_t>
void axpy_row(acc_t* out, acc_t a, const acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += a * x[j];
}

// dS row in place over dP: ds[r] = scale * p[r] * (dp[r] + ga[r] - delta), ga optional
template <typename acc_t>
void softmax_grad_row(acc_t* dp, const acc_t* p, const acc_t* ga, acc_t scale, acc_t delta, int64_t R) {
  if (ga != nullptr) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) dp[r] = scale * p[r] * (dp[r] + ga[r] - delta);
  } else {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) dp[r] = scale * p[r] * (dp[r] - delta);
  }
}

struct Dims {
  int64_t B, K, R, D, Dv;
  bool shared_q, shared_ref;
};

Dims check_dims(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& ref,
                const c10::optional<at::Tensor>& mask, int64_t mode, const char* op) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && (q.dim() == 2 || q.dim() == 3), op,
              ": expected q (K, D) or (B, K, D), k (B, R, D), v (B, R, Dv), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  Dims d{k.size(0), q.size(-2), k.size(1), k.size(2), v.size(2), q.dim() == 2, true};
  TORCH_CHECK(v.size(0) == d.B && v.size(1) == d.R && q.size(-1) == d.D && (q.dim() == 2 || q.size(0) == d.B), op,
              ": shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(mode == kNone || mode == kDot || mode == kCosine, op, ": score_mode must be 0, 1 or 2, got ", mode);
  if (mode != kNone) {
    TORCH_CHECK(ref.has_value(), op, ": score_mode ", mode, " needs ref");
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
  return d;
}

// Query rows per forward unit: whole rows of K when the batch alone keeps every thread busy, else K split so that
// there are a few units per thread.
int64_t query_tile(const Dims& d) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_b = std::max<int64_t>(1, (4 * threads + d.B - 1) / d.B);
  return std::max<int64_t>(std::min<int64_t>(d.K, 16), (d.K + per_b - 1) / per_b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attribute_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& ref_in,
    const c10::optional<at::Tensor>& mask_in, double scale, int64_t mode, bool return_attention, bool save_e,
    double eps) {
  const Dims d = check_dims(q_in, k_in, v_in, ref_in, mask_in, mode, "zslfast::_attribute_attention_fwd");
  const at::NoGradGuard no_grad;  // the at::mm_out calls below reject inputs that require grad
  const auto acc_type = at::toOpMathType(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc_type).contiguous(), k = k_in.to(acc_type).contiguous();
  const at::Tensor v = v_in.to(acc_type).contiguous();
  const at::Tensor ref = mode != kNone ? ref_in->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor mask = mask_in.has_value() ? mask_in->to(at::kBool).contiguous() : at::Tensor();
  const auto acc_opts = q.options();
  const bool same_type = q_in.scalar_type() == acc_type;

  // Scores without a backward to come: each unit's E tile lives in a scratch buffer, never in a (B, K, Dv) tensor.
  const bool e_in_scratch = mode != kNone && !save_e;
  at::Tensor e = e_in_scratch ? at::empty({0}, acc_opts) : at::empty({d.B, d.K, d.Dv}, acc_opts);
  at::Tensor lse = at::empty({d.B, d.K}, acc_opts);
  at::Tensor attn = return_attention ? at::empty({d.B, d.K, d.R}, q_in.options()) : at::empty({0}, q_in.options());
  at::Tensor out = mode != kNone ? at::empty({d.B, d.K}, q_in.options()) : at::Tensor();
  const int64_t tile = query_tile(d);
  const int64_t tiles = (d.K + tile - 1) / tile;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "attribute_attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool* keep_all = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    acc_t* lse_all = lse.data_ptr<acc_t>();
    const acc_t* ref_all = ref.defined() ? ref.data_ptr<acc_t>() : nullptr;
    scalar_t* out_all = out.defined() ? out.data_ptr<scalar_t>() : nullptr;
    scalar_t* attn_all = return_attention ? attn.data_ptr<scalar_t>() : nullptr;
    const acc_t ep = static_cast<acc_t>(eps);
    at::parallel_for(0, d.B * tiles, 1, [&](int64_t begin, int64_t end) {
      const at::NoGradGuard worker_no_grad;  // grad mode is thread-local: on again in the pool's threads
      at::Tensor scratch = at::empty({tile, d.R}, acc_opts);
      at::Tensor e_scratch = e_in_scratch ? at::empty({tile, d.Dv}, acc_opts) : at::Tensor();
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t b = unit / tiles, i0 = (unit % tiles) * tile, rows = std::min(tile, d.K - i0);
        const at::Tensor q_tile = (d.shared_q ? q : q.select(0, b)).narrow(0, i0, rows);
        at::Tensor s = scratch.narrow(0, 0, rows);
        at::mm_out(s, q_tile, k.select(0, b).t());
        acc_t* s_data = s.data_ptr<acc_t>();
        const bool* keep = keep_all != nullptr ? keep_all + b * d.R : nullptr;
        for (int64_t i = 0; i < rows; ++i) {
          lse_all[b * d.K + i0 + i] = softmax_row<acc_t>(s_data + i * d.R, keep, d.R, static_cast<acc_t>(scale));
        }
        if (attn_all != nullptr) {
          scalar_t* a = attn_all + (b * d.K + i0) * d.R;
          for (int64_t j = 0; j < rows * d.R; ++j) a[j] = static_cast<scalar_t>(s_data[j]);
        }
        at::Tensor e_tile = e_in_scratch ? e_scratch.narrow(0, 0, rows) : e.select(0, b).narrow(0, i0, rows);
        at::mm_out(e_tile, s, v.select(0, b));
        if (mode == kNone) continue;
        const acc_t* e_tile_data = e_tile.data_ptr<acc_t>();
        for (int64_t i = i0; i < i0 + rows; ++i) {
          const acc_t* e_row = e_tile_data + (i - i0) * d.Dv;
          const acc_t* r_row = ref_all + ((d.shared_ref ? 0 : b * d.K) + i) * d.Dv;
          const acc_t dot = row_dot(e_row, r_row, d.Dv);
          acc_t value = dot;
          if (mode == kCosine) {
            value = dot * inv_norm(row_dot(e_row, e_row, d.Dv), ep) * inv_norm(row_dot(r_row, r_row, d.Dv), ep);
          }
          out_all[b * d.K + i] = static_cast<scalar_t>(value);
        }
      }
    });
  });
  if (mode == kNone) {
    out = same_type ? e : e.to(q_in.scalar_type());
    return {out, at::empty({0}, acc_opts), lse, attn};
  }
  return {out, e, lse, attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attribute_attention_bwd_cpu(
    const at::Tensor& grad_in, const c10::optional<at::Tensor>& grad_attn_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const c10::optional<at::Tensor>& ref_in,
    const c10::optional<at::Tensor>& mask_in, const at::Tensor& e_in, const at::Tensor& lse_in, double scale,
    int64_t mode, std::array<bool, 4> output_mask, double eps) {
  const char* op = "zslfast::_attribute_attention_bwd";
  const Dims d = check_dims(q_in, k_in, v_in, ref_in, mask_in, mode, op);
  const at::NoGradGuard no_grad;
  TORCH_CHECK(e_in.dim() == 3 && e_in.size(0) == d.B && e_in.size(1) == d.K && e_in.size(2) == d.Dv, op,
              ": e must be (B, K, Dv), got ", e_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == d.B && lse_in.size(1) == d.K, op, ": lse must be (B, K), got ",
              lse_in.sizes());
  const bool need_q = output_mask[0], need_k = output_mask[1], need_v = output_mask[2];
  const bool need_ref = output_mask[3] && mode != kNone;
  const auto in_opts = q_in.options();
  const auto acc_type = at::toOpMathType(q_in.scalar_type());
  const auto acc_opts = in_opts.dtype(acc_type);
  if (mode == kNone) {
    TORCH_CHECK(grad_in.dim() == 3 && grad_in.sizes() == e_in.sizes(), op, ": grad must be (B, K, Dv), got ",
                grad_in.sizes());
  } else {
    TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == d.B && grad_in.size(1) == d.K, op, ": grad must be (B, K), got ",
                grad_in.sizes());
  }
  const at::Tensor q = q_in.to(acc_type).contiguous(), k = k_in.to(acc_type).contiguous();
  const at::Tensor v = v_in.to(acc_type).contiguous();
  const at::Tensor ref = mode != kNone ? ref_in->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor mask = mask_in.has_value() ? mask_in->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor e = e_in.to(acc_type).contiguous(), lse = lse_in.to(acc_type).contiguous();
  const at::Tensor g = grad_in.to(acc_type).contiguous();
  const at::Tensor grad_attn = grad_attn_in.has_value() && grad_attn_in->numel() > 0
                                   ? grad_attn_in->to(acc_type).contiguous()
                                   : at::Tensor();
  TORCH_CHECK(!grad_attn.defined() || (grad_attn.dim() == 3 && grad_attn.size(0) == d.B && grad_attn.size(1) == d.K &&
                                       grad_attn.size(2) == d.R),
              op, ": grad_attn must be (B, K, R), got ", grad_attn.sizes());

  at::Tensor grad_q = need_q ? at::empty(q.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_k = need_k ? at::empty(k.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_v = need_v ? at::empty(v.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_ref = need_ref ? at::empty(ref.sizes(), acc_opts) : at::Tensor();
  // Shared q: every b's dS lands in buf (K, B, R), so that one GEMM sums dS_b @ k_b over b.
  at::Tensor ds_all = need_q && d.shared_q ? at::empty({d.K, d.B, d.R}, acc_opts) : at::Tensor();
  // Shared ref: grad_ref[i] = sum_b a[b, i] E[b, i] - c[b, i] ref[i], summed over b after the units.
  at::Tensor coef_a = need_ref && d.shared_ref ? at::empty({d.B, d.K}, acc_opts) : at::Tensor();
  at::Tensor coef_c = need_ref && d.shared_ref ? at::empty({d.B, d.K}, acc_opts) : at::Tensor();

  if (need_q || need_k || need_v || need_ref) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "attribute_attention_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t sc = static_cast<acc_t>(scale), ep = static_cast<acc_t>(eps);
      const bool* keep_all = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      const acc_t* e_all = e.data_ptr<acc_t>();
      const acc_t* lse_all = lse.data_ptr<acc_t>();
      const acc_t* g_all = g.data_ptr<acc_t>();
      const acc_t* ref_all = ref.defined() ? ref.data_ptr<acc_t>() : nullptr;
      const acc_t* ga_all = grad_attn.defined() ? grad_attn.data_ptr<acc_t>() : nullptr;
      const bool need_attention = need_q || need_k || need_v;
      at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
        const at::NoGradGuard worker_no_grad;
        at::Tensor de_buf = mode != kNone ? at::empty({d.K, d.Dv}, acc_opts) : at::Tensor();
        at::Tensor p = at::empty({d.K, d.R}, acc_opts);
        at::Tensor dp = at::empty({d.K, d.R}, acc_opts);
        std::vector<acc_t> delta(d.K);
        for (int64_t b = begin; b < end; ++b) {
          const acc_t* e_b = e_all + b * d.K * d.Dv;
          at::Tensor de = mode == kNone ? g.select(0, b) : de_buf;
          acc_t* de_data = de.data_ptr<acc_t>();
          for (int64_t i = 0; i < d.K; ++i) {
            const acc_t* e_row = e_b + i * d.Dv;
            acc_t* de_row = de_data + i * d.Dv;
            if (mode != kNone) {
              const acc_t gi = g_all[b * d.K + i];
              const acc_t* r_row = ref_all + ((d.shared_ref ? 0 : b * d.K) + i) * d.Dv;
              acc_t a_e, c_e, a_r, c_r;  // dE = a_e ref - c_e E;  dref = a_r E - c_r ref
              if (mode == kDot) {
                a_e = a_r = gi;
                c_e = c_r = 0;
              } else {
                const acc_t e_sq = row_dot(e_row, e_row, d.Dv), r_sq = row_dot(r_row, r_row, d.Dv);
                const acc_t ie = inv_norm(e_sq, ep), ir = inv_norm(r_sq, ep);
                const acc_t cos = row_dot(e_row, r_row, d.Dv) * ie * ir;
                a_e = a_r = gi * ie * ir;
                c_e = norm_clamped(ie, ep) ? acc_t(0) : gi * cos * ie * ie;  // [|E| > eps]
                c_r = norm_clamped(ir, ep) ? acc_t(0) : gi * cos * ir * ir;
              }
              combine_rows(de_row, a_e, r_row, c_e, e_row, d.Dv);
              if (need_ref) {
                if (d.shared_ref) {
                  coef_a.data_ptr<acc_t>()[b * d.K + i] = a_r;
                  coef_c.data_ptr<acc_t>()[b * d.K + i] = c_r;
                } else {
                  acc_t* gr = grad_ref.data_ptr<acc_t>() + (b * d.K + i) * d.Dv;
                  combine_rows(gr, a_r, e_row, c_r, r_row, d.Dv);
                }
              }
            }
            delta[i] = row_dot(de_row, e_row, d.Dv);
          }
          if (!need_attention) continue;
          const at::Tensor q_b = d.shared_q ? q : q.select(0, b);
          const at::Tensor k_b = k.select(0, b), v_b = v.select(0, b);
          at::mm_out(p, q_b, k_b.t());
          at::mm_out(dp, de, v_b.t());
          acc_t* p_data = p.data_ptr<acc_t>();
          acc_t* dp_data = dp.data_ptr<acc_t>();
          const bool* keep = keep_all != nullptr ? keep_all + b * d.R : nullptr;
          for (int64_t i = 0; i < d.K; ++i) {
            acc_t* p_row = p_data + i * d.R;
            acc_t* dp_row = dp_data + i * d.R;
            recompute_row<acc_t>(p_row, keep, d.R, sc, lse_all[b * d.K + i]);
            const acc_t* ga = ga_all != nullptr ? ga_all + (b * d.K + i) * d.R : nullptr;
            const acc_t di = delta[i];
            // grad_attn enters dP; Delta gains sum_r P * grad_attn (the softmax Jacobian's row term).
            const acc_t extra = ga != nullptr ? row_dot(p_row, ga, d.R) : acc_t(0);
            softmax_grad_row(dp_row, p_row, ga, sc, di + extra, d.R);
          }
          if (need_v) {
            at::Tensor gv = grad_v.select(0, b);
            at::mm_out(gv, p.t(), de);
          }
          if (need_k) {
            at::Tensor gk = grad_k.select(0, b);
            at::mm_out(gk, dp.t(), q_b);
          }
          if (need_q) {
            if (d.shared_q) {
              acc_t* dst = ds_all.data_ptr<acc_t>() + b * d.R;
              for (int64_t i = 0; i < d.K; ++i) std::memcpy(dst + i * d.B * d.R, dp_data + i * d.R, d.R * sizeof(acc_t));
            } else {
              at::Tensor gq = grad_q.select(0, b);
              at::mm_out(gq, dp, k_b);
            }
          }
        }
      });
      if (need_q && d.shared_q) at::mm_out(grad_q, ds_all.view({d.K, d.B * d.R}), k.view({d.B * d.R, d.D}));
      if (need_ref && d.shared_ref) {
        const acc_t* ca = coef_a.data_ptr<acc_t>();
        const acc_t* cc = coef_c.data_ptr<acc_t>();
        acc_t* gr_all = grad_ref.data_ptr<acc_t>();
        at::parallel_for(0, d.K, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d.B * d.Dv)), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            acc_t* gr = gr_all + i * d.Dv;
            const acc_t* r_row = ref_all + i * d.Dv;
            acc_t c_total = 0;
            for (int64_t b = 0; b < d.B; ++b) c_total += cc[b * d.K + i];
            for (int64_t j = 0; j < d.Dv; ++j) gr[j] = -c_total * r_row[j];
            for (int64_t b = 0; b < d.B; ++b) {
              const acc_t a = ca[b * d.K + i];
              const acc_t* e_row = e_all + (b * d.K + i) * d.Dv;
              axpy_row(gr, a, e_row, d.Dv);
            }
          }
        });
      }
    });
  }
  auto finish = [&](const at::Tensor& t) {
    return t.defined() ? (t.scalar_type() == q_in.scalar_type() ? t : t.to(q_in.scalar_type())) : at::empty({0}, in_opts);
  };
  return {finish(grad_q), finish(grad_k), finish(grad_v), finish(grad_ref)};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) {
  m.impl("_attribute_attention_fwd", &attribute_attention_fwd_cpu);
  m.impl("_attribute_attention_bwd", &attribute_attention_bwd_cpu);
}

}  // namespace zslfast
