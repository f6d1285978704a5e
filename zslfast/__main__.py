"""``python -m zslfast [info | demo | bench | audit | gpucheck]``.

    info   (default) what was built and which backends run here
    demo   train ILPG twice, reference ops vs fused ops: step time, peak memory, loss difference, U/S/H
           (zslfast.demo; ``--model sage`` for SAGE, ``--data DIR`` for a real xlsa17 folder, ``--device cuda``
           on a GPU)
    bench  each op's forward+backward time and peak memory against the eager code on this device (zslfast.bench)
    audit  compile every Triton kernel for sm_80/sm_90 without a GPU: registers, spills, shared memory, occupancy,
           waves and the roofline floor (a model) at the papers' shapes (zslfast.audit)
    gpucheck  the GPU self-test: every op x GPU backend x dtype against the fp64 reference, then eager /
           torch.compile / zslfast timings and memory, written to benchmarks/results (zslfast.gpucheck)
"""

import sys

import torch


def info() -> None:
    from . import _backend, available_backends

    built = _backend.BUILD_INFO
    if _backend.extension_warning():
        print(_backend.extension_warning(), file=sys.stderr)
    print(f"zslfast on torch {torch.__version__}; CUDA devices: {torch.cuda.device_count()}")
    if built:
        print(f"extension: built for torch {built.TORCH_VERSION}, {'with' if built.WITH_CUDA else 'without'} CUDA kernels")
    else:
        print(f"extension: not loaded ({_backend.EXTENSION_ERROR})")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends for {device} tensors: {', '.join(available_backends(torch.device(device)))}")
    print("\nrun `python -m zslfast demo` or `python -m zslfast bench` (add --help for their options)")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "info"
    rest = argv[1:] if argv and argv[0] == command else argv
    if command == "demo":
        from .demo import main as demo

        demo(rest)
    elif command == "bench":
        from .bench import main as bench

        bench(rest)
    elif command in ("audit", "gpucheck"):
        module = __import__(f"zslfast.{command}", fromlist=["main"])
        sys.exit(module.main(rest))
    elif command == "info" and not rest:
        info()
    else:
        print(__doc__)
        sys.exit(0 if command in ("-h", "--help") or rest in (["-h"], ["--help"]) else 2)


if __name__ == "__main__":
    main()
