"""Consistency models (Song et al. 2023, "Consistency Models"; Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models" = iCT) over actions, with consistency training (iCT) and distillation (CD) losses.

``ConsistencyModel`` is the boundary-conditioned parametrisation ``f(x, σ, obs)``; the iCT pieces (curriculum,
log-normal index distribution, pseudo-Huber) are small pure functions; ``ct_loss`` / ``cd_loss`` return tensors
(no host sync) and ``cm_sample`` / ``sample_consistency`` do multistep sampling with an explicit evaluation count.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from idql_cm.diffusion.edm import (
    EDMDenoiser,
    Preconditioned,
    _randn,
    append_dims,
    batch_mean,
    check_noise,
    ode_step,
    stacked,
)
from idql_cm.diffusion.schedules import karras_sigmas, snap_to_grid
from idql_cm.errors import ConfigError


class ConsistencyModel(Preconditioned):
    """``f(x, σ, obs) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), obs)``, clipped to the action bounds.

    The training losses leave the student unclipped (``clip_student=False``): a clipped coordinate has zero gradient.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        x_min: float | torch.Tensor = -1.0,
        x_max: float | torch.Tensor = 1.0,
    ):
        super().__init__(net, sigma_data, sigma_min, sigma_max, rho, x_min, x_max)

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Song et al. 2023, Appendix C: ``c_skip = σ_d²/(σ_d² + (σ − σ_min)²)``,
        ``c_out = (σ − σ_min)·σ_d/√(σ_d² + σ²)``, ``c_in = 1/√(σ_d² + σ²)``; so f is the identity at σ_min."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sd2 + (sigma - self.sigma_min) ** 2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sd2 + sigma**2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        return c_skip, c_out, c_in

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, clip: bool = True
    ) -> torch.Tensor:
        return self.denoise(x, sigma, obs, clip)


@torch.no_grad()
def sample_consistency(
    model: ConsistencyModel,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    obs: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): ``f(x, sigmas[-1])``, then for each lower grid
    point σ_i > σ_min re-noise ``x = f + √(σ_i² − σ_min²)·z`` and apply f at σ_i. ``len(sigmas) − 1`` evaluations.

    ``noise``: the re-noising draws z as ``[len(sigmas) − 2, B, A]`` standard normals, used in order (the first at the
    highest inner level); None draws them with ``generator``."""
    n = x.shape[0]
    x = model(x, sigmas[-1].expand(n), obs)
    for k, i in enumerate(range(len(sigmas) - 2, 0, -1)):
        z = _randn(x.shape, x, generator) if noise is None else noise[k]
        x = x + (sigmas[i] ** 2 - model.sigma_min**2).sqrt() * z
        x = model(x, sigmas[i].expand(n), obs)
    return x


def cm_sample(
    model: ConsistencyModel,
    obs: torch.Tensor,
    nfe: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    train_grid: torch.Tensor | None = None,
    renoise_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Actions ``[B, act_dim]`` with ``nfe`` evaluations: one step from ``x = randn·σ_max``, then re-noising at the
    inner points of the Karras grid of nfe intervals (nfe 2: σ = 2.515; nfe 4: 17.53, 2.515, 0.170).

    ``sigma_max``: start there instead of at the model's σ_max (``x = randn·sigma_max``, the first step at that
    level; the grid below it as above, from it); on a training grid the start moves to its nearest point too.

    ``train_grid``: the σ-grid the model was trained on (:func:`sampling_sigmas`); the re-noising levels are then
    moved to its nearest points (18-interval CD grid, nfe 4: 21.11, 2.515, 0.242). ``renoise_min``: the lowest
    re-noising level (see :func:`sampling_sigmas`).
    ``noise``: all standard-normal draws as ``[nfe, B, A]`` (``noise[0]`` the initial draw, ``noise[1:]`` the
    re-noising draws), for bit-exact replays (e.g. against an exported graph); None draws them with ``generator``."""
    sigmas = sampling_sigmas(model, nfe, train_grid, device=obs.device, renoise_min=renoise_min, sigma_start=sigma_max)
    shape = (obs.shape[0], model.act_dim)
    check_noise(noise, nfe, shape)
    x = (_randn(shape, obs, generator) if noise is None else noise[0]) * sigmas[-1]  # the level of the first step
    return sample_consistency(model, x, sigmas, obs, generator, None if noise is None else noise[1:])


def cm_one_step(model: ConsistencyModel, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The one-step map ``a = f(ε·σ_max, σ_max | obs)`` with gradients (what critic guidance trains through):
    ``noise [..., B, A]`` standard normals, ``obs [..., B, O]``; clipped to the action bounds as a sample is (a
    coordinate beyond a bound gets no gradient from the critic, so the policy is not pulled out of the box)."""
    sigma = torch.full(noise.shape[:-1], float(model.sigma_max), device=noise.device, dtype=noise.dtype)
    return model(noise * model.sigma_max, sigma, obs, clip=True)


def sampling_sigmas(model: Preconditioned, nfe: int, train_grid: torch.Tensor | None = None,
                    device=None, renoise_min: float | None = None,
                    sigma_start: float | None = None) -> torch.Tensor:
    """The ascending σ-grid of ``nfe``-step consistency sampling: the Karras grid of nfe intervals, with its inner
    points moved onto ``train_grid`` (nearest in log σ) when given. Refuses an nfe the training grid cannot honour
    (two levels on one grid point).

    ``renoise_min``: the inner levels are instead the points below σ_max of the ρ-grid of nfe − 1 intervals from
    ``renoise_min`` to σ_max: nfe 2 re-noises at ``renoise_min``, nfe 4 (ρ 7, from 2.515) at 2.515, 9.72 and 30.18 —
    no level below it, where a distilled model may not remove the noise it is given.

    ``sigma_start``: the top of the grid (None: the model's σ_max); on ``train_grid`` it moves to the nearest point."""
    if nfe < 1:
        raise ConfigError(f"consistency sampling: expected nfe ≥ 1, found nfe={nfe}")
    top = model.sigma_max if sigma_start is None else float(sigma_start)
    if not model.sigma_min < top <= model.sigma_max:
        raise ConfigError(f"consistency sampling: expected a start level in ({model.sigma_min:g}, "
                          f"{model.sigma_max:g}], found {top:g}")
    if renoise_min is not None and nfe >= 2:
        if not renoise_min < top:
            raise ConfigError(f"consistency sampling: expected renoise_min below the start level {top:g}, "
                              f"found {renoise_min:g}")
        upper = karras_sigmas(nfe - 1, float(renoise_min), top, model.rho, device=device)
        sigmas = torch.cat([upper.new_tensor([model.sigma_min]), upper])
    else:
        sigmas = karras_sigmas(nfe, model.sigma_min, top, model.rho, device=device)
    if train_grid is not None and sigma_start is not None:
        sigmas = torch.cat([sigmas[:-1], snap_to_grid(sigmas[-1:], train_grid.to(sigmas))])
    if train_grid is None or nfe < 2:
        return sigmas
    # Deliberate difference: the reference re-noises at the Karras levels of nfe intervals whatever the model was
    # trained on; off CD's 18-interval grid (σ = 0.170 at nfe 4) its consistency function is untrained and NFE 4
    # fell to half the precision of NFE 2 (docs/quality.md). We re-noise on the training grid.
    inner = snap_to_grid(sigmas[1:-1], train_grid.to(sigmas))
    levels = torch.cat([inner, sigmas[-1:]]).tolist()  # on Python floats: no data-dependent tensor op in a trace
    if len(set(levels)) < len(levels):
        where = "" if sigma_start is None else f" below the start level {float(sigmas[-1]):g}"
        raise ConfigError(f"consistency sampling: expected nfe distinct levels of the {len(train_grid) - 1}-interval "
                          f"training grid{where} (nfe ≤ {len(train_grid) - 1} from σ_max), found nfe={nfe}")
    return torch.cat([sigmas[:1], inner, sigmas[-1:]])


def ict_kprime(total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """Steps per curriculum phase, iCT eq. 11: ``K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋`` (at least 1); 125 000 for K = 1e6."""
    return max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))


def ict_num_intervals(k: int, kprime: int, s0: int = 10, s1: int = 1280) -> int:
    """Number of discretisation intervals at step k, iCT eq. 11: ``N(k) = min(s0·2^⌊k/K'⌋, s1)`` (grid: N + 1 points)."""
    # Deliberate difference: the reference (CleanDiffuser main) uses ceil for K' and for k/K', which shifts every
    # phase by one (N = 20 from step 1, the cap one phase early); we follow the paper's floor form.
    return min(s0 * 2 ** (k // kprime), s1)


def lognormal_index_probs(sigmas: torch.Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> torch.Tensor:
    """Discretised log-normal over the intervals of ``sigmas`` ([N+1] → [N]), iCT Sec. 3.5:
    ``p(j) ∝ erf((ln σ_{j+1} − P_mean)/(√2·P_std)) − erf((ln σ_j − P_mean)/(√2·P_std))``."""
    cdf = torch.erf((sigmas.double().log() - P_mean) / (math.sqrt(2) * P_std))
    p = cdf[1:] - cdf[:-1]
    return (p / p.sum()).to(sigmas.dtype)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance on the whole vector (last dim), iCT Sec. 3.3: ``√(‖a − b‖² + c²) − c`` → [B]."""
    return (((a - b) ** 2).sum(-1) + c**2).sqrt() - c


def ct_loss(
    model: ConsistencyModel,
    x0: torch.Tensor,
    obs: torch.Tensor,
    sigmas: torch.Tensor,
    probs: torch.Tensor,
    c: float | None = None,
    generator=None,  # torch.Generator, or MemberGenerators: [S, B, ...] inputs, [S] losses
    clip_student: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Improved consistency training (iCT, Song & Dhariwal 2023, Algorithm 1 with eqs. 9–11).

    ``j ~ probs`` (``lognormal_index_probs(sigmas)``), σ_n = σ_j, σ_m = σ_{j+1}; one shared ε gives
    ``x_n = x0 + σ_n ε`` and ``x_m = x0 + σ_m ε``. Student f(x_m, σ_m) with gradient; teacher f(x_n, σ_n) is the same
    online model under no_grad (no EMA teacher in iCT). Returns ``(mean λ·d, mean d)`` with
    ``d = pseudo_huber(student, teacher, c)``, ``λ = 1/(σ_m − σ_n)``, ``c = 0.00054·√act_dim`` by default.
    The teacher is clipped to the action bounds, the student only with ``clip_student`` (see :data:`CLIP_NOTE`).
    """
    # The reference applies pseudo-Huber elementwise with c = 0.01; we use iCT's vector form and c.
    c = 0.00054 * math.sqrt(x0.shape[-1]) if c is None else c
    # Deliberate difference: the reference draws j with NumPy's global RNG; we use torch (and the given generator).
    if stacked(generator):
        j = generator.multinomial(probs, x0.shape[1])  # [S, B]
    else:
        j = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
    sigma_n, sigma_m = sigmas[j], sigmas[j + 1]
    eps = _randn(x0.shape, x0, generator)
    x_n = x0 + append_dims(sigma_n, x0.ndim) * eps
    x_m = x0 + append_dims(sigma_m, x0.ndim) * eps
    # Teacher and student share the dropout mask: the RNG state is restored after the student pass (as OpenAI's CM
    # code does); the reference gives them independent masks.
    if stacked(generator):
        fork = generator.fork()  # every member's generator restored (the stacked nets' dropout draws from them)
    else:
        devices = [x0.device] if x0.device.type != "cpu" else []
        fork = torch.random.fork_rng(devices=devices, device_type=x0.device.type)
    with fork:
        f_student = model(x_m, sigma_m, obs, clip=clip_student)
    with torch.no_grad():
        f_teacher = model(x_n, sigma_n, obs)
    d = pseudo_huber(f_student, f_teacher, c)
    return batch_mean(d / (sigma_m - sigma_n), generator), batch_mean(d.detach(), generator)


def cd_loss(
    model: ConsistencyModel,
    target: ConsistencyModel,
    teacher: EDMDenoiser,
    x0: torch.Tensor,
    obs: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "heun",
    generator=None,  # torch.Generator, or MemberGenerators: [S, B, ...] inputs, an [S] loss
    weighting: str = "inverse_delta",
    clip_student: bool = False,
) -> torch.Tensor:
    """Consistency distillation (Song et al. 2023, Algorithm 2) on a fixed grid (``karras_sigmas(18)``).

    ``idx ~ U{0..N−1}``, t_m = σ_{idx+1}, t_n = σ_idx, ``x_m = x0 + t_m ε``; one ODE step of the frozen EDM
    ``teacher`` (its EMA weights, x0-prediction not clipped) gives x_n; the target is ``target(x_n, t_n)`` under
    no_grad. Loss: mean over batch and dims of ``λ·(f(x_m, t_m) − f_target)²`` with ``λ = 1/(t_m − t_n)``
    (``weighting="inverse_delta"``, iCT's, the reference's) or ``λ = 1`` (``"uniform"``, the CD paper's).
    The target is clipped to the action bounds, the student only with ``clip_student`` (see :data:`CLIP_NOTE`).
    Call ``check_teacher_compatible`` once before training.
    """
    if solver not in ("heun", "euler"):
        raise ConfigError(f"CD teacher solver: expected 'heun' or 'euler', found {solver!r}")
    if weighting not in CD_WEIGHTINGS:
        raise ConfigError(f"CD loss weighting: expected one of {CD_WEIGHTINGS}, found {weighting!r}")
    if stacked(generator):
        idx = generator.randint(len(sigmas) - 1, (x0.shape[1],))  # [S, B]
    else:
        idx = torch.randint(0, len(sigmas) - 1, (x0.shape[0],), generator=generator, device=x0.device)
    t_n, t_m = sigmas[idx], sigmas[idx + 1]
    x_m = x0 + append_dims(t_m, x0.ndim) * _randn(x0.shape, x0, generator)
    with torch.no_grad():
        # Heun as in the CD paper; the reference takes one Euler step.
        x_n = ode_step(teacher, x_m, t_m, t_n, obs, heun=solver == "heun", clip=False)
        f_target = target(x_n, t_n, obs)
    f_student = model(x_m, t_m, obs, clip=clip_student)
    sq = (f_student - f_target) ** 2
    if weighting == "uniform":
        return batch_mean(sq, generator)
    return batch_mean(append_dims(1 / (t_m - t_n), x0.ndim) * sq, generator)


CD_WEIGHTINGS = ("inverse_delta", "uniform")

#: Deliberate difference: the reference clips the student's output in the training losses too, so a coordinate
#: that overshoots the action bound gets no gradient and stays there; with modes near the bound (the "far" toy,
#: modes at ±0.85) CT put its samples on the box edge. We clip targets and samples, not the trained output.
CLIP_NOTE = "the student's output is not clipped in training (zero gradient beyond the bound)"


def check_teacher_compatible(model: ConsistencyModel, teacher: EDMDenoiser) -> None:
    """Raise ``ConfigError`` unless the EDM ``teacher`` matches ``model`` in σ_min, σ_max, σ_data, ρ, the action bounds
    and the network (constructor ``config``, e.g. Fourier scale, and state-dict names/shapes), naming both sides."""
    diffs = [
        f"{name}: consistency model {getattr(model, name)}, teacher {getattr(teacher, name)}"
        for name in ("sigma_min", "sigma_max", "sigma_data", "rho")
        if getattr(model, name) != getattr(teacher, name)
    ]
    for name in ("x_min", "x_max"):
        a, b = getattr(model, name).cpu(), getattr(teacher, name).cpu()
        try:
            same = torch.equal(*torch.broadcast_tensors(a, b))
        except RuntimeError:  # shapes do not broadcast
            same = False
        if not same:
            diffs.append(f"{name}: consistency model {a.tolist()}, teacher {b.tolist()}")
    cfg_a, cfg_b = getattr(model.net, "config", {}), getattr(teacher.net, "config", {})
    diffs += [
        f"net.{key}: consistency model {cfg_a.get(key)}, teacher {cfg_b.get(key)}"
        for key in sorted(cfg_a.keys() & cfg_b.keys())
        if cfg_a[key] != cfg_b[key]
    ]
    shapes_a = {k: tuple(v.shape) for k, v in model.net.state_dict().items()}
    shapes_b = {k: tuple(v.shape) for k, v in teacher.net.state_dict().items()}
    diffs += [
        f"net tensor {key}: consistency model {shapes_a.get(key)}, teacher {shapes_b.get(key)}"
        for key in sorted(shapes_a.keys() | shapes_b.keys())
        if shapes_a.get(key) != shapes_b.get(key)
    ][:3]
    if diffs:
        raise ConfigError("CD teacher (EDM) does not match the consistency model: " + "; ".join(diffs))
