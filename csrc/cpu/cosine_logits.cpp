// cosine_logits on CPU: out = scale * cos(x, protos), with normalisation fused into the GEMM's epilogue.
//
//   x (N, D), protos (C, D), scale (), ix (N,) = 1 / max(|x|, eps), ip (C,) = 1 / max(|p|, eps)  (inv_norm.h), or
//   for eps_mode EpsMode::kAdd ("add", GEM-ZSL's x / (|x| + eps)) ix = 1 / (|x| + eps), ip = 1 / (|p| + eps)
//   forward   out[n, c] = scale * ix[n] * ip[c] * (x @ protos.T)[n, c]                          out (N, C)
//   backward  W = g * ip[None, :],  A = W @ protos = g @ normalize(protos)                       W (N, C), temporary
//             r[n]        = <x[n] ix[n], A[n]> = sum_c g[n, c] cos[n, c]
//             grad_x[n]   = scale * ix[n] * (A[n] - [|x_n| > eps] * x[n] * (ix[n] * r[n]))       grad_x (N, D)
//                           (add mode: x[n] * (r[n] / |x_n|) instead, inv_norm.h projection_coeff)
//             W = g * ix[:, None] (the same buffer),  B = W.T @ x = g.T @ normalize(x)
//             q[c]        = <p[c] ip[c], B[c]> = sum_n g[n, c] cos[n, c]
//             grad_p[c]   = scale * ip[c] * (B[c] - [|p_c| > eps] * p[c] * (ip[c] * q[c]))       grad_p (C, D)
//             grad_scale  = sum(g * cos) = sum_n r[n]                                           grad_scale ()
// Scaling g rather than the operands keeps the temporary at N x C, smaller than normalised copies of x and protos
// ((N + C) x D) at ZSL shapes. g is scaled by one side's inverse norms only, and the other side's is applied after
// the GEMM: ix * ip can leave float's normal range when both |x| and |p| are ~1e19, and ix^2 underflows to 0 for
// |x| ~ 1e30, so it is never formed; the norms themselves never overflow (inv_norm.h row_norm).
// grad_scale is reduced from A, never as sum(g * out) / scale, so scale == 0 is no special case.
//
// Results do not depend on the thread count: a multithreaded GEMM may split its reduction over threads
// (MKL does for W.T @ x at N = 1024), so every GEMM runs as fixed blocks of its output (a function of the shapes
// only), each block one GEMM over the whole reduction with MKL held to one thread (SequentialBlas), and row sums run
// in a fixed order in one thread each. Accumulation is in float for half/bfloat16/float inputs and in double for
// double; fp16/bf16 inputs run the GEMMs in float, as CPU GEMMs would round a 16-bit result and x @ protos.T of
// unnormalised rows can overflow fp16.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <vector>

#include "cpu/fixed_gemm.h"
#include "inv_norm.h"

namespace zslfast {
namespace {

int64_t grain_for(int64_t row_length) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_length, 1)); }

template <typename acc_t>
void row_inv_norms(const acc_t* v, acc_t* inv, int64_t R, int64_t D, acc_t eps, int64_t eps_mode) {
  at::parallel_for(0, R, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = v + r * D;
      acc_t sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t d = 0; d < D; ++d) sum_sq += row[d] * row[d];
      inv[r] = inv_by_mode(row_norm(row, D, sum_sq), eps, eps_mode);
    }
  });
}

// w[n, c] = g[n, c] * ip[c] (ix == nullptr) or g[n, c] * ix[n] (ip == nullptr)
template <typename acc_t>
void scale_grad(const acc_t* g, const acc_t* ix, const acc_t* ip, acc_t* w, int64_t N, int64_t C) {
  at::parallel_for(0, N, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (ix == nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) w[n * C + c] = g[n * C + c] * ip[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) w[n * C + c] = g[n * C + c] * ix[n];
      }
    }
  });
}

// out[r] = s * iv[r] * (a[r] - v[r] * projection_coeff(iv[r], rowdot[r])), rowdot[r] = <v[r] iv[r], a[r]>.
// out may alias a. iv^2 is never formed: it underflows for |v| ~ 1e30, where v * (iv * rowdot) is O(1). The dot is
// taken of v iv (entries in [-1, 1]), not of v: <v, a> overflows float for |v| ~ 1e37 (4e37 against |a| ~ 16, an
// O(16) rowdot).
template <typename scalar_t, typename acc_t>
void project_rows(const acc_t* a, const acc_t* v, const acc_t* iv, acc_t s, acc_t eps, int64_t eps_mode,
                  scalar_t* out, acc_t* rowdot, int64_t R, int64_t D) {
  at::parallel_for(0, R, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* a_row = a + r * D;
      const acc_t* v_row = v + r * D;
      const acc_t iv_r = iv[r];
      acc_t normalised_dot = 0;
#pragma omp simd reduction(+ : normalised_dot)
      for (int64_t d = 0; d < D; ++d) normalised_dot += (iv_r * v_row[d]) * a_row[d];
      if (rowdot != nullptr) rowdot[r] = normalised_dot;
      if (out == nullptr) continue;
      const acc_t coeff = projection_coeff(iv[r], normalised_dot, eps, eps_mode);
      const acc_t row_scale = s * iv[r];
      scalar_t* out_row = out + r * D;
      for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(row_scale * (a_row[d] - v_row[d] * coeff));
    }
  });
}

void check_2d(const at::Tensor& x, const at::Tensor& protos, const char* op) {
  TORCH_CHECK(x.dim() == 2 && protos.dim() == 2 && x.size(1) == protos.size(1), op,
              ": expected x (N, D) and protos (C, D), got ", x.sizes(), " and ", protos.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_fwd_cpu(const at::Tensor& x_in, const at::Tensor& p_in,
                                                                     const at::Tensor& scale, double eps,
                                                                     int64_t eps_mode) {
  check_2d(x_in, p_in, "zslfast::_cosine_logits_fwd");
  TORCH_CHECK(eps_mode == EpsMode::kClamp || eps_mode == EpsMode::kAdd, "zslfast::_cosine_logits_fwd: bad eps_mode id ",
              eps_mode);
  TORCH_CHECK(scale.numel() == 1, "zslfast::_cosine_logits_fwd: scale must have one element, got ", scale.sizes());
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  const at::Tensor x = x_in.to(acc_type).contiguous(), p = p_in.to(acc_type).contiguous();
  const int64_t N = x.size(0), D = x.size(1), C = p.size(0);
  at::Tensor x_inv_norm = at::empty({N}, x.options());
  at::Tensor p_inv_norm = at::empty({C}, x.options());
  at::Tensor dot = at::empty({N, C}, x.options());
  mm_fixed(x, p.t(), dot);
  at::Tensor out = x_in.scalar_type() == acc_type ? dot : at::empty({N, C}, x_in.options());
  const double s = scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "cosine_logits_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* ix = x_inv_norm.data_ptr<acc_t>();
    acc_t* ip = p_inv_norm.data_ptr<acc_t>();
    row_inv_norms<acc_t>(x.data_ptr<acc_t>(), ix, N, D, static_cast<acc_t>(eps), eps_mode);
    row_inv_norms<acc_t>(p.data_ptr<acc_t>(), ip, C, D, static_cast<acc_t>(eps), eps_mode);
    const acc_t* dot_data = dot.data_ptr<acc_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const acc_t row_scale = static_cast<acc_t>(s) * ix[n];
        for (int64_t c = 0; c < C; ++c) {
          out_data[n * C + c] = static_cast<scalar_t>(dot_data[n * C + c] * row_scale * ip[c]);
        }
      }
    });
  });
  return {out, x_inv_norm, p_inv_norm};
}

// out (the forward's, which the Triton backward reads) is not read: the GEMMs here reduce over all of D.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                     const at::Tensor& p_in,
                                                                     const c10::optional<at::Tensor>& out,
                                                                     const at::Tensor& ix_in, const at::Tensor& ip_in,
                                                                     const at::Tensor& scale, double eps,
                                                                     int64_t eps_mode,
                                                                     std::array<bool, 3> output_mask) {
  (void)out;
  check_2d(x_in, p_in, "zslfast::_cosine_logits_bwd");
  TORCH_CHECK(eps_mode == EpsMode::kClamp || eps_mode == EpsMode::kAdd, "zslfast::_cosine_logits_bwd: bad eps_mode id ",
              eps_mode);
  const int64_t N = x_in.size(0), D = x_in.size(1), C = p_in.size(0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N && grad_in.size(1) == C && ix_in.numel() == N &&
                  ip_in.numel() == C && scale.numel() == 1,
              "zslfast::_cosine_logits_bwd: shapes do not match");
  const bool need_x = output_mask[0], need_p = output_mask[1], need_scale = output_mask[2];
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  const at::Tensor x = x_in.to(acc_type).contiguous(), p = p_in.to(acc_type).contiguous();
  const at::Tensor g = grad_in.to(acc_type).contiguous();
  const at::Tensor ix_t = ix_in.to(acc_type).contiguous(), ip_t = ip_in.to(acc_type).contiguous();
  const double s = scale.item<double>();
  const bool same_type = x_in.scalar_type() == acc_type;
  at::Tensor grad_x = at::empty({0}, x_in.options());
  at::Tensor grad_p = at::empty({0}, x_in.options());
  at::Tensor grad_scale = at::empty({0}, scale.options());
  if (!need_x && !need_p && !need_scale) return {grad_x, grad_p, grad_scale};

  at::Tensor w = at::empty({N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "cosine_logits_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ix = ix_t.data_ptr<acc_t>();
    const acc_t* ip = ip_t.data_ptr<acc_t>();
    const acc_t eps_acc = static_cast<acc_t>(eps);

    if (need_x || need_scale) {
      scale_grad<acc_t>(g.data_ptr<acc_t>(), nullptr, ip, w.data_ptr<acc_t>(), N, C);
      at::Tensor a = at::empty({N, D}, x.options());
      mm_fixed(w, p, a);
      if (need_x) grad_x = same_type ? a : at::empty({N, D}, x_in.options());
      std::vector<acc_t> rowdot(need_scale ? N : 0);
      project_rows<scalar_t, acc_t>(a.data_ptr<acc_t>(), x.data_ptr<acc_t>(), ix, static_cast<acc_t>(s), eps_acc, eps_mode,
                                    need_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                                    need_scale ? rowdot.data() : nullptr, N, D);
      if (need_scale) {
        double total = 0;
        for (int64_t n = 0; n < N; ++n) total += rowdot[n];
        grad_scale = at::scalar_tensor(total, scale.options());
      }
    }
    if (need_p) {
      scale_grad<acc_t>(g.data_ptr<acc_t>(), ix, nullptr, w.data_ptr<acc_t>(), N, C);
      at::Tensor b = at::empty({C, D}, x.options());
      mm_fixed(w.t(), x, b);
      grad_p = same_type ? b : at::empty({C, D}, x_in.options());
      project_rows<scalar_t, acc_t>(b.data_ptr<acc_t>(), p.data_ptr<acc_t>(), ip, static_cast<acc_t>(s), eps_acc, eps_mode,
                                    grad_p.data_ptr<scalar_t>(), nullptr, C, D);
    }
  });
  return {grad_x, grad_p, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) {
  m.impl("_cosine_logits_fwd", &cosine_logits_fwd_cpu);
  m.impl("_cosine_logits_bwd", &cosine_logits_bwd_cpu);
}

}  // namespace zslfast
