"""Smoke test of the benchmarks: ``python -m benchmarks --quick`` (what ``make bench`` runs, at tiny sizes) runs end
to end and writes every key, the exported agent's and the ensemble's included. The training and ensemble parts run
for the critic and one backbone (``--kinds iql,ct``): they are the same code for every module (the bare loop runs
each module's own update step, tests/test_bench_bare.py); acting runs for every backbone.

A benchmark, not a timed test: values are only checked to be present, finite and positive, never against a
threshold (CI machines are shared and their speed varies).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from idql_cm.backbones import builtin_kinds

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("iql", "ct")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_quick_writes_every_key(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--kinds", ",".join(KINDS), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())

    for kind in KINDS:
        for key in ("lightning", "bare", "ratio"):
            assert _positive(res["train_steps_per_s"][kind][key]), (kind, key)
    for key in ("datamodule_batches_per_s", "dataloader_batches_per_s", "ratio"):
        assert _positive(res["sampler"][key]), key
    for kind in builtin_kinds():
        for nfe in (1, 2, 4):
            assert _positive(res["action_ms"][kind][f"nfe{nfe}"]), (kind, nfe)
    assert _positive(res["eval_env_steps_per_s"])
    export = res["export"]["ms_per_decision"]
    assert set(export) == {"b1", "b4", "b1_1thread"}  # the quick sizes: 1 and 4 states, and 1 with one thread
    for rows in export.values():
        for nfe in (1, 2, 4):
            for runtime in ("onnxruntime", "torchscript", "eager", "onnxruntime_speedup_vs_eager"):
                assert _positive(rows[f"nfe{nfe}"][runtime]), (nfe, runtime)

    for kind in KINDS:  # several seeds in one run: both sides measured, and their ratio
        for key in ("ensemble_member_updates_per_s", "solo_member_updates_per_s", "speedup"):
            assert _positive(res["ensemble"][kind][key]), (kind, key)

    machine = res["machine"]
    for key in ("cpu", "cores", "torch"):
        assert machine[key], key
    assert "gpu" in machine
    assert res["date"]
    assert res["settings"]["quick"] is True
    # the table is printed
    assert "Lightning steps/s" in proc.stdout and "batches/s" in proc.stdout and "exported agent" in proc.stdout
