"""Throughput benchmarks of idql-cm: ``make bench`` (``python -m benchmarks``) → ``benchmarks/results.json`` and
a table on stdout.

Everything is measured side by side in one process on one machine (CPU, fp32), so each ratio compares like with like:

1. **Training** (gradient steps/s) of the IQL, EDM, CT and CD modules through a real ``lightning.Trainer`` (the real
   ``TDDataModule`` on a synthetic D4RL-shaped HDF5 file, obs 17 / act 6, batch 256, full-size default nets,
   TensorBoard logger at ``log_every_n_steps=200``, no progress bar, no checkpointing, no validation) against the
   same math in a bare PyTorch loop (``benchmarks/bare.py``: built from the module's own hyperparameters, the same
   nets, losses, optimiser, LR schedule and EMA / target updates, batches indexed from the same tensors with
   ``torch.randint``). ``ratio`` = Lightning seconds per step / bare seconds per step (1.00 = no overhead), the
   median over groups of blocks timed alternately inside one ``fit`` (``benchmarks/throughput.py``).
2. **Batch sampling**: ``TDDataModule``'s on-device iterable against the reference's path (a per-item ``Dataset``
   returning a dict of tensors, ``DataLoader(batch_size=256, shuffle=True, num_workers=4)``) on 1M in-memory rows.
3. **IDQL action selection** (ms per call): 50 states × 256 candidates at NFE 1, 2, 4 for each backbone (EDM Euler,
   CD, CT; CD and CT share the consistency-model sampler), full-size nets with random weights, plus the critic.
4. **Evaluation throughput**: env steps/s of ``idql_cm.eval.rollout.evaluate`` (10 HalfCheetah-v5 envs, an IDQL agent
   with 32 candidates, CT at NFE 1, episodes of 200 steps), policy time included.
5. **Exported agent** (key ``export``, ``benchmarks/export.py``): ms per decision of onnxruntime, TorchScript and
   the eager ``load_agent`` for 1 and 50 states × 256 candidates at NFE 1, 2, 4.
6. **Several seeds in one run** (key ``ensemble``, ``benchmarks/ensemble.py``): member-updates/s of one ``fit``
   with ``num_seeds: 5`` against 5 consecutive solo fits (seeds s..s+4) per module, their blocks timed alternately
   in one process, and the speed-up next to the issue's target (>= 2× IQL, >= 1.2× the others on CPU, >= 4× GPU).

One module per benchmark: ``throughput.py`` (1), ``dataloader.py`` (2), ``acting.py`` (3, 4), ``export.py`` (5),
``ensemble.py`` (6);
``diagnostics.py`` (``--ablate``, ``--profile``), ``tables.py`` (the JSON and the tables), ``harness.py`` (shared).

``--quick`` runs tiny sizes (seconds; the CI smoke test, not a measurement); ``--only train,sampler`` runs a subset.
Diagnostics (print, write no results): ``--ablate iql,edm`` times Lightning's own floor (a near-empty module), the
in-situ cost of each per-step hook of the modules, and Lightning variants with those costs switched off one by one
against the bare loop; ``--profile iql`` prints a cProfile of one module's Lightning loop. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks import ensemble, export
from benchmarks.acting import bench_action, bench_eval
from benchmarks.dataloader import bench_sampler
from benchmarks.diagnostics import ablate, lightning_floor, profile_lightning
from benchmarks.harness import ACT_DIM, FULL, KINDS, OBS_DIM, QUICK, ROOT, machine_info, quiet
from benchmarks.tables import ensemble_lines, export_lines, table, write_results
from benchmarks.throughput import bench_training


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"), help="where to write the JSON results")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--only", default="train,sampler,action,eval,export,ensemble",
                   help="comma-separated subset of train,sampler,action,eval,export,ensemble")
    p.add_argument("--kinds", default=",".join(KINDS), help="training modules to bench (iql,edm,ct,cd)")
    p.add_argument("--rounds", type=int, default=None, help="with --ablate: interleaved rounds per variant")
    p.add_argument("--groups", type=int, default=None,
                   help="training: timed groups (log_every_n_steps steps a side) per module")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train and act (auto: cuda when available); CUDA runs bf16-mixed, CPU fp32")
    p.add_argument("--compile", default="auto", metavar="auto|off|KINDS",
                   help="also time the opt-in fast path (compile: true) through the Trainer for these modules (e.g. "
                        "ct,iql); auto: ct with CUDA (the module of the GPU target), none on CPU, where compiling "
                        "costs 10-20 s per module and gains nothing")
    p.add_argument("--profile", choices=KINDS, default=None,
                   help="print a cProfile of one module's Lightning loop and exit (writes no results)")
    p.add_argument("--no-ablation-rounds", action="store_true",
                   help="with --ablate: only the Lightning floor and the in-situ hook timings")
    p.add_argument("--ablate", default=None, metavar="KINDS",
                   help="e.g. iql,edm: time Lightning variants without the module's per-step costs against the "
                        "bare loop, print the breakdown and exit (writes no results)")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they are measured, also when piped
    quiet()
    cfg = copy.deepcopy(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.groups:
        cfg["groups"] = {k: args.groups for k in KINDS}
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks: --device cuda: expected a CUDA device, found none (torch "
              f"{torch.__version__}, torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    cfg.update(device=device, precision="bf16-mixed" if device == "cuda" else "32-true")
    if args.compile == "auto":
        compiled = ("ct",) if device == "cuda" else ()
    elif args.compile in ("off", "none", ""):
        compiled = ()
    else:
        compiled = tuple(k for k in args.compile.split(",") if k)
        if not set(compiled) <= set(KINDS):
            print(f"benchmarks: --compile: expected auto, off or some of {','.join(KINDS)}, found {args.compile!r}",
                  file=sys.stderr)
            return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    kinds = tuple(k for k in args.kinds.split(",") if k)
    log = print

    with tempfile.TemporaryDirectory(prefix="idql_bench_") as work:
        if args.profile:
            print(profile_lightning(args.profile, cfg, work))
            return 0
        if args.ablate:
            lightning_floor(cfg, steps=64 if args.quick else 1000)  # multiples of the 8 fused updates
            ablate([k for k in args.ablate.split(",") if k], cfg, work,
                   0 if args.no_ablation_rounds else (args.rounds or 3))
            return 0
        t_start = time.perf_counter()
        res: dict[str, Any] = {"machine": machine_info(),
                               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        settings = {k: v for k, v in cfg.items()}
        settings.update(quick=args.quick, compiled_fast_path=list(compiled),
                        logger=f"TensorBoard, log_every_n_steps={cfg['log_every_n_steps']}",
                        obs_dim=OBS_DIM, act_dim=ACT_DIM,
                        data="synthetic D4RL-layout HDF5 (idql_cm/data/synthetic.py) through TDDataModule for training; "
                             "in-memory random tensors for the sampler; random-weight nets for acting")
        res["settings"] = settings  # bench_training adds train_transitions to it
        m = res["machine"]
        log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"GPU {m['gpu'] or 'none'}, load average {m['loadavg_start']}")
        if "train" in only:
            log("training throughput (Lightning vs bare loop):")
            res["train_steps_per_s"] = bench_training(settings, work, kinds, log, compiled=compiled)
        if "sampler" in only:
            log("batch sampling:")
            res["sampler"] = bench_sampler(cfg, log)
        if "action" in only:
            log(f"IDQL action selection ({cfg['action_envs']} x {cfg['action_candidates']}):")
            res["action_ms"] = bench_action(settings, log)
        if "eval" in only:
            log("evaluation throughput:")
            res["eval"] = bench_eval(settings, log)
            res["eval_env_steps_per_s"] = res["eval"]["env_steps_per_s"]
        if "export" in only:  # self-contained: benchmarks/export.py
            log("exported agent (onnxruntime / TorchScript / eager load_agent, ms per decision):")
            res["export"] = export.bench_export(export.QUICK if args.quick else export.FULL, work, log)
        if "ensemble" in only:
            ens = ensemble.QUICK if args.quick else ensemble.FULL
            log(f"several seeds in one run (num_seeds {ens['members']} vs {ens['members']} consecutive solo runs, "
                "member-updates/s):")
            res["ensemble"] = ensemble.bench_ensemble(settings, ens, work, kinds, log)
        try:
            res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            pass
        res["total_seconds"] = time.perf_counter() - t_start

    out = write_results(res, args.out)
    print()
    print(table(res))
    if "export" in res:
        print("\n" + "\n".join(export_lines(res["export"])))
    if "ensemble" in res:
        print("\n" + "\n".join(ensemble_lines(res["ensemble"])))
    print(f"\nwrote {out} ({res['total_seconds']:.0f} s)")
    return 0
