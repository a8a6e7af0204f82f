"""The benchmark's bare loop trains the math of the module it is timed against, with that module's hyperparameters.

Each module is built with values away from its defaults: the bare loop's loss on one batch must equal the module's
``loss_step`` with the same weights and the same noise, and its optimiser, schedule and EMA rates must be the
module's. A bare loop with its own constants (a discount of 0.99, CT's 10 / 1280 curriculum, ...) fails here.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bare import BareLoop, bare_hparams
from benchmarks.harness import ACT_DIM, OBS_DIM, synthetic_tensors
from idql_cm.modules import CDModule, CTModule, EDMModule, IQLModule

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
}
DEFAULTS = {"iql": lambda: IQLModule(hidden_dim=16), "edm": lambda: EDMModule(net=NET),
            "ct": lambda: CTModule(net=NET, total_steps=40)}


def _bare_and_module_losses(module) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = synthetic_tensors(64)
    bare = BareLoop(module, tensors, CFG, TOTAL)
    module.build(OBS_DIM, ACT_DIM)
    nets = ("q", "v", "q_target") if module.kind == "iql" else ("model", "ema_model")
    for name in nets:
        getattr(module, name).load_state_dict(getattr(bare, name).state_dict())
    batch = bare.batch()
    torch.manual_seed(1)
    bare_loss = bare.loss(batch)
    torch.manual_seed(1)
    module_loss = module.loss_step(batch)
    return bare_loss, module_loss


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bare_loss_is_the_modules_loss(kind):
    bare_loss, module_loss = _bare_and_module_losses(MODULES[kind]())
    assert torch.isfinite(module_loss)
    torch.testing.assert_close(bare_loss, module_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_hyperparameters_change_the_loss(kind):
    """The comparison above can fail: a bare loop built from the defaults computes another loss."""
    module = MODULES[kind]()
    module.build(OBS_DIM, ACT_DIM)
    bare = BareLoop(DEFAULTS[kind](), synthetic_tensors(64), CFG, TOTAL)
    for name in ("q", "v", "q_target") if kind == "iql" else ("model",):
        getattr(module, name).load_state_dict(getattr(bare, name).state_dict())
    batch = bare.batch()
    torch.manual_seed(1)
    default_loss = bare.loss(batch)
    torch.manual_seed(1)
    assert not torch.allclose(default_loss, module.loss_step(batch))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bare_update_uses_the_modules_optimiser_and_ema(kind):
    module = MODULES[kind]()
    bare = BareLoop(module, synthetic_tensors(64), CFG, TOTAL)
    group = bare.opt.param_groups[0]
    assert group["lr"] == module.lr
    if kind == "iql":
        assert type(bare.opt) is torch.optim.Adam and group["weight_decay"] == 0.0
        assert bare.hp["tau"] == module.tau == 0.05 and bare.hp["discount"] == 0.9
    else:
        assert type(bare.opt).__name__.lower() == module.opt_name and group["weight_decay"] == module.weight_decay
        for step in (0, 1, 10, 1000):
            assert bare.ema_rate(step) == module.ema_decay_at(step)
    assert (bare.sched is None) == (module.lr_schedule == "constant")


def test_reference_target_update_reaches_the_bare_loop():
    assert bare_hparams(IQLModule(target_update="reference"))["tau"] == 0.995


def test_cd_hyperparameters_are_the_modules():
    module = CDModule(teacher_ckpt="teacher.ckpt", solver="euler", distill_intervals=12, target_ema=0.5,
                      weighting="uniform", clip_student=True, ema_power=0.5, lr=1e-4)
    hp = bare_hparams(module)
    assert (hp["solver"], hp["distill_intervals"], hp["target_ema"], hp["weighting"], hp["clip_student"]) == (
        "euler", 12, 0.5, "uniform", True)
    assert hp["lr"] == 1e-4 and hp["lr_schedule"] == "constant" and hp["ema_warmup"]["power"] == 0.5
    assert hp["teacher_ckpt"] == "teacher.ckpt" and hp["method"] == module.method
