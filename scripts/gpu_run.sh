#!/usr/bin/env bash
# The GPU sweep and the GPU-only checks in one go, for a one-shot run on a CUDA machine (a rented box).
#
#   scripts/gpu_run.sh                     # all built-in models, paper preset, sizes every model accepts
#   SIZES=128,256 STEPS=5 scripts/gpu_run.sh
#   WHEELS=/path/to/wheels scripts/gpu_run.sh    # offline: install from local wheels
#
# Steps (each one's outcome is summarised at the end; the script exits 1 if any failed):
#   0. install, only if the package is not importable yet: a virtual environment .venv, then
#      `pip install -e .[dev]` -- from local wheels (--no-index) when WHEELS (default ./wheels) exists,
#      else from the package index (torch's default Linux wheel is a CUDA build). Make the wheels on a
#      connected machine of the same platform: pip download -d wheels torch==2.13.0 '.[dev]' setuptools wheel
#   1. environment: nvidia-smi, a CUDA build of torch that sees the GPU (exit 2 otherwise);
#   2. the sweep: run_bench.py --device cuda --preset paper over MODELS x SIZES into OUT
#      (reports/gpu-<timestamp>/ by default): CUDA allocator peaks, NVML memory and energy, timings;
#   3. allocator vs prediction: python -m idmbench.harness.compare OUT --cuda prints the table it checked
#      and fails unless every model has at least one config measured on CUDA, no config failed
#      (error, timeout, killed), every measured row is within 0.90-1.25x of its fake-tensor prediction
#      and has NVML energy; an empty or all-error sweep cannot pass;
#   4. the pytest suite on this machine (includes the CUDA-only tests that are skipped on CPU);
#   5. the CI memory gate (run_bench.py check);
#   6. the HTML report OUT/report.html.
# Environment overrides: PYTHON, MODELS, SIZES, STEPS, WARMUP, TIMEOUT (s per config), OUT, PRECISION, WHEELS.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PY=${PYTHON:-python3}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
TIMEOUT=${TIMEOUT:-900}
PRECISION=${PRECISION:-fp32}
OUT=${OUT:-reports/gpu-$(date +%Y%m%d-%H%M%S)}
WHEELS=${WHEELS:-wheels}
declare -A STATUS

echo "== 0. install"
if "$PY" -c "import idmbench" 2>/dev/null; then
  echo "idmbench already importable by $PY: nothing to install"
  STATUS[install]=0
else
  if [ -z "${PYTHON:-}" ]; then
    python3 -m venv .venv && . .venv/bin/activate && PY=python
  fi
  if [ -d "$WHEELS" ]; then
    echo "installing from the local wheels in $WHEELS (no index)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e '.[dev]'
  else
    echo "installing from the package index (torch's default Linux wheel is a CUDA build)"
    "$PY" -m pip install -q -e '.[dev]'
  fi
  STATUS[install]=$?
  if [ "${STATUS[install]}" != "0" ]; then echo "install failed (exit ${STATUS[install]})" >&2; exit 2; fi
fi

echo "== 1. environment"
if ! nvidia-smi; then echo "nvidia-smi failed: no NVIDIA driver here" >&2; exit 2; fi
if ! "$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU; install a CUDA build, e.g. "
             "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
then exit 2; fi

if [ -z "${MODELS:-}" ]; then
  MODELS=$("$PY" -c "import idmbench; print(','.join(idmbench.list_models()))")
fi
if [ -z "${SIZES:-}" ]; then
  # the sizes among 128..384 that every model accepts at the paper preset
  SIZES=$("$PY" - "$MODELS" <<'PYEOF'
import sys
from idmbench import get_spec
models = sys.argv[1].split(",")
ok = []
for s in (128, 256, 384):
    try:
        for m in models:
            spec = get_spec(m)
            spec.check_size((s, s, s), spec.config("paper"))
        ok.append(str(s))
    except ValueError:
        pass
print(",".join(ok))
PYEOF
)
fi
if [ -z "$SIZES" ]; then echo "no size in 128, 256, 384 fits every model of $MODELS at the paper preset; set SIZES" >&2; exit 2; fi
echo "models $MODELS, sizes $SIZES, out $OUT"

echo "== 2. GPU sweep"
"$PY" run_bench.py --device cuda --preset paper --models "$MODELS" --sizes "$SIZES" \
  --steps "$STEPS" --warmup "$WARMUP" --timeout "$TIMEOUT" --precision "$PRECISION" --out "$OUT" --no-report
STATUS[sweep]=$?

echo "== 3. CUDA allocator vs fake-tensor prediction, NVML energy, every model measured on CUDA"
"$PY" -m idmbench.harness.compare "$OUT" --cuda
STATUS[compare]=$?

echo "== 4. pytest (CUDA-only tests run here)"
"$PY" -m pytest -q -rs --benchmark-disable
STATUS[pytest]=$?

echo "== 5. memory gate"
"$PY" run_bench.py check
STATUS[check]=$?

echo "== 6. report"
"$PY" run_bench.py report "$OUT"
STATUS[report]=$?

echo "== summary ($OUT)"
rc=0
for k in install sweep compare pytest check report; do
  echo "  $k: exit ${STATUS[$k]}"
  [ "${STATUS[$k]}" = "0" ] || rc=1
done
OUT_ABS=$(cd "$OUT" 2>/dev/null && pwd || echo "$OUT")
if [ -f "$OUT/report.html" ]; then
  echo "report: $OUT_ABS/report.html (results: $OUT_ABS/results.csv)"
else
  echo "report: none written; results (if any): $OUT_ABS/results.csv"
fi
exit $rc
