"""``load_d4rl("minari:<id>")`` on a dataset that Minari's own DataCollector writes into a temporary root."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from idql_cm.data.d4rl import load_d4rl, read_env_id
from idql_cm.data.datamodule import TDDataModule
from idql_cm.errors import DataError

minari = pytest.importorskip("minari")

DATASET_ID = "test/halfcheetah/tiny-v0"
EP_STEPS = [30, 30, 25]  # two episodes truncated by the 30-step time limit, the last left unfinished


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    import gymnasium as gym
    from minari import DataCollector

    root = tmp_path_factory.mktemp("minari")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = DataCollector(gym.make("HalfCheetah-v5", max_episode_steps=30))
        rng = np.random.default_rng(0)
        for ep, steps in enumerate(EP_STEPS):
            env.reset(seed=ep)
            for _ in range(steps):
                _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 6).astype(np.float32))
                if terminated or truncated:
                    break
        dataset = env.create_dataset(dataset_id=DATASET_ID, algorithm_name="random", author="idql-cm tests",
                                     author_email="tests@example.com", code_permalink="https://example.com",
                                     description="three short random HalfCheetah episodes")
    episodes = list(dataset.iterate_episodes())
    yield root, episodes
    mp.undo()


@pytest.mark.parametrize("use_package", [True, False], ids=["minari-package", "h5py"])
def test_minari_matches_episodes(minari_root, use_package):
    from idql_cm.data.minari_source import load_minari

    _, episodes = minari_root
    out = load_minari(DATASET_ID, use_package=use_package)
    assert len(out["rewards"]) == sum(EP_STEPS)  # every step kept, including the truncated last ones
    np.testing.assert_array_equal(out["observations"], np.concatenate([e.observations[:-1] for e in episodes]).astype(np.float32))
    np.testing.assert_array_equal(out["next_observations"], np.concatenate([e.observations[1:] for e in episodes]).astype(np.float32))
    np.testing.assert_array_equal(out["actions"], np.concatenate([e.actions for e in episodes]))
    np.testing.assert_array_equal(out["rewards"], np.concatenate([e.rewards for e in episodes]).astype(np.float32))
    assert out["terminals"].dtype == np.bool_ and not out["terminals"].any()
    assert all(v.dtype == np.float32 for k, v in out.items() if k != "terminals")


def test_minari_through_load_d4rl_and_datamodule(minari_root):
    out = load_d4rl(f"minari:{DATASET_ID}")
    assert out["observations"].shape == (sum(EP_STEPS), 17)
    assert read_env_id(f"minari:{DATASET_ID}") == "HalfCheetah-v5"
    dm = TDDataModule(f"minari:{DATASET_ID}", batch_size=4)
    assert (dm.obs_dim, dm.act_dim, dm.env_id, dm.task) == (17, 6, "HalfCheetah-v5", "halfcheetah")


def test_minari_missing_dataset(minari_root):
    root, _ = minari_root
    with pytest.raises(DataError) as info:
        load_d4rl("minari:test/halfcheetah/absent-v0")
    msg = str(info.value)
    assert "test/halfcheetah/absent-v0" in msg and str(root) in msg and "MINARI_DATASETS_PATH" in msg
