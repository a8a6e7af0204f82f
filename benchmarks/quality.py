"""``make quality``: generative-policy quality on data whose answer is known, through the user's commands.

Two parts, each trained with the shipped demo configs (``configs/demo/{edm,ct,cd}.yaml``, run by ``idql-cm fit``)
and sampled through ``load_actor`` / the RolloutEvaluation callback:

* **toys** (:mod:`idql_cm.data.toys`): conditional mixtures with known modes (2-D and 6-D actions, one-hot or
  continuous observations), each over its data seeds (another seed, another mode layout). For EDM (Euler and Heun),
  CT, CD, MeanFlow (and with ``--ect`` CT started from the EDM stage) at NFE 1/2/4 (Heun: 1/3, it cannot do an even
  NFE): precision (share of samples within 0.15 of a mode of their condition), each mode's share against its true
  share, and the sliced Wasserstein-1 distance to fresh samples of the truth (with the truth-against-truth floor).
* **medium-expert analogues** (``idql-cm collect --behaviour medium-expert`` / ``two-gait``): HalfCheetah-v5
  datasets built as D4RL builds medium-expert, a weak and a strong behaviour concatenated (the same gait with lapses;
  or another, weaker gait); IQL + every backbone at demo size, with ``--members S`` each stage trains S seeds at once
  (``num_seeds``) and the scores are the across-seed mean ± SE (IDQL's protocol), at NFE 1/2/4 beside the two
  behaviours' own scores.

Two presets: ``--preset quick`` (``make quality``: every toy at data seed 0, the medium-expert analogue with one
member) and ``--preset full`` (``make quality-full``: every toy at seeds 0-2, both analogues with 5 members and 20
episodes per member, CT from EDM beside CT from scratch); the explicit flags override a preset.

Every stage runs as its own ``idql-cm fit`` process with one intra-op thread, ``--jobs`` at a time (default 2, one
per core of the project's machine), so a run's figures depend only on its seeds and the machine: the same seed gives
the same table on the same machine and build. Writes ``benchmarks/quality.json`` and ``docs/quality.md``.

    python -m benchmarks.quality                         # the quick benchmark (make quality)
    python -m benchmarks.quality --preset full           # the verdict over seeds (make quality-full)
    python -m benchmarks.quality --part toys --toys far  # one part / one toy
    python -m benchmarks.quality --set ct.model.init_args.fourier_scale=0.02 --label "CT scale 0.02"  # an ablation
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from idql_cm.backbones import backbone, builtin_kinds
from idql_cm.cli import compose_config, parse_set_overrides
from idql_cm.data.toys import QUALITY_TOYS
from idql_cm.fileio import pid_alive

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
TOY_STAGES = builtin_kinds()  # the package's backbones, a teacher before its student
ME_STAGES = ("iql", *TOY_STAGES)
#: stages that are another configuration of a backbone: (config, the stage whose checkpoint it starts from).
#: ``ct_ect``: CT initialised from the EDM stage's EMA network (ECT), the same budget as CT from scratch
DERIVED = {"ct_ect": ("ct", "edm")}
ALL_STAGES = (*ME_STAGES, *DERIVED)
#: the medium-expert analogues: name -> (``idql-cm collect --behaviour``, folder under --out)
ANALOGUES = {"medium-expert": ("medium-expert", "medium_expert"), "two-gait": ("two-gait", "two_gait")}
PRESETS = {
    "quick": {"toys": list(QUALITY_TOYS), "seeds": [0], "analogues": ["medium-expert"], "members": 1, "ect": False},
    "full": {"toys": list(QUALITY_TOYS), "seeds": [0, 1, 2], "analogues": list(ANALOGUES), "members": 5, "ect": True},
}
EVAL_CLASS = "idql_cm.eval.callback.RolloutEvaluation"
#: the panels of the toy figure (backbone key, NFE); SAMPLES keeps their samples of the first seed
PLOTTED = (("edm_euler", 4), ("edm_heun", 3), ("ct", 1), ("cd", 1), ("meanflow", 1), ("ct", 4), ("cd", 4),
           ("meanflow", 4))
SAMPLES: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
OUT = REPO / "results" / "quality"  # --out (stage names are relative to it)
STALE_CODE_OK = False  # --stale-code-ok: reuse stages trained by other code (exploration only)
PROGRESS_CLASS = "idql_cm.modules.callbacks.StepProgressBar"


#: ``--ablate``: each row undoes one change of the shipped configs (the sampling-only changes, EDM's grid and the
#: consistency models' re-noising, are rows of every run: the ``*_ref`` samplers of the same checkpoints)
ABLATIONS: dict[str, dict[str, Any]] = {
    "CD: one EMA from the teacher, constant rate (reference)": {
        "cd.model.init_args.target_ema": None, "cd.model.init_args.ema_warmup": False},
    "CD: one EMA with the warm-up (idql-cm 0.1)": {"cd.model.init_args.target_ema": None},
    "CD: 2000 steps (idql-cm 0.1 demo)": {"cd.trainer.max_steps": 2000},
    "CT: Fourier scale 0.02 (reference)": {"ct.model.init_args.fourier_scale": 0.02},
    "CT: Fourier scale 16 (= ¼ ln σ at EDM's scale)": {"ct.model.init_args.fourier_scale": 16.0},
    "CT: Fourier scale 20 (= iCT's 1000·¼ ln σ at 0.02)": {"ct.model.init_args.fourier_scale": 20.0},
    "CT and CD: student clipped in the loss (reference)": {
        "ct.model.init_args.clip_student": True, "cd.model.init_args.clip_student": True},
    "all actors: AdamW, weight decay 0.01 (reference)": {
        "edm.model.init_args.optimizer": "adamw", "edm.model.init_args.weight_decay": 0.01,
        "ct.model.init_args.optimizer": "adamw", "ct.model.init_args.weight_decay": 0.01,
        "cd.model.init_args.optimizer": "adamw", "cd.model.init_args.weight_decay": 0.01},
}


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- configs
def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
    cur: Any = cfg
    for p in parts[:-1]:
        cur = cur[p] if isinstance(p, int) else cur.setdefault(p, {})
    cur[parts[-1]] = value


def stage_config(stage: str, dataset: Path, seed: int, overrides: dict[str, Any], evaluate: bool) -> dict:
    """``configs/demo/<stage>.yaml`` pointed at ``dataset``; no progress bar (parallel jobs share the
    terminal); without ``evaluate`` no rollout callback (a toy has no environment). ``overrides`` are
    ``{"<stage>.<dotted key>" or "<dotted key>": value}``; ``eval.<arg>`` sets a RolloutEvaluation argument."""
    config = DERIVED[stage][0] if stage in DERIVED else stage
    cfg = compose_config(DEMO / f"{config}.yaml")
    cfg["seed_everything"] = seed
    cfg["trainer"]["default_root_dir"] = ""  # fit_job sets the folder
    cfg["trainer"]["enable_progress_bar"] = False
    cbs = [cb for cb in cfg["trainer"].get("callbacks", []) if cb.get("class_path") != PROGRESS_CLASS]
    if not evaluate:
        cbs = [cb for cb in cbs if cb.get("class_path") != EVAL_CLASS]
    cfg["trainer"]["callbacks"] = cbs
    cfg["data"]["dataset"] = str(dataset)
    if not evaluate:
        cfg["data"]["reward_scale"] = "none"
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in ALL_STAGES:
            if head not in (stage, config):  # a CT setting also applies to CT from EDM
                continue
            key = rest
        if key.startswith("eval."):
            for cb in cbs:
                if cb.get("class_path") == EVAL_CLASS:
                    cb.setdefault("init_args", {})[key[5:]] = value
        elif key.startswith("model.init_args.") and stage == "iql" and not head == "iql":
            continue  # an actor setting given to every stage does not apply to the critic
        else:
            set_dotted(cfg, key, value)
    return cfg


# ----------------------------------------------------------------------------------------------- job runner
@dataclass
class Job:
    name: str
    cmd: list[str]
    log_path: Path
    deps: tuple[str, ...] = ()
    done: Path | None = None  # skip the job when this file exists (an earlier run of the same config finished)
    reuse: bool = True  # False: ``done`` was written by other code; train again (the file goes when training starts)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    t0: float = 0.0
    seconds: float = 0.0


def run_jobs(jobs: list[Job], max_jobs: int) -> dict[str, float]:
    """Run ``jobs`` (each after its ``deps``), ``max_jobs`` at a time, each with one intra-op thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    pending, running, finished = list(jobs), [], {}
    while pending or running:
        for job in list(running):
            rc = job.proc.poll()
            if rc is None:
                continue
            running.remove(job)
            job.seconds = time.time() - job.t0
            (job.log_path.parent / ".running").unlink(missing_ok=True)
            if rc != 0:
                for other in running:
                    other.proc.kill()
                tail = job.log_path.read_text().strip().splitlines()[-5:]
                sys.exit(f"quality: {job.name} failed (exit {rc}); last lines of {job.log_path}:\n  " + "\n  ".join(tail))
            finished[job.name] = job.seconds
            log(f"[quality] {job.name}: done in {job.seconds:.0f} s")
        for job in list(pending):
            if len(running) >= max_jobs:
                break
            if not all(d in finished for d in job.deps):
                continue
            pending.remove(job)
            if _running_elsewhere(job):  # another `make quality` into the same --out trains it: wait for that
                pending.append(job)
                continue
            if job.reuse and job.done is not None and job.done.exists():
                finished[job.name] = 0.0
                log(f"[quality] {job.name}: finished earlier, skipped")
                continue
            job.log_path.parent.mkdir(parents=True, exist_ok=True)
            (job.log_path.parent / ".running").write_text(str(os.getpid()))
            if job.done is not None:  # an aborted run must not leave an older result under this code's hash
                job.done.unlink(missing_ok=True)
            (job.log_path.parent / "code.sha256").write_text(code_digest())
            job.t0 = time.time()
            job.proc = subprocess.Popen(job.cmd, stdout=job.log_path.open("w"), stderr=subprocess.STDOUT, env=env,
                                        cwd=REPO)
            running.append(job)
            log(f"[quality] {job.name}: started")
        if pending and not running and not any(all(d in finished for d in j.deps) for j in pending):
            sys.exit(f"quality: unmet dependencies: {[j.name for j in pending]}")
        time.sleep(0.5)
    return finished


def code_digest() -> str:
    """A hash of the package's source: a cached stage is reused only when the code that trained it is this code."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "idql_cm").rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()


def jobs_name(root: Path) -> str:
    """A stage's name in the log: its folder under ``--out`` (``two_gait/seed0/members5/ct-1a2b3c4d``)."""
    try:
        return str(root.relative_to(OUT))
    except ValueError:
        return f"{root.parent.parent.name}/{root.parent.name}/{root.name}"


def _running_elsewhere(job: Job) -> bool:
    marker = job.log_path.parent / ".running"
    try:
        pid = int(marker.read_text())
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and pid_alive(pid)


def fit_job(cfg: dict, base: Path, stage: str, deps: tuple[str, ...] = ()) -> tuple[Job, Path]:
    """The ``idql-cm fit`` job of ``cfg`` in ``base/<stage>-<hash of the config>``: a configuration trained before
    (by any run into the same ``--out``) is reused, so ablations retrain only the stages they change."""
    import hashlib

    cfg = copy.deepcopy(cfg)
    cfg["trainer"]["default_root_dir"] = ""
    digest = hashlib.sha256(yaml.safe_dump(cfg, sort_keys=True).encode()).hexdigest()[:8]
    root = base / f"{stage}-{digest}"
    cfg["trainer"]["default_root_dir"] = str(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "stage.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    has_eval = any(cb.get("class_path") == EVAL_CLASS for cb in cfg["trainer"].get("callbacks", []))
    done = (root / "eval_report.json") if has_eval else (root / "checkpoints" / "last.ckpt")
    # the code's defaults count too: a stage trained by other code is retrained (unless --stale-code-ok); its files
    # stay until the new training overwrites them (planning alone, or an aborted run, deletes nothing)
    code = root / "code.sha256"
    stale = not STALE_CODE_OK and (not code.exists() or code.read_text() != code_digest())
    job = Job(jobs_name(root), [sys.executable, "-m", "idql_cm", "fit", "--config", str(cfg_path)], root / "fit.log", deps,
              done=done, reuse=not stale)
    return job, root


# ----------------------------------------------------------------------------------------------- toys
#: the sampled rows of each backbone: (key, sampler settings replacing the checkpoint's, NFEs). The ``*_ref`` rows
#: sample the same checkpoint as the reference does: EDM from σ_max 80 on the ρ-7 grid, consistency models
#: re-noising at the Karras levels (no retraining: these are sampling choices).
SAMPLERS = {
    "edm": (("edm_euler", {"solver": "euler"}, (1, 2, 4)), ("edm_heun", {"solver": "heun"}, (1, 3)),
            ("edm_euler_ref", {"solver": "euler", "sigma_max": None, "rho": None}, (1, 2, 4))),
    "ct": (("ct", {}, (1, 2, 4)), ("ct_ref", {"train_grid": None}, (2, 4))),
    "cd": (("cd", {}, (1, 2, 4)), ("cd_ref", {"train_grid": None}, (2, 4))),
}


def toy_samples(ckpt: Path, toy, nfe: int, sampler: dict[str, Any], n: int, seed: int) -> list[np.ndarray]:
    """``n`` actions per condition from the checkpoint's EMA policy at ``nfe``, with ``sampler`` settings replacing
    the checkpoint's (the backbone sampler's options, ``idql_cm.policies.Actor.options``)."""
    import dataclasses

    import torch

    from idql_cm import load_actor

    policy = load_actor(str(ckpt), device="cpu")
    policy.actor = dataclasses.replace(policy.actor, options={**policy.actor.options, **sampler})
    g = torch.Generator().manual_seed(seed)
    return [policy.sample(torch.from_numpy(toy.obs(c, n)), nfe=nfe, generator=g).numpy() for c in range(toy.num_conditions)]


def toy_metrics(toy, samples: list[np.ndarray], seed: int) -> dict[str, Any]:
    from idql_cm.data.toys import RADIUS
    from idql_cm.eval.fidelity import mode_stats, sliced_wasserstein

    rng = np.random.default_rng(10_000 + seed)
    per_cond, prec, ratio, sw = [], [], [], []
    for c, s in enumerate(samples):
        st = mode_stats(s, toy.centres(c), toy.weights(c), RADIUS)
        d = sliced_wasserstein(s, toy.sample(c, len(s), rng), seed=seed)
        per_cond.append({"precision": st.precision, "shares": st.shares, "true_shares": st.weights,
                         "min_share_ratio": st.min_share_ratio, "sliced_w1": d})
        prec.append(st.precision)
        ratio.append(st.min_share_ratio)
        sw.append(d)
    return {"precision": float(np.mean(prec)), "worst_precision": float(np.min(prec)),
            "min_share_ratio": float(np.min(ratio)), "sliced_w1": float(np.mean(sw)), "conditions": per_cond}


def truth_floor(toy, n: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(20_000 + seed)
    return toy_metrics(toy, [toy.sample(c, n, rng) for c in range(toy.num_conditions)], seed)


def stage_list(args, base: tuple[str, ...]) -> tuple[str, ...]:
    return (*base, *DERIVED) if args.ect else base


def stage_needs(stage: str) -> tuple[str, ...]:
    """The stages whose checkpoints this stage reads (teacher or init), not counting the critic."""
    return (DERIVED[stage][1],) if stage in DERIVED else backbone(stage).needs


def _point_at_sources(ov: dict[str, Any], roots: dict[str, Path], stage: str) -> None:
    ckpt = {s: str(roots[s] / "checkpoints" / "last.ckpt") for s in stage_needs(stage)}
    if stage in DERIVED:
        ov[f"{stage}.model.init_args.init_from"] = ckpt[DERIVED[stage][1]]
    else:
        for t in stage_needs(stage):
            ov[f"{stage}.model.init_args.teacher_ckpt"] = ckpt[t]


def plan_toys(args, variants: dict[str, dict[str, Any]], out: Path) -> tuple[list[Job], list[tuple]]:
    """The fit jobs of every (variant, toy, seed), deduplicated by configuration."""
    from idql_cm.data.toys import toy, write_toy_dataset

    jobs: dict[str, Job] = {}
    plan = []
    for label, overrides in variants.items():
        for name in args.toys:
            for seed in args.seeds:
                base = out / "toys" / name / f"seed{seed}"
                data = base / "data.hdf5"
                if not data.exists():
                    write_toy_dataset(data, toy(name, seed), transitions=args.toy_transitions, seed=seed)
                roots: dict[str, Path] = {}
                for stage in stage_list(args, TOY_STAGES):
                    ov = dict(overrides)
                    _point_at_sources(ov, roots, stage)
                    cfg = stage_config(stage, data, seed, ov, evaluate=False)
                    deps = tuple(jobs_name(roots[t]) for t in stage_needs(stage))
                    job, roots[stage] = fit_job(cfg, base, stage, deps)
                    jobs.setdefault(job.name, job)
                plan.append((label, name, seed, roots))
    return list(jobs.values()), plan


def toy_results(args, plan: list[tuple], times: dict[str, float]) -> dict[str, dict[str, Any]]:
    """``{variant: {toy: {seed: row}}}``: every backbone at every NFE, sampled through ``load_actor``."""
    from idql_cm.data.toys import toy as toy_of

    results: dict[str, dict[str, Any]] = {}
    for label, name, seed, roots in plan:
        toy = toy_of(name, seed)
        row: dict[str, Any] = {"truth": truth_floor(toy, args.samples, seed)}
        for stage in roots:
            ckpt = roots[stage] / "checkpoints" / "last.ckpt"
            for key, sampler, nfes in SAMPLERS.get(stage, ((stage, {}, (1, 2, 4)),)):
                row[key] = {}
                for k in nfes:
                    samples = toy_samples(ckpt, toy, k, sampler, args.samples, seed)
                    row[key][str(k)] = toy_metrics(toy, samples, seed)
                    if seed == args.seeds[0] and (key, k) in PLOTTED:
                        SAMPLES.setdefault(label, {}).setdefault(name, {})[f"{key}@{k}"] = samples
        row["seconds"] = {s: times.get(jobs_name(roots[s]), 0.0) for s in roots}
        row["stages"] = {s: str(roots[s]) for s in roots}
        results.setdefault(label, {}).setdefault(name, {})[str(seed)] = row
    return results


# ----------------------------------------------------------------------------------------------- medium-expert
def me_data(args, out: Path, seed: int, analogue: str = "medium-expert") -> Path:
    behaviour, folder = ANALOGUES[analogue]
    data = out / folder / f"seed{seed}" / "data.hdf5"
    if not data.exists():
        log(f"[quality] {analogue} seed {seed}: collecting {args.me_transitions} HalfCheetah-v5 transitions")
        proc = subprocess.run([sys.executable, "-m", "idql_cm", "collect", "--env", "HalfCheetah-v5", "--out",
                               str(data), "--transitions", str(args.me_transitions), "--seed", str(seed),
                               "--behaviour", behaviour, "--quiet"], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"quality: collect failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return data


def plan_me(args, variants: dict[str, dict[str, Any]], out: Path) -> tuple[list[Job], list[tuple]]:
    """The fit jobs of every (variant, analogue): IQL, then every backbone pointed at it (and at its teacher /
    init stage); ``--members S`` trains S seeds per stage in ``members<S>/``."""
    jobs: dict[str, Job] = {}
    plan = []
    for label, overrides in variants.items():
        for analogue in args.analogues:
            seed = args.me_seed
            data = me_data(args, out, seed, analogue)
            base = data.parent if args.members == 1 else data.parent / f"members{args.members}"
            roots: dict[str, Path] = {}
            # the demo's 10 episodes give a standard error of ~3 points on these bimodal (run or stall) episodes
            ov = {"eval.episodes": args.me_episodes, "eval.num_envs": args.me_episodes, **overrides}
            if args.members > 1:
                ov = {"model.init_args.num_seeds": args.members, "iql.model.init_args.num_seeds": args.members, **ov}
            for stage in stage_list(args, ME_STAGES):
                stage_ov = dict(ov)
                if stage != "iql":
                    _point_at_sources(stage_ov, roots, stage)
                cfg = stage_config(stage, data, seed, stage_ov, evaluate=True)
                if stage != "iql":
                    _point_at_critic(cfg, roots)
                deps = () if stage == "iql" else tuple(jobs_name(roots[d]) for d in (*stage_needs(stage), "iql"))
                job, roots[stage] = fit_job(cfg, base, stage, deps)
                jobs.setdefault(job.name, job)
            plan.append((label, analogue, seed, data, roots))
    return list(jobs.values()), plan


def me_results(plan: list[tuple], times: dict[str, float], members: int) -> dict[str, dict[str, Any]]:
    """``{variant: {analogue: row}}``; with several members a score is the across-seed mean ± SE and ``members``
    holds each member's own."""
    results: dict[str, dict[str, Any]] = {}
    for label, analogue, seed, data, roots in plan:
        row: dict[str, Any] = {"behaviour": behaviour_levels(data), "seed": seed, "members": members,
                               "seconds": {s: times.get(jobs_name(roots[s]), 0.0) for s in roots},
                               "stages": {s: str(roots[s]) for s in roots}}
        for stage in roots:
            if stage == "iql":
                continue
            rep = json.loads((roots[stage] / "eval_report.json").read_text())
            row[stage] = {str(r["nfe"]): {"score": r["normalized_score_mean"], "se": r["normalized_score_se"],
                                          "episodes": r["episodes"]} for r in rep["results"]}
            if rep.get("members"):
                row[stage + "_members"] = rep["members"]
        results.setdefault(label, {})[analogue] = row
    return results


def _point_at_critic(cfg: dict, roots: dict[str, Path]) -> None:
    """The evaluation critic of an analogue's stage: the IQL stage of this run."""
    for cb in cfg["trainer"].get("callbacks", []):
        if cb.get("class_path") == EVAL_CLASS:
            cb["init_args"]["critic_ckpt"] = str(roots["iql"] / "checkpoints" / "last.ckpt")


def behaviour_levels(data: Path) -> dict[str, Any]:
    """The two behaviours' own normalised scores (mean ± SE over their episodes), from the file's metadata."""
    import h5py

    from idql_cm.data.scores import normalized_score

    with h5py.File(data, "r") as f:
        returns = np.asarray(f["metadata/episode_returns"])
        level = np.asarray(f["metadata/episode_level"]).astype(str)
    out = {}
    for name in ("expert", "medium"):
        s = normalized_score("halfcheetah", returns[level == name])
        out[name] = {"score": float(s.mean()), "se": float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else 0.0,
                     "episodes": int(len(s))}
    s = normalized_score("halfcheetah", returns)
    out["dataset"] = {"score": float(s.mean()), "se": float(s.std(ddof=1) / np.sqrt(len(s))), "episodes": int(len(s))}
    return out


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="quick",
                    help="quick (make quality, ~35 min on 2 cores) or full (make quality-full, the verdict over seeds)")
    ap.add_argument("--part", choices=["all", "toys", "me"], default="all")
    ap.add_argument("--toys", default=None, type=_names(QUALITY_TOYS), help=f"default: {','.join(QUALITY_TOYS)}")
    ap.add_argument("--seeds", default=None, type=lambda s: [int(t) for t in s.split(",") if t],
                    help="data seeds of the toys (each its own mode layout; also the training seed)")
    ap.add_argument("--analogues", default=None, type=_names(tuple(ANALOGUES)), help=f"of {','.join(ANALOGUES)}")
    ap.add_argument("--members", type=int, default=None, help="num_seeds of every analogue stage")
    ap.add_argument("--me-seed", type=int, default=0, help="the analogues' data and training seed")
    ap.add_argument("--ect", action=argparse.BooleanOptionalAction, default=None,
                    help="also train CT started from the EDM stage (ECT) beside CT from scratch")
    ap.add_argument("--jobs", type=int, default=2, help="stages trained at once (one thread each)")
    ap.add_argument("--samples", type=int, default=2000, help="samples per condition and NFE")
    ap.add_argument("--toy-transitions", type=int, default=50_000)
    ap.add_argument("--me-transitions", type=int, default=100_000)
    ap.add_argument("--me-episodes", type=int, default=20, help="evaluation episodes per NFE (medium-expert)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every stage, or <stage>.KEY=VALUE for one")
    ap.add_argument("--out", default="results/quality", help="working folder (datasets, checkpoints, logs)")
    ap.add_argument("--json", default=None, help="write the figures here (default: benchmarks/quality.json for a "
                                                 "run without --set)")
    ap.add_argument("--ablate", action="store_true", help="also run every row of ABLATIONS (toys: ~35 min per seed "
                                                          "on 2 cores; writes benchmarks/quality_ablations.json)")
    ap.add_argument("--stale-code-ok", action="store_true",
                    help="reuse cached stages trained by another version of the code (exploration only)")
    ap.add_argument("--md", default=None, help="write the Markdown page (and its figure) here (default: "
                                               "docs/quality.md for a run without --set / --variant)")
    ap.add_argument("--label", default="shipped configs", help="the name of the run without --variant overrides")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE;KEY=VALUE",
                    help="also run these overrides (on top of --set), as an ablation row")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.members < 1:
        ap.error(f"--members: expected at least 1, found {args.members}")
    global STALE_CODE_OK
    STALE_CODE_OK = args.stale_code_ok
    overrides = parse_set_overrides(args.set, "quality")
    variants = {args.label: overrides}
    if args.ablate:
        variants.update({label: {**overrides, **ov} for label, ov in ABLATIONS.items()})
    for item in args.variant:
        label, _, rest = item.partition(":")
        variants[label] = {**overrides, **parse_set_overrides([kv for kv in rest.split(";") if kv.strip()], "quality")}
    out = (REPO / args.out).resolve()
    global OUT
    OUT = out
    t0 = time.time()
    jobs, toy_plan, me_plan = [], [], []
    if args.part in ("all", "me"):  # the analogues first: their stages are the longest
        j, me_plan = plan_me(args, variants, out)
        jobs += j
    if args.part in ("all", "toys"):
        j, toy_plan = plan_toys(args, variants, out)
        jobs += j
    times = run_jobs(jobs, args.jobs)
    toys, me = toy_results(args, toy_plan, times), me_results(me_plan, times, args.members)
    results = {label: {"label": label, "overrides": ov, "seeds": args.seeds, "toys": toys.get(label, {}),
                       "members": args.members, "analogues": me.get(label, {})} for label, ov in variants.items()}
    doc = {"machine": machine(), "preset": args.preset, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
           "seconds": time.time() - t0, "threads_per_stage": 1, "jobs": args.jobs, "variants": results}
    plain = not overrides and not args.variant
    full = args.preset == "full"
    name = "quality_ablations.json" if args.ablate else f"quality{'_full' if full else ''}.json"
    dest = args.json or (str(REPO / "benchmarks" / name) if plain else None)
    if full and plain and not args.ablate:
        doc = merge_parts(doc, Path(dest), args.part)
        results = doc["variants"]
    if dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(json.dumps(doc, indent=1))
        log(f"[quality] wrote {dest}")
    from benchmarks.quality_report import plot_toys, summary, write_full_section, write_markdown

    md = args.md or (str(REPO / "docs" / "quality.md") if plain and not args.ablate else None)
    if plain and args.ablate:
        from benchmarks.quality_report import write_ablations

        write_ablations(doc, REPO / "docs" / "quality.md")
        log("[quality] wrote the ablation table into docs/quality.md")
    if md and full:
        write_full_section(doc, Path(md))
        log(f"[quality] wrote the full run's section of {md}")
    elif md:
        figure = Path(md).with_name("quality_toys.png")
        if SAMPLES.get(args.label):
            plot_toys(SAMPLES[args.label], figure, args.samples, args.seeds[0])
        write_markdown(doc, Path(md), figure.name if figure.exists() else None)
        log(f"[quality] wrote {md}")
    for result in results.values():
        print(summary(result), flush=True)
    log(f"[quality] total {doc['seconds'] / 60:.1f} min")
    return 0


def merge_parts(doc: dict[str, Any], path: Path, part: str) -> dict[str, Any]:
    """A full run of one part (``--part toys`` / ``me``) replaces that part of the last full run's figures and keeps
    the other; ``parts`` says when each was measured and how long it took."""
    when = f"{doc['started']}, {doc['seconds'] / 60:.0f} min"
    stamps = {"toys": when, "analogues": when} if part == "all" else {"toys" if part == "toys" else "analogues": when}
    if part == "all" or not path.exists():
        return {**doc, "parts": stamps}
    old = json.loads(path.read_text())
    key = "toys" if part == "toys" else "analogues"
    keep = "analogues" if key == "toys" else "toys"
    for label, result in doc["variants"].items():
        before = old.get("variants", {}).get(label, {})
        result[keep] = before.get(keep, {})
        if keep == "toys":
            result["seeds"] = before.get("seeds", result["seeds"])
        else:
            result["members"] = before.get("members", result["members"])
    return {**doc, "parts": {**old.get("parts", {}), **stamps}}


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [t for t in text.split(",") if t]
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(f"{n!r}: expected one of {', '.join(allowed)}")
        return names
    return parse


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
