"""Benchmark of the exported agent (``make bench`` key ``export``): ms per decision, raw observations in, actions out.

For 1 state and 50 states, each with 256 candidates, at NFE 1, 2 and 4: onnxruntime (CPU) on the exported ONNX
file, the exported TorchScript module, and the eager ``load_agent(...).act``, side by side in one process. The
checkpoints are real (the full-size CT and IQL configs of ``configs/halfcheetah-medium-v2`` trained for 2 steps on a
synthetic HalfCheetah-shaped file: the weights do not matter for speed, the architecture does). The three runtimes
are timed in interleaved rounds (the machine is shared; its slow spells then hit all three), and the median over
all calls is reported.

    .venv/bin/python -m benchmarks.export [--quick] [--out FILE]     # alone
    make bench                                                       # as part of python -m benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.harness import NFES, ROOT, loadavg
from benchmarks.tables import export_lines

# rounds x runtimes x NFEs blocks per batch size, each >= min_calls calls and >= min_seconds: ~1.5 min on 2 quiet cores
FULL = {"configs": "halfcheetah-medium-v2", "candidates": 256, "batches": (1, 50), "rounds": 3, "min_calls": 2,
        "min_seconds": 0.5, "kind": "ct"}
QUICK = {**FULL, "configs": "demo", "candidates": 16, "batches": (1, 4), "rounds": 1, "min_calls": 1,
         "min_seconds": 0.0}
RUNTIMES = ("onnxruntime", "torchscript", "eager")


def two_step_config(src: Path, dst: Path, root: Path, dataset: str) -> Path:
    """A shipped config trained for 2 steps on ``dataset`` under ``root``: no evaluation, no progress bar."""
    from idql_cm.cli import compose_config

    cfg = compose_config(src)
    cfg["trainer"].update(max_steps=2, default_root_dir=str(root), log_every_n_steps=1, enable_progress_bar=False)
    callbacks = []
    for cb in cfg["trainer"].get("callbacks", []):
        if cb["class_path"].endswith(("ProgressBar", "RolloutEvaluation")):
            continue
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 1
        callbacks.append(cb)
    cfg["trainer"]["callbacks"] = callbacks
    cfg["data"].update(dataset=dataset, batch_size=32)
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def make_checkpoints(work: Path, cfg: dict[str, Any]) -> tuple[str, str]:
    """A CT (or ``cfg['kind']``) and an IQL checkpoint of the shipped configs, 2 training steps, via the CLI."""
    from idql_cm.cli import main
    from idql_cm.data.synthetic import write_d4rl_file

    data = write_d4rl_file(work / "bench_export.hdf5", n_episodes=2, episode_len=100, obs_dim=17, act_dim=6,
                           with_infos=False, env_id="HalfCheetah-v5")
    out = []
    for stage in ("iql", cfg["kind"]):
        cfg_path = two_step_config(ROOT / "configs" / cfg["configs"] / f"{stage}.yaml", work / f"{stage}.yaml",
                                   work / stage, str(data))
        if main(["fit", "--config", str(cfg_path), "--trainer.logger", "false"]) != 0:
            raise RuntimeError(f"bench_export: training {cfg_path} failed")
        out.append(str(work / stage / "checkpoints" / "last.ckpt"))
    return out[1], out[0]


def _time_calls(fn, x: np.ndarray, min_calls: int, min_seconds: float) -> list[float]:
    """Seconds per ``fn(x)``: at least ``min_calls`` calls and ``min_seconds`` in all (one block of a round)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def bench_export(cfg: dict[str, Any] | None = None, work: str | None = None, log=print) -> dict[str, Any]:
    """Measure; returns the ``export`` record of ``benchmarks/results.json``.

    ``ms_per_decision``: ``b1`` and ``b50`` (states per call) with each runtime's default threads (torch:
    ``torch.get_num_threads()``, onnxruntime: one per physical core), and ``b1_1thread`` with one thread each: on
    a busy 2-core host the multi-threaded figures swing with the other load (threads wait on each other), the
    one-thread figures much less."""
    import onnxruntime as ort

    from idql_cm import load_agent
    from idql_cm.export.exporter import export_agent

    cfg = dict(cfg or FULL)
    load_start = loadavg()
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="idql_bench_export_", dir=work) as tmp:
        tmp = Path(tmp)
        actor, critic = make_checkpoints(tmp, cfg)
        n = cfg["candidates"]
        agent = load_agent(actor, critic, num_candidates=n, temperature=100.0, device="cpu")
        files, export_s = {}, {}
        for nfe in NFES:
            t0 = time.perf_counter()
            files[nfe] = (tmp / f"nfe{nfe}.onnx", tmp / f"nfe{nfe}.pt")
            for path in files[nfe]:
                export_agent(actor, critic, str(path), nfe=nfe, candidates=n, temperature=100.0)
            export_s[f"nfe{nfe}"] = (time.perf_counter() - t0) / 2

        def runners(nfe: int, threads: int | None):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            if threads:
                opts.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(files[nfe][0]), opts, providers=["CPUExecutionProvider"])
            ts = torch.jit.load(str(files[nfe][1])).eval()
            return {"onnxruntime": lambda x: sess.run(["action"], {"obs": x})[0],
                    "torchscript": lambda x: _ts_call(ts, x),
                    "eager": lambda x: agent.act(x, nfe=nfe)}

        rng = np.random.default_rng(0)
        mean, std = agent.actor.obs_mean.numpy(), agent.actor.obs_std.numpy()
        settings = [(f"b{b}", b, None) for b in cfg["batches"]] + [(f"b{cfg['batches'][0]}_1thread",
                                                                    cfg["batches"][0], 1)]
        ms: dict[str, Any] = {}
        for label, b, threads in settings:
            torch.set_num_threads(threads or default_threads)
            obs = (mean + std * rng.standard_normal((b, agent.obs_dim))).astype(np.float32)
            rows: dict[str, Any] = {}
            for nfe in NFES:
                run, calls = runners(nfe, threads), {r: [] for r in RUNTIMES}
                for r in RUNTIMES:  # warm-up (ORT's first run plans its memory; TorchScript's profiles the graph)
                    _time_calls(run[r], obs, 3, 0.0)
                for _ in range(cfg["rounds"]):
                    for r in RUNTIMES:
                        calls[r] += _time_calls(run[r], obs, cfg["min_calls"], cfg["min_seconds"])
                o = {r: 1e3 * statistics.median(calls[r]) for r in RUNTIMES}
                o["onnxruntime_speedup_vs_eager"] = o["eager"] / o["onnxruntime"]
                rows[f"nfe{nfe}"] = o
                log(f"  {b:3d} state(s) x {n} candidates, NFE {nfe}, {threads or 'default'} thread(s): onnxruntime "
                    f"{o['onnxruntime']:7.2f} ms  TorchScript {o['torchscript']:7.2f} ms  eager {o['eager']:7.2f} ms"
                    f"  (onnxruntime {o['onnxruntime_speedup_vs_eager']:.2f}x faster than eager)")
            ms[label] = rows
        torch.set_num_threads(default_threads)
    return {
        "ms_per_decision": ms,
        "export_seconds": export_s,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                     "temperature": 100.0, "selection": "softmax",
                     "nets": f"configs/{cfg['configs']}/{{{cfg['kind']},iql}}.yaml (2 training steps)",
                     "eager": "load_agent(...).act(obs_numpy, nfe): NumPy in and out, inference mode",
                     "onnxruntime_call": "InferenceSession.run(['action'], {'obs': obs}): draws its own noise and u",
                     "torchscript_call": "torch.jit.load(file)(torch.from_numpy(obs)).numpy(), inference mode",
                     "onnxruntime": ort.__version__, "torch": torch.__version__,
                     "threads_default": {"torch": default_threads, "onnxruntime": "one per physical core"}},
    }


def _ts_call(module, obs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(obs)).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, not a measurement)")
    p.add_argument("--out", default=None, help="write the record as JSON here (make bench writes it into "
                                               "benchmarks/results.json under 'export')")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    res = bench_export(QUICK if args.quick else FULL)
    print("\n".join(export_lines(res)))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
