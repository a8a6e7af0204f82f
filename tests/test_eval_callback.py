"""RolloutEvaluation end to end with a real lightning.Trainer on HalfCheetah-v5 (CPU, tiny)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from idql_cm.errors import CheckpointError, ConfigError
from idql_cm.eval.callback import RolloutEvaluation, resolve_env_id


class LinearActor:
    """A deterministic toy policy a = tanh(W obs), recording whether its module was in eval mode."""

    kind = "ct"

    def __init__(self, module, env_id="HalfCheetah-v5", task=None):
        self.module, self.env_id, self.task = module, env_id, task
        self.obs_dim, self.act_dim, self.device = 17, 6, torch.device("cpu")
        self.obs_mean = None  # no normaliser to compare

    def sample(self, obs, nfe, generator=None):
        self.module.seen_training.append(self.module.training)
        return torch.tanh(self.module.policy(obs))


class TinyModule(L.LightningModule):
    def __init__(self, env_id="HalfCheetah-v5", task=None):
        super().__init__()
        self.policy = torch.nn.Linear(17, 6)
        self.env_id, self.task = env_id, task
        self.seen_training: list[bool] = []

    def eval_actor(self):
        return LinearActor(self, self.env_id, self.task)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.policy(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def loader():
    return DataLoader(TensorDataset(torch.randn(64, 17)), batch_size=8)


def trainer(tmp_path, cb, max_steps=4):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=TensorBoardLogger(str(tmp_path)),
                     callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))


class FakeCritic:
    def __init__(self, obs_dim=17, act_dim=6):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.obs_mean, self.task = None, None

    def advantage(self, obs, act):
        return -act.pow(2).sum(-1)


def test_fit_evaluates_every_n_steps_and_at_the_end_logs_and_reports(tmp_path):
    cb = RolloutEvaluation(nfe=[1, 2], episodes=2, num_envs=2, max_episode_steps=50, every_n_steps=2, progress=False)
    model = TinyModule()
    t = trainer(tmp_path, cb, max_steps=5)
    t.fit(model, train_dataloaders=loader())
    log_dir = Path(t.log_dir)
    rep = json.loads((log_dir / "eval_report.json").read_text())
    assert rep["task"] == "HalfCheetah-v5" and rep["env_id"] == "HalfCheetah-v5" and rep["backbone"] == "ct"
    assert rep["step"] == 5 and rep["critic"] is None and rep["idql"] is False and rep["mode"] == "fit"
    assert [r["nfe"] for r in rep["results"]] == [1, 2]
    for r in rep["results"]:
        assert r["episodes"] == 2 and len(r["returns"]) == 2 and r["lengths"] == [50, 50]
        assert isinstance(r["normalized_score_mean"], float) and r["normalized_score_se"] is not None
    assert "Behaviour policy alone" in (log_dir / "eval_report.md").read_text()
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for k in (1, 2):
        for name in ("normalized_score", "normalized_score_se", "return_mean", "action_latency_ms"):
            assert f"eval/nfe{k}/{name}" in tags
    # every 2 steps (2, 4) and once at the end (5); never twice for one step
    assert [e.step for e in acc.Scalars("eval/nfe1/normalized_score")] == [2, 4, 5]
    final = acc.Scalars("eval/nfe1/normalized_score")[-1].value
    assert final == pytest.approx(rep["results"][0]["normalized_score_mean"], rel=1e-6)
    # the policy ran in eval mode and training mode was restored afterwards
    assert model.seen_training and not any(model.seen_training) and model.training


def test_critic_is_loaded_once_and_used(tmp_path, monkeypatch):
    loads = []

    def fake_load(path, device):
        loads.append(path)
        return FakeCritic()

    monkeypatch.setattr(RolloutEvaluation, "_load_critic_from", staticmethod(fake_load))
    cb = RolloutEvaluation(critic_ckpt="runs/iql.ckpt", nfe=[1], episodes=2, num_envs=2, max_episode_steps=10,
                           every_n_steps=1, num_candidates=4, progress=False)
    t = trainer(tmp_path, cb, max_steps=3)
    t.fit(TinyModule(), train_dataloaders=loader())
    rep = cb.last_report
    assert loads == ["runs/iql.ckpt"]
    assert rep["idql"] is True and rep["critic"] == "runs/iql.ckpt" and rep["num_candidates"] == 4
    assert rep["selection"] == "softmax" and rep["step"] == 3


def test_critic_of_another_task_fails_at_fit_start(tmp_path, monkeypatch):
    monkeypatch.setattr(RolloutEvaluation, "_load_critic_from", staticmethod(lambda p, d: FakeCritic(11, 3)))
    cb = RolloutEvaluation(critic_ckpt="iql.ckpt", episodes=1, num_envs=1, max_episode_steps=5, progress=False)
    with pytest.raises(CheckpointError):
        trainer(tmp_path, cb).fit(TinyModule(), train_dataloaders=loader())


@pytest.mark.parametrize("version", [None, "v5"])
def test_validate_runs_once_with_the_d4rl_task_mapped_to_v4(tmp_path, version):
    """A D4RL task is evaluated in the v4 environment (the data's dynamics) by default, v5 on request; the report
    says which and why."""
    kwargs = {} if version is None else {"env_version": version}
    cb = RolloutEvaluation(nfe=[1], episodes=3, num_envs=2, max_episode_steps=20, progress=False, **kwargs)
    model = TinyModule(env_id=None, task="halfcheetah-medium-expert-v2")
    t = trainer(tmp_path, cb)
    t.validate(model, dataloaders=DataLoader(TensorDataset(torch.randn(8, 17)), batch_size=8))
    rep = json.loads((Path(t.log_dir) / "eval_report.json").read_text())
    want = f"HalfCheetah-{version or 'v4'}"
    assert rep["mode"] == "validate" and rep["env_id"] == want
    assert rep["task"] == "halfcheetah-medium-expert-v2" and rep["results"][0]["episodes"] == 3
    assert want in rep["env_choice"] and ("dynamics the D4RL" in rep["env_choice"]) == (version is None)
    assert rep["env_choice"] in (Path(t.log_dir) / "eval_report.md").read_text()


def test_unknown_environment_skips_with_one_message(tmp_path, caplog):
    cb = RolloutEvaluation(nfe=[1], episodes=1, num_envs=1, max_episode_steps=5, every_n_steps=1, progress=False)
    model = TinyModule(env_id=None, task="/data/my_robot_demos.hdf5")
    with caplog.at_level(logging.INFO):
        t = trainer(tmp_path, cb, max_steps=3)
        t.fit(model, train_dataloaders=loader())
    msgs = [r.getMessage() for r in caplog.records if "RolloutEvaluation" in r.getMessage()]
    assert len(msgs) == 1 and "skipping" in msgs[0] and "my_robot_demos" in msgs[0]
    assert not list(Path(tmp_path).rglob("eval_report*"))


def test_config_checks():
    with pytest.raises(ConfigError):
        RolloutEvaluation(selection="best")
    with pytest.raises(ConfigError):
        RolloutEvaluation(nfe=[0])
    with pytest.raises(ConfigError):
        RolloutEvaluation(vector_mode="threads")
    cb = RolloutEvaluation(env_id="NoSuchEnv-v0")
    with pytest.raises(ConfigError, match="NoSuchEnv"):
        cb.setup(None, None, "fit")
    with pytest.raises(ConfigError, match="env_version.*'v4' or 'v5'.*'v3'"):
        RolloutEvaluation(env_version="v3")
    assert resolve_env_id("hopper-medium-v2") == "Hopper-v4"
    assert resolve_env_id("Walker2d-v5") == "Walker2d-v5"  # a gymnasium id is used as it is
    assert resolve_env_id("halfcheetah-medium-v2", "v5") == "HalfCheetah-v5"
    assert resolve_env_id("/data/whatever.hdf5") is None
    assert resolve_env_id("/data/d4rl/walker2d_medium-v2.hdf5") == "Walker2d-v4"


def test_v4_walker_has_the_d4rl_feet():
    """Why v4: Walker2d-v5 changed the right foot's friction from D4RL's 0.9 to 1.9."""
    import gymnasium as gym
    import mujoco

    def foot_friction(env_id):
        model = gym.make(env_id).unwrapped.model
        return float(model.geom_friction[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "foot_geom")][0])

    assert foot_friction(resolve_env_id("walker2d-medium-v2")) == pytest.approx(0.9)
    assert foot_friction(resolve_env_id("walker2d-medium-v2", "v5")) == pytest.approx(1.9)


DDP_SCRIPT = r'''
import json, os, sys
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from idql_cm.eval.callback import RolloutEvaluation
from idql_cm.eval.rollout import evaluate

class Actor:
    kind, env_id, task, obs_dim, act_dim, device = "edm", "HalfCheetah-v5", None, 17, 6, torch.device("cpu")
    def __init__(self, net):
        self.net = net
    def sample(self, obs, nfe, generator=None):
        return torch.tanh(self.net(obs))

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.policy = torch.nn.Linear(17, 6)
    def eval_actor(self):
        return Actor(self.policy)
    def training_step(self, batch, i):
        return self.policy(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)

out = sys.argv[1]
L.seed_everything(0)
cb = RolloutEvaluation(nfe=[1], episodes=3, num_envs=2, max_episode_steps=20, progress=False)
model = M()
trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp", default_root_dir=out, callbacks=[cb],
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, logger=False)
trainer.fit(model, DataLoader(TensorDataset(torch.randn(32, 17)), batch_size=4))
if trainer.global_rank == 0:
    single = evaluate(model.eval_actor(), "HalfCheetah-v5", episodes=3, num_envs=2, seed=0, max_episode_steps=20)
    with open(os.path.join(out, "single.json"), "w") as f:
        json.dump(single.returns, f)
'''


def test_ddp_splits_episodes_across_ranks_and_gathers_them(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "eval_report.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert rep["world_size"] == 2 and rep["step"] == 2
    # rank 0 ran episodes 0-1, rank 1 episode 2 (its own seeds); gathered in order they equal one process's run
    assert rep["results"][0]["returns"] == single and rep["results"][0]["episodes"] == 3
