// prototype_scores on CUDA (the method: csrc/cpu/prototype_scores.cpp):
//   e (B, K), s (C, K), w (B, C, K), g (B, C) = dL/dout -> out (B, C); grad_e (B, K), grad_s (C, K), grad_w (B, C, K)
//   (each empty where its output_mask entry is false; grad_e and grad_s are formed in any case)
//   forward   out[b, c]     = sum_k e[b, k] * s[c, k] * (1 + w[b, c, k])                one warp per (b, c) row
//   backward  grad_s[c, k]  = sum_b g[b, c] * e[b, k] * (1 + w[b, c, k]),  and grad_w   one thread per (c, k), loop b
//             grad_e[b, k]  = sum_c g[b, c] * s[c, k] * (1 + w[b, c, k])                one thread per (b, k), loop c
// Every sum runs in a fixed order in one thread or one warp: no atomics, deterministic. The backward reads w twice;
// the Triton backward (zslfast/triton/prototype_scores.py) reads it once and is the default GPU backend.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>

namespace zslfast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ e, const scalar_t* __restrict__ s,
                               const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t B, int64_t C,
                               int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= B * C) return;
  const scalar_t* e_row = e + (row / C) * K;
  const scalar_t* s_row = s + (row % C) * K;
  const scalar_t* w_row = w + row * K;
  acc_t acc = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    acc += static_cast<acc_t>(e_row[k]) * static_cast<acc_t>(s_row[k]) * (acc_t(1) + static_cast<acc_t>(w_row[k]));
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[row] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void grad_s_and_w_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ e,
                                    const scalar_t* __restrict__ s, const scalar_t* __restrict__ w,
                                    scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_w, int64_t B,
                                    int64_t C, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t ck = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ck >= C * K) return;
  const int64_t c = ck / K, k = ck % K;
  const acc_t sk = static_cast<acc_t>(s[ck]);
  acc_t acc = 0;
  for (int64_t b = 0; b < B; ++b) {
    const acc_t g = static_cast<acc_t>(grad[b * C + c]);
    const acc_t ek = static_cast<acc_t>(e[b * K + k]);
    const int64_t idx = b * C * K + ck;
    acc += g * ek * (acc_t(1) + static_cast<acc_t>(w[idx]));
    if (grad_w != nullptr) grad_w[idx] = static_cast<scalar_t>(g * ek * sk);
  }
  grad_s[ck] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void grad_e_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ s,
                              const scalar_t* __restrict__ w, scalar_t* __restrict__ grad_e, int64_t B, int64_t C,
                              int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bk >= B * K) return;
  const int64_t b = bk / K, k = bk % K;
  acc_t acc = 0;
  for (int64_t c = 0; c < C; ++c) {
    acc += static_cast<acc_t>(grad[b * C + c]) * static_cast<acc_t>(s[c * K + k]) *
           (acc_t(1) + static_cast<acc_t>(w[(b * C + c) * K + k]));
  }
  grad_e[bk] = static_cast<scalar_t>(acc);
}

unsigned int blocks_for(int64_t threads) { return static_cast<unsigned int>((threads + kThreads - 1) / kThreads); }

at::Tensor prototype_scores_fwd_cuda(const at::Tensor& e_in, const at::Tensor& s_in, const at::Tensor& w_in) {
  const c10::cuda::CUDAGuard guard(e_in.device());
  const at::Tensor e = e_in.contiguous(), s = s_in.contiguous(), w = w_in.contiguous();
  const int64_t B = e.size(0), K = e.size(1), C = s.size(0);
  TORCH_CHECK(s.size(1) == K && w.size(0) == B && w.size(1) == C && w.size(2) == K,
              "zslfast::_prototype_scores_fwd: shapes do not match");
  at::Tensor out = at::empty({B, C}, e.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "prototype_scores_fwd_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(B * C * kWarp), kThreads, 0, stream>>>(
        e.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), B, C, K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_scores_bwd_cuda(const at::Tensor& grad_in,
                                                                         const at::Tensor& e_in,
                                                                         const at::Tensor& s_in,
                                                                         const at::Tensor& w_in,
                                                                         std::array<bool, 3> output_mask) {
  const bool need_grad_w = output_mask[2];
  const c10::cuda::CUDAGuard guard(e_in.device());
  const at::Tensor grad = grad_in.contiguous(), e = e_in.contiguous(), s = s_in.contiguous(), w = w_in.contiguous();
  const int64_t B = e.size(0), K = e.size(1), C = s.size(0);
  at::Tensor grad_e = at::empty({B, K}, e.options());
  at::Tensor grad_s = at::empty({C, K}, e.options());
  at::Tensor grad_w = need_grad_w ? at::empty({B, C, K}, e.options()) : at::empty({0}, e.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.scalar_type(), "prototype_scores_bwd_cuda", [&] {
    grad_s_and_w_kernel<scalar_t><<<blocks_for(C * K), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
        grad_s.data_ptr<scalar_t>(), need_grad_w ? grad_w.data_ptr<scalar_t>() : nullptr, B, C, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_e_kernel<scalar_t><<<blocks_for(B * K), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), grad_e.data_ptr<scalar_t>(), B, C,
        K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto requested = [&](const at::Tensor& g, bool need) { return need ? g : at::empty({0}, e.options()); };
  return {requested(grad_e, output_mask[0]), requested(grad_s, output_mask[1]), grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CUDA, m) {
  m.impl("_prototype_scores_fwd", &prototype_scores_fwd_cuda);
  m.impl("_prototype_scores_bwd", &prototype_scores_bwd_cuda);
}

}  // namespace zslfast
