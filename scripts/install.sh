#!/usr/bin/env bash
# Creates .venv and installs idql-cm into it (editable, with the dev extra).
#  - No torch on the system Python: install the CPU wheel torch==2.13.0 (~25 s here) instead of
#    letting pip resolve "torch>=2.4" to a multi-GB CUDA build.
#  - A torch already on the system Python (GPU machines ship a CUDA build): the venv sees the
#    system site-packages and keeps that torch; setup.cfg asks only for torch>=2.4.
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$ver" in 3.10|3.11|3.12) ;; *) echo "idql-cm needs Python 3.10-3.12, found $ver at $(command -v "$PY")" >&2; exit 2;; esac
if "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "[install] keeping the system torch $("$PY" -c 'import torch; print(torch.__version__)')"
  "$PY" -m venv --system-site-packages "$VENV"
  TORCH_SPEC=()
else
  "$PY" -m venv "$VENV"
  TORCH_SPEC=("torch==${IDQL_CM_TORCH:-2.13.0}")
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# pip's own notices (index warnings, build-backend banners) go to a log, shown only if the install fails
LOG="$VENV/install.log"
echo "[install] installing idql-cm and its dependencies into $VENV (pip's output: $LOG)"
if [ "${IDQL_CM_NO_DEPS:-0}" = "1" ]; then
  ARGS=(--no-deps -e .)
else
  ARGS=("${TORCH_SPEC[@]}" -e ".[dev]")
fi
if ! "$VENV/bin/python" -m pip install -q "${ARGS[@]}" >"$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  echo "[install] failed: pip install ${ARGS[*]} (full output in $LOG)" >&2
  exit 1
fi
touch "$VENV/.installed"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)')"
