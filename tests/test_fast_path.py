"""The opt-in fast path (`model.init_args.compile: true`, torch.compile of the trained nets) trains to the same
weights as the eager path, which stays the reference. Dropout 0 here: compiled and eager code draw dropout
masks from different random streams, so with dropout they agree in distribution, not bit for bit."""

from __future__ import annotations

import pytest
import torch

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, shrink_config


# One behaviour module and the critic: compiling is the same code for every module (IDQLModule.setup compiles
# trained_nets()), and EDM's compile took 40 s of the suite without covering anything CT's does not.
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ct", "iql"])
def test_compiled_training_matches_eager(stage, tmp_path):
    data = str(write_d4rl_file(tmp_path / "d.hdf5", n_episodes=2, episode_len=100, obs_dim=17, act_dim=6))
    small = ({"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.0}} if stage in ("edm", "ct")
             else {"hidden_dim": 32})
    if stage == "ct":
        small.update(total_steps=5, s0=2, s1=8)
    from torch._dynamo.utils import counters

    def fit(name: str, **model_args) -> dict[str, torch.Tensor]:
        root = tmp_path / name
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"{name}.yaml", root, data, steps=5,
                            model_args={**small, **model_args}, keep_eval=False)
        assert main(["fit", "--config", str(cfg)]) == 0
        return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    # lr 0: the weights both runs start from (Adam moves nothing, so neither do the EMA and the target nets)
    start = fit("start", compile=False, lr=0.0)
    finals = {}
    for compiled in (False, True):
        counters.clear()
        finals[compiled] = fit(f"run_{compiled}", compile=compiled, lr=LR)
        # the compiled run really went through torch.compile (and the eager one did not)
        assert (sum(counters["stats"].values()) > 0) == compiled, dict(counters["stats"])
    assert finals[False].keys() == finals[True].keys() == start.keys()
    trained = [k for k in start if k.startswith(("model.", "q.", "v.")) and start[k].is_floating_point()
               and not k.endswith(".freqs")]  # (the Fourier features' fixed frequencies: a buffer)
    assert trained
    for k, eager in finals[False].items():
        torch.testing.assert_close(finals[True][k], eager, rtol=1e-4, atol=1e-5, msg=k)
    # both paths move the trained weights, and by the same amount: equal weights alone would also hold for an lr
    # of 0 or a training step that did nothing
    moved = {c: torch.stack([(finals[c][k] - start[k]).abs().sum() for k in trained]) for c in (False, True)}
    torch.testing.assert_close(moved[True], moved[False], rtol=1e-3, atol=1e-6)
    still = [k for k, m in zip(trained, moved[False].tolist(), strict=True) if not m > 0]
    assert not still, f"trained weights that did not move in 5 steps: {still}"


LR = 1e-3  # the runs' learning rate (at 0 the movement check fails, as it must)
