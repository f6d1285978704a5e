"""zslfast's tools, apart from the library: what ``python -m zslfast COMMAND`` runs (zslfast/__main__.py is the door).

    bench       ``python -m zslfast bench``: each op's forward+backward time and peak memory against the eager code
    timing      the timers and memory figures every timing goes through (bench, benchmarks/, gpucheck)
    audit       ``python -m zslfast audit``: every Triton launch compiled for sm_80/sm_90 without a GPU
    gpucheck    ``python -m zslfast gpucheck``: the GPU self-test
    demo        ``python -m zslfast demo``: ILPG or SAGE trained with the reference ops and with the fused ops
    _cli        what every command shares: its parser, one-line usage errors, the conditions of its timings
    _memory     the peak memory of one call on CPU, where PyTorch keeps no allocator statistics

The ops they run, with their inputs, shapes, eager code and audit plans, are the records of zslfast.testing.
"""
