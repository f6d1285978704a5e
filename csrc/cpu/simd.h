// Run-time ISA dispatch for the CPU kernels' innermost loops. The extension is built for baseline x86-64 so that
// one binary runs anywhere, but these memory-bound loops need wide vectors to reach DRAM speed (torch.compile's
// C++ code is built for the host's ISA). GCC/Clang function multiversioning compiles each marked function for
// AVX-512, AVX2 and baseline, and picks one at load time. Results are deterministic on a given machine.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define ZSLFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ZSLFAST_SIMD_CLONES
#endif
