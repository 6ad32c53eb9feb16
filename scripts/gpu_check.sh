#!/usr/bin/env bash
# The whole GPU check in one device call (see docs/testing.md, "Running on a GPU").
#
# Installs fastcore5 from this working tree without network, builds the CUDA extension, runs the
# GPU tests, a one-epoch demo, the quick benchmark and the host-time benchmark, and writes every log and JSON under $OUT
# (default ./gpu-out). Budget: one 600 s device call with room to spare. Each stage has its own
# time limit (below; 515 s together, 545 if the CUDA build fails), so one slow stage cannot eat the call; a failed stage is
# recorded and the next still runs. $OUT/summary.txt says how long each stage took and how it
# ended. The exit status is 1 when the install, the tests or the demo failed.
#
# The tests run in parallel (pytest-xdist, -n $WORKERS) with a per-test limit (pytest-timeout,
# --timeout $TEST_TIMEOUT) when those plugins are installed, so one crashing or hanging test
# costs its worker or its own time, not the rest of the run. Without them the tests run
# serially under the stage's limit, and summary.txt says so.
#
# Usage on the device machine: bash scripts/gpu_check.sh                        (everything)
#                              STAGES="install tests" bash scripts/gpu_check.sh  (then "demo bench")
#                              STAGES="install train" bash scripts/gpu_check.sh  (the training benchmark:
#                              not in the default stages, it needs most of a call on its own)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
STAGES=${STAGES:-"install tests demo bench host"}
PYTHON=${PYTHON:-python3}
WORKERS=${WORKERS:-8}
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
# seconds per stage
INSTALL_LIMIT=${INSTALL_LIMIT:-120}
TESTS_LIMIT=${TESTS_LIMIT:-200}
DEMO_LIMIT=${DEMO_LIMIT:-60}
BENCH_LIMIT=${BENCH_LIMIT:-90}
HOST_LIMIT=${HOST_LIMIT:-45}
TRAIN_LIMIT=${TRAIN_LIMIT:-420}
mkdir -p "$OUT"
status=0
: >"$OUT/summary.txt"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local how="exit $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="TIMED OUT at its ${seconds} s limit (exit $rc)"
  echo "$name: $how after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
  return $rc
}

has_module() {  # has_module NAME: the plugin imports in this python
  $PYTHON -c "import $1" >/dev/null 2>&1
}

{
  date -u +%FT%TZ
  git rev-parse HEAD 2>/dev/null || echo "(no .git: commit unknown)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  $PYTHON -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

for s in $STAGES; do
  case $s in
    install)
      FASTCORE5_BUILD_CUDA=${FASTCORE5_BUILD_CUDA:-1} stage install "$INSTALL_LIMIT" \
        $PYTHON -m pip install --no-deps --no-build-isolation -e . \
        || { status=1; echo "CUDA build failed; installing without it so the Triton path is still checked"; \
             FASTCORE5_BUILD_CUDA=0 stage install-python-only 30 $PYTHON -m pip install --no-deps --no-build-isolation -e .; } ;;
    tests)
      # The GPU-marked tests and those marked any_device (their tensors follow the device
      # present); the rest of the suite is written for CPU tensors under the Triton interpreter,
      # which CI runs.
      parallel=()
      if has_module xdist; then parallel+=(-n "$WORKERS"); else echo "tests: pytest-xdist missing, running serially" | tee -a "$OUT/summary.txt"; fi
      if has_module pytest_timeout; then parallel+=(--timeout "$TEST_TIMEOUT"); else echo "tests: pytest-timeout missing, no per-test limit" | tee -a "$OUT/summary.txt"; fi
      # FASTCORE5_TUNING=off: each shape bucket launches its default config untimed (the tests
      # check results, which do not depend on the config; tests of the tuning turn it back on).
      FASTCORE5_TUNING=off stage tests "$TESTS_LIMIT" $PYTHON -m pytest tests -m "gpu or any_device" -q -rfE -p no:cacheprovider \
        "${parallel[@]}" --junitxml="$OUT/tests.xml" \
        || status=1 ;;
    demo)
      stage demo "$DEMO_LIMIT" $PYTHON -m fastcore5 demo --epochs 1 --device cuda || status=1 ;;
    bench)
      stage bench "$BENCH_LIMIT" $PYTHON -m bench --quick --out "$OUT/bench" || true ;;
    host)
      # Host time per call with real launches on tiny tensors (the hot-path issue's GPU check).
      stage host "$HOST_LIMIT" $PYTHON -m fastcore5.bench.host --calls 500 --json "$OUT/host.json" || true ;;
    train)
      # python -m bench --train at full size; its JSON goes under bench/results/ once committed
      stage train "$TRAIN_LIMIT" $PYTHON -m bench --train --out "$OUT/train" || status=1 ;;
    *) echo "unknown stage $s" | tee -a "$OUT/summary.txt"; status=2 ;;
  esac
done
echo "total: $SECONDS s" | tee -a "$OUT/summary.txt"
exit $status
