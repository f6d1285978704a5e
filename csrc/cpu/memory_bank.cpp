// memory_bank on CPU: the class-wise bank's update and the fused KL to its prototypes
// (math: zslfast/ops/memory_bank.py).
//
// update   features (C, M, K, D), confidences (C, M, K), counts (C, M) int64, next_slot (C, M) int64, stale (C, M)
//          bool, all updated in place; offers z (N, M, D), y (N,) int64, conf (N, M).
//          1. accepted[e] = conf[e] > threshold and z[e] finite, e = n * M + m (rows checked in parallel)
//          2. a stable counting sort of the accepted entries by queue q = y[n] * M + m: segment q keeps batch order
//          3. at::parallel_for over the non-empty segments (queues are independent: no atomics, no races):
//             fifo      only the last K of a segment's L entries survive; entry i goes to slot (head + i) % K,
//                       counts = min(counts + L, K), head = (head + L) % K: closed form, no per-entry state
//             min_conf  the entries one by one: append while counts < K, else replace the first least confident
//                       slot when strictly more confident
//             a queue whose slots changed is marked stale
// refresh  means (C, M, D) = mean of each stale queue's stored slots, summed in slot order; stale cleared. Apart from
//          the update: the means are read once per step however many updates ran (and the update stays cheap).
// kl       z (B, M, D), protos (C, M, D), labels (B,) int64, active (B, M) bool -> loss (), grad_z (B, M, D)
//          per active row r = (b, m), p = protos[labels[b], m] read in place (no gathered copy):
//             lse_z = logsumexp(z_r), lse_p = logsumexp(p), P = exp(z_r - lse_z)
//             kl_r  = sum_d P_d ((z_r,d - lse_z) - (p_d - lse_p))
//             grad_z[r] = P * ((z_r - lse_z) - (p - lse_p) - kl_r) / n_active     (inactive rows: 0)
//          loss = sum_r kl_r / max(n_active, 1), summed in row order (deterministic). The gradient comes out of the
//          same pass (the loss is a scalar: the backward only multiplies it by the incoming grad).
// Accumulation in float for half/bfloat16/float, double for double. exp for float rows is a vectorisable
// Cephes-style polynomial (~1 ulp), compiled for AVX-512/AVX2/baseline (cpu/simd.h), as libm's scalar expf is the
// bottleneck otherwise; double rows use std::exp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "enums.h"

namespace zslfast {
namespace {

// ---------------------------------------------------------------------------------------------------------- update

// Below this many element operations a pass runs on one thread: an OpenMP region costs more than it saves (and
// far more on a loaded machine, where a descheduled thread holds up the barrier).
// The update's passes are memory moves of a few hundred KiB at ZSL shapes: they stay serial up to a larger size.
constexpr int64_t kSerialWork = 1 << 18;
constexpr int64_t kSerialMoves = 1 << 21;

int64_t grain_for(int64_t item_work, int64_t serial_work = kSerialWork) {
  return std::max<int64_t>(1, serial_work / std::max<int64_t>(item_work, 1));
}

// Whether every element of a row is finite: x * 0 is 0 for finite x and NaN for inf/NaN, and a sum of zeros stays 0
// (an order-free reduction, so it vectorises).
#define ZSLFAST_ROW_FINITE(T)                                                                                         \
  ZSLFAST_SIMD_CLONES bool row_finite(const T* v, int64_t D) {                                                        \
    T probe = 0;                                                                                                      \
    _Pragma("omp simd reduction(+ : probe)") for (int64_t d = 0; d < D; ++d) probe += v[d] * T(0);                   \
    return probe == T(0);                                                                                             \
  }
ZSLFAST_ROW_FINITE(float)
ZSLFAST_ROW_FINITE(double)
#undef ZSLFAST_ROW_FINITE

template <typename scalar_t>
bool row_finite(const scalar_t* v, int64_t D) {
  float probe = 0;
  for (int64_t d = 0; d < D; ++d) probe += static_cast<float>(v[d]) * 0.0f;
  return probe == 0.0f;
}

// Step 1: accepted[e] = conf[e] > threshold and z[e] finite, for every offered entry e = n * M + m.
template <typename scalar_t>
std::vector<uint8_t> accepted_entries(const scalar_t* z, const scalar_t* conf, int64_t E, int64_t D, double threshold) {
  std::vector<uint8_t> accepted(E);
  at::parallel_for(0, E, grain_for(D, kSerialMoves), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      bool ok = static_cast<double>(conf[e]) > threshold;
      if (ok) ok = row_finite(z + e * D, D);
      accepted[e] = ok;
    }
  });
  return accepted;
}

// Step 2: the accepted entries grouped by queue q = y[n] * M + m with a stable counting sort, so that each queue's
// segment order[start[q] .. start[q + 1]) keeps batch order; touched lists the queues with a non-empty segment.
struct QueueSegments {
  std::vector<int64_t> start, order, touched;
};

QueueSegments group_by_queue(const std::vector<uint8_t>& accepted, const int64_t* y, int64_t M, int64_t Q) {
  const int64_t E = static_cast<int64_t>(accepted.size());
  QueueSegments seg;
  seg.start.assign(Q + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    if (accepted[e]) ++seg.start[y[e / M] * M + e % M + 1];
  }
  for (int64_t q = 0; q < Q; ++q) seg.start[q + 1] += seg.start[q];
  seg.order.resize(seg.start[Q]);
  std::vector<int64_t> cursor(seg.start.begin(), seg.start.end() - 1);
  for (int64_t e = 0; e < E; ++e) {
    if (accepted[e]) seg.order[cursor[y[e / M] * M + e % M]++] = e;
  }
  for (int64_t q = 0; q < Q; ++q) {
    if (seg.start[q + 1] > seg.start[q]) seg.touched.push_back(q);
  }
  return seg;
}

// One queue's slots and bookkeeping: feat (K, D), conf (K,), count and head (its counts and next_slot entries).
template <typename scalar_t>
struct Queue {
  scalar_t* feat;
  scalar_t* conf;
  int64_t* count;
  int64_t* head;
};

// fifo: of a segment's L entries only the last K survive, entry i in slot (head + i) % K; the counters move in
// closed form. Always changes the queue.
template <typename scalar_t>
void fifo_insert(const Queue<scalar_t>& queue, const int64_t* entries, int64_t L, const scalar_t* z,
                 const scalar_t* conf, int64_t K, int64_t D) {
  for (int64_t i = std::max<int64_t>(0, L - K); i < L; ++i) {
    const int64_t slot = (*queue.head + i) % K;
    std::memcpy(queue.feat + slot * D, z + entries[i] * D, D * sizeof(scalar_t));
    queue.conf[slot] = conf[entries[i]];
  }
  *queue.count = std::min<int64_t>(*queue.count + L, K);
  *queue.head = (*queue.head + L) % K;
}

// min_conf: the entries one by one, appended while the queue has room, else replacing the first least confident
// slot when strictly more confident. Returns whether any slot changed.
template <typename scalar_t>
bool min_conf_insert(const Queue<scalar_t>& queue, const int64_t* entries, int64_t L, const scalar_t* z,
                     const scalar_t* conf, int64_t K, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  bool changed = false;
  int64_t n = *queue.count;
  for (int64_t i = 0; i < L; ++i) {
    const scalar_t value = conf[entries[i]];
    int64_t slot;
    if (n < K) {
      slot = n++;
    } else {
      slot = 0;
      for (int64_t s = 1; s < K; ++s) {
        if (static_cast<acc_t>(queue.conf[s]) < static_cast<acc_t>(queue.conf[slot])) slot = s;
      }
      if (!(static_cast<acc_t>(value) > static_cast<acc_t>(queue.conf[slot]))) continue;
    }
    std::memcpy(queue.feat + slot * D, z + entries[i] * D, D * sizeof(scalar_t));
    queue.conf[slot] = value;
    changed = true;
  }
  *queue.count = n;
  return changed;
}

template <typename scalar_t>
void update_impl(at::Tensor& features, at::Tensor& confidences, at::Tensor& counts, at::Tensor& next_slot,
                 at::Tensor& stale, const at::Tensor& z, const at::Tensor& y, const at::Tensor& conf,
                 double threshold, int64_t policy) {
  const int64_t C = features.size(0), M = features.size(1), K = features.size(2), D = features.size(3);
  const int64_t N = z.size(0);
  const scalar_t* z_data = z.data_ptr<scalar_t>();
  const scalar_t* conf_data = conf.data_ptr<scalar_t>();
  const int64_t* y_data = y.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(y_data[n] >= 0 && y_data[n] < C, "zslfast::_memory_bank_update: label y[", n, "] = ", y_data[n],
                " is outside [0, ", C, ")");
  }
  const QueueSegments seg = group_by_queue(accepted_entries(z_data, conf_data, N * M, D, threshold), y_data, M, C * M);

  // Step 3: the queues are independent (each owns its slots): no atomics, no races.
  scalar_t* feat = features.data_ptr<scalar_t>();
  scalar_t* confs = confidences.data_ptr<scalar_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  int64_t* head = next_slot.data_ptr<int64_t>();
  bool* stale_data = stale.data_ptr<bool>();
  const int64_t T = static_cast<int64_t>(seg.touched.size());
  at::parallel_for(0, T, grain_for(2 * D, kSerialMoves), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t q = seg.touched[t];
      const int64_t* entries = seg.order.data() + seg.start[q];
      const int64_t L = seg.start[q + 1] - seg.start[q];
      const Queue<scalar_t> queue{feat + q * K * D, confs + q * K, count + q, head + q};
      bool changed = true;
      if (policy == Policy::kFifo) {
        fifo_insert(queue, entries, L, z_data, conf_data, K, D);
      } else {
        changed = min_conf_insert(queue, entries, L, z_data, conf_data, K, D);
      }
      if (changed) stale_data[q] = true;
    }
  });
}

// means[q] = mean of queue q's stored slots, for the stale queues; stale cleared. Slot order: deterministic.
template <typename scalar_t>
void refresh_impl(const at::Tensor& features, const at::Tensor& counts, at::Tensor& stale, at::Tensor& means) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = features.size(0) * features.size(1), K = features.size(2), D = features.size(3);
  const scalar_t* feat = features.data_ptr<scalar_t>();
  const int64_t* count = counts.data_ptr<int64_t>();
  bool* stale_data = stale.data_ptr<bool>();
  scalar_t* out = means.data_ptr<scalar_t>();
  std::vector<int64_t> todo;
  for (int64_t q = 0; q < Q; ++q) {
    if (stale_data[q]) todo.push_back(q);
  }
  const int64_t T = static_cast<int64_t>(todo.size());
  at::parallel_for(0, T, grain_for(K * D, kSerialMoves), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t q = todo[t];
      const int64_t stored = count[q];
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t s = 0; s < stored; ++s) {
        const scalar_t* row = feat + (q * K + s) * D;
        for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<acc_t>(row[d]);
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(stored, 1));
      for (int64_t d = 0; d < D; ++d) out[q * D + d] = static_cast<scalar_t>(sum[d] * inv);
      stale_data[q] = false;
    }
  });
}

void memory_bank_refresh_cpu(const at::Tensor& features, const at::Tensor& counts, at::Tensor stale,
                             at::Tensor means) {
  TORCH_CHECK(features.dim() == 4 && features.is_contiguous() && counts.is_contiguous() && stale.is_contiguous() &&
                  means.is_contiguous() && counts.scalar_type() == at::kLong && stale.scalar_type() == at::kBool &&
                  means.scalar_type() == features.scalar_type() &&
                  counts.numel() == features.size(0) * features.size(1) &&
                  stale.numel() == counts.numel() && means.numel() == counts.numel() * features.size(3),
              "zslfast::_memory_bank_refresh: expected contiguous features (C, M, K, D), counts (C, M) int64, stale "
              "(C, M) bool, means (C, M, D) of the features' dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "memory_bank_refresh_cpu", [&] {
    refresh_impl<scalar_t>(features, counts, stale, means);
  });
}

void memory_bank_update_cpu(at::Tensor features, at::Tensor confidences, at::Tensor counts, at::Tensor next_slot,
                            at::Tensor stale, const at::Tensor& z_in, const at::Tensor& y_in,
                            const at::Tensor& conf_in, double threshold, int64_t policy) {
  constexpr const char* op = "zslfast::_memory_bank_update";
  TORCH_CHECK(features.dim() == 4 && features.is_contiguous(), op, ": features must be contiguous (C, M, K, D), got ",
              features.sizes());
  const int64_t C = features.size(0), M = features.size(1), K = features.size(2), D = features.size(3);
  TORCH_CHECK(K >= 1, op, ": capacity must be >= 1");
  TORCH_CHECK(policy == Policy::kFifo || policy == Policy::kMinConf, op, ": bad policy id ", policy);
  TORCH_CHECK(confidences.sizes() == at::IntArrayRef({C, M, K}) && confidences.is_contiguous() &&
                  confidences.scalar_type() == features.scalar_type(),
              op, ": confidences must be contiguous (C, M, K) of the features' dtype, got ", confidences.sizes());
  for (const at::Tensor* t : {&counts, &next_slot}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({C, M}) && t->is_contiguous() && t->scalar_type() == at::kLong, op,
                ": counts and next_slot must be contiguous int64 (C, M), got ", t->sizes());
  }
  TORCH_CHECK(stale.sizes() == at::IntArrayRef({C, M}) && stale.is_contiguous() && stale.scalar_type() == at::kBool,
              op, ": stale must be contiguous bool (C, M), got ", stale.sizes());
  TORCH_CHECK(z_in.dim() == 3 && z_in.size(1) == M && z_in.size(2) == D, op, ": z must be (N, M, D), got ",
              z_in.sizes());
  const int64_t N = z_in.size(0);
  TORCH_CHECK(y_in.dim() == 1 && y_in.size(0) == N && conf_in.dim() == 2 && conf_in.size(0) == N &&
                  conf_in.size(1) == M,
              op, ": y must be (N,) and conf (N, M), got ", y_in.sizes(), " and ", conf_in.sizes());
  const at::Tensor z = z_in.to(features.scalar_type()).contiguous();
  const at::Tensor conf = conf_in.to(features.scalar_type()).contiguous();
  const at::Tensor y = y_in.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "memory_bank_update_cpu", [&] {
    update_impl<scalar_t>(features, confidences, counts, next_slot, stale, z, y, conf, threshold, policy);
  });
}

// -------------------------------------------------------------------------------------------------------------- kl

// exp_poly (cpu/simd.h): a vectorisable e^x for the row passes.

// The row passes, compiled per ISA for float and double (target_clones takes no templates). With a = log P - log Q
// and t the arg-max of z (the first), a_d - a_t = (z_d - z_t) - (p_d - p_t), formed from the inputs alone:
//   row_max      max_d v[d]
//   exp_shifted  e[d] = exp(v[d] - shift), returns sum_d e[d]
//   kl_row       P = e * inv_sum written over e, returns sum_d P_d (a_d - a_t)  (KL = a_t + that, as sum P = 1)
//   grad_row     out[d] = P_d ((a_d - a_t) - kl_t) * inv_n, kl_t = kl_row's sum: P (a - KL), the softmax backward
//                shifted by its arg-max's term, exact where P is near one-hot (a - KL rounds to 0 at t there,
//                where the true gradient is -P_t sum_{d != t} P_d (a_d - a_t): zslfast.ops.attribute_attention's
//                docstring, "saturation")
#define ZSLFAST_KL_ROWS(T)                                                                                            \
  ZSLFAST_SIMD_CLONES T row_max(const T* v, int64_t D) {                                                              \
    T best = -std::numeric_limits<T>::infinity();                                                                     \
    _Pragma("omp simd reduction(max : best)") for (int64_t d = 0; d < D; ++d) best = v[d] > best ? v[d] : best;       \
    return best;                                                                                                      \
  }                                                                                                                   \
  ZSLFAST_SIMD_CLONES T exp_shifted(const T* v, T shift, T* e, int64_t D) {                                           \
    T sum = 0;                                                                                                        \
    _Pragma("omp simd reduction(+ : sum)") for (int64_t d = 0; d < D; ++d) {                                          \
      e[d] = exp_poly(v[d] - shift);                                                                                  \
      sum += e[d];                                                                                                    \
    }                                                                                                                 \
    return sum;                                                                                                       \
  }                                                                                                                   \
  ZSLFAST_SIMD_CLONES T kl_row(const T* z, const T* p, T* e, T inv_sum, T z_t, T p_t, int64_t D) {                    \
    T kl = 0;                                                                                                         \
    _Pragma("omp simd reduction(+ : kl)") for (int64_t d = 0; d < D; ++d) {                                           \
      const T P = e[d] * inv_sum;                                                                                     \
      e[d] = P;                                                                                                       \
      kl += P * ((z[d] - z_t) - (p[d] - p_t));                                                                        \
    }                                                                                                                 \
    return kl;                                                                                                        \
  }                                                                                                                   \
  ZSLFAST_SIMD_CLONES void grad_row(const T* z, const T* p, const T* P, T z_t, T p_t, T kl_t, T inv_n, T* out,        \
                                    int64_t D) {                                                                      \
    _Pragma("omp simd") for (int64_t d = 0; d < D; ++d) {                                                             \
      out[d] = P[d] * (((z[d] - z_t) - (p[d] - p_t)) - kl_t) * inv_n;                                                 \
    }                                                                                                                 \
  }
ZSLFAST_KL_ROWS(float)
ZSLFAST_KL_ROWS(double)
#undef ZSLFAST_KL_ROWS

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> kl_impl(const at::Tensor& z, const at::Tensor& protos, const at::Tensor& labels,
                                           const at::Tensor& active, bool compute_grad, const at::Tensor& z_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = z.size(0), M = z.size(1), D = z.size(2), C = protos.size(0), R = B * M;
  const scalar_t* z_data = z.data_ptr<scalar_t>();
  const scalar_t* p_data = protos.data_ptr<scalar_t>();
  const int64_t* label = labels.data_ptr<int64_t>();
  const bool* on = active.data_ptr<bool>();
  int64_t n_active = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (!on[r]) continue;
    ++n_active;
    TORCH_CHECK(label[r / M] >= 0 && label[r / M] < C, "zslfast::_memory_bank_kl: label ", label[r / M],
                " is outside [0, ", C, ")");
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(n_active, 1));
  at::Tensor grad = compute_grad ? at::empty({B, M, D}, z_in.options()) : at::empty({0}, z_in.options());
  scalar_t* grad_data = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> kl_rows(R, acc_t(0));
  constexpr bool same = std::is_same<scalar_t, acc_t>::value;
  at::parallel_for(0, R, grain_for(8 * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer((same ? 1 : 4) * D);
    acc_t* ez = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      if (!on[r]) {
        if (compute_grad) std::fill(grad_data + r * D, grad_data + (r + 1) * D, scalar_t(0));
        continue;
      }
      const int64_t q = label[r / M] * M + r % M;
      const acc_t* zr;
      const acc_t* pr;
      if constexpr (same) {
        zr = reinterpret_cast<const acc_t*>(z_data + r * D);
        pr = reinterpret_cast<const acc_t*>(p_data + q * D);
      } else {
        acc_t* zc = buffer.data() + D;
        acc_t* pc = buffer.data() + 2 * D;
        for (int64_t d = 0; d < D; ++d) zc[d] = static_cast<acc_t>(z_data[r * D + d]);
        for (int64_t d = 0; d < D; ++d) pc[d] = static_cast<acc_t>(p_data[q * D + d]);
        zr = zc;
        pr = pc;
      }
      const acc_t max_p = row_max(pr, D);
      const acc_t lse_p = max_p + std::log(exp_shifted(pr, max_p, ez, D));
      const acc_t max_z = row_max(zr, D);
      const acc_t sum_z = exp_shifted(zr, max_z, ez, D);
      const acc_t lse_z = max_z + std::log(sum_z);
      int64_t t = 0;  // the arg-max of z (the first; 0 for a row without one: a NaN row, NaN throughout anyway)
      while (t + 1 < D && !(zr[t] == max_z)) ++t;
      const acc_t kl_t = kl_row(zr, pr, ez, acc_t(1) / sum_z, zr[t], pr[t], D);
      kl_rows[r] = ((zr[t] - lse_z) - (pr[t] - lse_p)) + kl_t;
      if (!compute_grad) continue;
      if constexpr (same) {
        grad_row(zr, pr, ez, zr[t], pr[t], kl_t, inv_n, reinterpret_cast<acc_t*>(grad_data + r * D), D);
      } else {
        acc_t* g = buffer.data() + 3 * D;
        grad_row(zr, pr, ez, zr[t], pr[t], kl_t, inv_n, g, D);
        for (int64_t d = 0; d < D; ++d) grad_data[r * D + d] = static_cast<scalar_t>(g[d]);
      }
    }
  });
  acc_t total = 0;
  for (int64_t r = 0; r < R; ++r) total += kl_rows[r];
  at::Tensor loss = at::scalar_tensor(total * inv_n, z_in.options());
  return {loss, grad};
}

// output_mask[0]: also return d loss / dz (z is the only differentiable input), else an empty grad_z.
std::tuple<at::Tensor, at::Tensor> memory_bank_kl_cpu(const at::Tensor& z_in, const at::Tensor& protos_in,
                                                      const at::Tensor& labels_in, const at::Tensor& active_in,
                                                      std::array<bool, 1> output_mask) {
  const bool compute_grad = output_mask[0];
  constexpr const char* op = "zslfast::_memory_bank_kl";
  TORCH_CHECK(z_in.dim() == 3 && protos_in.dim() == 3 && protos_in.size(1) == z_in.size(1) &&
                  protos_in.size(2) == z_in.size(2) && protos_in.scalar_type() == z_in.scalar_type(),
              op, ": expected z (B, M, D) and protos (C, M, D) of one dtype, got ", z_in.sizes(), " and ",
              protos_in.sizes());
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == z_in.size(0) && active_in.dim() == 2 &&
                  active_in.size(0) == z_in.size(0) && active_in.size(1) == z_in.size(1),
              op, ": expected labels (B,) and active (B, M), got ", labels_in.sizes(), " and ", active_in.sizes());
  const at::Tensor z = z_in.contiguous(), protos = protos_in.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous(), active = active_in.to(at::kBool).contiguous();
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "memory_bank_kl_cpu", [&] {
    result = kl_impl<scalar_t>(z, protos, labels, active, compute_grad, z_in);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(zslfast, CPU, m) {
  m.impl("_memory_bank_update", &memory_bank_update_cpu);
  m.impl("_memory_bank_refresh", &memory_bank_refresh_cpu);
  m.impl("_memory_bank_kl", &memory_bank_kl_cpu);
}

}  // namespace zslfast
