"""Rollouts: exact return bookkeeping against a hand-written single-env loop, seeds, unstable episodes, video."""

from __future__ import annotations

import math
import os

import gymnasium
import numpy as np
import pytest
import torch

from idql_cm.errors import ConfigError
from idql_cm.eval.agent import IDQLAgent
from idql_cm.eval.rendering import configure_rendering
from idql_cm.eval.report import nfe_result
from idql_cm.eval.rollout import evaluate


def hopper_faller(obs: np.ndarray) -> np.ndarray:
    """A deterministic, elementwise (so batch-independent) policy that makes Hopper fall within ~50 steps."""
    return (np.tanh(obs[:, :3]) * 0.5 + 0.4).astype(np.float32)


def cheetah_policy(obs: np.ndarray) -> np.ndarray:
    return np.sin(obs[:, :6]).astype(np.float32)


def manual_returns(env_id, policy, seeds, max_episode_steps):
    """The reference: one env, plain gymnasium loop, every reward up to and including the last step."""
    out = []
    for s in seeds:
        env = gymnasium.make(env_id, max_episode_steps=max_episode_steps)
        obs, _ = env.reset(seed=s)
        total, n = 0.0, 0
        while True:
            obs, r, term, trunc, _ = env.step(policy(obs[None])[0])
            total += r
            n += 1
            if term or trunc:
                break
        env.close()
        out.append((total, n, term))
    return out


def test_early_termination_bookkeeping_equals_a_single_env_loop():
    # 5 episodes on 2 envs: slots are refilled, the last one alone; every episode falls early
    res = evaluate(hopper_faller, "Hopper-v5", episodes=5, num_envs=2, nfe=1, seed=10, max_episode_steps=1000)
    ref = manual_returns("Hopper-v5", hopper_faller, [10 + i for i in range(5)], 1000)
    assert all(term for _, _, term in ref) and max(n for _, n, _ in ref) < 1000   # really early terminations
    assert res.returns == [r for r, _, _ in ref]                               # exactly equal
    assert res.lengths == [n for _, n, _ in ref]
    assert res.episodes == 5 and res.num_envs == 2 and res.unstable_episodes == 0
    assert res.env_steps == sum(res.lengths)                               # no extra episode counted


def test_truncation_bookkeeping_and_seed_per_episode():
    res = evaluate(cheetah_policy, "HalfCheetah-v5", episodes=3, num_envs=2, seed=3, max_episode_steps=25)
    ref = manual_returns("HalfCheetah-v5", cheetah_policy, [3, 4, 5], 25)
    assert res.returns == [r for r, _, _ in ref] and res.lengths == [25, 25, 25]
    # episode i is reset with seed + i whatever slot runs it
    shifted = evaluate(cheetah_policy, "HalfCheetah-v5", episodes=2, num_envs=2, seed=4, max_episode_steps=25)
    assert shifted.returns == res.returns[1:]
    assert res.seconds > 0 and res.env_steps_per_second > 0 and res.action_latency_ms > 0


def test_async_matches_sync():
    kw = dict(episodes=3, num_envs=2, seed=0, max_episode_steps=15)
    a = evaluate(cheetah_policy, "HalfCheetah-v5", vector_mode="async", **kw)
    s = evaluate(cheetah_policy, "HalfCheetah-v5", vector_mode="sync", **kw)
    assert a.returns == s.returns and a.lengths == s.lengths


class NaNAfter(gymnasium.Wrapper):
    """Simulates an unstable simulation: for odd reset seeds the observation turns NaN at step 5."""

    def reset(self, *, seed=None, options=None):
        self._poison = seed is not None and seed % 2 == 1
        self._t = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        self._t += 1
        if self._poison and self._t == 5:
            obs = np.full_like(obs, np.nan)
        return obs, r, term, trunc, info


def test_nan_observations_end_the_episode_and_are_excluded():
    def make():
        return NaNAfter(gymnasium.make("HalfCheetah-v5", max_episode_steps=20))

    res = evaluate(cheetah_policy, make, episodes=4, num_envs=2, seed=0, max_episode_steps=20)
    assert res.unstable == [False, True, False, True]
    assert res.unstable_episodes == 2
    assert res.lengths == [20, 5, 20, 5]
    assert all(math.isfinite(r) for r in res.returns)
    summary = nfe_result(res, "halfcheetah-medium-v2")
    assert summary["counted_episodes"] == 2 and summary["unstable_episodes"] == 2
    assert math.isfinite(summary["return_mean"]) and math.isfinite(summary["normalized_score_mean"])
    assert summary["return_mean"] == pytest.approx(np.mean([res.returns[0], res.returns[2]]))


class CheetahActor:
    kind, env_id, task = "cd", "HalfCheetah-v5", None
    obs_dim, act_dim, device = 17, 6, torch.device("cpu")

    def sample(self, obs, nfe, generator=None):
        return torch.tanh(obs[:, :6] + 0.1 * torch.randn(obs.shape[0], 6, generator=generator))


class ZeroCritic:
    obs_dim, act_dim = 17, 6

    def advantage(self, obs, act):
        return -act.pow(2).sum(-1)


def test_agent_rollout_is_reproducible_and_checks_sizes():
    agent = IDQLAgent(CheetahActor(), ZeroCritic(), num_candidates=8, temperature=5.0)
    kw = dict(episodes=2, num_envs=2, nfe=2, seed=1, max_episode_steps=10)
    r1, r2 = evaluate(agent, "HalfCheetah-v5", **kw), evaluate(agent, "HalfCheetah-v5", **kw)
    assert r1.returns == r2.returns and r1.nfe == 2 and r1.policy_calls == 10
    with pytest.raises(ConfigError, match="17"):
        evaluate(agent, "Hopper-v5", **kw)
    with pytest.raises(ConfigError, match="NoSuchEnv"):
        evaluate(agent, "NoSuchEnv-v0", **kw)


def test_records_the_first_episodes_as_mp4(tmp_path):
    configure_rendering()  # what idql-cm does at start (this test process may not have rendered yet)
    res = evaluate(cheetah_policy, "HalfCheetah-v5", episodes=2, num_envs=2, max_episode_steps=4,
                   record_episodes=1, video_dir=str(tmp_path), video_prefix="t", render_size=(64, 64))
    assert res.videos == [str(tmp_path / "t_ep0.mp4")]
    data = (tmp_path / "t_ep0.mp4").read_bytes()
    assert len(data) > 0 and data[4:8] == b"ftyp"


def test_evaluate_leaves_the_environment_alone(monkeypatch, tmp_path):
    # the rendering backend is chosen once at process start (configure_rendering), not by a rollout
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    evaluate(cheetah_policy, "HalfCheetah-v5", episodes=1, num_envs=1, max_episode_steps=3, record_episodes=1,
             video_dir=str(tmp_path), render_size=(32, 32))
    assert "MUJOCO_GL" not in os.environ
