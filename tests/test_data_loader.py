"""load_d4rl: qlearning_dataset semantics on synthetic files, id resolution, env ids, every error path; scores."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from idql_cm.data.d4rl import iql_episode_returns, iql_reward_scale, load_d4rl, read_env_id
from idql_cm.data.scores import REF_SCORES, gym_env_id, normalized_score, task_family
from idql_cm.data.sources import d4rl_file_name, d4rl_task_of, resolve_source
from idql_cm.data.synthetic import make_d4rl_arrays, write_arrays, write_d4rl_file
from idql_cm.errors import ConfigError, DataError

KEYS = ("observations", "actions", "next_observations", "rewards", "terminals")


def reference_qlearning(dataset: dict, max_episode_steps: int = 1000) -> dict:
    """d4rl.qlearning_dataset's loop (d4rl/__init__.py), written out plainly."""
    n = dataset["rewards"].shape[0]
    obs_, next_obs_, action_, reward_, done_ = [], [], [], [], []
    use_timeouts = "timeouts" in dataset
    episode_step = 0
    for i in range(n - 1):
        obs = dataset["observations"][i].astype(np.float32)
        new_obs = dataset["observations"][i + 1].astype(np.float32)
        action = dataset["actions"][i].astype(np.float32)
        reward = dataset["rewards"][i].astype(np.float32)
        done_bool = bool(dataset["terminals"][i])
        if use_timeouts:
            final_timestep = dataset["timeouts"][i]
        else:
            final_timestep = episode_step == max_episode_steps - 1
        if final_timestep:
            episode_step = 0
            continue
        if done_bool or final_timestep:
            episode_step = 0
        obs_.append(obs)
        next_obs_.append(new_obs)
        action_.append(action)
        reward_.append(reward)
        done_.append(done_bool)
        episode_step += 1
    return {
        "observations": np.array(obs_),
        "actions": np.array(action_),
        "next_observations": np.array(next_obs_),
        "rewards": np.array(reward_),
        "terminals": np.array(done_),
    }


def read_all(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts") if k in f}


def assert_same(got: dict, want: dict):
    assert set(got) == set(KEYS)
    for k in KEYS:
        assert got[k].shape == want[k].shape, k
        assert got[k].dtype == (np.bool_ if k == "terminals" else np.float32), k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ------------------------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # timeouts at every episode end (HalfCheetah-like)
        dict(terminal_every=13),  # terminals at episode ends (Hopper-like)
        dict(dtype=np.float64),  # medium-replay files are float64
        dict(with_infos=False, with_metadata=False),
        dict(obs_dim=3, act_dim=1),
        dict(obs_dim=111, act_dim=8, n_episodes=2),
        dict(with_next_observations=False),
    ],
)
def test_matches_reference_loop(tmp_path, kwargs):
    path = write_d4rl_file(tmp_path / "d.hdf5", **kwargs)
    got = load_d4rl(path)
    assert_same(got, reference_qlearning(read_all(path)))


def test_semantics_by_hand(tmp_path):
    # 3 episodes of 4 rows: timeout, terminal, timeout
    arrays = make_d4rl_arrays(n_episodes=3, episode_len=4, obs_dim=2, act_dim=1)
    arrays["timeouts"][:] = False
    arrays["terminals"][:] = False
    arrays["timeouts"][3] = True
    arrays["terminals"][7] = True
    arrays["timeouts"][11] = True
    arrays["next_observations"][:] = 1e6  # must be ignored
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    got = load_d4rl(path)
    rows = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # row 3 (timeout) and 11 (last row) dropped
    np.testing.assert_array_equal(got["observations"], arrays["observations"][rows])
    np.testing.assert_array_equal(got["next_observations"], arrays["observations"][np.array(rows) + 1])
    assert got["terminals"].tolist() == [False] * 6 + [True] + [False] * 3
    assert got["rewards"].ndim == 1


def test_mixed_terminals_and_timeouts_random(tmp_path):
    rng = np.random.default_rng(3)
    arrays = make_d4rl_arrays(n_episodes=1, episode_len=500, obs_dim=4, act_dim=2)
    arrays["terminals"] = rng.uniform(size=500) < 0.05
    arrays["timeouts"] = (rng.uniform(size=500) < 0.05) & ~arrays["terminals"]
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    assert_same(load_d4rl(path), reference_qlearning(arrays))


@pytest.mark.parametrize("max_steps", [7, 10])
def test_no_timeouts_uses_d4rl_counter(tmp_path, max_steps):
    rng = np.random.default_rng(max_steps)
    arrays = make_d4rl_arrays(n_episodes=1, episode_len=300, obs_dim=3, act_dim=2)
    del arrays["timeouts"]
    arrays["terminals"] = rng.uniform(size=300) < 0.04
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    assert_same(load_d4rl(path, max_episode_steps=max_steps), reference_qlearning(arrays, max_steps))


def test_column_shaped_and_numeric_flags(tmp_path):
    arrays = make_d4rl_arrays(n_episodes=3, episode_len=10, obs_dim=3, act_dim=2, terminal_every=6)
    want = reference_qlearning(arrays)
    arrays["rewards"] = arrays["rewards"][:, None]
    arrays["terminals"] = arrays["terminals"].astype(np.float32)[:, None]
    arrays["timeouts"] = arrays["timeouts"].astype(np.uint8)
    assert_same(load_d4rl(write_arrays(tmp_path / "d.hdf5", arrays)), want)


def test_one_million_rows_is_fast(tmp_path):
    n = 1_000_000
    rng = np.random.default_rng(0)
    timeouts = np.zeros(n, bool)
    timeouts[999::1000] = True
    path = write_arrays(
        tmp_path / "big.hdf5",
        {
            "observations": rng.standard_normal((n, 17), dtype=np.float32),
            "actions": rng.uniform(-1, 1, (n, 6)).astype(np.float32),
            "rewards": rng.standard_normal(n, dtype=np.float32),
            "terminals": np.zeros(n, bool),
            "timeouts": timeouts,
        },
    )
    t0 = time.perf_counter()
    out = load_d4rl(path)
    elapsed = time.perf_counter() - t0
    assert len(out["rewards"]) == n - 1000  # 999 timeouts among rows 0..N-2, plus the dropped last row
    print(f"1M-row load: {elapsed:.2f} s")  # informational; no timing assertion (shared CI machines)


# ------------------------------------------------------------------------------------------- sources and ids
def test_d4rl_id_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert d4rl_file_name("halfcheetah-medium-replay-v2") == "halfcheetah_medium_replay-v2.hdf5"
    assert resolve_source("hopper-medium-expert-v2") == tmp_path / "hopper_medium_expert-v2.hdf5"
    path = write_d4rl_file(tmp_path / "halfcheetah_medium-v2.hdf5")
    assert_same(load_d4rl("halfcheetah-medium-v2"), reference_qlearning(read_all(path)))
    assert read_env_id("halfcheetah-medium-v2") == "halfcheetah"
    assert read_env_id(path) == "halfcheetah"  # a file named like a D4RL download
    assert d4rl_task_of(path) == "halfcheetah-medium-v2"
    assert d4rl_task_of("walker2d-medium-replay-v2") == "walker2d-medium-replay-v2"
    assert d4rl_task_of(tmp_path / "mine.hdf5") is None


def test_default_d4rl_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_source("walker2d-medium-v2") == tmp_path / ".d4rl" / "datasets" / "walker2d_medium-v2.hdf5"


@pytest.mark.parametrize("how", ["dataset", "attr"])
def test_read_env_id_from_metadata(tmp_path, how):
    path = write_d4rl_file(tmp_path / "c.hdf5", env_id="Hopper-v5", env_id_as=how)
    assert read_env_id(path) == "Hopper-v5"
    assert read_env_id(str(path)) == "Hopper-v5"
    assert read_env_id(write_d4rl_file(tmp_path / "n.hdf5")) is None


# ------------------------------------------------------------------------------------------------ error paths
def expect_error(source, *fragments):
    with pytest.raises(DataError) as info:
        load_d4rl(source)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert str(fragment) in msg, msg
    return msg


def test_missing_d4rl_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    msg = expect_error("hopper-medium-replay-v2", tmp_path / "hopper_medium_replay-v2.hdf5", "D4RL_DATASET_DIR")
    assert "rail.eecs.berkeley.edu" in msg
    with pytest.raises(DataError):
        read_env_id(tmp_path / "nope.hdf5")


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.hdf5", tmp_path / "nope.hdf5", "not found")
    expect_error(tmp_path, tmp_path, "directory")


@pytest.mark.parametrize("key", ["observations", "actions", "rewards", "terminals"])
def test_missing_key(tmp_path, key):
    arrays = make_d4rl_arrays(n_episodes=2, episode_len=5)
    del arrays[key]
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    expect_error(path, path, f"'{key}'", "missing")


@pytest.mark.parametrize("key", ["actions", "rewards", "terminals", "timeouts"])
def test_unequal_rows(tmp_path, key):
    arrays = make_d4rl_arrays(n_episodes=2, episode_len=5)
    arrays[key] = arrays[key][:-1]
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    expect_error(path, path, f"'{key}'", "9 rows", "10 rows")


@pytest.mark.parametrize("key", ["observations", "actions", "rewards"])
def test_non_finite(tmp_path, key):
    arrays = make_d4rl_arrays(n_episodes=2, episode_len=5)
    arrays[key][3] = np.nan
    arrays[key][7] = np.inf
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    expect_error(path, path, f"'{key}'", "2 of 10 rows", "first at row 3")


@pytest.mark.parametrize("rows", [0, 1])
def test_empty_or_single_row(tmp_path, rows):
    arrays = {k: v[:rows] for k, v in make_d4rl_arrays(n_episodes=1, episode_len=5).items()}
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    expect_error(path, path, "'observations'", "at least 2 rows")


def test_all_rows_timeouts(tmp_path):
    arrays = make_d4rl_arrays(n_episodes=1, episode_len=5)
    arrays["timeouts"][:] = True
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    expect_error(path, path, "'timeouts'", "no transitions")


def test_empty_hdf5_file(tmp_path):
    path = write_arrays(tmp_path / "d.hdf5", {})
    expect_error(path, path, "'observations'", "missing", "found keys: none")


def test_zero_byte_and_text_file(tmp_path):
    empty = tmp_path / "empty.hdf5"
    empty.write_bytes(b"")
    expect_error(empty, empty, "empty file")
    text = tmp_path / "text.hdf5"
    text.write_text("observations,actions\n1,2\n")
    expect_error(text, text, "HDF5")


def test_truncated_file(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", n_episodes=20, episode_len=100)
    data = path.read_bytes()
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(data[: len(data) // 2])
    expect_error(cut, cut, "truncated")


@pytest.mark.parametrize(
    "key,value,found",
    [
        ("observations", lambda a: a.astype(np.int64), "int64"),
        ("actions", lambda a: a.astype("S8"), "S8"),
        ("rewards", lambda a: a.astype(np.int32), "int32"),
        ("terminals", lambda a: a.astype("S1"), "S1"),
        ("observations", lambda a: a[:, 0], None),  # 1-D observations are read as one column: fine
        ("rewards", lambda a: np.stack([a, a], 1), "shape"),
    ],
)
def test_wrong_dtype_or_shape(tmp_path, key, value, found):
    arrays = make_d4rl_arrays(n_episodes=2, episode_len=5)
    arrays[key] = value(arrays[key])
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    if found is None:
        assert load_d4rl(path)["observations"].shape == (8, 1)
    else:
        expect_error(path, path, f"'{key}'", found)


def test_group_where_array_expected(tmp_path):
    arrays = make_d4rl_arrays(n_episodes=2, episode_len=5)
    arrays["rewards/x"] = arrays.pop("rewards")
    path = write_arrays(tmp_path / "d.hdf5", arrays)
    expect_error(path, path, "'rewards'", "group")


# --------------------------------------------------------------------------------------------- reward scaling
def reference_return_range(rewards, terminals, max_len=1000):
    returns, ep_ret, ep_len = [], 0.0, 0
    for r, d in zip(rewards, terminals, strict=True):
        ep_ret += float(r)
        ep_len += 1
        if d or ep_len == max_len:
            returns.append(ep_ret)
            ep_ret, ep_len = 0.0, 0
    return returns


@pytest.mark.parametrize("max_len", [1000, 7])
def test_iql_reward_scale_matches_loop(max_len):
    rng = np.random.default_rng(max_len)
    rewards = rng.normal(size=5000).astype(np.float32)
    terminals = rng.uniform(size=5000) < 0.003
    want = reference_return_range(rewards, terminals, max_len)
    got = iql_episode_returns(rewards, terminals, max_len)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)
    scaled = iql_reward_scale(rewards, terminals, max_len)
    np.testing.assert_allclose(scaled, rewards * 1000.0 / (max(want) - min(want)), rtol=1e-6)
    assert scaled.dtype == np.float32 and rewards.dtype == np.float32


def test_iql_reward_scale_needs_two_episodes():
    with pytest.raises(DataError, match="rewards"):
        iql_reward_scale(np.ones(10, np.float32), np.zeros(10, bool), 1000, where="x.hdf5")


# -------------------------------------------------------------------------------------------------- scores
def test_scores():
    assert REF_SCORES["halfcheetah"] == (-280.178953, 12135.0)
    assert REF_SCORES["hopper"] == (-20.272305, 3234.3)
    assert REF_SCORES["walker2d"] == (1.629008, 4592.3)
    for name, fam in [
        ("hopper-medium-replay-v2", "hopper"),
        ("Hopper-v5", "hopper"),
        ("HalfCheetah-v4", "halfcheetah"),
        ("walker2d", "walker2d"),
        ("Walker2d-v5", "walker2d"),
        ("halfcheetah_medium-v2.hdf5", "halfcheetah"),
        ("Ant-v5", None),
        ("", None),
        (None, None),
    ]:
        assert task_family(name) == fam, name
    assert normalized_score("halfcheetah-medium-v2", -280.178953) == pytest.approx(0.0)
    assert normalized_score("HalfCheetah-v5", 12135.0) == pytest.approx(100.0)
    assert normalized_score("hopper", 3234.3) == pytest.approx(100.0)
    arr = normalized_score("walker2d", np.array([1.629008, 4592.3]))
    np.testing.assert_allclose(arr, [0.0, 100.0])
    assert gym_env_id("halfcheetah-medium-expert-v2") == "HalfCheetah-v4"
    assert gym_env_id("hopper") == "Hopper-v4"
    assert gym_env_id("walker2d", version="v5") == "Walker2d-v5"
    with pytest.raises(ConfigError):
        normalized_score("ant", 1.0)
    with pytest.raises(ConfigError):
        gym_env_id("hopper", version="latest")
