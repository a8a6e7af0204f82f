"""EDM and consistency models: grids, scalings, losses against hand computations, evaluation counts, clipping."""

import math

import pytest
import torch

from idql_cm.diffusion import (
    ConsistencyModel,
    EDMDenoiser,
    cd_loss,
    check_teacher_compatible,
    cm_sample,
    ct_loss,
    edm_sample,
    ict_kprime,
    ict_num_intervals,
    karras_sigmas,
    lognormal_index_probs,
    pseudo_huber,
    sampling_sigmas,
    snap_to_grid,
)
from idql_cm.errors import ConfigError
from idql_cm.nets import IDQLMlp

OBS, ACT = 3, 2


def small_net(**kw) -> IDQLMlp:
    return IDQLMlp(OBS, ACT, **{"emb_dim": 8, "hidden_dim": 16, "n_blocks": 1, **kw})


class CountingNet(torch.nn.Module):
    """Wraps a net and records the σ of every call (σ = exp(4·c_noise))."""

    def __init__(self, net):
        super().__init__()
        self.net, self.act_dim, self.sigmas = net, net.act_dim, []

    def forward(self, x, c_noise, obs):
        self.sigmas.append(math.exp(4 * c_noise[0].item()))
        return self.net(x, c_noise, obs)


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, [0.002, 80.0]),
        (2, [0.002, 2.51522, 80.0]),
        (3, [0.002, 0.46998, 9.7232, 80.0]),
        (4, [0.002, 0.16975, 2.51522, 17.52783, 80.0]),
        (
            18,
            [
                0.002,
                0.00704,
                0.02044,
                0.05153,
                0.11664,
                0.24238,
                0.46998,
                0.86058,
                1.50174,
                2.51522,
                4.06612,
                6.37361,
                9.7232,
                14.48081,
                21.10868,
                30.18326,
                42.41519,
                58.67148,
                80.0,
            ],
        ),
    ],
)
def test_karras_sigmas(n, expected):
    sigmas = karras_sigmas(n)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,)
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=1e-4, atol=5e-6)  # spec: 5 decimals
    assert sigmas[0] == torch.tensor(0.002) and sigmas[-1] == 80.0


def test_edm_scalings():
    edm = EDMDenoiser(small_net())
    c_skip, c_out, c_in = edm.get_scalings(torch.tensor([80.0, 0.002]))
    torch.testing.assert_close(c_skip, torch.tensor([0.25 / 6400.25, 0.25 / 0.250004]))
    assert c_skip[0] == pytest.approx(3.9e-5, rel=2e-3) and c_skip[1] == pytest.approx(0.99998, abs=1e-5)
    assert c_out[0] == pytest.approx(0.49999, abs=1e-5) and c_out[1] == pytest.approx(
        0.002 * 0.5 / 0.250004**0.5
    )
    torch.testing.assert_close(c_in, 1 / torch.tensor([6400.25, 0.250004]).sqrt())
    torch.testing.assert_close(
        edm.c_noise(torch.tensor([80.0, 0.002])), torch.tensor([1.0955, -1.5537]), atol=1e-4, rtol=0
    )


def test_cm_boundary_condition():
    cm = ConsistencyModel(small_net())
    sigma_min = torch.full((4,), 0.002)
    c_skip, c_out, _ = cm.get_scalings(sigma_min)
    assert torch.all(c_skip == 1) and torch.all(c_out == 0)
    x, obs = torch.rand(4, ACT) * 2 - 1, torch.randn(4, OBS)
    assert torch.equal(cm(x, sigma_min, obs), x)
    x_big = 3 * x
    assert torch.equal(cm(x_big, sigma_min, obs, clip=False), x_big)
    assert torch.equal(cm(x_big, sigma_min, obs), x_big.clamp(-1, 1))


def test_edm_loss_by_hand():
    torch.manual_seed(0)
    edm = EDMDenoiser(small_net(dropout=0.0))
    x0, obs = torch.rand(8, ACT) * 2 - 1, torch.randn(8, OBS)
    loss = edm.loss(x0, obs, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.randn(8, generator=g) * 1.2 - 1.2)
    eps = torch.randn(8, ACT, generator=g)
    s, sd = sigma[:, None], 0.5
    x = x0 + s * eps
    F = edm.net(x / (sd**2 + s**2).sqrt(), 0.25 * sigma.log(), obs)
    D = sd**2 / (sd**2 + s**2) * x + s * sd / (sd**2 + s**2).sqrt() * F
    expected = ((s**2 + sd**2) / (s * sd) ** 2 * (D - x0) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in edm.net.parameters() if p.requires_grad)


def test_ict_curriculum():
    kprime = ict_kprime(1_000_000)
    assert kprime == 125_000 and ict_kprime(100_000) == 12_500
    expected = {
        0: 10,
        124_999: 10,
        125_000: 20,
        249_999: 20,
        250_000: 40,
        375_000: 80,
        500_000: 160,
        625_000: 320,
        750_000: 640,
        874_999: 640,
        875_000: 1280,
        1_000_000: 1280,
        5_000_000: 1280,
    }
    assert {k: ict_num_intervals(k, kprime) for k in expected} == expected


@pytest.mark.parametrize("n", [10, 20, 1280])
def test_lognormal_index_probs(n):
    sigmas = karras_sigmas(n)
    p = lognormal_index_probs(sigmas)
    assert p.shape == (n,) and torch.all(p > 0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    # the mode of the discretised log-normal lies near exp(P_mean) = 0.33 (per unit of ln σ)
    density = p / (sigmas[1:].log() - sigmas[:-1].log())
    assert 0.1 < sigmas[density.argmax()] < 1.0


def test_pseudo_huber_by_hand():
    a, b = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    c = 0.1
    expected = torch.tensor([math.sqrt(8 + c**2) - c, 0.0])
    torch.testing.assert_close(pseudo_huber(a, b, c), expected)


def _counting_edm():
    return EDMDenoiser(CountingNet(small_net()))


@pytest.mark.parametrize(
    "solver, nfe", [("euler", 1), ("euler", 2), ("euler", 4), ("heun", 1), ("heun", 3), ("heun", 5)]
)
def test_edm_sampler_evaluation_count(solver, nfe):
    edm = _counting_edm().eval()
    act = edm_sample(edm, torch.randn(5, OBS), nfe, solver=solver, generator=torch.Generator().manual_seed(0))
    assert act.shape == (5, ACT) and len(edm.net.sigmas) == nfe
    assert edm.net.sigmas[0] == pytest.approx(80.0, rel=1e-5)


def test_edm_sampling_can_start_below_sigma_max():
    edm = _counting_edm().eval()
    x = edm_sample(edm, torch.randn(64, OBS), 2, sigma_max=10.0, generator=torch.Generator().manual_seed(0))
    expected = karras_sigmas(2, 0.002, 10.0)
    assert edm.net.sigmas == pytest.approx([10.0, float(expected[1])], rel=1e-5)
    assert x.abs().max() <= 1.0


def test_heun_refuses_even_nfe():
    for nfe in (2, 4):
        with pytest.raises(ConfigError, match=f"odd nfe.*found nfe={nfe}"):
            edm_sample(_counting_edm(), torch.randn(2, OBS), nfe, solver="heun")
    with pytest.raises(ConfigError, match="found nfe=0"):
        edm_sample(_counting_edm(), torch.randn(2, OBS), 0)
    with pytest.raises(ConfigError, match="'dpm'"):
        edm_sample(_counting_edm(), torch.randn(2, OBS), 1, solver="dpm")


@pytest.mark.parametrize(
    "nfe, seen",
    [(1, [80.0]), (2, [80.0, 2.51522]), (4, [80.0, 17.52783, 2.51522, 0.16975])],
)
def test_cm_sampler_evaluation_count_and_renoise_levels(nfe, seen):
    cm = ConsistencyModel(CountingNet(small_net())).eval()
    act = cm_sample(cm, torch.randn(5, OBS), nfe, generator=torch.Generator().manual_seed(0))
    assert act.shape == (5, ACT)
    assert cm.net.sigmas == pytest.approx(seen, rel=1e-4)


# The 18-interval CD grid (docs/design.md): NFE 4's Karras levels 17.53 and 0.170 are not on it, 2.515 is.
@pytest.mark.parametrize(
    "nfe, seen",
    [(1, [80.0]), (2, [80.0, 2.51522]), (3, [80.0, 9.7232, 0.46998]), (4, [80.0, 21.10868, 2.51522, 0.24238])],
)
def test_cm_sampler_renoises_on_the_training_grid(nfe, seen):
    """With its training grid, a consistency model is only evaluated at σ it was trained on (each Karras level
    moved to the nearest grid point in log σ: 17.53 → 21.11, 0.170 → 0.242), with exactly nfe evaluations."""
    cm = ConsistencyModel(CountingNet(small_net())).eval()
    grid = karras_sigmas(18)
    cm_sample(cm, torch.randn(5, OBS), nfe, generator=torch.Generator().manual_seed(0), train_grid=grid)
    assert cm.net.sigmas == pytest.approx(seen, rel=1e-4)
    on_grid = [min(abs(s - float(g)) / s for g in grid) for s in cm.net.sigmas]
    assert max(on_grid) < 1e-6
    assert sampling_sigmas(cm, nfe, grid).tolist() == pytest.approx(sorted([0.002] + seen), rel=1e-5)
    # a fine grid (CT's last curriculum grid) keeps the Karras levels almost exactly
    fine = sampling_sigmas(cm, 4, karras_sigmas(1280))
    assert fine.tolist() == pytest.approx([0.002, 0.16975, 2.51522, 17.52783, 80.0], rel=2e-3)


@pytest.mark.parametrize("nfe, seen", [(1, [80.0]), (2, [80.0, 2.51522]), (4, [80.0, 30.18326, 9.72320, 2.51522])])
def test_renoise_min_keeps_every_level_at_or_above_it(nfe, seen):
    """``renoise_min`` 2.515: the levels are the ρ-7 grid from it to σ_max (30.18 and 9.72 lie on the 18-interval
    grid as well), exactly nfe evaluations, none below the floor; without it NFE 4 re-noises at 0.242."""
    cm = ConsistencyModel(CountingNet(small_net())).eval()
    cm_sample(cm, torch.randn(5, OBS), nfe, generator=torch.Generator().manual_seed(0), train_grid=karras_sigmas(18),
              renoise_min=2.51522)
    assert cm.net.sigmas == pytest.approx(seen, rel=1e-4)
    lo, hi = 2.51522 ** (1 / 7), 80.0 ** (1 / 7)  # the hand computation of the 3-interval ρ-7 grid
    assert [(lo + i / 3 * (hi - lo)) ** 7 for i in (2, 1)] == pytest.approx([30.18326, 9.72320], rel=1e-4)


@pytest.mark.parametrize("nfe, seen", [(1, [2.51522]), (2, [2.51522, 0.24238]), (3, [2.51522, 0.46998, 0.05153])])
def test_cm_sampler_can_start_below_sigma_max(nfe, seen):
    """``sigma_max`` 2.6 on the 18-interval grid: the start moves to the grid point 2.515, the draw is scaled by it,
    the levels below are the Karras grid of nfe intervals from 2.6, snapped (nfe 2: 0.174 → 0.242; nfe 3: the hand
    computation below), exactly nfe evaluations."""
    grid = karras_sigmas(18)
    cm = ConsistencyModel(CountingNet(small_net())).eval()
    eps = torch.randn(nfe, 5, ACT)
    inputs = []
    cm.net.register_forward_hook(lambda mod, args, out: inputs.append(args[0].clone()))
    cm_sample(cm, torch.randn(5, OBS), nfe, noise=eps, train_grid=grid, sigma_max=2.6)
    assert cm.net.sigmas == pytest.approx(seen, rel=1e-4)
    assert max(min(abs(s - float(g)) / s for g in grid) for s in cm.net.sigmas) < 1e-6
    # the first evaluation sees c_in·(ε·2.515): EDM's c_in = 1/√(σ² + σ_data²)
    c_in = 1 / (2.51522**2 + cm.sigma_data**2) ** 0.5
    assert torch.allclose(inputs[0], eps[0] * 2.51522 * c_in, rtol=1e-4)
    lo, hi = 0.002 ** (1 / 7), 2.6 ** (1 / 7)  # nfe 3's inner levels before snapping: 0.4834 → 0.46998, 0.0525 → 0.0515
    assert [(lo + i / 3 * (hi - lo)) ** 7 for i in (2, 1)] == pytest.approx([0.48337, 0.052535], rel=1e-4)
    # without a grid the start is exactly the level asked for; None is the model's σ_max, bit for bit
    free = ConsistencyModel(CountingNet(small_net())).eval()
    cm_sample(free, torch.randn(5, OBS), 1, noise=eps[:1], sigma_max=2.6)
    assert free.net.sigmas == pytest.approx([2.6], rel=1e-6)
    obs = torch.randn(5, OBS)
    assert torch.equal(cm_sample(cm, obs, nfe, noise=eps), cm_sample(cm, obs, nfe, noise=eps, sigma_max=None))
    with pytest.raises(ConfigError, match="start level in .*found 100"):
        cm_sample(cm, obs, 1, sigma_max=100.0)
    with pytest.raises(ConfigError, match="renoise_min below the start level 2.6, found 5"):
        cm_sample(cm, obs, 2, sigma_max=2.6, renoise_min=5.0)
    # on a coarse grid a low start and its re-noising level can snap to one point: refused, not run twice there
    coarse = karras_sigmas(4)  # 0.002, 0.170, 2.515, 17.5, 80: from 0.5, nfe 2 would start and re-noise at 0.170
    assert sampling_sigmas(cm, 2, coarse, sigma_start=1.0).tolist() == pytest.approx([0.002, 0.16975, 2.51522], rel=1e-4)
    with pytest.raises(ConfigError, match="distinct levels of the 4-interval training grid below the start level "
                                          "0.169753.*found nfe=2"):
        sampling_sigmas(cm, 2, coarse, sigma_start=0.5)


def test_cm_sampler_refuses_more_levels_than_the_training_grid_has():
    cm = ConsistencyModel(small_net()).eval()
    sampling_sigmas(cm, 4, karras_sigmas(4))  # exactly the grid
    with pytest.raises(ConfigError) as e:
        sampling_sigmas(cm, 6, karras_sigmas(4))
    msg = str(e.value)  # the parts that matter, not the sentence: expected, found, where
    assert "≤ 4" in msg and "found nfe=6" in msg and "4-interval training grid" in msg


def test_snap_to_grid_is_nearest_in_log_sigma():
    grid = torch.tensor([0.1, 1.0, 10.0])
    # by ratio: 3.0 is ×3 from 1.0 and ×3.3 from 10; 0.35 is ×2.9 from 1.0 and ×3.5 from 0.1; 0.3 is ×3 from 0.1
    levels = torch.tensor([3.0, 0.35, 0.3, 9.0])
    assert snap_to_grid(levels, grid).tolist() == pytest.approx([1.0, 1.0, 0.1, 10.0])


def test_sampling_is_reproducible_with_a_generator():
    edm = EDMDenoiser(small_net()).eval()
    obs = torch.randn(4, OBS)
    a, b = (edm_sample(edm, obs, 2, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


class ConstantNet(torch.nn.Module):
    """F = 100 everywhere: every x0-prediction falls far outside the bounds."""

    act_dim = ACT

    def forward(self, x, c_noise, obs):
        return torch.full_like(x, 100.0)


def test_samples_are_clipped_to_bounds():
    x_min, x_max = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.25])
    obs = torch.randn(64, OBS)
    edm = EDMDenoiser(ConstantNet(), x_min=x_min, x_max=x_max)
    cm = ConsistencyModel(ConstantNet(), x_min=x_min, x_max=x_max)
    for act in (
        edm_sample(edm, obs, 1),
        edm_sample(edm, obs, 4),
        edm_sample(edm, obs, 3, solver="heun"),
        cm_sample(cm, obs, 1),
        cm_sample(cm, obs, 4),
    ):
        assert torch.all(act >= x_min) and torch.all(act <= x_max)
        # F = +100 pushes every x0-prediction to the upper bound (NFE 1 Euler keeps (σ_min/σ_max)·x_N of the noise)
        torch.testing.assert_close(act, x_max.expand_as(act), atol=0.02, rtol=0)
    assert (
        edm(torch.zeros(2, ACT), torch.full((2,), 1.0), obs[:2]).max() > 1
    )  # D itself is unclipped by default


def test_ct_loss_weighting_and_grad():
    torch.manual_seed(0)
    cm = ConsistencyModel(small_net(fourier_scale=0.02))
    sigmas = karras_sigmas(10)
    probs = torch.zeros(10)
    probs[3] = 1.0  # always the interval [σ_3, σ_4]
    x0, obs = torch.rand(16, ACT) * 2 - 1, torch.randn(16, OBS)
    loss, unweighted = ct_loss(cm, x0, obs, sigmas, probs, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == unweighted.ndim == 0 and not unweighted.requires_grad
    torch.testing.assert_close(loss.detach(), unweighted / (sigmas[4] - sigmas[3]))
    loss.backward()
    assert cm.net.inp.weight.grad.abs().sum() > 0


def test_ct_teacher_shares_the_student_dropout_mask():
    torch.manual_seed(0)
    cm = ConsistencyModel(small_net(dropout=0.5)).train()
    x0, obs = torch.rand(32, ACT) * 2 - 1, torch.randn(32, OBS)
    sigma = torch.full((32,), 1.0)
    # dropout is active: two plain calls differ
    assert not torch.equal(cm(x0, sigma, obs), cm(x0, sigma, obs))
    # σ_n == σ_m ⇒ x_n == x_m: with a shared mask the teacher equals the student exactly
    _, unweighted = ct_loss(cm, x0, obs, torch.tensor([1.0, 1.0]), torch.tensor([1.0]))
    assert unweighted.item() < 1e-12


def _cd_setup(**teacher_kw):
    torch.manual_seed(0)
    cm_kw = teacher_kw.pop("cm", {})
    teacher = EDMDenoiser(small_net(dropout=0.0, **teacher_kw.pop("net", {})), **teacher_kw).eval()
    model = ConsistencyModel(small_net(dropout=0.0), **cm_kw)
    return model, teacher


@pytest.mark.parametrize(
    "teacher_kw, word",
    [
        ({"net": {"fourier_scale": 0.02}}, "fourier_scale"),
        ({"net": {"hidden_dim": 32}}, "hidden_dim"),
        ({"sigma_max": 40.0}, "sigma_max"),
        ({"x_max": torch.tensor([1.0, 0.5])}, "x_max"),
    ],
)
def test_cd_refuses_incompatible_teacher(teacher_kw, word):
    model, teacher = _cd_setup(**teacher_kw)
    with pytest.raises(ConfigError, match=f"{word}: consistency model .*, teacher "):
        check_teacher_compatible(model, teacher)


def test_cd_accepts_compatible_teacher_and_state_dict_shapes_are_compared():
    model, teacher = _cd_setup(x_max=torch.ones(ACT))  # a tensor bound equal to the float one is compatible
    check_teacher_compatible(model, teacher)
    del teacher.net.config  # networks without a config are compared by their state-dict shapes
    teacher.net.out[1] = torch.nn.Linear(16, ACT, bias=False)
    with pytest.raises(ConfigError) as e:
        check_teacher_compatible(model, teacher)
    msg = str(e.value)  # where (the parameter), the model's shape, the teacher's
    assert "out.1.bias" in msg and "(2,)" in msg and "None" in msg


@pytest.mark.parametrize("solver, weighting", [("euler", "inverse_delta"), ("heun", "inverse_delta"),
                                               ("heun", "uniform")])
def test_cd_loss_by_hand(solver, weighting):
    model, teacher = _cd_setup()
    target = ConsistencyModel(small_net(dropout=0.0)).requires_grad_(False)
    sigmas = karras_sigmas(18)
    x0, obs = torch.rand(8, ACT) * 2 - 1, torch.randn(8, OBS)
    loss = cd_loss(model, target, teacher, x0, obs, sigmas, solver=solver, generator=torch.Generator().manual_seed(3),
                   weighting=weighting)
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 18, (8,), generator=g)
    t_n, t_m = sigmas[idx][:, None], sigmas[idx + 1][:, None]
    x_m = x0 + t_m * torch.randn(8, ACT, generator=g)
    with torch.no_grad():
        d = (x_m - teacher(x_m, t_m[:, 0], obs)) / t_m
        x_n = x_m + (t_n - t_m) * d
        if solver == "heun":
            x_n = x_m + (t_n - t_m) * (d + (x_n - teacher(x_n, t_n[:, 0], obs)) / t_n) / 2
        f_target = target(x_n, t_n[:, 0], obs)
    weight = 1 / (t_m - t_n) if weighting == "inverse_delta" else torch.ones_like(t_m)
    expected = (weight * (model(x_m, t_m[:, 0], obs) - f_target) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.net.inp.weight.grad is not None and teacher.net.inp.weight.grad is None


def test_cd_refuses_unknown_solver():
    model, teacher = _cd_setup()
    with pytest.raises(ConfigError, match="'rk4'"):
        cd_loss(
            model, model, teacher, torch.zeros(2, ACT), torch.zeros(2, OBS), karras_sigmas(18), solver="rk4"
        )



@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_given_noise_replays_the_generator_draws(nfe):
    """``noise=[nfe, B, A]`` (initial draw, then re-noising draws) gives exactly the generator's samples."""
    obs = torch.randn(6, OBS)
    cm, edm = ConsistencyModel(small_net()).eval(), EDMDenoiser(small_net()).eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.stack([torch.randn(6, ACT, generator=g) for _ in range(nfe)])  # the samplers' order of draws
    assert torch.equal(cm_sample(cm, obs, nfe, generator=torch.Generator().manual_seed(3)),
                       cm_sample(cm, obs, nfe, noise=noise))
    assert torch.equal(edm_sample(edm, obs, nfe, generator=torch.Generator().manual_seed(3)),
                       edm_sample(edm, obs, nfe, noise=noise))
    if nfe > 1:  # the re-noising draws are used: other z, other actions
        other = torch.cat([noise[:1], -noise[1:]])
        assert not torch.equal(cm_sample(cm, obs, nfe, noise=noise), cm_sample(cm, obs, nfe, noise=other))
    with pytest.raises(ConfigError, match=rf"expected shape \[{nfe}, 6, {ACT}\].*found \[{nfe}, 6, {ACT + 1}\]"):
        cm_sample(cm, obs, nfe, noise=torch.zeros(nfe, 6, ACT + 1))


class OvershootNet(torch.nn.Module):
    """F = w (a learnable constant, 100): every output lies far beyond the action bound."""

    act_dim = ACT

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((ACT,), 100.0))

    def forward(self, x, c_noise, obs):
        return self.w.expand_as(x)


@pytest.mark.parametrize("loss", ["ct", "cd"])
def test_student_beyond_the_bound_still_gets_a_gradient(loss):
    """The reference clips the student's output in the loss: a coordinate that overshoots the bound gets a zero
    gradient and never comes back (CT put the 'far' toy's samples on the box edge). Unclipped, it is pulled back."""
    x0, obs, sigmas = torch.zeros(16, ACT), torch.randn(16, OBS), karras_sigmas(18)
    grads = {}
    for clip in (False, True):
        model = ConsistencyModel(OvershootNet())
        if loss == "ct":
            out = ct_loss(model, x0, obs, sigmas, lognormal_index_probs(sigmas), clip_student=clip,
                          generator=torch.Generator().manual_seed(0))[0]
        else:
            teacher = EDMDenoiser(ConstantNet())
            out = cd_loss(model, model, teacher, x0, obs, sigmas, clip_student=clip,
                          generator=torch.Generator().manual_seed(0))
        out.backward()
        grads[clip] = model.net.w.grad.abs().sum().item()
    assert grads[True] == 0.0 and grads[False] > 0.0
