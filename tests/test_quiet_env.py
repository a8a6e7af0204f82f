"""The project's MuJoCo environments compile without MuJoCo's ``settotalmass`` deprecation warning, to exactly the
stock gymnasium model (:mod:`idql_cm.data.envs`): same masses, same compiled model, same rollout."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest

from idql_cm.data import collect as collect_mod
from idql_cm.data.envs import explicit_mass_xml, make_env
from idql_cm.eval.rollout import make_vector_env


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MuJoCo also appends its warnings to MUJOCO_LOG.TXT in the working directory."""
    monkeypatch.chdir(tmp_path)
    explicit_mass_xml.cache_clear()  # derive the model afresh: that step must be quiet too


def _arrays(model) -> dict[str, np.ndarray]:
    """Every array and number of a compiled mjModel, its options and statistics included."""
    out = {}
    for obj, prefix in ((model, ""), (model.opt, "opt."), (model.stat, "stat.")):
        for name in dir(obj):
            if name.startswith("_"):
                continue
            value = getattr(obj, name)
            if isinstance(value, (np.ndarray, int, float)):
                out[prefix + name] = np.array(value)
    return out


def test_project_envs_write_no_warning(capfd, tmp_path):
    capfd.readouterr()
    envs = [collect_mod._make_env(env_id) for env_id in ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5")]
    envs.append(make_vector_env("HalfCheetah-v5", 2))
    for env in envs:
        env.close()
    out, err = capfd.readouterr()
    assert "deprecated" not in err + out and "WARNING" not in err + out, err + out
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()


def test_same_model_and_rollout_as_gymnasium(capfd):
    stock = gymnasium.make("HalfCheetah-v5", max_episode_steps=1000)  # MuJoCo warns here, into capfd
    ours = make_env("HalfCheetah-v5", max_episode_steps=1000)
    capfd.readouterr()
    m0, m1 = stock.unwrapped.model, ours.unwrapped.model
    assert np.array_equal(m1.body_mass, m0.body_mass) and np.array_equal(m1.body_inertia, m0.body_inertia)
    assert m1.body_mass.sum() == pytest.approx(14.0)  # the stock model's settotalmass
    a0, a1 = _arrays(m0), _arrays(m1)
    assert a0.keys() == a1.keys() and "body_subtreemass" in a0 and "dof_invweight0" in a0
    assert [k for k in a0 if not np.array_equal(a0[k], a1[k], equal_nan=True)] == []

    actions = np.random.default_rng(0).uniform(-1, 1, (50, 6)).astype(np.float32)
    runs = []
    for env in (stock, ours):
        steps = [env.reset(seed=3)[0]]
        for a in actions:
            obs, reward, *_ = env.step(a)
            steps.append(np.append(obs, reward))
        runs.append(np.concatenate(steps))
        env.close()
    assert np.array_equal(runs[0], runs[1])


def test_explicit_xml_is_passed_on():
    assert explicit_mass_xml("hopper.xml") is None  # no settotalmass: the stock model is used as it is
    env = make_env("HalfCheetah-v5", xml_file="half_cheetah.xml")  # the caller's choice wins
    assert env.spec.kwargs["xml_file"] == "half_cheetah.xml"
    env.close()
