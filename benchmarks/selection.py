"""Where IDQL's selection goes on an analogue of ``make quality-full``: per backbone and NFE, on states of the data.

For each member k of each stage (the analogue's checkpoints, critic k with actor k), ``--candidates`` samples per
state on ``--states`` states of the dataset, re-ranked as the evaluation does (softmax at the configs' temperature).
Reported, member-averaged, for all candidates and for the chosen one: the critic's Q (min of the twin targets) and
advantage, the distance to the data's own action at the state, and the share of action coordinates at the bound
(|a| > 0.99); beside them the data's own action's Q, the distance of the nearest candidate to the data's action
(coverage), the candidates' spread (their std across the N candidates of a state, mean over states and dimensions)
and how far the NFE-k action lands from the NFE-4 one from the same initial draw. A backbone whose chosen actions
gain Q while leaving the data is being picked for the critic's extrapolation, not for its behaviour.

    python -m benchmarks.selection --analogue two-gait                 # reads benchmarks/quality_full.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def _gap_to_nfe4(policy, obs, nfe: int, member: int) -> float:
    """Mean distance between the NFE-``nfe`` action and the NFE-4 action from the same initial draw (one per state;
    its own generator, so the candidates above keep their draws). For a deterministic map (EDM's Euler ODE,
    MeanFlow's composition) it is how far fewer steps land from more; a consistency model re-noises between steps,
    so there it also counts the later draws."""
    import torch

    noise = torch.randn(4, *obs.shape[:-1], policy.actor.act_dim, generator=torch.Generator().manual_seed(7 + member))
    with torch.no_grad():
        a = policy.sample(obs, nfe=nfe, noise=noise[:nfe])
        b = policy.sample(obs, nfe=4, noise=noise)
    return float((a - b).norm(dim=-1).mean())


def measure(stage: Path, critic: Path, data: Path, members: int, nfes: tuple[int, ...], states: int,
            candidates: int, temperature: float) -> dict[str, dict[str, float]]:
    import h5py
    import torch

    from idql_cm import load_actor
    from idql_cm.eval.agent import select_candidates
    from idql_cm.policies import critic_from_checkpoint

    with h5py.File(data, "r") as f:
        idx = np.sort(np.random.default_rng(0).choice(len(f["observations"]), states, replace=False))
        obs = torch.from_numpy(np.asarray(f["observations"][idx], np.float32))
        act = torch.from_numpy(np.asarray(f["actions"][idx], np.float32))
    out: dict[str, dict[str, float]] = {}
    for nfe in nfes:
        rows = []
        for m in range(members):
            member = m if members > 1 else None
            policy = load_actor(str(stage / "checkpoints" / "last.ckpt"), device="cpu", member=member)
            c = critic_from_checkpoint(str(critic), device="cpu", what="critic", member=member)
            g = torch.Generator().manual_seed(1000 * nfe + m)
            with torch.no_grad():
                rep = obs.repeat_interleave(candidates, 0)
                cand = policy.sample(rep, nfe=nfe, generator=g)                      # [B·N, A]
                o = (rep - c.obs_mean) / c.obs_std
                q = c.q_target(o, cand).reshape(states, candidates)
                adv = c.advantage(rep, cand).reshape(states, candidates)
                pick = select_candidates(adv, temperature, "softmax", g)
                chosen = cand.reshape(states, candidates, -1)[torch.arange(states), pick]
                dist = (cand.reshape(states, candidates, -1) - act[:, None]).norm(dim=-1)
                q_data = c.q_target((obs - c.obs_mean) / c.obs_std, act)
                rows.append([float(q.mean()), float(q[torch.arange(states), pick].mean()), float(q_data.mean()),
                             float(adv[torch.arange(states), pick].mean()), float(dist.mean()),
                             float(dist[torch.arange(states), pick].mean()),
                             float((cand.abs() > 0.99).float().mean()), float((chosen.abs() > 0.99).float().mean()),
                             float(dist.min(dim=1).values.mean()),
                             float(cand.reshape(states, candidates, -1).std(dim=1).mean()),
                             _gap_to_nfe4(policy, obs, nfe, m)])
        keys = ("q_all", "q_chosen", "q_data", "adv_chosen", "dist_all", "dist_chosen", "bound_all", "bound_chosen",
                "dist_nearest", "spread", "gap_to_nfe4")
        out[str(nfe)] = dict(zip(keys, (float(v) for v in np.mean(rows, axis=0)), strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--analogue", default="two-gait")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "quality_full.json"))
    ap.add_argument("--states", type=int, default=500)
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=100.0)
    ap.add_argument("--nfe", default="1,2,4", type=lambda s: tuple(int(t) for t in s.split(",")))
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.json).read_text())
    row = next(iter(doc["variants"].values()))["analogues"][args.analogue]
    stages = {k: Path(v) for k, v in row["stages"].items()}
    data = Path(yaml.safe_load((stages["iql"] / "stage.yaml").read_text())["data"]["dataset"])
    critic = stages["iql"] / "checkpoints" / "last.ckpt"
    result: dict[str, Any] = {}
    print(f"{args.analogue}: {row['members']} members, {args.states} states x {args.candidates} candidates, T "
          f"{args.temperature:g}")
    print("| backbone | NFE | score | Q all / chosen / data | adv chosen | distance all / chosen / nearest | spread "
          "| gap to NFE 4 | bound all / chosen |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: | --- |")
    for name, stage in stages.items():
        if name == "iql":
            continue
        result[name] = measure(stage, critic, data, row["members"], args.nfe, args.states, args.candidates,
                               args.temperature)
        for nfe, r in result[name].items():
            s = row.get(name, {}).get(nfe, {})
            print(f"| {name} | {nfe} | {s.get('score', float('nan')):.1f} | {r['q_all']:.2f} / {r['q_chosen']:.2f} / "
                  f"{r['q_data']:.2f} | {r['adv_chosen']:.3f} | {r['dist_all']:.3f} / {r['dist_chosen']:.3f} / "
                  f"{r['dist_nearest']:.3f} | {r['spread']:.3f} | {r['gap_to_nfe4']:.3f} | "
                  f"{r['bound_all']:.3f} / {r['bound_chosen']:.3f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
