#!/usr/bin/env python
"""The whole IDQL protocol, stage by stage: (collect) → IQL → EDM → CD → CT → evaluation → report.

    python scripts/run_pipeline.py --preset demo --out results/demo          # `make demo`
    python scripts/run_pipeline.py --task halfcheetah-medium-v2 --seed 0      # `make pipeline`
    python scripts/run_pipeline.py --task halfcheetah-medium-v2 --seeds 5     # `make pipeline SEEDS=5`

`--seeds S` trains every stage as an S-member ensemble in one process (model.init_args.num_seeds: S; member k is
the solo run of seed `--seed` + k, CD member k distils EDM member k, actor k is evaluated with critic k) and the
report shows the mean ± SE across the S seeds.

Each stage is one `idql-cm fit` run of configs/<task>/<stage>.yaml. The exact config a stage ran with is
written to <out>/<stage>.yaml. A finished stage (its last checkpoint at max_steps and, for actors, its
evaluation report) is skipped; an interrupted one resumes from checkpoints/last.ckpt.
`--set key=value` overrides any config key for every stage (`trainer.max_steps=10`, `data.dataset=f.hdf5`,
`eval.episodes=2` for the RolloutEvaluation callback, `iql.model.init_args.lr=1e-3` for one stage).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from idql_cm.cli import compose_config, parse_set_overrides

REPO = Path(__file__).resolve().parents[1]
CRITIC = "iql"
DEMO_DATA = "data/demo_halfcheetah.hdf5"
EVAL_CLASS = "idql_cm.eval.callback.RolloutEvaluation"


def default_stages() -> tuple[str, ...]:
    """The critic, then the package's backbones in registry order (a backbone's teacher stage comes first)."""
    from idql_cm.backbones import builtin_kinds

    return (CRITIC, *builtin_kinds())


def log(msg: str) -> None:
    print(msg, flush=True)


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
    cur: Any = cfg
    for p in parts[:-1]:  # integers index lists: trainer.callbacks.0.init_args.every_n_train_steps
        cur = cur[p] if isinstance(p, int) else cur.setdefault(p, {})
    cur[parts[-1]] = value


def stage_config(base: Path, stage: str, root: Path, seed: int, overrides: dict[str, Any], seeds: int = 1) -> dict:
    cfg = compose_config(base)  # a task's file and its base (configs/base/<stage>.yaml) as one config
    cfg["seed_everything"] = seed
    if seeds > 1:
        cfg["model"].setdefault("init_args", {})["num_seeds"] = seeds
    cfg["trainer"]["default_root_dir"] = str(root)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in (CRITIC, stage) or head in default_stages():  # stage-specific: iql.trainer.max_steps=...
            if head != stage:
                continue
            key, head, rest = rest, rest.partition(".")[0], rest.partition(".")[2]
        if head == "eval":
            for cb in cfg["trainer"].get("callbacks", []):
                if cb.get("class_path") == EVAL_CLASS:
                    cb.setdefault("init_args", {})[rest] = value
        else:
            set_dotted(cfg, key, value)
    return cfg


def ckpt_step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False).get("global_step", -1))
    except Exception:  # noqa: BLE001 - an unreadable last.ckpt means: not finished
        return -1


def run(cmd: list[str]) -> None:
    env = dict(os.environ)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        log(f"[pipeline] stopped: `{' '.join(cmd)}` exited with code {proc.returncode}")
        sys.exit(proc.returncode)


def idql_cm() -> list[str]:
    return [sys.executable, "-m", "idql_cm"]


def run_stage(i: int, n: int, stage: str, base: Path, out: Path, seed: int, overrides: dict[str, Any],
              seeds: int = 1) -> dict:
    root = out / stage
    cfg = stage_config(base, stage, root, seed, overrides, seeds)
    cfg_path = out / f"{stage}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    max_steps = int(cfg["trainer"]["max_steps"])
    last = root / "checkpoints" / "last.ckpt"
    report = root / "eval_report.json"
    done_step = ckpt_step(last) if last.exists() else -1
    t0 = time.time()
    if done_step >= max_steps and (stage == CRITIC or report.exists()):
        log(f"[stage {i}/{n}] {stage.upper()}: finished earlier ({max_steps} steps), skipped")
        return {"stage": stage, "skipped": True, "seconds": 0.0}
    if done_step >= max_steps:
        log(f"[stage {i}/{n}] {stage.upper()}: trained; evaluating {last}")
        run(idql_cm() + ["validate", "--config", str(cfg_path), "--ckpt_path", str(last)])
    else:
        resume = ["--ckpt_path", "last"] if last.exists() else []
        what = f"resuming from step {done_step}" if resume else f"training {max_steps} steps"
        log(f"[stage {i}/{n}] {stage.upper()}: {what} -> {root}")
        run(idql_cm() + ["fit", "--config", str(cfg_path)] + resume)
    secs = time.time() - t0
    log(f"[stage {i}/{n}] {stage.upper()}: done in {secs:.0f} s")
    return {"stage": stage, "skipped": False, "seconds": secs}


def ensure_demo_data(path: Path, seed: int) -> None:
    if path.exists():
        log(f"[stage 0] demo dataset: {path} (exists)")
        return
    log(f"[stage 0] demo dataset: collecting 100k HalfCheetah-v5 transitions (mixed behaviour) -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    run(idql_cm() + ["collect", "--env", "HalfCheetah-v5", "--out", str(path), "--transitions", "100000",
                     "--seed", str(seed), "--behaviour", "mixed"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["demo"], help="demo: the built-in HalfCheetah dataset, CPU-sized steps")
    ap.add_argument("--task", help="a D4RL task id with configs/<task>/, e.g. halfcheetah-medium-v2")
    ap.add_argument("--config-dir", help="use the configs in this folder instead of configs/<task>/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, metavar="S",
                    help="train every stage as an S-member ensemble (num_seeds: S; seeds --seed .. --seed + S - 1)")
    ap.add_argument("--out", help="output folder (default results/<task>/seed<k>, results/<task>/seeds<k>x<S> for "
                                  "--seeds S > 1, or results/demo)")
    ap.add_argument("--stages", default=",".join(default_stages()),
                    help=f"comma-separated subset of {','.join(default_stages())}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)

    os.chdir(REPO)
    if args.seeds < 1:
        ap.error(f"--seeds: expected a positive integer, found {args.seeds}")
    overrides = parse_set_overrides(args.set, "run_pipeline")
    if args.preset == "demo":
        cfg_dir = Path(args.config_dir or "configs/demo")
        out = Path(args.out or "results/demo")
        data = Path(str(overrides.get("data.dataset", DEMO_DATA)))
        if "data.dataset" not in overrides:
            ensure_demo_data(data, args.seed)
    elif args.task:
        cfg_dir = Path(args.config_dir or f"configs/{args.task}")
        default = f"seed{args.seed}" if args.seeds == 1 else f"seeds{args.seed}x{args.seeds}"
        out = Path(args.out or f"results/{args.task}/{default}")
        if "data.dataset" not in overrides:
            check_dataset(args.task)
    else:
        ap.error("give --preset demo or --task TASK")
    if not cfg_dir.is_dir():
        sys.exit(f"run_pipeline: error: no config folder {cfg_dir} (expected configs/<task>/<stage>.yaml per stage)")
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    t0 = time.time()
    timings = [run_stage(i + 1, len(stages), s, cfg_dir / f"{s}.yaml", out, args.seed, overrides, args.seeds)
               for i, s in enumerate(stages)]
    log(f"[report] assembling {out}/report.md")
    from idql_cm.eval.pipeline_report import assemble

    summary = assemble(out, dataset=str(data) if args.preset == "demo" else overrides.get("data.dataset", args.task),
                       timings=timings, total_seconds=time.time() - t0)
    print(summary, flush=True)
    return 0


def check_dataset(task: str) -> None:
    """Stop at once, before any training, with the data layer's one-line message when the dataset is missing,
    is not HDF5, lacks the D4RL keys or has keys of unequal lengths (the reader's own checks, on the whole file)."""
    from idql_cm.data.d4rl import load_d4rl
    from idql_cm.errors import IDQLError

    try:
        load_d4rl(task)
    except IDQLError as e:
        sys.exit(f"idql-cm: error: {e}")


if __name__ == "__main__":
    sys.exit(main())
