#!/usr/bin/env bash
# The GPU check in two device calls of at most 300 s each (docs/gpu-check.md).
#
#   RUN=1 bash scripts/gpu_check.sh   install (+ the CUDA C++ build), GPU tests, demo
#   RUN=2 bash scripts/gpu_check.sh   install (no C++ build unless asked), quick benchmark,
#                                     host-time benchmark, the training benchmark if time is left
#   STAGES="install train" bash scripts/gpu_check.sh   any stages, in order
#
# Everything goes under $OUT (default ./gpu-out): one log per stage, summary.txt. Every stage has
# its own time limit, cut to what is left of the run's BUDGET, and leaves a readable partial
# result when the limit hits: the tests run one pytest per test file (8 files at a time), each
# with its own limit, its own JUnit XML and a -v log written test by test; the benchmarks write
# their tables as they go. summary.txt gets one line per stage as it finishes (and a line when
# it starts), so a run killed from outside still shows where it was. Exit 1 when the install,
# a test file or the demo failed.
#
# Estimated from the H200 run of 2026-11-26 (/work/shared/gpu-runs/2026-11-26-h200-f02c316):
#   run 1: install 40 s (27 s of it the CUDA build) + tests ~130 s (124 s for the gpu/any_device
#          tests with -n 8 then; since then test_mlp's largest GPU case shrank 20x; the 16 files
#          with GPU tests start first, among them test_mlp_hopper.py, a guessed 60-90 s: the
#          JIT compiles of 2 x 9 TMA kernel variants and one inductor compile) + demo ~25 s
#          (1 epoch; 4 s collab, the digits part was 78 s of cold per-batch-size tuning, now
#          FASTCORE5_TUNING=off) = ~195 s, limits 60 + 150 + 60 = 270 s.
#   run 2: install 15 s (Python only) + bench --quick ~40 s (39 s then, 28.5 of it tuning; tuning
#          now capped at TUNING_SECONDS) + host ~30 s + train with what is left (~200 s) = 285 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
RUN=${RUN:-1}
case $RUN in
  1) DEFAULT_STAGES="install tests demo"; BUILD_CUDA_DEFAULT=1 ;;
  2) DEFAULT_STAGES="install bench host train"; BUILD_CUDA_DEFAULT=0 ;;
  *) echo "RUN must be 1 or 2, got '$RUN'" >&2; exit 2 ;;
esac
STAGES=${STAGES:-$DEFAULT_STAGES}
PYTHON=${PYTHON:-python3}
BUDGET=${BUDGET:-290}  # seconds for the whole run: under the 300 s a device call may take
FILE_JOBS=${FILE_JOBS:-8}
TEST_TIMEOUT=${TEST_TIMEOUT:-60}
TUNING_SECONDS=${TUNING_SECONDS:-15}
# seconds per stage, each cut to what is left of BUDGET
INSTALL_LIMIT=${INSTALL_LIMIT:-60}
TESTS_LIMIT=${TESTS_LIMIT:-150}
TEST_FILE_LIMIT=${TEST_FILE_LIMIT:-120}
DEMO_LIMIT=${DEMO_LIMIT:-60}
BENCH_LIMIT=${BENCH_LIMIT:-90}
HOST_LIMIT=${HOST_LIMIT:-45}
TRAIN_LIMIT=${TRAIN_LIMIT:-420}
MARGIN=5  # seconds kept for the summary after the last stage
mkdir -p "$OUT"
status=0
: >"$OUT/summary.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

limit_for() {  # limit_for SECONDS: SECONDS, or what is left of BUDGET if less
  local left=$((BUDGET - SECONDS - MARGIN))
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

stage() {  # stage NAME SECONDS COMMAND...: run it under min(SECONDS, what is left), log to $OUT/NAME.log
  local name=$1 seconds
  seconds=$(limit_for "$2")
  shift 2
  if [ "$seconds" -lt 10 ]; then
    note "$name: SKIPPED, ${seconds} s left of the run's ${BUDGET} s"
    return 3
  fi
  note "$name: started at ${SECONDS} s, limit ${seconds} s"
  local start=$SECONDS
  timeout --kill-after=5 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local how="exit $rc"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && how="TIMED OUT at its ${seconds} s limit (exit $rc); partial result in $name.log"
  note "$name: $how after $((SECONDS - start)) s"
  tail -n 15 "$OUT/$name.log"
  return $rc
}

has_module() {  # has_module NAME: the module imports in this python
  $PYTHON -c "import $1" >/dev/null 2>&1
}

test_file() {  # test_file PATH: one file's GPU tests, its own limit, JUnit XML and -v log
  local file=$1 name
  name=$(basename "$file" .py)
  # each file's own timeout runs in its own process group, out of reach of the stage's: so no
  # file may outlive the stage, whose end is TESTS_DEADLINE (epoch seconds)
  local limit=$((TESTS_DEADLINE - $(date +%s)))
  [ "$limit" -gt "$TEST_FILE_LIMIT" ] && limit=$TEST_FILE_LIMIT
  if [ "$limit" -lt 5 ]; then echo "$name: NOT RUN, the tests stage's time was spent"; return 1; fi
  local extra=()
  has_module pytest_timeout && extra+=(--timeout "$TEST_TIMEOUT")
  timeout --kill-after=2 "$limit" $PYTHON -m pytest "$file" -m "gpu or any_device" -v -rfE \
    -p no:cacheprovider -p no:randomly "${extra[@]}" --junitxml="$OUT/tests/$name.xml" >"$OUT/tests/$name.log" 2>&1
  local rc=$?
  case $rc in
    0) echo "$name: passed" ;;
    5) echo "$name: no GPU tests" ;;
    124|137) echo "$name: TIMED OUT after ${limit} s (the tests it finished are in tests/$name.log)" ;;
    *) echo "$name: FAILED (exit $rc): $(grep -cE '^(FAILED|ERROR) ' "$OUT/tests/$name.log") failed, see tests/$name.log" ;;
  esac
  case $rc in 0|5) return 0 ;; *) return 1 ;; esac
}
export -f test_file has_module
export OUT PYTHON TEST_TIMEOUT TEST_FILE_LIMIT  # and TESTS_DEADLINE, set by the tests stage

run_tests() {  # every test file at once, FILE_JOBS at a time; one result line per file
  mkdir -p "$OUT/tests"
  local failed=0
  # the files with GPU tests first: the slow ones (compiles, inductor) start in the first waves
  { grep -lE 'mark\.gpu|any_device' tests/test_*.py; grep -LE 'mark\.gpu|any_device' tests/test_*.py; } \
    | xargs -P "$FILE_JOBS" -I{} bash -c 'test_file {}' >"$OUT/tests/files.txt" 2>&1 || failed=1
  sort "$OUT/tests/files.txt"
  return $failed
}
export -f run_tests

{
  date -u +%FT%TZ
  echo "run $RUN, stages: $STAGES, budget ${BUDGET} s"
  git rev-parse HEAD 2>/dev/null || echo "(no .git: commit unknown)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PYTHON -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

for s in $STAGES; do
  case $s in
    install)
      # A failed CUDA build is a failure (and the CUDA backend's tests then fail, not skip).
      FASTCORE5_BUILD_CUDA=${FASTCORE5_BUILD_CUDA:-$BUILD_CUDA_DEFAULT} stage install "$INSTALL_LIMIT" \
        $PYTHON -m pip install --no-deps --no-build-isolation -e . \
        || { status=1; note "install failed; installing without the CUDA extension so the Triton path is still checked"; \
             FASTCORE5_BUILD_CUDA=0 stage install-python-only 30 $PYTHON -m pip install --no-deps --no-build-isolation -e .; } ;;
    tests)
      # The GPU-marked tests and those marked any_device; the rest of the suite is written for CPU
      # tensors under the Triton interpreter, which CI runs. FASTCORE5_TUNING=off: each shape
      # bucket launches its default config untimed (tests of the tuning turn it back on).
      TESTS_DEADLINE=$(( $(date +%s) + $(limit_for "$TESTS_LIMIT") - 3 )) FASTCORE5_TUNING=off \
        stage tests "$TESTS_LIMIT" bash -c run_tests || status=1
      [ -f "$OUT/tests/files.txt" ] && sort "$OUT/tests/files.txt" >>"$OUT/summary.txt" ;;
    demo)
      FASTCORE5_TUNING=off stage demo "$DEMO_LIMIT" $PYTHON -m fastcore5 demo --epochs 1 --device cuda || status=1 ;;
    bench)
      FASTCORE5_TUNING_SECONDS=$TUNING_SECONDS stage bench "$BENCH_LIMIT" $PYTHON -m bench --quick --out "$OUT/bench" || true ;;
    host)
      # Host time per call with real launches on tiny tensors (the hot-path issue's GPU check).
      stage host "$HOST_LIMIT" $PYTHON -m fastcore5.bench.host --calls 500 --json "$OUT/host.json" || true ;;
    train)
      # python -m bench --train at full size, with whatever time the run has left
      FASTCORE5_TUNING_SECONDS=$TUNING_SECONDS stage train "$TRAIN_LIMIT" $PYTHON -m bench --train --out "$OUT/train" || true ;;
    *) note "unknown stage $s"; status=2 ;;
  esac
done
note "total: $SECONDS s (run $RUN)"
exit $status
