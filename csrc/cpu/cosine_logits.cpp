// cosine_logits on CPU: out = scale * cos(x, protos), with normalisation fused into the GEMM's epilogue.
//
//   x (N, D), protos (C, D), scale (), ix (N,) = 1 / max(|x|, eps), ip (C,) = 1 / max(|p|, eps)  (inv_norm.h)
//   forward   out[n, c] = scale * ix[n] * ip[c] * (x @ protos.T)[n, c]                          out (N, C)
//   backward  W = g * ix[:, None] * ip[None, :]                                                 W (N, C), temporary
//             A = W @ protos = ix * (g @ normalize(protos)),  B = W.T @ x = ip * (g.T @ normalize(x))
//             grad_x[n]   = scale * (A[n] - [|x_n| > eps] * x[n] * ix[n]^2 * <x[n], A[n]>)       grad_x (N, D)
//             grad_p[c]   = scale * (B[c] - [|p_c| > eps] * p[c] * ip[c]^2 * <p[c], B[c]>)       grad_p (C, D)
//             grad_scale  = sum(g * cos) = sum_n <x[n], A[n]>                                   grad_scale ()
// The GEMMs are at::mm (MKL / OpenBLAS); the rest are row loops. Scaling g rather than the operands keeps the
// temporary at N x C, smaller than normalised copies of x and protos ((N + C) x D) at ZSL shapes. grad_scale is
// reduced from A, never as sum(g * out) / scale, so scale == 0 is no special case. Row sums run in a fixed order
// in one thread each: deterministic. Accumulation is in float for half/bfloat16/float inputs and in double for
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

#include "inv_norm.h"

namespace zslfast {
namespace {

int64_t grain_for(int64_t row_length) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_length, 1)); }

template <typename acc_t>
void row_inv_norms(const acc_t* v, acc_t* inv, int64_t R, int64_t D, acc_t eps) {
  at::parallel_for(0, R, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = v + r * D;
      acc_t sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t d = 0; d < D; ++d) sum_sq += row[d] * row[d];
      inv[r] = inv_norm(sum_sq, eps);
    }
  });
}

// w[n, c] = g[n, c] * ix[n] * ip[c]
template <typename acc_t>
void scale_grad(const acc_t* g, const acc_t* ix, const acc_t* ip, acc_t* w, int64_t N, int64_t C) {
  at::parallel_for(0, N, grain_for(C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) w[n * C + c] = g[n * C + c] * ix[n] * ip[c];
    }
  });
}

// out[r] = s * (a[r] - [clamped_r ? 0 : v[r] * iv[r]^2 * <v[r], a[r]>]), rowdot[r] = <v[r], a[r]>. out may alias a.
template <typename scalar_t, typename acc_t>
void project_rows(const acc_t* a, const acc_t* v, const acc_t* iv, acc_t s, acc_t eps, scalar_t* out,
                  acc_t* rowdot, int64_t R, int64_t D) {
  at::parallel_for(0, R, grain_for(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* a_row = a + r * D;
      const acc_t* v_row = v + r * D;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += v_row[d] * a_row[d];
      if (rowdot != nullptr) rowdot[r] = dot;
      if (out == nullptr) continue;
      const acc_t coeff = norm_clamped(iv[r], eps) ? acc_t(0) : iv[r] * iv[r] * dot;
      scalar_t* out_row = out + r * D;
      for (int64_t d = 0; d < D; ++d) out_row[d] = static_cast<scalar_t>(s * (a_row[d] - v_row[d] * coeff));
    }
  });
}

void check_2d(const at::Tensor& x, const at::Tensor& protos, const char* op) {
  TORCH_CHECK(x.dim() == 2 && protos.dim() == 2 && x.size(1) == protos.size(1), op,
              ": expected x (N, D) and protos (C, D), got ", x.sizes(), " and ", protos.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_fwd_cpu(const at::Tensor& x_in, const at::Tensor& p_in,
                                                                     const at::Tensor& scale, double eps) {
  check_2d(x_in, p_in, "zslfast::_cosine_logits_fwd");
  TORCH_CHECK(scale.numel() == 1, "zslfast::_cosine_logits_fwd: scale must have one element, got ", scale.sizes());
  const auto acc_type = at::toOpMathType(x_in.scalar_type());
  const at::Tensor x = x_in.to(acc_type).contiguous(), p = p_in.to(acc_type).contiguous();
  const int64_t N = x.size(0), D = x.size(1), C = p.size(0);
  at::Tensor x_inv_norm = at::empty({N}, x.options());
  at::Tensor p_inv_norm = at::empty({C}, x.options());
  at::Tensor dot = at::mm(x, p.t());
  at::Tensor out = x_in.scalar_type() == acc_type ? dot : at::empty({N, C}, x_in.options());
  const double s = scale.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "cosine_logits_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* ix = x_inv_norm.data_ptr<acc_t>();
    acc_t* ip = p_inv_norm.data_ptr<acc_t>();
    row_inv_norms<acc_t>(x.data_ptr<acc_t>(), ix, N, D, static_cast<acc_t>(eps));
    row_inv_norms<acc_t>(p.data_ptr<acc_t>(), ip, C, D, static_cast<acc_t>(eps));
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                     const at::Tensor& p_in, const at::Tensor& ix_in,
                                                                     const at::Tensor& ip_in, const at::Tensor& scale,
                                                                     double eps, std::array<bool, 3> output_mask) {
  check_2d(x_in, p_in, "zslfast::_cosine_logits_bwd");
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
    scale_grad<acc_t>(g.data_ptr<acc_t>(), ix, ip, w.data_ptr<acc_t>(), N, C);
    const acc_t eps_acc = static_cast<acc_t>(eps);

    if (need_x || need_scale) {
      at::Tensor a = at::mm(w, p);
      if (need_x) grad_x = same_type ? a : at::empty({N, D}, x_in.options());
      std::vector<acc_t> rowdot(need_scale ? N : 0);
      project_rows<scalar_t, acc_t>(a.data_ptr<acc_t>(), x.data_ptr<acc_t>(), ix, static_cast<acc_t>(s), eps_acc,
                                    need_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                                    need_scale ? rowdot.data() : nullptr, N, D);
      if (need_scale) {
        double total = 0;
        for (int64_t n = 0; n < N; ++n) total += rowdot[n];
        grad_scale = at::scalar_tensor(total, scale.options());
      }
    }
    if (need_p) {
      at::Tensor b = at::mm(w.t(), x);
      grad_p = same_type ? b : at::empty({C, D}, x_in.options());
      project_rows<scalar_t, acc_t>(b.data_ptr<acc_t>(), p.data_ptr<acc_t>(), ip, static_cast<acc_t>(s), eps_acc,
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
