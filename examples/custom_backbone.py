"""A behaviour backbone of your own, outside the idql_cm package: a one-step Gaussian behaviour-cloning policy.

    a = clip(μ(s) + std · ε),  ε ~ N(0, I),  one network evaluation per action

μ is the project's residual MLP (``IDQLMlp``, fed zeros for the noisy action and a zero time input), trained by
regression onto the dataset's actions (the Gaussian likelihood at a fixed ``std``). It is far weaker than EDM / CD /
CT on multi-modal data (it averages the modes), which is why it makes a good example: nothing about it is special
to the package, and every command works with it because the three pieces below say all there is to say:

1. the model (a module whose parameters all live in ``self.net``, with ``act_dim``, ``x_min`` and ``x_max``:
   then ``num_seeds: S`` stacks it like the built-in backbones);
2. its LightningModule (``BehaviourModule`` brings the EMA, optimiser, checkpoint payload, seeding, ensembles and
   the non-finite guard and logging; you give ``kind``, ``wrap`` and ``loss``, a plain function of the batch, the
   step and the generator that the Trainer's step, the bare benchmark loop and tests call alike);
3. a ``BackboneSpec`` at module level: how to rebuild the model from a checkpoint and how to sample it.

A checkpoint records this module's class path; loading it later (``idql_cm.load_actor``, ``idql-cm export``,
``idql-cm validate``) imports this file again, so keep its folder on ``PYTHONPATH``::

    PYTHONPATH=examples idql-cm fit --config examples/custom_backbone.yaml --data.dataset data/demo_halfcheetah.hdf5
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from idql_cm.backbones import BackboneSpec
from idql_cm.checkpoint import load_weights
from idql_cm.errors import ConfigError
from idql_cm.modules.behaviour import BehaviourModule
from idql_cm.nets.mlp import IDQLMlp


class GaussianPolicy(nn.Module):
    """``a = clip(μ(s) + std·ε)``. Works on ``[B, ...]`` and, stacked, on ``[S, B, ...]`` inputs."""

    def __init__(self, net: nn.Module, std: float, x_min: float, x_max: float):
        super().__init__()
        self.net = net
        self.std = float(std)
        self.register_buffer("x_min", torch.as_tensor(x_min, dtype=torch.float32), persistent=False)
        self.register_buffer("x_max", torch.as_tensor(x_max, dtype=torch.float32), persistent=False)

    @property
    def act_dim(self) -> int:
        return self.net.act_dim

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        """``μ(s)``: ``obs [..., B, obs_dim]`` (normalised) → ``[..., B, act_dim]``."""
        x = obs.new_zeros(*obs.shape[:-1], self.act_dim)
        return self.net(x, obs.new_zeros(obs.shape[:-1]), obs)

    def clip(self, a: torch.Tensor) -> torch.Tensor:
        return torch.clamp(a, self.x_min, self.x_max)


def gaussian_sample(model: GaussianPolicy, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """One network evaluation: ``nfe`` must be 1. ``noise [1, B, act_dim]`` replaces the draw (replays, export)."""
    if nfe != 1:
        raise ConfigError(f"gaussian sampling: expected nfe 1 (a one-step policy), found nfe={nfe}")
    shape = (obs.shape[0], model.act_dim)
    if noise is not None and tuple(noise.shape) != (1, *shape):
        raise ConfigError(f"sampler noise: expected shape {[1, *shape]}, found {list(noise.shape)}")
    eps = torch.randn(shape, generator=generator, device=obs.device) if noise is None else noise[0]
    return model.clip(model.mean(obs) + model.std * eps)


class GaussianBC(BehaviourModule):
    """Behaviour cloning of a Gaussian policy with a fixed ``std`` (regression of its mean onto the actions)."""

    kind = "gauss"

    def __init__(self, std: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not std >= 0:
            raise ConfigError(f"model.std: expected a number >= 0, found {std}")
        self.std = float(std)
        self.save_hyperparameters()

    def wrap(self, net: nn.Module) -> GaussianPolicy:
        return GaussianPolicy(net, self.std, self.method["x_min"], self.method["x_max"])

    def payload(self) -> dict[str, Any]:
        return {**super().payload(), "std": self.std}

    def behaviour_loss(self, batch: dict[str, torch.Tensor], step: int, generator=None, stats: bool = False):
        """(loss, named scalars to log): no noise is drawn, so ``step`` and ``generator`` are unused."""
        err = (self.model.mean(batch["obs"]) - batch["act"]).pow(2).sum(-1)  # [B], or [S, B] with num_seeds: S
        return self.reduce(err), {}  # a scalar, or one loss per member


def rebuild(payload: dict[str, Any], state: dict[str, torch.Tensor] | None, where: str) -> GaussianPolicy:
    """The policy a checkpoint payload describes, with its EMA weights."""
    net = IDQLMlp(payload["obs_dim"], payload["act_dim"], **payload["net"])
    model = GaussianPolicy(net, payload["std"], payload["method"]["x_min"], payload["method"]["x_max"])
    if state is not None:
        load_weights(model, state, "ema_model.", where)
    return model


GAUSSIAN = BackboneSpec(kind="gauss", title="one-step Gaussian behaviour cloning (an example from outside idql_cm)",
                        module="custom_backbone.GaussianBC", rebuild=rebuild, sample=gaussian_sample,
                        config="examples/custom_backbone.yaml")
