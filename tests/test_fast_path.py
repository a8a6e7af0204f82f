"""The opt-in fast path (`model.init_args.compile: true`, torch.compile of the trained nets) trains to the same
weights as the eager path, which stays the reference. Dropout 0 here: compiled and eager code draw dropout
masks from different random streams, so with dropout they agree in distribution, not bit for bit."""

from __future__ import annotations

import pytest
import torch

from idql_cm.cli import main
from tests.cli_utils import CONFIGS, shrink_config
from idql_cm.data.synthetic import write_d4rl_file


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["edm", "ct", "iql"])
def test_compiled_training_matches_eager(stage, tmp_path):
    data = str(write_d4rl_file(tmp_path / "d.hdf5", n_episodes=2, episode_len=100, obs_dim=17, act_dim=6))
    small = ({"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.0}} if stage in ("edm", "ct")
             else {"hidden_dim": 32})
    if stage == "ct":
        small.update(total_steps=5, s0=2, s1=8)
    finals = {}
    from torch._dynamo.utils import counters

    for compiled in (False, True):
        counters.clear()
        root = tmp_path / f"run_{compiled}"
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"{compiled}.yaml", root, data, steps=5,
                            model_args={**small, "compile": compiled}, keep_eval=False)
        assert main(["fit", "--config", str(cfg)]) == 0
        # the compiled run really went through torch.compile (and the eager one did not)
        assert (sum(counters["stats"].values()) > 0) == compiled, dict(counters["stats"])
        finals[compiled] = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu",
                                      weights_only=False)["state_dict"]
    assert finals[False].keys() == finals[True].keys()
    moved = 0
    for k, eager in finals[False].items():
        torch.testing.assert_close(finals[True][k], eager, rtol=1e-4, atol=1e-5, msg=k)
        moved += 1
    assert moved > 0
