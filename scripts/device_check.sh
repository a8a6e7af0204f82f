#!/usr/bin/env bash
# The GPU measurements of the performance issue in one command, for a machine lent through the device tool
# (one CUDA GPU, a CUDA torch and lightning already installed, no package index). Writes into $OUT:
#   gpu.txt          the machine: GPU, driver, torch, lightning
#   bench_cuda.json  python -m benchmarks --device cuda: Lightning vs bare loop per module (bf16-mixed, fused_steps 8
#                    and 1), CT with compile: true, host syncs per step, sampling, IDQL action selection
#   bench_cuda.log   its output
#   bench_ensemble_cuda.json  python -m benchmarks --device cuda --only ensemble: one fit with num_seeds 5 against 5
#                    consecutive solo fits per module, member-updates/s and the speed-up (target >= 4x on a GPU)
#   bench_ensemble_cuda.log   its output
#   fast_path.log    the eager-vs-compile equivalence tests, on the GPU
# Training, sampling and acting need neither gymnasium nor mujoco; the evaluation benchmark does and is skipped
# unless those import (carry their wheels: the device tool's README shows how). Sized to end in ~9 minutes.
# Status: written and checked for syntax on CPU machines only; not yet run on a GPU (no GPU has been lent).
set -uo pipefail
OUT=${OUT:-/tmp/idql_cm_device}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__,
             "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/gpu.txt"

only=train,sampler,action
if "$PY" -c 'import gymnasium, mujoco' >/dev/null 2>&1; then only=$only,eval; fi
timeout 420 "$PY" -m benchmarks --device cuda --only "$only" --out "$OUT/bench_cuda.json" 2>&1 \
  | tee "$OUT/bench_cuda.log"
rc=${PIPESTATUS[0]}

timeout 300 "$PY" -m benchmarks --device cuda --only ensemble --out "$OUT/bench_ensemble_cuda.json" 2>&1 \
  | tee "$OUT/bench_ensemble_cuda.log"
rc_ens=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] && rc=$rc_ens

if "$PY" -c 'import jsonargparse' >/dev/null 2>&1; then
  timeout 120 "$PY" -m pytest -q -x tests/test_fast_path.py 2>&1 | tail -n 20 | tee "$OUT/fast_path.log"
else
  echo "tests/test_fast_path.py skipped: jsonargparse is not installed here (carry its wheel)" | tee "$OUT/fast_path.log"
fi
exit "$rc"
