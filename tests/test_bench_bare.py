"""The benchmark's bare loop runs the module's own update step, with that module's hyperparameters.

The bare loop (benchmarks/bare.py) calls ``module.loss`` / ``module.update_targets`` / ``configure_optimizers`` on a
copy of the module built without a Trainer. Checked here: N bare updates give the weights that the same updates
through the module's Trainer-free functions give by hand (so the bare side trains what the Lightning side trains);
the first loss equals the Lightning module's ``loss_step`` on the same batch and noise; the loss depends on the
hyperparameters (a bare loop with its own constants would fail); and the optimiser / EMA are the module's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.bare import BareLoop
from benchmarks.harness import ACT_DIM, OBS_DIM, synthetic_tensors
from idql_cm.modules import CTModule, EDMModule, IQLModule, MeanFlowModule

NET = {"hidden_dim": 16, "n_blocks": 1, "expand": 2}
CFG = {"batch_size": 8, "device": "cpu", "precision": "32-true"}
TOTAL = 50

# values away from every default the loss or the update depends on
MODULES = {
    "iql": lambda: IQLModule(hidden_dim=16, discount=0.9, expectile=0.85, tau=0.05, lr=1e-3, lr_schedule="constant"),
    "edm": lambda: EDMModule(net=NET, P_mean=-0.5, P_std=0.8, sigma_data=0.7, sigma_max=20.0, rho=5.0, lr=2e-4,
                             ema_power=0.5, ema_decay=0.99, optimizer="adamw", weight_decay=0.01),
    "ct": lambda: CTModule(net=NET, s0=4, s1=64, total_steps=40, P_mean=-0.8, P_std=1.5, huber_c=0.01,
                           fourier_scale=0.5, clip_student=True, sigma_max=40.0, ema_warmup=False, ema_decay=0.95),
    "meanflow": lambda: MeanFlowModule(net=NET, flow_share=0.6, P_mean_t=0.2, P_std_t=0.7, P_mean_r=-1.0,
                                       adaptive_p=0.5, lr=5e-4),
}
DEFAULTS = {"iql": lambda: IQLModule(hidden_dim=16), "edm": lambda: EDMModule(net=NET),
            "ct": lambda: CTModule(net=NET, total_steps=40), "meanflow": lambda: MeanFlowModule(net=NET)}


def _params(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.state_dict().values() if p.is_floating_point()])


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bare_updates_are_the_modules_update_step(kind):
    """Three bare updates == three updates written out with the module's own functions on the same batches."""
    bare = BareLoop(MODULES[kind](), synthetic_tensors(64), CFG, TOTAL)
    by_hand = copy.deepcopy(bare.module)
    opt = by_hand.configure_optimizers()
    hand_opt, hand_sched = (opt["optimizer"], opt["lr_scheduler"]) if isinstance(opt, dict) else (opt, None)
    for step in range(3):
        torch.manual_seed(100 + step)
        bare.step()  # draws its batch, then the loss's noise, from torch's generator
        torch.manual_seed(100 + step)
        loss, _ = by_hand.loss(bare.batch(), step, None)
        hand_opt.zero_grad(set_to_none=True)
        loss.backward()
        hand_opt.step()
        by_hand.update_targets(step)
        if hand_sched is not None:
            hand_sched.step()
    torch.testing.assert_close(_params(bare.module), _params(by_hand), rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bare_loss_is_the_lightning_modules_loss_step(kind):
    module = MODULES[kind]()
    bare = BareLoop(module, synthetic_tensors(64), CFG, TOTAL)
    module.init_nets(OBS_DIM, ACT_DIM, torch.zeros(OBS_DIM), torch.ones(OBS_DIM), {})
    module.load_state_dict(bare.module.state_dict())
    batch = bare.batch()
    torch.manual_seed(1)
    bare_loss = bare.loss(batch)
    torch.manual_seed(1)
    module_loss = module.loss_step(batch)  # the Trainer's path (no Trainer: step 0, no logging)
    assert torch.isfinite(module_loss)
    torch.testing.assert_close(bare_loss, module_loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_hyperparameters_change_the_loss(kind):
    """The comparison above can fail: the module at its defaults computes another loss with the same weights."""
    tuned = BareLoop(MODULES[kind](), synthetic_tensors(64), CFG, TOTAL)
    default = BareLoop(DEFAULTS[kind](), synthetic_tensors(64), CFG, TOTAL)
    default.module.load_state_dict(tuned.module.state_dict(), strict=False)
    batch = tuned.batch()
    torch.manual_seed(1)
    a = tuned.loss(batch)
    torch.manual_seed(1)
    assert not torch.allclose(a, default.loss(batch))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bare_update_uses_the_modules_optimiser_and_ema(kind):
    module = MODULES[kind]()
    bare = BareLoop(module, synthetic_tensors(64), CFG, TOTAL)
    group = bare.opt.param_groups[0]
    assert group["lr"] == module.lr
    if kind == "iql":
        assert type(bare.opt) is torch.optim.Adam and group["weight_decay"] == 0.0
        assert bare.module.tau == 0.05 and bare.module.discount == 0.9
    else:
        assert type(bare.opt).__name__.lower() == module.opt_name and group["weight_decay"] == module.weight_decay
    assert (bare.sched is None) == (module.lr_schedule == "constant")
