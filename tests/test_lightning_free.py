"""Inference needs no Lightning: ``load_actor`` / ``load_agent`` and sampling run in a process that never imports it.

The checkpoints are made here by the real ``idql-cm fit`` (2 steps of each demo config); a fresh interpreter then
loads and samples them and reports which modules it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, REPO, shrink_config

OBS_DIM, ACT_DIM = 17, 6

INFER = """
import json, sys
import numpy as np
import torch
from idql_cm import load_actor, load_agent

ckpts = json.loads(sys.argv[1])
obs = np.random.default_rng(0).normal(size=(3, 17)).astype(np.float32)
out = {}
for kind in ("edm", "cd", "ct"):
    actor = load_actor(ckpts[kind], device="cpu")
    act = actor.sample(obs, nfe=2, generator=torch.Generator().manual_seed(0))
    out[kind] = [actor.kind, list(act.shape), bool(np.isfinite(act).all()), bool((np.abs(act) <= 1).all())]
agent = load_agent(ckpts["ct"], ckpts["iql"], num_candidates=4, device="cpu")
act = agent.act(obs, nfe=1, generator=torch.Generator().manual_seed(0))
out["agent"] = [agent.is_idql, list(act.shape), bool(np.isfinite(act).all())]
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")
                        or m.startswith(("idql_cm.modules", "lightning_fabric")))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("lightning_free")
    data = str(write_d4rl_file(tmp / "d.hdf5", n_episodes=2, episode_len=40, obs_dim=OBS_DIM, act_dim=ACT_DIM,
                               env_id="HalfCheetah-v5"))
    out = {}
    for stage in ("iql", "edm", "cd", "ct"):  # cd finds its teacher at {root}/../edm
        root = tmp / "run" / stage
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp / f"{stage}.yaml", root, data, steps=2,
                            keep_eval=False)
        assert main(["fit", "--config", str(cfg)]) == 0, stage
        out[stage] = str(root / "checkpoints" / "last.ckpt")
    return out


def test_load_and_sample_without_lightning(ckpts):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", INFER, json.dumps(ckpts)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("edm", "cd", "ct"):
        assert got[kind] == [kind, [3, ACT_DIM], True, True], (kind, got[kind])
    assert got["agent"] == [True, [3, ACT_DIM], True]
    # neither Lightning nor the training modules (which need it) were imported
    assert got["modules"] == [], got["modules"]
