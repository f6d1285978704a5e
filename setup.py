"""Build zslfast and its compiled extension ``zslfast._C``.

The extension holds the C++ CPU kernels (always built; -O3, OpenMP) and the CUDA kernels (built whenever a
CUDA toolkit is found). The C++ standard is torch's own choice: its build helper adds the -std its headers need
(C++17 up to torch 2.14, C++20 from 2.15) only when none is given, so none is given here.

Switches, read from the environment:

    ZSLFAST_CUDA=0          skip the CUDA sources (fast iteration on a CPU machine)
    ZSLFAST_CUDA=1          require the CUDA sources; a missing toolkit is an error
    (unset)                 build CUDA when a toolkit is found
    TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0" when no GPU is visible
    MAX_JOBS                parallel compile jobs; default one per core, at most one per 3 GiB of memory

Build with torch already installed: ``pip install -e . --no-build-isolation``.
"""

import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _find_cuda_home():
    """Where the CUDA toolkit lives, or None. torch's own guess follows ``which nvcc``, which can be a wrapper."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "include" / "cuda_runtime.h").exists():
            return str(home)
    return None


CUDA_SWITCH = os.environ.get("ZSLFAST_CUDA", "").strip()
if CUDA_SWITCH not in ("", "0", "1"):
    sys.exit(f"ZSLFAST_CUDA must be 0, 1 or unset, got {CUDA_SWITCH!r}")
CUDA_HOME = _find_cuda_home() if CUDA_SWITCH != "0" else None
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must be set before torch.utils.cpp_extension is imported
def _default_jobs() -> int:
    """One compile job per core, at most one per 3 GiB of memory (a .cu file with torch headers takes ~2 GiB)."""
    try:
        memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = 6
    return max(1, min(os.cpu_count() or 1, int(memory_gib // 3)))


os.environ.setdefault("MAX_JOBS", str(_default_jobs()))

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if CUDA_SWITCH == "1" and not CUDA_HOME:
    sys.exit("ZSLFAST_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to the folder holding bin/nvcc)")
if CUDA_HOME and torch.version.cuda is None:
    if CUDA_SWITCH == "1":
        sys.exit("ZSLFAST_CUDA=1 but the installed torch is a CPU-only build; install a CUDA build of torch")
    print("zslfast: torch is a CPU-only build, skipping the CUDA sources", file=sys.stderr)
    CUDA_HOME = None
WITH_CUDA = CUDA_HOME is not None
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
cpu_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")) if WITH_CUDA else []

cxx_flags = ["-O3", "-fopenmp"]
extra_compile_args = {"cxx": cxx_flags}
define_macros = []
if WITH_CUDA:
    extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    define_macros.append(("ZSLFAST_WITH_CUDA", None))
Extension = CUDAExtension if WITH_CUDA else CppExtension
extension = Extension(
    name="zslfast._C",
    sources=cpu_sources + cuda_sources,
    include_dirs=[str(ROOT / "csrc")],
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=["-fopenmp"],
)

# Recorded so that `import zslfast` can refuse (with a warning, not a crash) an extension built against another torch.
(ROOT / "zslfast" / "_build_info.py").write_text(
    '"""Written by setup.py at build time; do not edit."""\n'
    f"TORCH_VERSION = {torch.__version__!r}\n"
    f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
    f"WITH_CUDA = {WITH_CUDA!r}\n"
    f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if WITH_CUDA else None!r}\n"
)

print(
    "zslfast build configuration:\n"
    f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}\n"
    f"  CPU sources : {', '.join(cpu_sources)}\n"
    f"  CUDA        : {'on, ' + CUDA_HOME + ', arch ' + os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU') if WITH_CUDA else 'off'}"
    f" (ZSLFAST_CUDA={CUDA_SWITCH or 'unset'})\n"
    f"  CUDA sources: {', '.join(cuda_sources) or '-'}\n"
    f"  MAX_JOBS    : {os.environ['MAX_JOBS']}",
    file=sys.stderr,
)

class BuildExtensionKeepingObjects(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, with its object files kept in build/ between builds.

    pip's editable installs compile in a fresh temporary folder every time, so each `pip install -e .` (the README's
    second command included) recompiled every source. In a folder that persists, ninja recompiles only the sources
    (or headers) that changed. One folder per Python, torch and CUDA switch: objects of another torch never mix.
    """

    def build_extensions(self):
        key = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{'cuda' if WITH_CUDA else 'cpu'}"
        self.build_temp = str(ROOT / "build" / f"objects-{key}")
        super().build_extensions()


setup(
    name="zslfast",
    version="0.1.0",
    description="Fused, autograd-correct kernels for attribute-based zero-shot learning",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zslfast", "zslfast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={"test": ["pytest", "pytest-benchmark", "timm"], "models": ["timm"], "plot": ["matplotlib"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtensionKeepingObjects},
    zip_safe=False,
)
