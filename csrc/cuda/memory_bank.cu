// memory_bank update and refresh on CUDA (the method: csrc/cpu/memory_bank.cpp). The KL runs in Triton.
//   bank state, in place: features (C, M, K, D), confidences (C, M, K), counts (C, M) int64, next_slot (C, M) int64,
//   stale (C, M) bool; offers z (N, M, D), y (N,) int64, conf (N, M); refresh writes means (C, M, D).
//   Q = C * M queues, E = N * M offered entries; keys, order (E,) int64, start (Q + 1,) int64 are temporaries.
//   queue_keys   one warp per offered entry e = n * M + m: key[e] = y[n] * M + m when conf[e] > threshold and
//                z[e] is finite, else Q = C * M (sorts last, belongs to no queue)
//   at::sort(keys, stable) gives the entries grouped by queue in batch order; at::searchsorted of 0..Q gives each
//   queue's segment [start[q], start[q + 1])
//   update       one warp per queue walks its segment in order (fifo: only the last K survive, slot (head + i) % K;
//                min_conf: sequential, every lane taking the same argmin of the K confidences); the lanes copy D
//   refresh      one warp per stale queue: means = mean of the stored slots, in slot order; stale cleared
// Queues are owned by one warp each: no atomics, no races, deterministic; no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "enums.h"

namespace zslfast {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

template <typename scalar_t>
__global__ void queue_keys_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y,
                                  const scalar_t* __restrict__ conf, int64_t* __restrict__ keys, int64_t E, int64_t M,
                                  int64_t C, int64_t D, double threshold) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (e >= E) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t label = y[e / M];
  bool ok = static_cast<double>(conf[e]) > threshold && label >= 0 && label < C;
  if (ok) {
    float probe = 0;  // x * 0 is 0 for finite x, NaN for inf/NaN
    for (int64_t d = lane; d < D; d += kWarp) probe += static_cast<float>(z[e * D + d]) * 0.0f;
    ok = __all_sync(0xffffffffu, probe == 0.0f);
  }
  if (lane == 0) keys[e] = ok ? label * M + e % M : C * M;
}

template <typename scalar_t>
__global__ void update_kernel(scalar_t* __restrict__ features, scalar_t* __restrict__ confidences,
                              int64_t* __restrict__ counts, int64_t* __restrict__ next_slot, bool* __restrict__ stale,
                              const scalar_t* __restrict__ z, const scalar_t* __restrict__ conf,
                              const int64_t* __restrict__ order, const int64_t* __restrict__ start, int64_t Q,
                              int64_t K, int64_t D, bool fifo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (q >= Q) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t begin = start[q], L = start[q + 1] - begin;
  if (L == 0) return;
  scalar_t* q_feat = features + q * K * D;
  scalar_t* q_conf = confidences + q * K;
  if (fifo) {
    const int64_t head = next_slot[q];
    for (int64_t i = L > K ? L - K : 0; i < L; ++i) {
      const int64_t slot = (head + i) % K, e = order[begin + i];
      for (int64_t d = lane; d < D; d += kWarp) q_feat[slot * D + d] = z[e * D + d];
      if (lane == 0) q_conf[slot] = conf[e];
    }
    if (lane == 0) {
      counts[q] = counts[q] + L < K ? counts[q] + L : K;
      next_slot[q] = (head + L) % K;
      stale[q] = true;
    }
    return;
  }
  int64_t n = counts[q];
  bool changed = false;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t e = order[begin + i];
    const acc_t value = static_cast<acc_t>(conf[e]);
    int64_t slot;
    if (n < K) {
      slot = n++;
    } else {
      slot = 0;  // every lane takes the same argmin (first least confident slot)
      for (int64_t s = 1; s < K; ++s) {
        if (static_cast<acc_t>(q_conf[s]) < static_cast<acc_t>(q_conf[slot])) slot = s;
      }
      if (!(value > static_cast<acc_t>(q_conf[slot]))) continue;
    }
    for (int64_t d = lane; d < D; d += kWarp) q_feat[slot * D + d] = z[e * D + d];
    __syncwarp();  // every lane has read q_conf[slot] before lane 0 overwrites it
    if (lane == 0) q_conf[slot] = conf[e];
    __syncwarp();  // and sees the new value in the next argmin
    changed = true;
  }
  if (lane == 0) {
    counts[q] = n;
    if (changed) stale[q] = true;
  }
}

template <typename scalar_t>
__global__ void refresh_kernel(const scalar_t* __restrict__ features, const int64_t* __restrict__ counts,
                               bool* __restrict__ stale, scalar_t* __restrict__ means, int64_t Q, int64_t K,
                               int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (q >= Q || !stale[q]) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t stored = counts[q];
  const acc_t inv = acc_t(1) / static_cast<acc_t>(stored > 1 ? stored : 1);
  for (int64_t d = lane; d < D; d += kWarp) {
    acc_t sum = 0;
    for (int64_t s = 0; s < stored; ++s) sum += static_cast<acc_t>(features[(q * K + s) * D + d]);
    means[q * D + d] = static_cast<scalar_t>(sum * inv);
  }
  __syncwarp();
  if (lane == 0) stale[q] = false;
}

unsigned int blocks_for(int64_t warps) {
  return static_cast<unsigned int>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

void memory_bank_update_cuda(at::Tensor features, at::Tensor confidences, at::Tensor counts, at::Tensor next_slot,
                             at::Tensor stale, const at::Tensor& z_in, const at::Tensor& y_in,
                             const at::Tensor& conf_in, double threshold, int64_t policy) {
  constexpr const char* op = "zslfast::_memory_bank_update";
  TORCH_CHECK(features.dim() == 4 && features.is_contiguous() && confidences.is_contiguous() &&
                  counts.is_contiguous() && next_slot.is_contiguous() && stale.is_contiguous() &&
                  stale.scalar_type() == at::kBool && counts.scalar_type() == at::kLong &&
                  next_slot.scalar_type() == at::kLong && confidences.scalar_type() == features.scalar_type(),
              op, ": expected the contiguous bank state of zslfast.MemoryBank");
  TORCH_CHECK(policy == Policy::kFifo || policy == Policy::kMinConf, op, ": bad policy id ", policy);
  const int64_t C = features.size(0), M = features.size(1), K = features.size(2), D = features.size(3), Q = C * M;
  TORCH_CHECK(z_in.dim() == 3 && z_in.size(1) == M && z_in.size(2) == D && conf_in.dim() == 2 &&
                  conf_in.size(0) == z_in.size(0) && conf_in.size(1) == M && y_in.numel() == z_in.size(0),
              op, ": expected z (N, M, D), y (N,), conf (N, M), got ", z_in.sizes(), ", ", y_in.sizes(), ", ",
              conf_in.sizes());
  const int64_t E = z_in.size(0) * M;
  if (E == 0) return;
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor z = z_in.to(features.scalar_type()).contiguous();
  const at::Tensor conf = conf_in.to(features.scalar_type()).contiguous();
  const at::Tensor y = y_in.to(at::kLong).contiguous();
  at::Tensor keys = at::empty({E}, y.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "memory_bank_keys_cuda", [&] {
    queue_keys_kernel<scalar_t><<<blocks_for(E), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), conf.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(), E, M, C,
        D, threshold);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted), order = std::get<1>(sorted).contiguous();
  const at::Tensor start = at::searchsorted(sorted_keys, at::arange(Q + 1, keys.options())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "memory_bank_update_cuda", [&] {
    update_kernel<scalar_t><<<blocks_for(Q), kThreads, 0, stream>>>(
        features.data_ptr<scalar_t>(), confidences.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(),
        next_slot.data_ptr<int64_t>(), stale.data_ptr<bool>(), z.data_ptr<scalar_t>(), conf.data_ptr<scalar_t>(),
        order.data_ptr<int64_t>(), start.data_ptr<int64_t>(), Q, K, D, policy == Policy::kFifo);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void memory_bank_refresh_cuda(const at::Tensor& features, const at::Tensor& counts, at::Tensor stale,
                              at::Tensor means) {
  TORCH_CHECK(features.dim() == 4 && features.is_contiguous() && counts.is_contiguous() && stale.is_contiguous() &&
                  means.is_contiguous() && means.scalar_type() == features.scalar_type() &&
                  stale.scalar_type() == at::kBool && counts.scalar_type() == at::kLong,
              "zslfast::_memory_bank_refresh: expected the contiguous bank state of zslfast.MemoryBank");
  const int64_t Q = features.size(0) * features.size(1), K = features.size(2), D = features.size(3);
  const c10::cuda::CUDAGuard guard(features.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "memory_bank_refresh_cuda", [&] {
    refresh_kernel<scalar_t><<<blocks_for(Q), kThreads, 0, stream>>>(
        features.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), stale.data_ptr<bool>(), means.data_ptr<scalar_t>(),
        Q, K, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CUDA, m) {
  m.impl("_memory_bank_update", &memory_bank_update_cuda);
  m.impl("_memory_bank_refresh", &memory_bank_refresh_cuda);
}

}  // namespace zslfast
