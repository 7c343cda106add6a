#!/usr/bin/env bash
# One run on a machine with an NVIDIA GPU and a CUDA build of torch: build fakespotter with its
# CUDA kernels, run the CUDA tests, then the kernel, tap, agreement and scan benchmarks on the
# GPU. Logs go to OUT (default ./gpu-out); the tables end each log.
#
#   FAKESPOTTER_CACHE=DIR   the cache holding the dlib weights (weights/...resnet_model_v1.dat)
#   AGREEDIR=DIR            a folder of 150x150 JPEG chips for cuda_agreement.py (default:
#                           $SCANWORK/corpus2000; neither set: no agreement step)
#   SCANWORK=DIR            optional: a bench_scan.py --workdir with a corpus of --n 2000 chips and its
#                           model (built on any machine: bench_scan.build)
#   PRECISIONWORK=DIR       optional: a bench_scan_precision.py --workdir with its model and --n 64 chips:
#                           float32 vs float16 autocast, channels_last and compile in the scanner's forward
#   ARCH=90                 CUDA architectures to build for (default: 90, Hopper)
#   OPS_REPEATS=15          rounds of bench_ops.py (default: 15)
#   CPU_TAPS=1              0: leave out bench_taps.py on the host's CPUs (default: 1)
#
# Each step has its own time limit, so one that hangs or fails leaves the others' results. The steps
# run most-wanted first (tests, taps, CPU taps, precision, agreement, kernels, scan): a lease that ends early
# still brings back the first ones.
#
# Preparing the data on a machine without a GPU, in the repository root (.gpu/ is ignored by git;
# about 31 MB, within what a device run carries):
#   mkdir -p .gpu/cache/weights && cp ~/.cache/fakespotter/weights/dlib_face_recognition_resnet_model_v1.dat .gpu/cache/weights/
#   (cd benchmarks && ../.venv/bin/python -c "from pathlib import Path; import bench_scan, bench_scan_precision; \
#     bench_scan.build(Path('../.gpu/scan'), 512, 0); bench_scan_precision.build(Path('../.gpu/prec'), 64)")
# then, carrying .gpu:
#   FAKESPOTTER_CACHE=$PWD/.gpu/cache AGREEDIR=$PWD/.gpu/scan/corpus512 PRECISIONWORK=$PWD/.gpu/prec \
#     bash benchmarks/gpu_check.sh $OUT
# On an H200 (2026-11-27) that took 5 minutes: build 36 s, tests 3 min, taps 40 s, precision 33 s;
# the CPU taps step, added since, took 3 minutes more on the H100 host (16 CPUs, 2026-11-27; the
# compiled run 2.5 of them). A device call has 10; CPU_TAPS=0 leaves it out.
set -u
out=${1:-gpu-out}
mkdir -p "$out"
step() { echo; echo "== $(date +%T) $*"; }
export PYTHONUNBUFFERED=1

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, \
'cudnn conv fp32_precision', torch.backends.cudnn.conv.fp32_precision, 'matmul fp32_precision', torch.backends.cuda.matmul.fp32_precision)"

step build
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if ! FAKESPOTTER_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH:-90}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    timeout 400 python3 -m pip install --no-build-isolation --no-deps --no-compile -q --target /tmp/fs-site . \
    >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"; exit 1
fi
export PYTHONPATH=/tmp/fs-site
python3 -c "import fakespotter; print(fakespotter._C.build_info())"

step tests
# the CUDA tests, and the CPU op / tap tests: every CPU kernel variant this machine has (AVX-512 on
# most GPU hosts) against the twins
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
timeout 300 python3 -m pytest -p no:cacheprovider -q -rs $xdist tests/test_cuda.py tests/test_ops.py \
  tests/test_opcheck.py tests/test_bitset_linear.py tests/test_taps.py tests/test_reference.py \
  tests/test_calibration.py tests/test_classifier.py 2>&1 | tee "$out/tests.log" | tail -25

step taps
# contiguous and channels_last input (the element kernel on channels_last activations), with TF32
# off as the scanner runs and on as torch's default
for cfg in "64 off contiguous" "64 off channels_last" "256 default contiguous" "256 default channels_last"; do
  set -- $cfg
  timeout 100 python3 benchmarks/bench_taps.py --device cuda --threads 8 --batch "$1" --tf32 "$2" --input "$3" --repeats 7
done 2>&1 | tee "$out/taps.log"

if [ "${CPU_TAPS:-1}" != 0 ]; then
  step cpu-taps
  # issue B's CPU targets on the host's CPUs: the naive monitor's numpy work runs on one thread while
  # the forward uses them all, so (b)/(c) grows with the core count (eager channel: 1.12x at 2 threads on
  # the 2-CPU VM, 1.70-1.77x at 16 on the H100 host, compiled 2.65-2.75x; RESULTS.md)
  { timeout 120 python3 benchmarks/bench_taps.py --device cpu --threads "$(nproc)" --batch 64 --repeats 5
    timeout 300 python3 benchmarks/bench_taps.py --device cpu --threads "$(nproc)" --batch 64 --repeats 5 --compile
  } 2>&1 | tee "$out/cpu-taps.log"
fi

if [ -n "${PRECISIONWORK:-}" ]; then
  step precision
  timeout 200 python3 benchmarks/bench_scan_precision.py --device cuda --workdir "$PRECISIONWORK" --n 64 \
    --batch 64 --threads 4 --repeats 5 2>&1 | tee "$out/precision.log" | tail -14
fi

agree=${AGREEDIR:-${SCANWORK:+$SCANWORK/corpus2000}}
if [ -n "$agree" ]; then
  step agreement
  timeout 90 python3 benchmarks/cuda_agreement.py "$agree" --n 512 2>&1 | tee "$out/agreement.log" | tail -6
fi

step threshold_pack
for mf in contiguous channels_last; do
  timeout 100 python3 benchmarks/bench_ops.py --device cuda --repeats "${OPS_REPEATS:-15}" --memory-format $mf
done 2>&1 | tee "$out/ops.log" | grep -A10 "^| threads"

if [ -n "${SCANWORK:-}" ] && [ -d "$SCANWORK/corpus2000" ]; then
  step scan
  timeout 300 python3 benchmarks/bench_scan.py --device cuda --workdir "$SCANWORK" --n 2000 --big 10000 \
    --n-resnet 512 --threads 4 --repeats 3 2>&1 | tee "$out/scan.log" | tail -32
fi
step done
