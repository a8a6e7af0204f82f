"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

``EDMDenoiser`` wraps a network ``F(x, c_noise, obs)`` with the σ-preconditioning of Table 1 and trains it with
the log-normal σ distribution and λ(σ) weighting; ``sample_euler`` / ``sample_heun`` are k-diffusion-style
samplers over an explicit σ-grid, so the number of network evaluations is visible in the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from idql_cm.diffusion.schedules import karras_sigmas
from idql_cm.errors import ConfigError
from idql_cm.nets.ensemble import MemberGenerators, member_mean


def stacked(generator) -> bool:
    """Whether a loss draws for S stacked members (``generator`` a :class:`~idql_cm.nets.ensemble.MemberGenerators`):
    then its inputs are ``[S, B, ...]``, member k's draws come from generator k and the loss is ``[S]``."""
    return isinstance(generator, MemberGenerators)


def _randn(shape, like: torch.Tensor, generator) -> torch.Tensor:
    if stacked(generator):  # shape [S, *solo]: member k draws its solo shape from its own generator
        return generator.randn(tuple(shape)[1:], dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


def standard_normal(shape, like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normals of ``shape`` like ``like``, from ``generator`` (a ``MemberGenerators``: member k's rows from
    generator k; None: torch's default generator), as the losses draw them."""
    return _randn(shape, like, generator)


def batch_mean(x: torch.Tensor, generator) -> torch.Tensor:
    """The mean over the batch and the action dims: a scalar, or ``[S]`` per member for stacked draws."""
    return member_mean(x, len(generator.generators) if stacked(generator) else 1)


def check_noise(noise: torch.Tensor | None, nfe: int, shape: tuple[int, int]) -> None:
    """Refuse given sampler noise that is not ``[nfe, B, A]`` (``shape`` = ``(B, A)``)."""
    if noise is not None and tuple(noise.shape) != (nfe, *shape):
        raise ConfigError(f"sampler noise: expected shape {[nfe, *shape]} ([nfe, B, act_dim]), "
                          f"found {list(noise.shape)}")


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Right-pad ``v`` with singleton dims up to ``ndim`` (``[B] -> [B, 1]`` against ``x: [B, A]``)."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Preconditioned(nn.Module):
    """``c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), obs)``, optionally clipped to ``[x_min, x_max]``.

    Subclasses define ``get_scalings(sigma) -> (c_skip, c_out, c_in)``. ``x_min`` / ``x_max`` are floats or
    ``[act_dim]`` tensors, kept as (non-persistent) buffers so they follow ``.to(device)``.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float,
        sigma_min: float,
        sigma_max: float,
        rho: float,
        x_min: float | torch.Tensor,
        x_max: float | torch.Tensor,
    ):
        super().__init__()
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.register_buffer("x_min", torch.as_tensor(x_min, dtype=torch.float32).clone(), persistent=False)
        self.register_buffer("x_max", torch.as_tensor(x_max, dtype=torch.float32).clone(), persistent=False)

    @property
    def act_dim(self) -> int:
        return self.net.act_dim

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        """``c_noise = ¼·ln σ`` (EDM Table 1; no ×1000 rescale)."""
        return 0.25 * sigma.log()

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.x_min, self.x_max)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, clip: bool) -> torch.Tensor:
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in self.get_scalings(sigma))
        out = c_skip * x + c_out * self.net(c_in * x, self.c_noise(sigma), obs)
        return self.clip(out) if clip else out


class EDMDenoiser(Preconditioned):
    """The EDM denoiser ``D(x, σ, obs)`` (Karras et al. 2022, Table 1, "Ours" column)."""

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        x_min: float | torch.Tensor = -1.0,
        x_max: float | torch.Tensor = 1.0,
    ):
        super().__init__(net, sigma_data, sigma_min, sigma_max, rho, x_min, x_max)
        self.P_mean, self.P_std = P_mean, P_std

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c_skip = σ_d²/(σ_d²+σ²)``, ``c_out = σ·σ_d/√(σ_d²+σ²)``, ``c_in = 1/√(σ_d²+σ²)``."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sd2 + sigma**2)
        c_out = sigma * self.sigma_data / (sd2 + sigma**2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        return c_skip, c_out, c_in

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, clip: bool = False
    ) -> torch.Tensor:
        """``D(x, σ, obs)``: the x0-prediction; ``clip=True`` clips it to the action bounds (used by samplers)."""
        return self.denoise(x, sigma, obs, clip)

    def loss(
        self, x0: torch.Tensor, obs: torch.Tensor, generator: torch.Generator | MemberGenerators | None = None
    ) -> torch.Tensor:
        """EDM training loss (Karras et al. 2022, eq. 2 and Table 1): ``ln σ ~ N(P_mean, P_std²)`` (not clipped to
        [σ_min, σ_max]), ``x_σ = x0 + σ·ε``, mean over batch and dims of ``λ(σ)·(D(x_σ, σ) − x0)²`` with
        ``λ(σ) = (σ² + σ_d²)/(σ·σ_d)²``. The prediction is not clipped here. With a ``MemberGenerators`` the inputs
        are ``[S, B, ...]`` and the loss ``[S]``."""
        sigma = (_randn(x0.shape[:-1], x0, generator) * self.P_std + self.P_mean).exp()
        eps = _randn(x0.shape, x0, generator)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        D = self(x0 + append_dims(sigma, x0.ndim) * eps, sigma, obs)
        return batch_mean(append_dims(weight, x0.ndim) * (D - x0) ** 2, generator)


def ode_step(
    denoiser: Preconditioned,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    obs: torch.Tensor,
    heun: bool,
    clip: bool,
) -> torch.Tensor:
    """One step of the probability-flow ODE ``dx/dσ = (x − D(x, σ))/σ`` from σ to σ_next: Euler, or with
    ``heun=True`` the second-order correction of Karras et al. 2022, Algorithm 1 (lines 4–8; 2 evaluations).
    ``sigma`` / ``sigma_next`` are scalars (0-d) or per-sample ``[B]``; ``clip`` clips each x0-prediction."""
    n, h = x.shape[:-1], append_dims(sigma_next - sigma, x.ndim)  # n: [B], or [S, B] for stacked members
    d = (x - denoiser(x, sigma.expand(n), obs, clip=clip)) / append_dims(sigma, x.ndim)
    x_next = x + d * h
    if heun:
        d_next = (x_next - denoiser(x_next, sigma_next.expand(n), obs, clip=clip)) / append_dims(
            sigma_next, x.ndim
        )
        x_next = x + (d + d_next) / 2 * h
    return x_next


@torch.no_grad()
def sample_euler(
    denoiser: EDMDenoiser, x: torch.Tensor, sigmas: torch.Tensor, obs: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """Euler sampler (Karras et al. 2022, Algorithm 1 without the correction) from ``x`` at ``sigmas[-1]`` down the
    ascending grid to ``sigmas[0]`` = σ_min; ``len(sigmas) − 1`` network evaluations. ``clip`` clips every
    x0-prediction and the final sample to the action bounds."""
    for i in range(len(sigmas) - 1, 0, -1):
        x = ode_step(denoiser, x, sigmas[i], sigmas[i - 1], obs, heun=False, clip=clip)
    return denoiser.clip(x) if clip else x


@torch.no_grad()
def sample_heun(
    denoiser: EDMDenoiser, x: torch.Tensor, sigmas: torch.Tensor, obs: torch.Tensor, clip: bool = True
) -> torch.Tensor:
    """Heun sampler (Karras et al. 2022, Algorithm 1) over the ascending grid; the last step, to σ_min, is Euler
    (as in the reference and Algorithm 1 when σ_{i+1} = 0), so N steps cost 2N − 1 network evaluations."""
    for i in range(len(sigmas) - 1, 0, -1):
        x = ode_step(denoiser, x, sigmas[i], sigmas[i - 1], obs, heun=i > 1, clip=clip)
    return denoiser.clip(x) if clip else x


def edm_sample(
    denoiser: EDMDenoiser,
    obs: torch.Tensor,
    nfe: int,
    solver: str = "euler",
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
    noise: torch.Tensor | None = None,
    rho: float | None = None,
) -> torch.Tensor:
    """Actions ``[B, act_dim]`` for ``obs: [B, obs_dim]`` with exactly ``nfe`` network evaluations: Euler takes nfe
    steps on the Karras grid of nfe intervals, Heun (nfe + 1)/2 steps and refuses an even nfe. Starts from
    ``x = randn·σ_max`` drawn with ``generator`` when given. ``sigma_max`` overrides the model's σ_max for sampling
    only (the grid then runs σ_min → sigma_max), ``rho`` the grid's ρ (None = the model's ρ = 7). ``noise``: ``[nfe, B, A]`` standard normals (the interface of
    ``cm_sample``); the ODE samplers are deterministic, so only ``noise[0]``, the initial draw, is used."""
    if solver not in ("euler", "heun"):
        raise ConfigError(f"EDM solver: expected 'euler' or 'heun', found {solver!r}")
    if nfe < 1 or (solver == "heun" and nfe % 2 == 0):
        expected = (
            "an odd nfe ≥ 1 (Heun uses 2N − 1 evaluations for N steps)" if solver == "heun" else "nfe ≥ 1"
        )
        raise ConfigError(f"EDM {solver} sampling: expected {expected}, found nfe={nfe}")
    steps = nfe if solver == "euler" else (nfe + 1) // 2
    top = denoiser.sigma_max if sigma_max is None else float(sigma_max)
    shape = (obs.shape[0], denoiser.act_dim)
    check_noise(noise, nfe, shape)
    x = (_randn(shape, obs, generator) if noise is None else noise[0]) * top
    sampler = sample_euler if solver == "euler" else sample_heun
    sigmas = karras_sigmas(steps, denoiser.sigma_min, top, denoiser.rho if rho is None else float(rho),
                           device=obs.device)
    return sampler(denoiser, x, sigmas, obs)
