// GEMMs whose result does not depend on the thread count, shared by the CPU kernels.
//
// torch.set_num_threads(n) sets MKL's thread count for the calling thread (MKL_Set_Num_Threads_Local) with MKL's
// dynamic adjustment off, so an MKL GEMM may split its reduction n ways, even inside a parallel region, and its
// result then depends on n (cosine_logits' W.T @ x does at N = 1024). mm_fixed runs a GEMM as fixed blocks of its
// output (a function of the shapes only), each block one GEMM over the whole reduction with MKL held to one thread
// (SequentialBlas); the blocks run in parallel. With another BLAS (OpenBLAS and the like, single-threaded inside an
// OpenMP parallel region on their own) the weak reference is null and SequentialBlas does nothing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// MKL's thread-local thread count, where torch's BLAS is MKL (a weak reference: null with OpenBLAS and the like,
// which run single-threaded inside an OpenMP parallel region on their own). The C entry point: mkl_service.h
// #defines mkl_set_num_threads_local to it; the lowercase symbol is the Fortran one, which takes an int*.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace zslfast {

// One thread for the GEMMs of this scope (see above).
struct SequentialBlas {
  int saved = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) saved = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved);
  }
};

// GEMM output blocks, a function of the shapes only: as many as the work allows at kGemmWork (1M) multiply-adds or more
// each (smaller ones cost more in calls and packing than they gain), kGemmBlocks at most (enough for the threads of a
// large CPU), cut along the output's longer side first, no thinner than kGemmRows rows or kGemmCols columns.
constexpr int64_t kGemmWork = int64_t(1) << 20;
constexpr int64_t kGemmBlocks = 64;
constexpr int64_t kGemmRows = 64;
constexpr int64_t kGemmCols = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out (M, K2) = a (M, K) @ b (K, K2), out contiguous, in fixed blocks of the output, each one single-threaded GEMM
// over all of K (see the header: thread-count independence).
inline void mm_fixed(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), K2 = b.size(1);
  if (M == 0 || K2 == 0) return;
  const int64_t blocks = std::max<int64_t>(1, std::min(kGemmBlocks, M * K2 * std::max<int64_t>(K, 1) / kGemmWork));
  int64_t rows = M, cols = K2;
  if (M >= K2) {
    rows = std::min(M, std::max(kGemmRows, ceil_div(M, blocks)));
    cols = std::min(K2, std::max(kGemmCols, ceil_div(K2, ceil_div(blocks, ceil_div(M, rows)))));
  } else {
    cols = std::min(K2, std::max(kGemmCols, ceil_div(K2, blocks)));
    rows = std::min(M, std::max(kGemmRows, ceil_div(M, ceil_div(blocks, ceil_div(K2, cols)))));
  }
  const int64_t row_blocks = ceil_div(M, rows), col_blocks = ceil_div(K2, cols);
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    const at::NoGradGuard no_grad;  // grad mode is thread-local: on again in the pool's threads
    const SequentialBlas sequential;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block / col_blocks * rows, c0 = block % col_blocks * cols;
      const int64_t m = std::min(rows, M - r0), n = std::min(cols, K2 - c0);
      at::Tensor out_block = out.narrow(0, r0, m).narrow(1, c0, n);  // unit column stride: BLAS writes it in place
      at::mm_out(out_block, a.narrow(0, r0, m), b.narrow(1, c0, n));
    }
  });
}

}  // namespace zslfast
