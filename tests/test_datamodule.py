"""TDDataModule: lazy properties, normalisation, reward scaling, action bounds, and the index sampler's contract
(uniform coverage, same seed → same batches, ranks differ, exact resume under a real Trainer)."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch

from idql_cm.data.d4rl import iql_reward_scale, load_d4rl
from idql_cm.data.datamodule import BATCH_KEYS, TDBatchIterable, TDDataModule
from idql_cm.data.normalizer import ObsNormalizer
from idql_cm.data.synthetic import make_d4rl_arrays, write_arrays, write_d4rl_file
from idql_cm.errors import ConfigError, DataError
from idql_cm.seeding import resolve_seed, step_seed


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_d4rl_file(tmp_path_factory.mktemp("dm") / "d.hdf5", n_episodes=4, episode_len=50, obs_dim=5,
                           act_dim=2, env_id="HalfCheetah-v5")


# ------------------------------------------------------------------------------------------------- normaliser
def test_normalizer_numpy_and_torch():
    rng = np.random.default_rng(0)
    obs = rng.normal(3.0, 2.0, size=(1000, 4)).astype(np.float32)
    obs[:, 2] = 7.0  # constant column: std 0 → 1
    norm = ObsNormalizer.from_data(obs)
    np.testing.assert_allclose(norm.mean, obs.astype(np.float64).mean(0), rtol=1e-12)
    want_std = obs.astype(np.float64).std(0)  # population std, ddof 0
    want_std[2] = 1.0
    np.testing.assert_allclose(norm.std, want_std, rtol=1e-12)
    z = norm.normalize(obs)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(0), [0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(z[:, 2], 0.0)
    np.testing.assert_allclose(norm.unnormalize(z), obs, rtol=1e-5, atol=1e-5)
    assert norm.normalize(obs.astype(np.float64)).dtype == np.float64
    t = torch.from_numpy(obs).double()
    zt = norm.normalize(t)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float64 and zt.device == t.device
    np.testing.assert_allclose(zt.numpy(), norm.normalize(obs.astype(np.float64)), rtol=1e-12)
    state = norm.state_dict()
    assert isinstance(state["mean"], list) and isinstance(state["std"][0], float)
    again = ObsNormalizer.from_state_dict(state)
    np.testing.assert_array_equal(again.mean, norm.mean)
    np.testing.assert_array_equal(again.std, norm.std)


# --------------------------------------------------------------------------------------------- the data module
def test_properties_before_setup_and_tensors(data_file):
    dm = TDDataModule(str(data_file), batch_size=8)
    assert dm.obs_dim == 5 and dm.act_dim == 2
    raw = load_d4rl(data_file)
    assert dm.num_transitions == len(raw["rewards"])
    assert dm.env_id == "HalfCheetah-v5" and dm.task == "halfcheetah"
    norm = dm.normalizer
    np.testing.assert_allclose(norm.mean, raw["observations"].astype(np.float64).mean(0), rtol=1e-10)
    dm.setup("fit")
    t = dm.tensors
    assert set(t) == set(BATCH_KEYS)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in t.values())
    assert t["rew"].shape == (dm.num_transitions, 1) and t["tml"].shape == (dm.num_transitions, 1)
    np.testing.assert_allclose(t["obs"].numpy(), (raw["observations"] - norm.mean) / norm.std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["next_obs"].numpy(), (raw["next_observations"] - norm.mean) / norm.std,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t["act"].numpy(), raw["actions"])
    np.testing.assert_array_equal(t["rew"][:, 0].numpy(), raw["rewards"])
    batch = next(iter(dm.train_dataloader()))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "obs": (8, 5), "act": (8, 2), "rew": (8, 1), "next_obs": (8, 5), "tml": (8, 1)}
    assert len(dm.val_dataloader()) == 1


def test_d4rl_id_task(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    write_d4rl_file(tmp_path / "hopper_medium_replay-v2.hdf5", obs_dim=11, act_dim=3, dtype=np.float64)
    dm = TDDataModule("hopper-medium-replay-v2")
    assert (dm.obs_dim, dm.act_dim, dm.env_id, dm.task) == (11, 3, "hopper", "hopper-medium-replay-v2")


def test_reward_scale(tmp_path):
    path = write_d4rl_file(tmp_path / "d.hdf5", n_episodes=3, episode_len=40, terminal_every=20, obs_dim=3, act_dim=2)
    raw = load_d4rl(path)
    dm = TDDataModule(str(path), reward_scale="iql_locomotion")
    dm.setup()
    want = iql_reward_scale(raw["rewards"], raw["terminals"])
    np.testing.assert_allclose(dm.tensors["rew"][:, 0].numpy(), want, rtol=1e-6)
    assert not np.allclose(want, raw["rewards"])
    flat = write_d4rl_file(tmp_path / "flat.hdf5", n_episodes=1, episode_len=40, obs_dim=3, act_dim=2)
    tiny = TDDataModule(str(flat), reward_scale="iql_locomotion")
    with pytest.warns(UserWarning, match="flat.hdf5.*rewards.*unscaled"):
        tiny.setup()
    np.testing.assert_array_equal(tiny.tensors["rew"][:, 0].numpy(), load_d4rl(flat)["rewards"])


def test_action_bounds(tmp_path):
    arrays = make_d4rl_arrays(n_episodes=2, episode_len=20, obs_dim=3, act_dim=2)
    arrays["actions"][3, 0] = 1.5
    arrays["actions"][5, 1] = -2.0
    path = write_arrays(tmp_path / "oob.hdf5", arrays)
    dm = TDDataModule(str(path))
    with pytest.warns(UserWarning, match="2 of .* entries"):
        dm.setup()
    assert float(dm.tensors["act"].abs().max()) == 1.0
    with pytest.raises(DataError, match="oob.hdf5.*'actions'.*2 of"):
        TDDataModule(str(path), out_of_bounds="error").setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TDDataModule(str(path), action_bounds=2.0).setup()


@pytest.mark.parametrize("kwargs", [dict(reward_scale="iql"), dict(out_of_bounds="ignore"), dict(batch_size=0),
                                    dict(action_bounds=0.0)])
def test_bad_arguments(data_file, kwargs):
    with pytest.raises(ConfigError):
        TDDataModule(str(data_file), **kwargs)


def test_missing_dataset_error(tmp_path):
    dm = TDDataModule(str(tmp_path / "missing.hdf5"))
    with pytest.raises(DataError, match="missing.hdf5"):
        _ = dm.obs_dim


# ------------------------------------------------------------------------------------------------ the sampler
def _sampler(n=37, batch=16, seed=0, rank=0, start=0):
    tensors = {"obs": torch.arange(n, dtype=torch.float32)[:, None]}
    return TDBatchIterable(tensors, batch, seed=seed, rank=rank, start_step=lambda: start)


def _take(it, k):
    out = []
    for i, b in enumerate(it):
        if i == k:
            break
        out.append(b["obs"][:, 0].long())
    return out


def test_every_index_reachable_and_uniform():
    counts = torch.bincount(torch.cat(_take(_sampler(), 500)), minlength=37)
    assert int((counts > 0).sum()) == 37
    expected = 500 * 16 / 37
    assert float(counts.min()) > 0.6 * expected and float(counts.max()) < 1.4 * expected


def test_same_seed_same_batches_ranks_and_seeds_differ():
    a, b = _take(_sampler(seed=3), 5), _take(_sampler(seed=3), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = _take(_sampler(seed=4), 5)
    r1 = _take(_sampler(seed=3, rank=1), 5)
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, r1, strict=True))
    assert not torch.equal(a[0], a[1])  # steps differ


def test_resume_at_step_k_reproduces_batches():
    full = _take(_sampler(seed=7), 12)
    resumed = _take(_sampler(seed=7, start=5), 7)
    assert all(torch.equal(x, y) for x, y in zip(full[5:], resumed, strict=True))
    s = _sampler(seed=7)
    assert torch.equal(s.batch_at(9)["obs"][:, 0].long(), full[9])
    assert step_seed(7, 0, 9) != step_seed(7, 1, 9) != step_seed(8, 0, 9)


def test_seed_from_seed_everything(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert resolve_seed(None) == 0
    L.seed_everything(123, verbose=False)
    assert resolve_seed(None) == 123
    assert resolve_seed(5) == 5


class _Recorder(L.LightningModule):
    """Records the first column of every training batch; automatic or manual (two optimisers) optimisation."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.automatic_optimization = not manual
        self.a = torch.nn.Linear(5, 1)
        self.b = torch.nn.Linear(5, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["obs"][:, 0].clone())
        if self.automatic_optimization:
            return self.a(batch["obs"]).mean()
        for opt, net in zip(self.optimizers(), (self.a, self.b), strict=True):
            opt.zero_grad()
            self.manual_backward(net(batch["obs"]).mean())
            opt.step()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.SGD(self.a.parameters(), lr=0.01)
        return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)


def _trainer(tmp_path, max_steps):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, default_root_dir=tmp_path)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual-2-optimisers"])
def test_trainer_resume_is_exact(tmp_path, data_file, manual):
    warnings.filterwarnings("ignore")
    per_batch = 2 if manual else 1  # global_step counts optimiser steps
    full = _Recorder(manual)
    _trainer(tmp_path, 10 * per_batch).fit(full, TDDataModule(str(data_file), batch_size=4, seed=1))
    first = _Recorder(manual)
    trainer = _trainer(tmp_path, 4 * per_batch)
    trainer.fit(first, TDDataModule(str(data_file), batch_size=4, seed=1))
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    second = _Recorder(manual)
    _trainer(tmp_path, 10 * per_batch).fit(second, TDDataModule(str(data_file), batch_size=4, seed=1), ckpt_path=ckpt)
    resumed = first.seen + second.seen
    assert len(full.seen) == len(resumed) == 10
    assert all(torch.equal(x, y) for x, y in zip(full.seen, resumed, strict=True))


def test_validate_runs_one_batch(tmp_path, data_file):
    warnings.filterwarnings("ignore")
    calls = []

    class Val(_Recorder):
        def validation_step(self, batch, batch_idx):
            calls.append({k: tuple(v.shape) for k, v in batch.items()})

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.validate(Val(), TDDataModule(str(data_file), batch_size=4))
    assert calls == [{"obs": (1, 5), "act": (1, 2), "rew": (1, 1), "next_obs": (1, 5), "tml": (1, 1)}]


def test_device_follows_trainer(tmp_path, data_file):
    warnings.filterwarnings("ignore")
    dm = TDDataModule(str(data_file), batch_size=4)
    rec = _Recorder()
    _trainer(tmp_path, 2).fit(rec, dm)
    assert dm.tensors["obs"].device == torch.device("cpu")
    assert rec.seen[0].device.type == "cpu"


def test_batches_are_one_row_gather_with_the_per_key_values(tmp_path):
    """The data module holds one [N, 42] matrix with the keys as column views (no copy into the stream); a batch
    equals indexing every key with the step's indices; separate tensors are packed once."""
    from idql_cm.data.datamodule import pack_columns

    dm = TDDataModule(str(write_d4rl_file(tmp_path / "p.hdf5", n_episodes=3, episode_len=50)), batch_size=16)
    dm.setup("fit")
    packed, cols = pack_columns(dm.tensors)
    assert packed.shape == (dm.num_transitions, 2 * dm.obs_dim + dm.act_dim + 2)
    assert packed.untyped_storage().data_ptr() == dm.tensors["obs"].untyped_storage().data_ptr()  # a view
    separate = {k: v.clone() for k, v in dm.tensors.items()}
    copied, cols2 = pack_columns(separate)
    assert copied.untyped_storage().data_ptr() != separate["obs"].untyped_storage().data_ptr() and cols2 == cols
    for tensors in (dm.tensors, separate):
        it = TDBatchIterable(tensors, 16, seed=3)
        gen = torch.Generator().manual_seed(step_seed(3, 0, 7))
        idx = torch.randint(dm.num_transitions, (16,), generator=gen)
        got = it.batch_at(7)
        assert set(got) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            assert got[k].shape == (16, *separate[k].shape[1:]) and torch.equal(got[k], separate[k][idx]), k
