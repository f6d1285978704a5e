#!/usr/bin/env bash
# One GPU session, prepared to fit a short lease: build, the GPU-only tests, gpucheck (correctness, then timing)
# and the model steps, each stage time-boxed so that a slow one cannot starve the rest, all output tee'd into OUT.
#
#   benchmarks/gpu_session.sh OUT [STAGE ...]     STAGE: build tests check time models (default: all, in order)
#
# Budgets (seconds; the environment can override): ZSLFAST_TESTS_S=240 ZSLFAST_TIME_S=90 ZSLFAST_MODELS_S=120.
# ZSLFAST_TESTS="-m gpu" selects the tests (e.g. a -k expression to rerun failures).
# A zslfast/_C*.so already here that imports with this torch is used as it is (e.g. carried from an earlier
# session's OUT, or built on a CPU machine with nvcc and the GPU machine's torch: ZSLFAST_CUDA=1
# TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace, then carried with zslfast/_build_info.py);
# otherwise the extension is built with every core, for TORCH_CUDA_ARCH_LIST=9.0 alone.
# Without a GPU the same stages run on CPU tensors (a dry run: Triton through its interpreter, tiny shapes).
# OUT receives at most 8 files (the device tool's limit): log.txt, tests.txt, the built extension (its log on
# failure), gpucheck's .json/.md, timing .json/.md, models.json.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_session.sh OUT [STAGE ...]}
shift
STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(build tests check time models)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ZSLFAST_REQUIRE_EXTENSION=1 ZSLFAST_REQUIRE_TRITON=1
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PYTHON:-python3}
HAS_GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
[ "$HAS_GPU" = 1 ] && export ZSLFAST_REQUIRE_CUDA_KERNELS=1
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

stamp "start: $(uname -m), $(nproc) cores; GPU visible: $HAS_GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
$PY -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
command -v nvcc >/dev/null && nvcc --version | tail -1

for stage in "${STAGES[@]}"; do
  case "$stage" in
    build)
      stamp build
      if $PY -c "import zslfast._C, zslfast._build_info as b, torch, sys; sys.exit(b.TORCH_VERSION != torch.__version__)" 2>/dev/null; then
        echo "zslfast._C already built for this torch: not rebuilt"
      else
        start=$SECONDS
        if [ "$HAS_GPU" = 1 ]; then
          export ZSLFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc)
        else
          export ZSLFAST_CUDA=0
        fi
        # build_ext --inplace: no index is needed (the device machine reaches none), the same sources and flags.
        $PY setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1
        rc=$?
        tail -n 5 "$OUT/build.txt"
        echo "build: exit $rc in $((SECONDS - start)) s"
        [ $rc = 0 ] || { tail -n 60 "$OUT/build.txt"; exit 1; }
        # OUT returns few files: the build's log only when it failed; the extension, to carry to a later session.
        rm "$OUT/build.txt"
        cp zslfast/_C*.so "$OUT"/
      fi
      ;;
    tests)
      stamp "tests (${ZSLFAST_TESTS:--m gpu}; budget ${ZSLFAST_TESTS_S:-240} s)"
      workers=$([ "$HAS_GPU" = 1 ] && echo 8 || echo 2)
      # Past the deadline the remaining cases skip (tests/conftest.py), so the summary still counts them; the
      # timeout (60 s later) only catches a hang.
      export ZSLFAST_TEST_DEADLINE=$(($(date +%s) + ${ZSLFAST_TESTS_S:-240}))
      # shellcheck disable=SC2086
      timeout -k 10 $((${ZSLFAST_TESTS_S:-240} + 60)) $PY -m pytest tests ${ZSLFAST_TESTS:--m gpu} -n "$workers" -ra \
        --timeout 120 --durations 15 2>&1 | tee "$OUT/tests.txt" | tail -n 150
      echo "tests: exit ${PIPESTATUS[0]}"
      ;;
    check)
      stamp "gpucheck: correctness"
      timeout -k 10 120 $PY -m zslfast gpucheck --no-timing --out "$OUT" | tail -n 60
      echo "gpucheck correctness: exit ${PIPESTATUS[0]}"
      for f in "$OUT"/*-20*.json "$OUT"/*-20*.md; do
        [ -e "$f" ] && [[ "$f" != *-timing.* ]] && mv "$f" "${f%.*}-check.${f##*.}"
      done
      ;;
    time)
      stamp "gpucheck: timing (budget ${ZSLFAST_TIME_S:-90} s)"
      timeout -k 10 $((${ZSLFAST_TIME_S:-90} + 120)) $PY -m zslfast gpucheck --no-check --budget "${ZSLFAST_TIME_S:-90}" \
        --out "$OUT" | tail -n 40
      echo "gpucheck timing: exit ${PIPESTATUS[0]}"
      for f in "$OUT"/*-20*.json "$OUT"/*-20*.md; do
        [ -e "$f" ] && [[ "$f" != *-check.* ]] && [[ "$f" != *-timing.* ]] && mv "$f" "${f%.*}-timing.${f##*.}"
      done
      ;;
    models)
      stamp "model steps (budget ${ZSLFAST_MODELS_S:-120} s)"
      timeout -k 10 $((${ZSLFAST_MODELS_S:-120} + 120)) $PY benchmarks/gpu_models.py "$OUT/models.json" \
        --budget "${ZSLFAST_MODELS_S:-120}"
      echo "models: exit $?"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
stamp done
ls -la "$OUT"
