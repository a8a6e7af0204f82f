"""Several seeds in one run (``model.init_args.num_seeds``) through the real CLI: member k of an S = 3 run with
``seed_everything: s`` equals the solo run with seed ``s + k`` (weights, Adam moments and step counts, EMA /
target); checkpoints of S members; CD from an ensemble teacher; the per-member non-finite guard; exact resume.

Tolerance: the per-member CPU path runs each member's layers as the solo ops on the member's slices
(docs/ensemble-design.md), so the networks' forward and backward are the solo ones bit for bit; what may differ is
the order of the batch means over ``[S, B, ...]`` against ``[B, ...]`` (one reduction kernel over a strided view),
which could round differently in the last bit. Measured on a 2-core CPU (2026-12-03, torch 2.13.0+cpu): max |diff|
0.0 for IQL, EDM, CT and CD after these runs, i.e. bit-identical. The tests still allow 1e-5 absolute + 1e-5
relative (weights are O(0.1-1)), so that another BLAS or thread count, which may sum in another order, passes while a
wrong seed, batch or mask (differences of O(1e-2) and more after a few steps) fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from idql_cm.checkpoint import MEMBER_PREFIXES, member_state
from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, shrink_config

SMALL_NET = {"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.1}}
ATOL = RTOL = 1e-5
S = 3
SEED = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "cheetah.hdf5"
    return str(write_d4rl_file(path, n_episodes=4, episode_len=100, obs_dim=17, act_dim=6))


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _fit(stage: str, dataset: str, tmp_path: Path, name: str, seed: int, steps: int, model_args: dict,
         log_every: int = 50) -> dict:
    cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"{name}.yaml", tmp_path / name, dataset,
                        steps=steps, model_args=model_args, keep_eval=False)
    doc = yaml.safe_load(cfg.read_text())
    doc["seed_everything"] = seed
    doc["trainer"]["log_every_n_steps"] = log_every
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["fit", "--config", str(cfg)]) == 0
    return _state(tmp_path / name / "checkpoints" / "last.ckpt")


def _gap(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    """max |a − b|, after asserting |a − b| ≤ ATOL + RTOL·|b| everywhere."""
    diff = (a.float() - b.float()).abs()
    assert bool((diff <= ATOL + RTOL * b.float().abs()).all()), f"{what}: max |diff| {float(diff.max()):.3g}"
    return float(diff.max()) if diff.numel() else 0.0


def _assert_member_equals_solo(ens: dict, solo: dict, k: int) -> float:
    """Member k of ``ens`` against the solo checkpoint: every stacked weight and buffer, and Adam's state."""
    assert ens["global_step"] == solo["global_step"]
    mine = member_state(ens["state_dict"], k)
    assert mine.keys() == solo["state_dict"].keys()
    worst = 0.0
    for key, value in solo["state_dict"].items():
        assert mine[key].shape == value.shape, key
        worst = max(worst, _gap(mine[key], value, f"member {k} {key}"))
    stacked = [key for key in ens["state_dict"] if key.startswith(MEMBER_PREFIXES)]
    assert stacked and all(ens["state_dict"][key].shape[0] == S for key in stacked)
    sa, sb = ens["optimizer_states"][0]["state"], solo["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sb:
        assert float(sa[i]["step"][k]) == float(sb[i]["step"])
        for moment in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, _gap(sa[i][moment][k], sb[i][moment], f"member {k} Adam {moment} of parameter {i}"))
    return worst


def _extra(stage: str, steps: int) -> dict:
    if stage == "iql":
        return {"hidden_dim": 32}
    return {**SMALL_NET, "total_steps": steps, "s0": 2, "s1": 8} if stage == "ct" else dict(SMALL_NET)


@pytest.mark.parametrize("stage", ["iql", "ct", "edm"])
def test_member_k_trains_as_the_solo_run_of_seed_s_plus_k(stage, dataset, tmp_path):
    """80 steps (CT: the curriculum moves through 3 grids; dropout 0.1 draws masks from every member's stream;
    fused_steps 8 of the demo configs, lowered to 4 by the periods (logging 20, checkpoints 40), so items are
    [K, S, B, ...]). A wrong seed, batch or mask shows after a step; 80 are plenty and keep the 12 fits short."""
    steps = 80
    extra = _extra(stage, steps)
    ens = _fit(stage, dataset, tmp_path, "ens", SEED, steps, {**extra, "num_seeds": S}, log_every=20)
    assert ens["idql_cm"]["num_seeds"] == S and ens["idql_cm"]["seed"] == SEED
    gaps = []
    for k in range(S):
        solo = _fit(stage, dataset, tmp_path, f"solo{k}", SEED + k, steps, extra, log_every=20)
        assert "num_seeds" not in solo["idql_cm"]
        gaps.append(_assert_member_equals_solo(ens, solo, k))
    print(f"{stage}: max |member k - solo seed s+k| over weights, buffers and Adam moments: {gaps}")
    # the members are different runs, not copies
    first = next(key for key in ens["state_dict"] if key.startswith(MEMBER_PREFIXES))
    w = ens["state_dict"][first]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


@pytest.fixture(scope="module")
def edm_ensemble(dataset, tmp_path_factory) -> Path:
    """A 3-member EDM run of 100 steps (the CD teacher below)."""
    root = tmp_path_factory.mktemp("teacher")
    _fit("edm", dataset, root, "edm", SEED, 100, {**SMALL_NET, "num_seeds": S})
    return root / "edm" / "checkpoints" / "last.ckpt"


def test_cd_member_k_distils_from_teacher_member_k(dataset, edm_ensemble, tmp_path):
    """CD with num_seeds 3 from a 3-member EDM == solo CD of seed s + k with teacher_member: k."""
    steps = 100
    teacher = {"teacher_ckpt": str(edm_ensemble)}
    ens = _fit("cd", dataset, tmp_path, "ens", SEED, steps, {**teacher, "num_seeds": S})
    gaps = []
    for k in range(S):
        solo = _fit("cd", dataset, tmp_path, f"solo{k}", SEED + k, steps, {**teacher, "teacher_member": k})
        assert solo["idql_cm"]["teacher_member"] == k
        gaps.append(_assert_member_equals_solo(ens, solo, k))
    print(f"cd: max |member k - solo seed s+k| over weights, buffers and Adam moments: {gaps}")


@pytest.mark.parametrize("args,needles", [
    ({"num_seeds": 2}, ["holds 3 member(s)", "num_seeds: 2"]),
    ({}, ["holds 3 member(s)", "teacher_member"]),
    ({"teacher_member": 3}, ["out of range 0..2"]),
    ({"num_seeds": 3, "teacher_member": 1}, ["teacher_member", "leave it unset"]),
])
def test_cd_refuses_a_teacher_of_another_member_count_in_one_line(args, needles, dataset, edm_ensemble, tmp_path,
                                                                   cli):
    from tests.test_cli_errors import _one_line_error

    cfg = shrink_config(CONFIGS / "demo" / "cd.yaml", tmp_path / "cd.yaml", tmp_path / "cd", dataset, steps=2,
                        model_args={"teacher_ckpt": str(edm_ensemble), **args}, keep_eval=False)
    _one_line_error(cli(["fit", "--config", str(cfg)]), *needles)
    assert not (tmp_path / "cd" / "checkpoints").exists()


def test_one_member_loads_from_an_ensemble_checkpoint(edm_ensemble, dataset, tmp_path):
    """load_actor / load_agent with member=k give member k (the solo net of its weights); without member, or with
    one out of range, a one-line CheckpointError says how many members the file holds."""
    import numpy as np

    from idql_cm import load_actor, load_agent
    from idql_cm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"holds 3 members \(num_seeds: 3\); pass member=k with k in 0\.\.2"):
        load_actor(edm_ensemble, device="cpu")
    with pytest.raises(CheckpointError, match="expected member in 0..2, found 3"):
        load_actor(edm_ensemble, device="cpu", member=3)
    ck = _state(edm_ensemble)
    obs = np.zeros((4, 17), dtype=np.float32)
    outs = []
    for k in range(S):
        policy = load_actor(edm_ensemble, device="cpu", member=k)
        net = policy.actor.model.net
        assert type(net).__name__ == "IDQLMlp"
        assert torch.equal(net.inp.weight, ck["state_dict"]["ema_model.net.inp.weight"][k])
        outs.append(policy.sample(obs, nfe=1, generator=torch.Generator().manual_seed(0)))
    assert not np.allclose(outs[0], outs[1])
    # an IQL ensemble pairs critic k with actor k
    iql = _fit("iql", dataset, tmp_path, "iql", SEED, 4, {"hidden_dim": 32, "num_seeds": S})
    iql_path = tmp_path / "iql" / "checkpoints" / "last.ckpt"
    agent = load_agent(edm_ensemble, iql_path, num_candidates=4, device="cpu", member=2)
    assert torch.equal(agent.critic.v.v[0].weight, iql["state_dict"]["v.v.0.weight"][2])
    with pytest.raises(CheckpointError, match="holds 3 members"):
        load_agent(edm_ensemble, iql_path, device="cpu")


def test_a_data_module_reused_after_an_ensemble_fit_draws_solo_batches_again(dataset, tmp_path):
    """The module sets the data module's member count on every setup, so a solo fit after an ensemble fit on the
    same TDDataModule draws [B, ...] batches again (it kept drawing [S, B, ...] before)."""
    import lightning as L

    from idql_cm.data.datamodule import TDDataModule
    from idql_cm.modules import IQLModule

    dm = TDDataModule(dataset=dataset, batch_size=16)
    for members in (S, 1):
        module = IQLModule(hidden_dim=16, num_seeds=members)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=dm)
        assert dm.num_seeds == members
        batch = next(iter(dm.train_dataloader()))
        assert batch["obs"].shape == ((S, 16, 17) if members > 1 else (16, 17))
