// cosine_logits on CUDA: out = scale * cos(x, protos) (the backward's derivation: csrc/cpu/cosine_logits.cpp).
//
//   x (N, D), protos (C, D), scale () read on the device, g (N, C) = dL/dout
//   ix (N,) = 1 / max(|x[n]|, eps), ip (C,) = 1 / max(|p[c]|, eps)   (inv_norm.h), float (double for double);
//   eps_mode EpsMode::kAdd ("add"): ix = 1 / (|x[n]| + eps), ip = 1 / (|p[c]| + eps)
//   forward   out[n, c] = scale * ix[n] * ip[c] * (x @ protos.T)[n, c]                             out (N, C)
//   backward  grad_x (N, D), grad_protos (C, D), grad_scale () = sum(g * cos), by the kernels below
// cuBLAS GEMMs through at::mm, fp16/bf16 ones with a float result (at::mm's out_dtype), and small kernels for the
// rest:
//   inv_norms      one warp per row: iv[r] = 1 / max(|v_r|, eps), |v_r| without overflow (inv_norm.h row_norm: a
//                  sum of squares that came out inf is taken again, scaled by the row's max, a warp-uniform branch)
//   scale_logits   forward epilogue, out = scale * ix[n] * ip[c] * (x @ protos.T)[n, c]
//   scale_rows     v_hat = v * iv, the backward's GEMM operands (values in [-1, 1]: safe in fp16, where scaling g
//                  by 1 / (|x| |p|) instead could underflow)
//   project_rows   one warp per row: grad = scale * iv * (A - [|v| > eps] * v * (iv * (iv * <v, A>))), in the add
//                  mode scale * iv * (A - v * (iv * <v, A>) / |v|) (inv_norm.h projection_coeff),
//                  rowdot = iv * <v, A> (iv^2 alone would underflow for |v| ~ 1e30)
//                  with A = g @ protos_hat (grad_x, v = x; A (N, D)) or g.T @ x_hat (grad_protos, v = protos; (C, D))
// grad_scale = sum_n rowdot[n] (= sum(g * cos), so scale == 0 needs nothing special). scale is read on the device:
// a learnable temperature costs no host sync. Warp sums run in a fixed order: deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <limits>

#include "inv_norm.h"

namespace zslfast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;

template <typename acc_t>
__device__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ acc_t warp_max(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// inv_norm.h's row_norm for one warp's row: the plain sum of squares, and where it overflowed (every lane holds
// the same reduced sum, so the branch is warp-uniform and rare) the sum again scaled by the row's max |v_d|.
template <typename scalar_t>
__global__ void inv_norms_kernel(const scalar_t* __restrict__ v, at::opmath_type<scalar_t>* __restrict__ inv,
                                 int64_t R, int64_t D, double eps, int64_t eps_mode) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  const int lane = threadIdx.x % kWarp;
  const scalar_t* row = v + r * D;
  acc_t sum_sq = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t value = static_cast<acc_t>(row[d]);
    sum_sq += value * value;
  }
  sum_sq = warp_sum(sum_sq);
  acc_t norm = std::sqrt(sum_sq);
  if (sum_sq == std::numeric_limits<acc_t>::infinity()) {
    acc_t m = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t magnitude = std::abs(static_cast<acc_t>(row[d]));
      m = magnitude > m ? magnitude : m;
    }
    m = warp_max(m);  // > 0 here: the sum is inf; an inf element makes m inf and the norm NaN, as rescaled_norm
    acc_t scaled_sq = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t scaled = static_cast<acc_t>(row[d]) / m;
      scaled_sq += scaled * scaled;
    }
    norm = m * std::sqrt(warp_sum(scaled_sq));
  }
  if (lane == 0) inv[r] = inv_by_mode(norm, static_cast<acc_t>(eps), eps_mode);
}

template <typename scalar_t>
__global__ void scale_logits_kernel(const at::opmath_type<scalar_t>* dot, const at::opmath_type<scalar_t>* ix,
                                    const at::opmath_type<scalar_t>* ip, const at::opmath_type<scalar_t>* scale,
                                    scalar_t* out, int64_t N, int64_t C) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  out[i] = static_cast<scalar_t>(dot[i] * (*scale * ix[i / C]) * ip[i % C]);  // out may alias dot
}

template <typename scalar_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ v, const at::opmath_type<scalar_t>* __restrict__ iv,
                                  scalar_t* __restrict__ out, int64_t R, int64_t D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R * D) return;
  out[i] = static_cast<scalar_t>(static_cast<at::opmath_type<scalar_t>>(v[i]) * iv[i / D]);
}

template <typename scalar_t>
__global__ void project_rows_kernel(const at::opmath_type<scalar_t>* a, const scalar_t* __restrict__ v,
                                    const at::opmath_type<scalar_t>* __restrict__ iv,
                                    const at::opmath_type<scalar_t>* __restrict__ scale, double eps,
                                    int64_t eps_mode, scalar_t* out,
                                    at::opmath_type<scalar_t>* __restrict__ rowdot, int64_t R, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  const int lane = threadIdx.x % kWarp;
  const acc_t* a_row = a + r * D;
  const scalar_t* v_row = v + r * D;
  acc_t dot = 0;
  for (int64_t d = lane; d < D; d += kWarp) dot += static_cast<acc_t>(v_row[d]) * a_row[d];
  dot = warp_sum(dot);
  const acc_t inv = iv[r];
  if (rowdot != nullptr && lane == 0) rowdot[r] = inv * dot;
  if (out == nullptr) return;
  // inv * (inv * dot), never inv^2: that underflows for |v| ~ 1e30, where v * coeff is O(1)
  const acc_t coeff = projection_coeff(inv, inv * dot, static_cast<acc_t>(eps), eps_mode);
  const acc_t row_scale = *scale * inv;
  for (int64_t d = lane; d < D; d += kWarp) {
    out[r * D + d] = static_cast<scalar_t>(row_scale * (a_row[d] - static_cast<acc_t>(v_row[d]) * coeff));
  }
}

unsigned int blocks_for(int64_t threads) { return static_cast<unsigned int>((threads + kThreads - 1) / kThreads); }
unsigned int row_blocks_for(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

// a @ b with a float (double for double) result.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  const auto acc_type = at::toOpMathType(a.scalar_type());
  return a.scalar_type() == acc_type ? at::mm(a, b) : at::mm(a, b, acc_type);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_fwd_cuda(const at::Tensor& x_in, const at::Tensor& p_in,
                                                                      const at::Tensor& scale_in, double eps,
                                                                      int64_t eps_mode) {
  TORCH_CHECK(x_in.dim() == 2 && p_in.dim() == 2 && x_in.size(1) == p_in.size(1) && scale_in.numel() == 1,
              "zslfast::_cosine_logits_fwd: expected x (N, D), protos (C, D), scale (), got ", x_in.sizes(), ", ",
              p_in.sizes(), ", ", scale_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), p = p_in.contiguous();
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor scale = scale_in.to(x.device(), acc_type).contiguous();
  const int64_t N = x.size(0), D = x.size(1), C = p.size(0);
  at::Tensor x_inv_norm = at::empty({N}, x.options().dtype(acc_type));
  at::Tensor p_inv_norm = at::empty({C}, x.options().dtype(acc_type));
  at::Tensor dot = mm_acc(x, p.t());
  at::Tensor out = x.scalar_type() == acc_type ? dot : at::empty({N, C}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cosine_logits_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    inv_norms_kernel<scalar_t><<<row_blocks_for(N), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x_inv_norm.data_ptr<acc_t>(), N, D, eps, eps_mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    inv_norms_kernel<scalar_t><<<row_blocks_for(C), kThreads, 0, stream>>>(
        p.data_ptr<scalar_t>(), p_inv_norm.data_ptr<acc_t>(), C, D, eps, eps_mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scale_logits_kernel<scalar_t><<<blocks_for(N * C), kThreads, 0, stream>>>(
        dot.data_ptr<acc_t>(), x_inv_norm.data_ptr<acc_t>(), p_inv_norm.data_ptr<acc_t>(), scale.data_ptr<acc_t>(),
        out.data_ptr<scalar_t>(), N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, x_inv_norm, p_inv_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_bwd_cuda(const at::Tensor& grad_in,
                                                                      const at::Tensor& x_in, const at::Tensor& p_in,
                                                                      const c10::optional<at::Tensor>& out,
                                                                      const at::Tensor& ix_in, const at::Tensor& ip_in,
                                                                      const at::Tensor& scale_in, double eps,
                                                                      int64_t eps_mode,
                                                                      std::array<bool, 3> output_mask) {
  (void)out;  // the GEMMs reduce over all of D: the forward's out (the Triton backward's input) is not read
  const int64_t N = x_in.size(0), D = x_in.size(1), C = p_in.size(0);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N && grad_in.size(1) == C && p_in.size(1) == D &&
                  ix_in.numel() == N && ip_in.numel() == C && scale_in.numel() == 1,
              "zslfast::_cosine_logits_bwd: shapes do not match");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool need_x = output_mask[0], need_p = output_mask[1], need_scale = output_mask[2];
  const at::Tensor x = x_in.contiguous(), p = p_in.contiguous(), g = grad_in.to(x.scalar_type());
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor ix = ix_in.to(acc_type).contiguous(), ip = ip_in.to(acc_type).contiguous();
  const at::Tensor scale = scale_in.to(x.device(), acc_type).contiguous();
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_p = at::empty({0}, x.options());
  at::Tensor grad_scale = at::empty({0}, scale_in.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cosine_logits_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool same_type = x.scalar_type() == acc_type;
    if (need_x || need_scale) {
      at::Tensor p_hat = at::empty_like(p);
      scale_rows_kernel<scalar_t><<<blocks_for(C * D), kThreads, 0, stream>>>(
          p.data_ptr<scalar_t>(), ip.data_ptr<acc_t>(), p_hat.data_ptr<scalar_t>(), C, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor a = mm_acc(g, p_hat);
      if (need_x) grad_x = same_type ? a : at::empty({N, D}, x.options());
      at::Tensor rowdot = need_scale ? at::empty({N}, ix.options()) : at::Tensor();
      project_rows_kernel<scalar_t><<<row_blocks_for(N), kThreads, 0, stream>>>(
          a.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), ix.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), eps, eps_mode,
          need_x ? grad_x.data_ptr<scalar_t>() : nullptr, need_scale ? rowdot.data_ptr<acc_t>() : nullptr, N, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (need_scale) grad_scale = rowdot.sum().to(scale_in.scalar_type());
    }
    if (need_p) {
      at::Tensor x_hat = at::empty_like(x);
      scale_rows_kernel<scalar_t><<<blocks_for(N * D), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), ix.data_ptr<acc_t>(), x_hat.data_ptr<scalar_t>(), N, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor b = mm_acc(g.t(), x_hat);
      grad_p = same_type ? b : at::empty({C, D}, x.options());
      project_rows_kernel<scalar_t><<<row_blocks_for(C), kThreads, 0, stream>>>(
          b.data_ptr<acc_t>(), p.data_ptr<scalar_t>(), ip.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), eps, eps_mode,
          grad_p.data_ptr<scalar_t>(), nullptr, C, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_p, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CUDA, m) {
  m.impl("_cosine_logits_fwd", &cosine_logits_fwd_cuda);
  m.impl("_cosine_logits_bwd", &cosine_logits_bwd_cuda);
}

}  // namespace zslfast
