"""Several seeds in one run (key ``ensemble``): ``num_seeds: S`` against S consecutive solo runs, side by side.

For each module (IQL, EDM, CT, CD) one Lightning ``fit`` with ``num_seeds = S`` (S = 5: S stacked members, member k
the solo run of seed s + k) is timed against S consecutive solo fits (``num_seeds = 1``, seeds s..s+S-1), each a
real ``lightning.Trainer`` as in the training benchmark (``benchmarks/throughput.py``: the real ``TDDataModule``,
batch 256, full-size default nets, the shipped ``fused_steps``, TensorBoard logger, CPU fp32 or CUDA bf16-mixed).

Timed side by side in one benchmark run: the ensemble fit and the solo fits run in two worker processes (one per
side, each with its own data module) that hand a baton to each other (:class:`Turns`), so exactly one of them
computes at any time, and their timed blocks alternate: ``B``
ensemble steps, then ``S·B`` steps of the current solo run, and so on (equal member-updates per block, so the two
blocks of a pair last about as long when the speed-up is ~1). A slow spell of the shared machine then slows both
sides of a pair alike, as in the Lightning-vs-bare comparison. The fits' setup and warm-up steps are not timed (each
happens in its side's turn, outside the blocks): the figures are steady-state training speed.

Reported per module: member-updates/s of the ensemble (S × its steps/s) and of the solo side (the steps/s of one
solo run, which is also the member-updates/s of S consecutive runs), and the speed-up (their ratio: the median over
block pairs of solo seconds / ensemble seconds), next to the issue's target (at S = 5: >= 2× for IQL and >= 1.2× for
the others on CPU, >= 4× on a GPU), which is reported, never applied.

CD distils from a frozen EDM teacher: a 5-member EDM checkpoint (an EDM fit of 2 steps with ``num_seeds = 5``) for
the ensemble, a solo one (2 steps) for the solo runs.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import queue
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    KINDS,
    NOISY_SPREAD,
    block_end,
    load1,
    loadavg,
    machine_info,
    make_datamodule,
    make_module,
    make_teacher,
    make_trainer,
    quiet,
    sync_fn,
    write_dataset,
)

# S members; per module: ensemble steps per block (B, a multiple of fused_steps; a solo block is S·B steps) and
# blocks per solo run (the ensemble fit runs S times as many: 10 block pairs a module, ~2-3 s a block on 2 CPU
# cores); every fit warms up for the training benchmark's warmup_steps first. ~4.5 minutes on 2 CPU cores.
FULL: dict[str, Any] = {
    "members": 5,
    "seed": 0,
    "block_steps": {"iql": 40, "edm": 16, "ct": 16, "cd": 8, "meanflow": 16},
    "blocks_per_run": {"iql": 2, "edm": 2, "ct": 2, "cd": 2, "meanflow": 2},
    "cuda_block_scale": 5,  # on a GPU every step is shorter: 5× the blocks' steps
}
QUICK: dict[str, Any] = {**FULL, "members": 2, "block_steps": {k: 4 for k in KINDS},
                         "blocks_per_run": {k: 1 for k in KINDS}, "cuda_block_scale": 1}
# the targets at S = 5 (ensemble member-updates/s ÷ solo member-updates/s); other S: reported as n/a
TARGET_MEMBERS = 5
TARGETS = {"cpu": {"iql": 2.0, **{k: 1.2 for k in KINDS if k != "iql"}}, "cuda": {k: 4.0 for k in KINDS}}
SIDES = ("ensemble", "solo")


def _orphaned() -> bool:
    """Whether this is a worker whose benchmark process has gone (killed, timed out): it then ends too."""
    parent = mp.parent_process()
    return parent is not None and not parent.is_alive()


class Turns:
    """A baton between the two sides (``ensemble``, ``solo``), each running its fits in its own process: a side
    computes only while it holds the baton and hands it over at the end of each timed block. A side that has
    finished (or failed) never takes it back, so the other one then runs on alone. Processes, not threads: two
    threads of one process each drive their own OpenMP team, and libgomp then throttles its spin-waits (more managed
    threads than CPUs), which made a solo IQL step ~2× slower on 2 cores, the small ops more than the ensemble's."""

    def __init__(self, ctx):
        self._cond = ctx.Condition()
        self._state = ctx.Array("i", 3, lock=False)  # [whose turn (index into SIDES), ensemble done, solo done]

    def reset(self) -> None:
        with self._cond:
            self._state[:] = [0, 0, 0]  # the ensemble side goes first

    def _mine(self, side: str) -> bool:
        i = SIDES.index(side)
        return self._state[0] == i or bool(self._state[2 - i])  # its turn, or the other side is done

    def _wait_locked(self, side: str) -> None:
        while not self._cond.wait_for(lambda: self._mine(side), timeout=5.0):
            if _orphaned():
                raise SystemExit(1)  # out of the fit and the lock; the worker's loop then exits

    def wait(self, side: str) -> None:
        with self._cond:
            self._wait_locked(side)

    def hand_over(self, side: str) -> None:
        """Give the baton to the other side and wait until it comes back."""
        with self._cond:
            self._state[0] = 1 - SIDES.index(side)
            self._cond.notify_all()
            self._wait_locked(side)

    def finish(self, side: str) -> None:
        with self._cond:
            i = SIDES.index(side)
            self._state[1 + i] = 1
            self._state[0] = 1 - i
            self._cond.notify_all()


def TurnTimer(turns: Turns, side: str, warmup: int, block: int, blocks: int, sync):  # noqa: N802 - used like a class
    """A Lightning callback timing ``blocks`` blocks of ``block`` steps after ``warmup`` steps, handing the baton to
    the other side after the warm-up and after every block but the last (the fit then ends, in this side's turn).
    ``startup`` is the time from the Trainer's start of training to the end of the warm-up."""
    from lightning.pytorch.callbacks import Callback

    class _TurnTimer(Callback):
        def __init__(self):
            self.times: list[float] = []  # seconds per block
            self.spans: list[tuple[float, float]] = []  # (start, end) of each block, time.time(): one clock for both
            self.startup: float | None = None
            self._t0: float | None = None
            self._wall0 = 0.0
            self._start = 0.0

        def on_train_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = block_end(trainer, warmup, block, sync)
            if now is None:
                return
            if self._t0 is None:
                self.startup = now - self._start
            else:
                self.times.append(now - self._t0)
                self.spans.append((self._wall0, time.time()))
            if len(self.times) < blocks:
                turns.hand_over(side)
                self._wall0 = time.time()
                self._t0 = time.perf_counter()

    return _TurnTimer()


def _timed_fit(kind: str, dm, cfg: dict[str, Any], work: str, teacher: str | None, members: int, seed: int,
               turns: Turns, side: str, block: int, blocks: int) -> tuple[list[float], float, list]:
    """One fit of ``warmup + block·blocks`` steps of ``kind`` with ``num_seeds = members`` under ``seed_everything:
    seed``; returns its blocks' seconds, the startup and the blocks' wall-clock spans (see :func:`TurnTimer`)."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    warm, fused = cfg["warmup_steps"][kind], cfg["fused_steps"]
    if block % fused or warm % fused:
        raise ValueError(f"fused_steps ({fused}) must divide the block ({block}) and warm-up ({warm}) steps")
    module = make_module(kind, cfg, teacher, fused=fused, num_seeds=members)
    timer = TurnTimer(turns, side, warm, block, blocks, sync_fn(cfg.get("device", "cpu")))
    trainer = make_trainer(warm + block * blocks, cfg, work, f"{kind}_{side}_s{members}_seed{seed}", [timer])
    trainer.fit(module, datamodule=dm)
    if len(timer.times) != blocks or timer.startup is None:
        raise RuntimeError(f"TurnTimer: expected {blocks} blocks, found {len(timer.times)}")
    return timer.times, timer.startup, timer.spans


def block_steps(kind: str, cfg: dict[str, Any], ens: dict[str, Any]) -> int:
    """B: the ensemble's steps per block (a solo block is S·B steps)."""
    return ens["block_steps"][kind] * (ens["cuda_block_scale"] if cfg.get("device") == "cuda" else 1)


def _side_worker(side: str, turns: Turns, tasks, results, path: str, cfg: dict[str, Any], ens: dict[str, Any],
                 work: str) -> None:
    """One side's process: its own data module, then per job ``(kind, teacher)`` the ensemble fit (S·n blocks of B
    steps) or the S consecutive solo fits (n blocks of S·B steps each, seeds s..s+S-1), in turns with the other."""
    quiet()
    dm = make_datamodule(path, cfg)  # num_seeds > 1 sets its data module's num_seeds: one per side
    S, seed = ens["members"], ens["seed"]
    while True:
        try:
            job = tasks.get(timeout=5.0)
        except queue.Empty:
            if _orphaned():
                os._exit(1)
            continue
        if job is None:
            return
        kind, teacher = job
        B, n = block_steps(kind, cfg, ens), ens["blocks_per_run"][kind]
        out, err = None, None
        try:
            if side == "ensemble":
                times, startup, spans = _timed_fit(kind, dm, cfg, work, teacher, S, seed, turns, side, B, S * n)
                out = {"times": times, "runs": [times], "startup": [startup], "spans": spans}
            else:
                turns.wait(side)
                out = {"times": [], "runs": [], "startup": [], "spans": []}
                for r in range(S):
                    gc.collect()
                    times, startup, spans = _timed_fit(kind, dm, cfg, work, teacher, 1, seed + r, turns, side,
                                                       S * B, n)
                    out["times"] += times
                    out["spans"] += spans
                    out["runs"].append(times)
                    out["startup"].append(startup)
        except BaseException:  # noqa: BLE001 - reported to the parent, which raises
            err = traceback.format_exc()
        finally:
            gc.collect()  # in this side's turn, as everything it does
            turns.finish(side)
        # only after finish: the parent resets the baton for the next module once both results are in
        results.put((side, out, err))


def _collect(results, procs, n: int) -> dict[str, Any]:
    got: dict[str, Any] = {}
    while len(got) < n:
        try:
            side, out, err = results.get(timeout=5)
        except queue.Empty:
            dead = [f"{p.name} (exit code {p.exitcode})" for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"ensemble benchmark: worker process ended: {', '.join(dead)}") from None
            continue
        if err is not None:
            raise RuntimeError(f"ensemble benchmark, {side} side:\n{err}")
        got[side] = out
    # the two sides' timed blocks must never overlap (one computes while the other waits for the baton)
    overlap = sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in got["ensemble"]["spans"]
                  for b0, b1 in got["solo"]["spans"])
    if overlap > 1e-3:
        raise RuntimeError(f"ensemble benchmark: the two sides' timed blocks overlapped for {overlap:.3f} s")
    return got


def _met(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "not met"


def bench_ensemble(cfg: dict[str, Any], ens: dict[str, Any], work: str, kinds=KINDS, log=print) -> dict[str, Any]:
    """The ``ensemble`` record: per module, member-updates/s of one ``num_seeds = S`` fit and of S solo fits."""
    t_start = time.perf_counter()
    device = cfg.get("device", "cpu")
    S = ens["members"]
    path = write_dataset(Path(work) / "synthetic_d4rl_ensemble.hdf5", cfg["train_rows"])
    dm = make_datamodule(path, cfg)  # here only for the CD teachers (each side's process loads its own)
    log(f"  synthetic dataset: {dm.num_transitions} transitions ({time.perf_counter() - t_start:.1f} s to write and "
        "load)")
    teachers: dict[str, str | None] = {"ensemble": None, "solo": None}
    if "cd" in kinds:
        teachers["solo"] = make_teacher(dm, cfg, str(Path(work) / "edm_teacher_solo.ckpt"))
        teachers["ensemble"] = make_teacher(dm, cfg, str(Path(work) / f"edm_teacher_s{S}.ckpt"), num_seeds=S)
    transitions = dm.num_transitions
    del dm
    gc.collect()
    targets = TARGETS["cuda" if device == "cuda" else "cpu"]
    res: dict[str, Any] = {
        "machine": machine_info(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {"members": S, "seed": ens["seed"], "device": device,
                     "precision": cfg.get("precision", "32-true"), "batch_size": cfg["batch_size"],
                     "fused_steps": cfg["fused_steps"], "warmup_steps": dict(cfg["warmup_steps"]),
                     "log_every_n_steps": cfg["log_every_n_steps"], "net": cfg["net"], "iql_hidden": cfg["iql_hidden"],
                     "train_transitions": transitions,
                     "blocks": "per module: S × blocks_per_run ensemble blocks of block_steps steps, alternating "
                               "with blocks of S × block_steps steps of the current solo run (blocks_per_run per "
                               "run); speed-up = median over the block pairs of solo s / ensemble s",
                     "block_steps": {k: block_steps(k, cfg, ens) for k in KINDS},
                     "blocks_per_run": dict(ens["blocks_per_run"]),
                     "targets": targets, "quick": bool(cfg.get("quick", False))},
    }
    ctx = mp.get_context("spawn")  # CUDA-safe, and no OpenMP state inherited from this process
    turns = Turns(ctx)
    tasks = {side: ctx.Queue() for side in SIDES}
    results = ctx.Queue()
    procs = [ctx.Process(target=_side_worker, args=(side, turns, tasks[side], results, path, cfg, ens, work),
                         name=f"bench-ensemble-{side}", daemon=True) for side in SIDES]
    for p in procs:
        p.start()
    try:
        for kind in kinds:
            load_before = load1()
            turns.reset()
            for side in SIDES:
                tasks[side].put((kind, teachers[side]))
            t = _collect(results, procs, len(SIDES))
            res[kind] = _record(kind, t, S, block_steps(kind, cfg, ens), targets[kind], load_before, log)
    finally:
        for side in SIDES:
            tasks[side].put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # SIGKILL: inside a fit, Lightning's SIGTERM handler would only note the signal
                p.kill()
                p.join()
    res["machine"]["loadavg_end"] = loadavg()
    res["seconds"] = time.perf_counter() - t_start
    return res


def _record(kind: str, t: dict[str, Any], S: int, B: int, target: float, load_before, log) -> dict[str, Any]:
    """One module's entry from the two sides' blocks (S·B member-updates each, so a pair's speed-up is solo seconds
    / ensemble seconds; the median over the pairs)."""
    te, ts = t["ensemble"]["times"], t["solo"]["times"]
    speedups = [b / a for a, b in zip(te, ts, strict=True)]
    e_sec, s_sec = statistics.median(te), statistics.median(ts)
    speedup = statistics.median(speedups)
    o = {
        "members": S,
        "ensemble_member_updates_per_s": S * B / e_sec,
        "solo_member_updates_per_s": S * B / s_sec,  # = steps/s of one solo run
        "speedup": speedup,
        "target": target,
        "target_met": speedup >= target if S == TARGET_MEMBERS else None,
        "ensemble_steps_per_s": B / e_sec,
        "ensemble_ms_per_step": 1e3 * e_sec / B,
        "solo_ms_per_step": 1e3 * s_sec / (S * B),
        "solo_steps_per_s_per_run": [S * B * len(r) / sum(r) for r in t["solo"]["runs"]],
        "block_speedups": [round(x, 4) for x in speedups],
        "blocks_ensemble_s": [round(x, 4) for x in te],
        "blocks_solo_s": [round(x, 4) for x in ts],
        # untimed: a fit's start of training to the end of its warm-up (the ensemble once, each solo run)
        "startup_s": {side: [round(x, 3) for x in t[side]["startup"]] for side in SIDES},
        "loadavg_1min": [load_before, load1()],
        "noisy": max(te) / min(te) > NOISY_SPREAD or max(ts) / min(ts) > NOISY_SPREAD,
    }
    log(f"  {kind:4s} S={S}: ensemble {o['ensemble_member_updates_per_s']:7.1f} member-updates/s "
        f"({o['ensemble_steps_per_s']:.1f} steps/s)  solo {o['solo_member_updates_per_s']:7.1f}  speed-up "
        f"{speedup:.2f}x (target >= {target:g}x at S = {TARGET_MEMBERS}: {_met(o['target_met'])}; block "
        f"speed-ups {o['block_speedups']})")
    if o["noisy"]:
        log(f"  note: {kind} blocks differ by more than {NOISY_SPREAD:.2f}x in speed (the machine was busy); "
            "the paired speed-up is robust to that, the absolute member-updates/s less so")
    return o
