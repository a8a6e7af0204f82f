"""The IQL critic trains, and every advantage used for selection is computed, in fp32 whatever the precision.

Q and V sit near 85-95 with the locomotion reward scaling, where bf16 values are 0.5 apart, while softmax selection
at temperature 100-400 reacts to advantage differences of 0.0025-0.01: under bf16 autocast the ranking would be
noise. On CPU, Lightning's ``bf16-mixed`` runs the same torch.autocast as on CUDA, so the check runs here.
"""

from __future__ import annotations

import torch

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, shrink_config


def _fit_iql(tmp_path, dataset: str, precision: str) -> dict:
    root = tmp_path / precision
    cfg = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / f"iql-{precision}.yaml", root, dataset, steps=6,
                        model_args={"fused_steps": 1})
    assert main(["fit", "--config", str(cfg), "--trainer.precision", precision]) == 0
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_iql_under_bf16_mixed_matches_fp32(tmp_path):
    dataset = str(write_d4rl_file(tmp_path / "d.hdf5", n_episodes=3, episode_len=100, obs_dim=17, act_dim=6))
    fp32, bf16 = _fit_iql(tmp_path, dataset, "32-true"), _fit_iql(tmp_path, dataset, "bf16-mixed")
    assert fp32["global_step"] == bf16["global_step"] == 6
    for key, value in fp32["state_dict"].items():
        assert torch.equal(value, bf16["state_dict"][key]), key


def test_advantage_is_fp32_under_autocast(tmp_path):
    from idql_cm.nets.critics import TwinQ, ValueNet
    from idql_cm.policies import Critic

    torch.manual_seed(0)
    critic = Critic(TwinQ(3, 2, 32).eval(), ValueNet(3, 32).eval(), torch.zeros(3), torch.ones(3), act_dim=2)
    obs, act = torch.randn(64, 3), (torch.rand(64, 2) * 2 - 1).bfloat16()  # e.g. candidates of a bf16 actor
    want = critic.advantage(obs, act.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = critic.advantage(obs, act)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
