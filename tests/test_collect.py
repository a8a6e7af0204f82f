"""``collect``: the D4RL layout it writes, the spread of the mixed demo data, atomic writes, the CLI hooks."""

from __future__ import annotations

import argparse
import os
import warnings

import h5py
import numpy as np
import pytest

from idql_cm.data import collect as collect_mod
from idql_cm.data.collect import SineGait, add_collect_parser, collect
from idql_cm.data.d4rl import load_d4rl, read_env_id
from idql_cm.errors import ConfigError

warnings.filterwarnings("ignore", message=".*settotalmass.*")


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    """10 mixed HalfCheetah episodes (the gait search included, at a 60,000-step budget: a few seconds)."""
    return collect("HalfCheetah-v5", tmp_path_factory.mktemp("collect") / "mixed.hdf5", transitions=10_000, seed=0,
                   behaviour="mixed", progress=False, search_budget=60_000)


def test_mixed_layout(mixed_file):
    with h5py.File(mixed_file, "r") as f:
        keys = set()
        f.visititems(lambda name, obj: keys.add(name) if isinstance(obj, h5py.Dataset) else None)
        for key in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations",
                    "infos/qpos", "infos/qvel", "metadata/env_id", "metadata/behaviour", "metadata/seed",
                    "metadata/episode_returns", "metadata/gait"):
            assert key in keys, key
        obs, nxt = f["observations"][()], f["next_observations"][()]
        act, rew = f["actions"][()], f["rewards"][()]
        term, tout = f["terminals"][()], f["timeouts"][()]
        qpos = f["infos/qpos"][()]
        returns = f["metadata/episode_returns"][()]
        lengths = f["metadata/episode_lengths"][()]
    assert obs.shape == (10_000, 17) and act.shape == (10_000, 6) and rew.shape == (10_000,)
    assert obs.dtype == act.dtype == rew.dtype == np.float32 and term.dtype == tout.dtype == np.bool_
    assert qpos.shape == (10_000, 9)
    assert np.abs(act).max() <= 1.0
    assert not term.any()  # HalfCheetah never terminates
    assert np.flatnonzero(tout).tolist() == list(range(999, 10_000, 1000))
    inside = ~tout[:-1]
    np.testing.assert_array_equal(nxt[:-1][inside], obs[1:][inside])  # next obs is the following row in an episode
    np.testing.assert_allclose(obs[:, :8], qpos[:, 1:], atol=1e-6)  # obs = qpos without x, then qvel
    np.testing.assert_array_equal(lengths, [1000] * 10)
    np.testing.assert_allclose(returns, rew.astype(np.float64).reshape(10, 1000).sum(1), rtol=1e-4, atol=1e-2)
    # qlearning view: 9 timeout rows and the last row dropped
    q = load_d4rl(mixed_file)
    assert len(q["rewards"]) == 9_990
    assert read_env_id(mixed_file) == "HalfCheetah-v5"


def test_mixed_returns_spread(mixed_file):
    with h5py.File(mixed_file, "r") as f:
        returns = f["metadata/episode_returns"][()]
        search_return = float(f["metadata/gait_search_return"][()])
    assert returns.min() < 0.0, returns  # random episodes
    assert returns.max() > 2000.0, returns  # the gait itself
    assert search_return > 2000.0
    assert len(np.unique(np.round(returns, -2))) >= 5  # levels in between


def test_gait_actions():
    gait = SineGait(np.array([2.0, 0.5]), np.array([0.0, np.pi / 2]), np.array([0.0, 0.2]), omega=1.0, ramp=1)
    a = gait.actions(50)
    assert a.shape == (50, 2) and np.abs(a).max() <= 1.0
    np.testing.assert_allclose(a[:, 1], np.clip(0.5 * np.cos(np.arange(50)) + 0.2, -1, 1))
    np.testing.assert_array_equal(SineGait.from_vector(gait.to_vector(), ramp=1).actions(50), a)


def test_random_is_deterministic_and_hopper_terminates(tmp_path):
    a = collect("Hopper-v5", tmp_path / "a.hdf5", transitions=3000, seed=5, behaviour="random", progress=False)
    b = collect("Hopper-v5", tmp_path / "b.hdf5", transitions=3000, seed=5, behaviour="random", progress=False)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            np.testing.assert_array_equal(fa[key][()], fb[key][()])
        term, tout = fa["terminals"][()], fa["timeouts"][()]
        assert fa["observations"].shape == (3000, 11) and fa["infos/qpos"].shape == (3000, 6)
    assert term.sum() > 5  # random Hopper falls within tens of steps
    assert not (term & tout).any()
    assert tout[-1] or term[-1]  # the budget cut the last episode
    assert read_env_id(a) == "Hopper-v5"
    assert len(load_d4rl(a)["rewards"]) > 2900


def test_scripted_runs_on_walker(tmp_path, capsys):
    out = collect("Walker2d-v5", tmp_path / "w.hdf5", transitions=500, seed=0, behaviour="scripted",
                  progress=True, search_budget=2000)
    assert load_d4rl(out)["observations"].shape[1] == 17
    assert "gait" in capsys.readouterr().err


def test_atomic_write(tmp_path, monkeypatch):
    out = tmp_path / "atomic.hdf5"

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(collect_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect("HalfCheetah-v5", out, transitions=200, behaviour="random", progress=False)
    assert os.listdir(tmp_path) == []


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="NoSuchEnv-v0"):
        collect("NoSuchEnv-v0", tmp_path / "x.hdf5", transitions=100, behaviour="random", progress=False)
    with pytest.raises(ConfigError, match="behaviour"):
        collect(out=tmp_path / "x.hdf5", behaviour="expert", progress=False)
    with pytest.raises(ConfigError, match="transitions"):
        collect(out=tmp_path / "x.hdf5", transitions=1, behaviour="random", progress=False)
    assert not (tmp_path / "x.hdf5").exists()


def test_cli_parser(tmp_path):
    parser = argparse.ArgumentParser(prog="idql-cm")
    add_collect_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.hdf5"
    args = parser.parse_args(["collect", "--out", str(out), "--transitions", "300", "--behaviour", "random",
                              "--seed", "2", "--quiet"])
    assert (args.env, args.transitions, args.seed, args.behaviour) == ("HalfCheetah-v5", 300, 2, "random")
    assert args.func(args) == 0
    assert load_d4rl(out)["observations"].shape == (299 - 0, 17)


def test_medium_expert_is_the_d4rl_construction(tmp_path):
    """The weak behaviour's episodes, then the strong one's (half the rows each), labelled per episode; the weak one
    is the strong gait with lapses (whole 50-step blocks at a third of the swing), so its returns are clearly lower
    while outside its lapses it plays the strong gait: at shared states, two actions."""
    path = collect("HalfCheetah-v5", tmp_path / "me.hdf5", transitions=8_000, seed=0, behaviour="medium-expert",
                   progress=False, search_budget=60_000)  # a poorer gait than the default budget's, the same construction
    with h5py.File(path, "r") as f:
        levels = f["metadata/episode_level"][()].astype(str).tolist()
        returns = f["metadata/episode_returns"][()]
        lapse_steps = f["metadata/episode_lapse_steps"][()]
        act = f["actions"][()].reshape(8, 1000, -1)
        gait = SineGait.from_vector(f["metadata/gait"][()])
    assert levels == ["medium"] * 4 + ["expert"] * 4
    assert (lapse_steps[:4] > 0).all() and (lapse_steps[:4] % 50 == 0).all() and (lapse_steps[4:] == 0).all()
    assert np.median(returns[4:]) > 1.5 * np.median(returns[:4])
    clean = gait.actions(1000)  # the strong gait, noise-free
    gap = np.abs(act - clean).mean(-1)  # [8, 1000]
    lapsed = gap[:4] > 0.1
    assert not lapsed[:, :100].any() and 0.2 < lapsed[:, 100:].mean() < 0.8
    assert (lapsed[:, 100:].reshape(4, 18, 50).mean(-1) % 1 == 0).all()  # whole blocks
    assert gap[4:].mean() < 0.03 and gap[:4][~lapsed].mean() < 0.03  # elsewhere: the strong gait + noise 0.02


def test_two_gait_is_two_different_policies(tmp_path):
    """``two-gait``: the weak half is *another* gait (searched with seed + 1, its own frequency and phases) at half its
    swing, not the strong gait with lapses; both under noise 0.02, the weak one clearly weaker. A search budget of
    60,000 env steps (46 s with the default 450,000, 10 s with this): the same construction, the weak gait
    is a poorer one (returns ~210 against ~2,600)."""
    path = collect("HalfCheetah-v5", tmp_path / "tg.hdf5", transitions=4_000, seed=0, behaviour="two-gait",
                   progress=False, search_budget=60_000)
    with h5py.File(path, "r") as f:
        levels = f["metadata/episode_level"][()].astype(str).tolist()
        returns = f["metadata/episode_returns"][()]
        act = f["actions"][()].reshape(4, 1000, -1)
        strong = SineGait.from_vector(f["metadata/gait"][()])
        weak = SineGait.from_vector(f["metadata/weak_gait"][()])
    assert levels == ["medium"] * 2 + ["expert"] * 2
    assert abs(weak.omega - strong.omega) > 0.01  # another gait, not a scaled copy
    assert returns[2:].min() > 1.5 * returns[:2].max()
    assert np.abs(act[:2] - weak.actions(1000)).mean() < 0.03  # each half plays its own gait (+ noise 0.02)
    assert np.abs(act[2:] - strong.actions(1000)).mean() < 0.03
    assert np.abs(act[:2] - strong.actions(1000)).mean() > 0.1
