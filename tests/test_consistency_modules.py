"""CT / CD modules: CD's target network and evaluation EMA, and the σ-grid a consistency checkpoint samples on."""

from __future__ import annotations

import pytest
import torch

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from idql_cm.diffusion import karras_sigmas
from idql_cm.nets.ema import EMAWarmup
from tests.cli_utils import CONFIGS, shrink_config

SMALL_NET = {"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.0}}


@pytest.fixture(scope="module")
def data_and_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cm")
    dataset = str(write_d4rl_file(tmp / "d.hdf5", n_episodes=3, episode_len=100, obs_dim=17, act_dim=6))
    cfg = shrink_config(CONFIGS / "demo" / "edm.yaml", tmp / "edm.yaml", tmp / "edm", dataset, steps=3,
                        model_args=SMALL_NET, keep_eval=False)
    assert main(["fit", "--config", str(cfg)]) == 0
    return dataset, tmp / "edm" / "checkpoints" / "last.ckpt"


def _fit(stage: str, tmp_path, dataset: str, steps: int, name: str, **model_args) -> dict:
    cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"{name}.yaml", tmp_path / name, dataset,
                        steps=steps, model_args={"fused_steps": 1, **model_args}, keep_eval=False)
    assert main(["fit", "--config", str(cfg)]) == 0
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_cd_target_follows_the_online_weights_and_the_policy_ema_restarts(data_and_teacher, tmp_path, mu):
    """The consistency loss's target θ⁻ ← μ·θ⁻ + (1 − μ)·θ starts from the teacher's online weights; the policy
    EMA is a separate network with the warm-up, so at update 0 it copies the online weights (the teacher's EMA, a
    denoiser, is not averaged into the policy)."""
    dataset, teacher = data_and_teacher
    teacher_state = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    runs = {k: _fit("cd", tmp_path, dataset, k, f"cd{k}", teacher_ckpt=str(teacher), target_ema=mu)["state_dict"]
            for k in (1, 2)}
    online = {k: _part(runs[k], "model.") for k in runs}
    target = {k: _part(runs[k], "target_model.") for k in runs}
    ema = {k: _part(runs[k], "ema_model.") for k in runs}
    start = _part(teacher_state, "model.")  # CD starts from the teacher's online weights
    decay1 = EMAWarmup(power=2 / 3, max_value=0.999).decay(1)
    assert online[1].keys() == target[1].keys() == ema[1].keys()
    for key in online[1]:
        if key.endswith("freqs"):  # a fixed buffer, copied
            continue
        torch.testing.assert_close(target[1][key], mu * start[key] + (1 - mu) * online[1][key], atol=1e-6, rtol=0)
        torch.testing.assert_close(target[2][key], mu * target[1][key] + (1 - mu) * online[2][key], atol=1e-6,
                                   rtol=0)
        assert torch.equal(ema[1][key], online[1][key]), key
        torch.testing.assert_close(ema[2][key], decay1 * ema[1][key] + (1 - decay1) * online[2][key], atol=1e-6,
                                   rtol=0)
    assert not torch.equal(online[1]["net.inp.weight"], start["net.inp.weight"])  # it trained


def test_cd_single_ema_is_the_reference_layout(data_and_teacher, tmp_path):
    """``target_ema: null``: no separate target; ``ema_warmup: false``: the EMA starts from the teacher's EMA at a
    constant rate (the reference's CD, kept for parity runs)."""
    dataset, teacher = data_and_teacher
    teacher_ema = _part(torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"], "ema_model.")
    state = _fit("cd", tmp_path, dataset, 1, "ref", teacher_ckpt=str(teacher), target_ema=None,
                 ema_warmup=False)["state_dict"]
    assert not _part(state, "target_model.")
    online, ema = _part(state, "model."), _part(state, "ema_model.")
    for key in ("net.inp.weight", "net.out.1.bias"):
        torch.testing.assert_close(ema[key], 0.999 * teacher_ema[key] + 0.001 * online[key], atol=1e-6, rtol=0)


def test_consistency_checkpoints_sample_on_their_training_grid(data_and_teacher, tmp_path):
    """A CD checkpoint records its 18-interval grid and a CT one its last curriculum grid; ``actor_from_checkpoint`` and the
    training module's ``eval_actor`` re-noise on it (``renoise: karras`` turns it off)."""
    from idql_cm.policies import actor_from_checkpoint

    dataset, teacher = data_and_teacher
    cd = _fit("cd", tmp_path, dataset, 2, "cdg", teacher_ckpt=str(teacher))
    assert cd["idql_cm"]["renoise"] == "train_grid" and cd["idql_cm"]["train_intervals"] == 18
    torch.testing.assert_close(actor_from_checkpoint(str(tmp_path / "cdg" / "checkpoints" / "last.ckpt"), "cpu").options["train_grid"],
                               karras_sigmas(18))
    ct = _fit("ct", tmp_path, dataset, 4, "ctg", **SMALL_NET, total_steps=4, s0=2, s1=8)
    # K' = ⌊4 / (log2(8/2) + 1)⌋ = 1, so the last update (k = 3) used N = min(2·2³, 8) = 8 intervals
    assert ct["idql_cm"]["train_intervals"] == 8
    off = _fit("cd", tmp_path, dataset, 1, "cdk", teacher_ckpt=str(teacher), renoise="karras")
    assert actor_from_checkpoint(str(tmp_path / "cdk" / "checkpoints" / "last.ckpt"), "cpu").options["train_grid"] is None
    assert off["idql_cm"]["renoise"] == "karras"



def test_ct_init_from_edm_starts_from_its_ema_network(data_and_teacher, tmp_path, cli):
    """``init_from`` (ECT): with lr 0 the CT's online and EMA networks stay what they started as, which must be the
    EDM's EMA network (its architecture, Fourier scale included), and the checkpoint records where they came from; a
    CT from scratch starts elsewhere. A critic checkpoint as ``init_from`` is refused in one line before any work."""
    from idql_cm.fileio import file_sha256

    dataset, teacher = data_and_teacher
    edm = torch.load(teacher, map_location="cpu", weights_only=False)
    ct = _fit("ct", tmp_path, dataset, 2, "ect", init_from=str(teacher), lr=0.0, total_steps=2, s0=2, s1=8)
    start = _part(edm["state_dict"], "ema_model.net.")
    for prefix in ("model.net.", "ema_model.net."):
        mine = _part(ct["state_dict"], prefix)
        assert mine.keys() == start.keys()
        for key in start:
            assert torch.equal(mine[key], start[key]), (prefix, key)
    payload = ct["idql_cm"]
    assert payload["init_sha256"] == file_sha256(str(teacher)) and payload["net"] == edm["idql_cm"]["net"]
    scratch = _fit("ct", tmp_path, dataset, 2, "scratch", lr=0.0, total_steps=2, s0=2, s1=8, **SMALL_NET)
    assert not torch.equal(_part(scratch["state_dict"], "model.net.")["inp.weight"], start["inp.weight"])

    critic = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / "iql.yaml", tmp_path / "iql", dataset, steps=2,
                           model_args={"hidden_dim": 16}, keep_eval=False)
    assert main(["fit", "--config", str(critic)]) == 0
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "bad.yaml", tmp_path / "bad", dataset, steps=2,
                        keep_eval=False, model_args={"init_from": str(tmp_path / "iql" / "checkpoints" / "last.ckpt")})
    proc = cli(["fit", "--config", str(cfg)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.init_from" in line and "'edm'" in line and "'iql'" in line, line
    assert not (tmp_path / "bad").exists()


def test_ct_init_from_an_edm_ensemble_takes_member_k_from_member_k(data_and_teacher, tmp_path, cli):
    dataset, _ = data_and_teacher
    edm = _fit("edm", tmp_path, dataset, 2, "edm2", num_seeds=2, **SMALL_NET)
    path = str(tmp_path / "edm2" / "checkpoints" / "last.ckpt")
    ct = _fit("ct", tmp_path, dataset, 2, "ect2", init_from=path, lr=0.0, total_steps=2, s0=2, s1=8, num_seeds=2)
    start, mine = _part(edm["state_dict"], "ema_model.net."), _part(ct["state_dict"], "ema_model.net.")
    assert all(torch.equal(mine[k], start[k]) for k in start)  # [2, ...] each: member k from member k
    assert not torch.equal(start["inp.weight"][0], start["inp.weight"][1])
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "solo.yaml", tmp_path / "solo", dataset, steps=2,
                        keep_eval=False, model_args={"init_from": path})
    proc = cli(["fit", "--config", str(cfg)])
    assert proc.returncode == 2 and "holds 2 member(s)" in proc.stderr.strip().splitlines()[-1]
