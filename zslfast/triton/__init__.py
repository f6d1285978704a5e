"""Triton kernels, one module per op. Imported lazily by zslfast/ops/ so that `import zslfast` needs no triton."""
