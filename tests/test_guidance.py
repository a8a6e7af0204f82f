"""Critic guidance (``q_weight``) and advantage weighting (``advantage_beta``): the loss and the resampling by
hand, the refusals, η = β = 0 bit for bit, and what they are for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idql_cm.data.toys import RADIUS, TOYS, write_toy_dataset
from idql_cm.modules.guidance import MAX_ADVANTAGE_WEIGHT, advantage_resample, check_q_weight, guidance_loss
from idql_cm.nets.ensemble import MemberGenerators
from tests.cli_utils import CONFIGS, shrink_config


def test_the_guidance_term_matches_a_hand_computation():
    # Q = [1, -3]: mean Q = -1, mean |Q| = 2, so -η · mean Q / mean |Q| = 2 · 1 / 2 = 1 for η = 2
    q = torch.tensor([[1.0], [-3.0]], requires_grad=True)
    term, q_mean = guidance_loss(q, 2.0)
    assert term.item() == pytest.approx(1.0) and q_mean.item() == pytest.approx(-1.0)
    term.backward()
    # the scale is under stop-gradient: dterm/dQ_i = -η / (B · mean |Q|) = -2 / (2 · 2)
    assert torch.allclose(q.grad, torch.full_like(q, -0.5))


def test_members_are_scaled_each_by_their_own_mean_abs_q():
    q = torch.tensor([[[1.0], [3.0]], [[-10.0], [-30.0]]])  # [S=2, B=2, 1]
    term, q_mean = guidance_loss(q, 1.0, num_seeds=2)
    assert term.shape == (2,)
    assert torch.allclose(term, torch.tensor([-1.0, 1.0])) and torch.allclose(q_mean, torch.tensor([2.0, -20.0]))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "strong"])
def test_a_q_weight_that_is_not_a_finite_number_at_least_zero_is_refused(bad):
    with pytest.raises(Exception, match="model.q_weight: expected a finite number >= 0"):
        check_q_weight(bad)
    with pytest.raises(Exception, match="model.advantage_beta: expected a finite number >= 0"):
        check_q_weight(bad, "advantage_beta")


def test_advantage_resampling_draws_rows_by_their_clipped_weights():
    # A = [0, ln 2, ln 3, 10] at β = 1: weights 1, 2, 3 and exp(10) clipped to 100 (shares 1 : 2 : 3 : 100 of 106)
    adv = torch.tensor([[0.0], [np.log(2.0)], [np.log(3.0)], [10.0]])
    rows = torch.arange(4.0)[:, None]
    batch = {"obs": rows.repeat(1, 3), "act": rows.repeat(1, 2) + 0.5, "rew": rows[:, 0]}
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        out, share = advantage_resample(batch, adv, 1.0, g)
        assert torch.equal(out["act"][:, 0] - 0.5, out["obs"][:, 0]) and torch.equal(out["rew"], out["obs"][:, 0])
        counts += torch.bincount(out["obs"][:, 0].long(), minlength=4)
    want = torch.tensor([1.0, 2.0, 3.0, MAX_ADVANTAGE_WEIGHT]) / 106.0
    assert torch.allclose(counts / counts.sum(), want, atol=0.004), counts / counts.sum()
    # the effective share (Σw)² / (B Σw²) by hand: 106² / (4 · (1 + 4 + 9 + 10000))
    assert share.item() == pytest.approx(106.0**2 / (4 * 10014.0))


def test_each_member_resamples_its_own_rows_with_its_own_generator():
    adv = torch.tensor([[[5.0], [-5.0]], [[-5.0], [5.0]]])  # [S=2, B=2, 1]: member 0 favours row 0, member 1 row 1
    batch = {"obs": torch.tensor([[[0.0], [1.0]], [[10.0], [11.0]]])}
    out, share = advantage_resample(batch, adv, 2.0, MemberGenerators(2).seed_([0, 1]))
    assert out["obs"].shape == (2, 2, 1) and share.shape == (2,)
    assert set(out["obs"][0].flatten().tolist()) <= {0.0, 1.0} and set(out["obs"][1].flatten().tolist()) <= {10.0, 11.0}
    # member k draws what a solo run seeded like generator k draws from member k's rows
    solo, _ = advantage_resample({"obs": batch["obs"][1]}, adv[1], 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(out["obs"][1], solo["obs"])


# ----------------------------------------------------------------------------------------------- the paid toy
#: the demo's batch, rewards as written (Q = r on this bandit) and periods that let fused_steps 8 fuse
FAST = ["--data.reward_scale", "none", "--data.batch_size", "256", "--trainer.log_every_n_steps", "400"]

@pytest.fixture(scope="module")
def paid(tmp_path_factory):
    """The paid toy (two modes per condition, the reward pays one) and an IQL critic of it, trained by the CLI."""
    from idql_cm.cli import main

    root = tmp_path_factory.mktemp("paid")
    data = write_toy_dataset(root / "paid.hdf5", TOYS["paid"], transitions=6000, seed=0)
    # 2000 steps: a critic of 800 steps still rises past the paid mode to the action bound, and the guided policy
    # follows it out of the data at every q_weight down to 0.03 (docs/quality.md); 2000 steps peak it on the mode
    cfg = shrink_config(CONFIGS / "demo" / "iql.yaml", root / "iql.yaml", root / "iql", str(data), steps=2000,
                        keep_eval=False)
    assert main(["fit", "--config", str(cfg), *FAST]) == 0
    return data, root / "iql" / "checkpoints" / "last.ckpt", root


def _fit(paid, stage: str, name: str, steps: int, **model_args) -> str:
    from idql_cm.cli import main

    data, _, root = paid
    cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", root / f"{name}.yaml", root / name, str(data), steps=steps,
                        keep_eval=False, model_args=model_args)
    assert main(["fit", "--config", str(cfg), *FAST]) == 0
    return str(root / name / "checkpoints" / "last.ckpt")


def _paid_share(ckpt: str) -> tuple[float, float]:
    """Share of one-sample-per-state NFE-1 actions within 0.15 of the paid mode, and within 0.15 of any mode."""
    from idql_cm import load_actor

    toy, policy, g = TOYS["paid"], load_actor(ckpt, device="cpu"), torch.Generator().manual_seed(0)
    paid_hits, any_hits = [], []
    for c in range(toy.obs_dim):
        act = policy.sample(torch.from_numpy(toy.obs(c, 1000)), nfe=1, generator=g).numpy()
        d = np.linalg.norm(act[:, None] - toy.centres(c)[None], axis=-1)
        paid_hits.append(d[:, toy.paid[c]] < RADIUS)
        any_hits.append(d.min(1) < RADIUS)
    return float(np.mean(paid_hits)), float(np.mean(any_hits))


#: the demo CT's network at half its width: the same verdict as the shipped width (measured: unguided 0.41 paid /
#: 0.81 on a mode, guided 0.97), in two thirds of the time; the critic keeps the demo's width (at 64 or 128 the
#: guided policy follows it off the data: 0.14 / 0.90)
HALF_NET = {"hidden_dim": 64, "n_blocks": 2, "expand": 4, "dropout": 0.0}


def test_the_guided_one_step_policy_takes_the_paid_mode_and_the_unguided_one_splits(paid):
    critic = str(paid[1])
    plain = _paid_share(_fit(paid, "ct", "ct_plain", 800, net=HALF_NET))
    guided = _paid_share(_fit(paid, "ct", "ct_guided", 800, net=HALF_NET, q_weight=1.0, critic_ckpt=critic))
    weighted = _paid_share(_fit(paid, "ct", "ct_weighted", 800, net=HALF_NET, advantage_beta=10.0,
                                critic_ckpt=critic))
    # unguided: both modes drawn (neither below a fifth of the samples), guided: the paid one, inside the data;
    # advantage-weighted (the data resampled towards the paid mode, Q never asked off the data): the same
    assert 0.2 < plain[0] < 0.8 and plain[1] - plain[0] > 0.2, plain
    assert guided[0] >= 0.9, guided
    assert weighted[0] >= 0.9, weighted
    payload = torch.load(paid[2] / "ct_guided" / "checkpoints" / "last.ckpt", weights_only=False)["idql_cm"]
    assert payload["q_weight"] == 1.0 and payload["critic_ckpt"] == critic and len(payload["critic_sha256"]) == 64

    # exported without a critic: one candidate, no critic at decision time, the same actions (real onnxruntime)
    from idql_cm import load_actor, load_exported
    from idql_cm.cli import main

    out = paid[2] / "guided.onnx"
    assert main(["export", "--actor", str(paid[2] / "ct_guided" / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    exported = load_exported(out)
    assert exported.metadata["candidates"] == 1 and exported.metadata["q_weight"] == 1.0
    assert exported.metadata["critic_ckpt"] is None
    obs = TOYS["paid"].obs(0, 4)
    noise = np.random.default_rng(0).standard_normal((1, 4, 1, 2)).astype(np.float32)
    want = load_actor(str(paid[2] / "ct_guided" / "checkpoints" / "last.ckpt"), device="cpu").sample(
        obs, nfe=1, noise=noise[:, :, 0])
    assert np.abs(exported.act(obs, noise=noise) - want).max() <= 1e-4


def test_q_weight_zero_reproduces_the_unguided_backbone_bit_for_bit(paid):
    a = torch.load(_fit(paid, "ct", "ct_default", 16), weights_only=False)["state_dict"]
    b = torch.load(_fit(paid, "ct", "ct_q0", 16, q_weight=0.0, critic_ckpt=str(paid[1])),
                   weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and a guided run does change the weights (the comparison above could fail)
    c = torch.load(_fit(paid, "ct", "ct_q1", 16, q_weight=1.0, critic_ckpt=str(paid[1])),
                   weights_only=False)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not any(k.startswith("guidance") for k in c)  # the critic is not saved in the policy's checkpoint
    # advantage weighting: β = 0 the same, β > 0 different, neither Q nor V saved
    d = torch.load(_fit(paid, "ct", "ct_b0", 16, advantage_beta=0.0, critic_ckpt=str(paid[1])),
                   weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], d[k]) for k in a)
    e = torch.load(_fit(paid, "ct", "ct_b3", 16, advantage_beta=3.0, critic_ckpt=str(paid[1])), weights_only=False)
    assert not all(torch.equal(a[k], e["state_dict"][k]) for k in a)
    assert list(e["state_dict"]) == list(a) and e["idql_cm"]["advantage_beta"] == 3.0


def test_two_members_are_guided_by_a_solo_critic(paid):
    ckpt = _fit(paid, "meanflow", "mf_two", 16, q_weight=1.0, critic_ckpt=str(paid[1]), num_seeds=2)
    assert torch.load(ckpt, weights_only=False)["idql_cm"]["num_seeds"] == 2
    ckpt = _fit(paid, "edm", "edm_two_weighted", 16, advantage_beta=3.0, critic_ckpt=str(paid[1]), num_seeds=2)
    assert torch.load(ckpt, weights_only=False)["idql_cm"]["advantage_beta"] == 3.0


# ----------------------------------------------------------------------------------------------- refusals
def _refusal(capsys, args: list[str]) -> str:
    import os

    from idql_cm.cli import main

    os.environ.pop("IDQL_CM_DEBUG", None)  # the one-line form (the debug form adds a traceback)
    capsys.readouterr()
    assert main(args) != 0
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("idql-cm: error:")]
    assert len(err) == 1, err
    return err[0]


def test_guidance_is_refused_for_a_backbone_without_a_one_step_map(paid, tmp_path, capsys):
    cfg = shrink_config(CONFIGS / "demo" / "edm.yaml", tmp_path / "edm.yaml", tmp_path / "edm", str(paid[0]),
                        keep_eval=False)
    line = _refusal(capsys, ["fit", "--config", str(cfg), "--model.init_args.q_weight", "1"])
    assert "model.q_weight" in line and "edm backbone has none" in line
    assert not (tmp_path / "edm").exists()


def test_a_missing_or_wrong_guiding_critic_is_refused_before_training(paid, tmp_path, capsys):
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct", str(paid[0]),
                        keep_eval=False)
    line = _refusal(capsys, ["fit", "--config", str(cfg), "--model.init_args.q_weight", "1"])
    assert "model.critic_ckpt" in line and "needs an IQL checkpoint" in line
    missing = str(tmp_path / "nowhere.ckpt")
    line = _refusal(capsys, ["fit", "--config", str(cfg), "--model.init_args.q_weight", "1",
                             "--model.init_args.critic_ckpt", missing])
    assert missing in line
    ct = _fit(paid, "ct", "ct_for_refusal", 2)
    line = _refusal(capsys, ["fit", "--config", str(cfg), "--model.init_args.q_weight", "1",
                             "--model.init_args.critic_ckpt", ct])
    assert "model.critic_ckpt" in line and "iql" in line
    assert not (tmp_path / "ct" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- evaluation
def test_a_guided_policy_is_evaluated_alone_and_re_ranked_and_reported_as_such(tmp_path, capsys):
    from idql_cm.cli import main
    from idql_cm.data.synthetic import write_d4rl_file

    data = str(write_d4rl_file(tmp_path / "cheetah.hdf5", n_episodes=2, episode_len=40, env_id="HalfCheetah-v5"))
    iql = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / "iql.yaml", tmp_path / "iql", data, steps=2)
    assert main(["fit", "--config", str(iql)]) == 0
    critic = str(tmp_path / "iql" / "checkpoints" / "last.ckpt")
    ct = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct", data, steps=2,
                       eval_args={"nfe": [1], "critic_ckpt": critic})
    # no model.critic_ckpt: the guided policy takes the evaluation's critic
    assert main(["fit", "--config", str(ct), "--model.init_args.q_weight", "0.5", "--eval.one_candidate", "true"]) == 0
    ranked = json.loads((tmp_path / "ct" / "eval_report.json").read_text())
    alone = json.loads((tmp_path / "ct" / "eval_report_n1.json").read_text())
    assert ranked["q_weight"] == alone["q_weight"] == 0.5
    assert ranked["idql"] and ranked["num_candidates"] == 4
    assert not alone["idql"] and alone["num_candidates"] is None and alone["critic"] is None
    payload = torch.load(tmp_path / "ct" / "checkpoints" / "last.ckpt", weights_only=False)["idql_cm"]
    assert payload["critic_ckpt"] == critic
    capsys.readouterr()
    assert main(["report", str(tmp_path / "ct")]) == 0
    table = capsys.readouterr().out
    assert "CT η=0.5 (N=1)" in table and "CT η=0.5 " in table.replace("CT η=0.5 (N=1)", "")


def test_a_guided_fine_tuning_stage_starts_from_a_trained_policy_of_its_backbone(paid, tmp_path, capsys):
    """``init_from`` a trained MeanFlow: with lr 0 the online and EMA networks stay the source's EMA network; the
    checkpoint records the source; another backbone's checkpoint is refused in one line before any work."""
    src = _fit(paid, "meanflow", "mf_source", 16)
    tuned = _fit(paid, "meanflow", "mf_tuned", 8, init_from=src, q_weight=1.0, critic_ckpt=str(paid[1]), lr=0.0)
    a = torch.load(src, weights_only=False)
    b = torch.load(tuned, weights_only=False)
    for name in ("model", "ema_model"):
        keys = [k for k in b["state_dict"] if k.startswith(f"{name}.net.")]
        assert keys and all(torch.equal(b["state_dict"][k], a["state_dict"][f"ema_model.net.{k[len(name) + 5:]}"])
                            for k in keys)
    assert b["idql_cm"]["init_from"] == src and b["idql_cm"]["q_weight"] == 1.0
    cfg = shrink_config(CONFIGS / "demo" / "meanflow.yaml", tmp_path / "mf.yaml", tmp_path / "mf", str(paid[0]),
                        keep_eval=False, model_args={"init_from": str(paid[1])})
    line = _refusal(capsys, ["fit", "--config", str(cfg)])
    assert "model.init_from" in line and "'meanflow'" in line and "'iql'" in line
    assert not (tmp_path / "mf" / "checkpoints").exists()


def test_report_columns_name_the_training_knob_and_whether_the_critic_picked():
    from idql_cm.eval.report import _column

    assert _column({"backbone": "ct", "idql": False, "advantage_beta": 3.0}) == "CT β=3 (N=1)"
    assert _column({"backbone": "ct", "idql": True, "advantage_beta": 3.0}) == "CT β=3"
    assert _column({"backbone": "cd", "idql": True, "q_weight": 0.5}) == "CD η=0.5"
    assert _column({"backbone": "edm", "idql": False}) == "EDM (BC)"
