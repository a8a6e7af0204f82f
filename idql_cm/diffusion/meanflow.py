"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447) as a policy.

The path is the linear interpolation ``z_t = (1 − t)·x + t·ε`` (t = 0 the data action, t = 1 noise) with
instantaneous velocity ``v = ε − x``. The network predicts the **average velocity** over ``[r, t]``,

    u(z_t, r, t | s) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ,

so that one step jumps from ``t`` to ``r``: ``z_r = z_t − (t − r)·u(z_t, r, t)``. Training uses the MeanFlow
identity (the paper's eq. 6) ``u = v − (t − r)·du/dt`` with the total derivative ``du/dt = v·∂_z u + ∂_t u``, one
Jacobian-vector product of ``u_θ`` along the tangent ``(v, 0, 1)`` in ``(z, r, t)``, under stop-gradient:

    L = w · ‖u_θ(z_t, r, t) − sg(v − (t − r)·JVP)‖²,   w = 1 / sg(‖Δ‖² + c)^p        (paper eq. 9-10, §4.3)

A share of each batch has ``r = t`` (the JVP term vanishes: plain flow matching, the anchor the long jumps are
built from). Checked against the paper and the authors' PyTorch code (Gsunshine/py-meanflow,
``meanflow/models/meanflow.py`` and ``time_sampler.py``): (t, r) from the code's sampler (:func:`sample_t_r`); the
network sees ``(t, t − r)``; the adaptive weight divides the per-sample squared error summed over dimensions.
"""

from __future__ import annotations

import torch
from torch import nn

from idql_cm.diffusion.edm import _randn, batch_mean, check_noise, stacked
from idql_cm.errors import ConfigError

#: the width of the fixed sinusoidal features of the interval length h = t − r fed beside the observation
H_FEATURES = 16


def interval_features(h: torch.Tensor) -> torch.Tensor:
    """Fixed (parameter-free) features of ``h = t − r`` ∈ [0, 1]: the positional embedding of the authors' code,
    ``[cos(f h), sin(f h)]`` with ``f = 10000^(−k/7)``, k = 0..7 (phases of at most 1 rad); ``[..., B]`` →
    ``[..., B, H_FEATURES]``. Parameter-free so that the model's parameters all live in its network (stackable for
    ``num_seeds``), and low-frequency on purpose: the JVP differentiates them, and features oscillating over [0, 1]
    (we first tried cos / sin(π·2^k·h), k = 0..7) made ``du/dt`` huge and the targets garbage (toy precision at
    NFE 2: 0.001 against 0.988 with these; docs/quality.md)."""
    n = H_FEATURES // 2
    freqs = 1e-4 ** (torch.arange(n, device=h.device, dtype=h.dtype) / (n - 1))
    phase = h[..., None] * freqs
    return torch.cat([phase.cos(), phase.sin()], dim=-1)


class MeanFlowModel(nn.Module):
    """``u_θ(z, r, t | obs) = F(z, t, [obs, features(t − r)])``: the IDQL MLP with the interval length as a second
    time input (``net`` is built with ``obs_dim + H_FEATURES`` inputs for the condition). ``x_min`` / ``x_max``:
    the action bounds a sample is clipped to."""

    def __init__(self, net: nn.Module, x_min: float | torch.Tensor = -1.0, x_max: float | torch.Tensor = 1.0):
        super().__init__()
        self.net = net
        self.register_buffer("x_min", torch.as_tensor(x_min, dtype=torch.float32).clone(), persistent=False)
        self.register_buffer("x_max", torch.as_tensor(x_max, dtype=torch.float32).clone(), persistent=False)

    @property
    def act_dim(self) -> int:
        return self.net.act_dim

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """``z [..., B, A]``, ``r, t [..., B]``, ``obs [..., B, O]`` → ``u [..., B, A]``."""
        return self.net(z, t, torch.cat([obs, interval_features(t - r)], dim=-1))

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.x_min, self.x_max)


def _rand(shape, like: torch.Tensor, generator) -> torch.Tensor:
    if stacked(generator):
        return generator.rand(tuple(shape)[1:], dtype=like.dtype)
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def sample_t_r(shape, like: torch.Tensor, generator, flow_share: float = 0.25, P_mean_t: float = -0.6,
               P_std_t: float = 1.6, P_mean_r: float = -4.0, P_std_r: float = 1.6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)`` of ``shape`` (``[B]`` or ``[S, B]``), the authors' sampler (py-meanflow ``tr_sampler: v1``): t and r
    drawn independently from logit-normals ``sigmoid(N(P_mean, P_std²))``, ``r = t`` with probability ``flow_share``,
    then ``r = min(t, r)``. The defaults are the authors' code's (t: (−0.6, 1.6), r: (−4.0, 1.6), 75% r ≠ t): r sits
    near 0, so most pairs train a jump to (almost) the data, from every t. The paper's image setting (one
    logit-normal (−0.4, 1.0) for both, 75% r = t) left the one-step map untrained here (2-D toy, 1,500 steps: NFE 1
    precision 0.07 against 0.66; docs/quality.md). Draw order: t's normal, r's normal, the uniform of the mask."""
    t = torch.sigmoid(_randn(shape, like, generator) * P_std_t + P_mean_t)
    r = torch.sigmoid(_randn(shape, like, generator) * P_std_r + P_mean_r)
    equal = _rand(shape, like, generator) < flow_share
    return t, torch.minimum(t, torch.where(equal, t, r))


def shortcut_target(model: MeanFlowModel, eps: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """The two-step composition as a target for the one-step map, ``u(ε, 0, 1) ≈ ½·(u(ε, ½, 1) + u(z_½, 0, ½))``
    with ``z_½ = ε − ½·u(ε, ½, 1)`` (the self-consistency of shortcut models, Frans et al. 2024), without gradients:
    ``eps [..., B, A]`` → ``[..., B, A]``."""
    with torch.no_grad():
        half = torch.full(eps.shape[:-1], 0.5, device=eps.device, dtype=eps.dtype)
        u_late = model(eps, half, half + 0.5, obs)
        u_early = model(eps - 0.5 * u_late, half - 0.5, half, obs)
        return 0.5 * (u_late + u_early)


def meanflow_loss(model: MeanFlowModel, x: torch.Tensor, obs: torch.Tensor, generator=None, flow_share: float = 0.25,
                  P_mean_t: float = -0.6, P_std_t: float = 1.6, P_mean_r: float = -4.0, P_std_r: float = 1.6,
                  adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                  shortcut_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weighted loss, unweighted loss)``: scalars, or ``[S]`` per member with a ``MemberGenerators``.

    ``x [..., B, A]`` data actions, ``obs [..., B, O]`` normalised observations. The JVP runs outside autocast: the
    target's ``(t − r)·du/dt`` is a difference of nearby quantities that bf16 would round away. ``shortcut_share``
    (default 0: no extra draw, the plain loss): a share of the rows moved to (r, t) = (0, 1), the one-step map,
    and trained towards :func:`shortcut_target` instead of the JVP target (its mask drawn after every other draw)."""
    with torch.autocast(x.device.type, enabled=False):
        x, obs = x.float(), obs.float()
        t, r = sample_t_r(x.shape[:-1], x, generator, flow_share, P_mean_t, P_std_t, P_mean_r, P_std_r)
        eps = _randn(x.shape, x, generator)
        shortcut = _rand(x.shape[:-1], x, generator) < shortcut_share if shortcut_share > 0 else None
        if shortcut is not None:
            t, r = torch.where(shortcut, torch.ones_like(t), t), torch.where(shortcut, torch.zeros_like(r), r)
        te, re_ = t[..., None], r[..., None]
        z = (1.0 - te) * x + te * eps
        v = eps - x

        def u_fn(z_, r_, t_):
            return model(z_, r_, t_, obs)

        u, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        target = (v - (te - re_) * dudt).detach()
        if shortcut is not None:
            target = torch.where(shortcut[..., None], shortcut_target(model, eps, obs), target)
        err = (u - target).pow(2).sum(dim=-1)                       # [..., B]: squared L2 per sample
        weight = 1.0 / (err.detach() + adaptive_c).pow(adaptive_p)  # the adaptive loss weight, under sg
        return batch_mean(weight * err, generator), batch_mean(err, generator)


def meanflow_grid(nfe: int, device=None) -> torch.Tensor:
    """The descending times ``1 = t_0 > t_1 > ... > t_nfe = 0`` of ``nfe`` equal steps."""
    if nfe < 1:
        raise ConfigError(f"MeanFlow sampling: expected nfe ≥ 1, found nfe={nfe}")
    return torch.linspace(1.0, 0.0, nfe + 1, device=device)


def meanflow_sample(model: MeanFlowModel, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """Actions ``[B, act_dim]`` with exactly ``nfe`` evaluations: ``z = ε``, then ``z ← z − (t − r)·u(z, r, t)`` over
    ``nfe`` equal steps from t = 1 to 0 (one step: ``a = ε − u(ε, 0, 1)``), clipped to the action bounds.
    ``noise [nfe, B, A]``: the sampler's standard normals (the interface of the other samplers); the map is
    deterministic, so only ``noise[0]``, the initial draw, is used."""
    times = meanflow_grid(nfe, obs.device)
    shape = (obs.shape[0], model.act_dim)
    check_noise(noise, nfe, shape)
    z = torch.randn(shape, generator=generator, device=obs.device) if noise is None else noise[0].to(obs.device)
    ones = torch.ones(shape[0], device=obs.device)
    for k in range(nfe):
        t, r = times[k], times[k + 1]
        z = z - (t - r) * model(z, ones * r, ones * t, obs)
    return model.clip(z)


def meanflow_one_step(model: MeanFlowModel, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The one-step map ``a = ε − u(ε, 0, 1 | obs)`` with gradients (what critic guidance trains through):
    ``noise [..., B, A]``, ``obs [..., B, O]``; clipped to the action bounds as a sample is."""
    zeros = torch.zeros(noise.shape[:-1], device=noise.device, dtype=noise.dtype)
    return model.clip(noise - model(noise, zeros, zeros + 1.0, obs))
