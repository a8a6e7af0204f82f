"""MeanFlow's math, checked against hand computations and a field whose average velocity is known in closed form."""

from __future__ import annotations

import pytest
import torch

from idql_cm.diffusion.meanflow import (
    H_FEATURES,
    MeanFlowModel,
    interval_features,
    meanflow_grid,
    meanflow_loss,
    meanflow_sample,
    sample_t_r,
    shortcut_target,
)
from idql_cm.errors import ConfigError
from idql_cm.nets.ensemble import MemberGenerators, StackedIDQLMlp
from idql_cm.nets.mlp import IDQLMlp

OBS, ACT = 3, 2


class PointMassField(torch.nn.Module):
    """The exact average velocity of the data ``x0(obs)`` (a point mass per state): z_t = (1 − t)·x0 + t·ε moves on a
    straight line, so u(z, r, t) = v = (z − x0)/t for every r. A "net" that returns it (ignoring the features)."""

    act_dim = ACT

    def __init__(self):
        super().__init__()
        self.calls = 0

    @staticmethod
    def x0(obs):
        return torch.tanh(obs[..., :ACT])

    def forward(self, z, t, cond):
        self.calls += 1
        obs = cond[..., :OBS]
        return (z - self.x0(obs)) / t[..., None]


def test_t_r_are_ordered_and_the_flow_share_has_r_equal_t():
    like = torch.zeros(1)
    t, r = sample_t_r((20000,), like, torch.Generator().manual_seed(0), flow_share=0.75, P_mean_t=-0.4, P_std_t=1.0,
                      P_mean_r=-0.4, P_std_r=1.0)
    assert bool((t >= r).all()) and bool(((t > 0) & (t < 1)).all())
    # r = t on the flow share, and where an independent r drew above t (r = min(t, r)): 0.75 + 0.25 / 2
    assert (t == r).float().mean().item() == pytest.approx(0.875, abs=0.01)
    # the default sampler (the authors' code): t's logit ~ N(-0.6, 1.6), r's ~ N(-4, 1.6), then r <= t
    t1, r1 = sample_t_r((20000,), like, torch.Generator().manual_seed(1), flow_share=0.0)
    assert torch.logit(t1).mean().item() == pytest.approx(-0.6, abs=0.05)
    assert torch.logit(t1).std().item() == pytest.approx(1.6, abs=0.05)
    assert torch.logit(r1).median().item() == pytest.approx(-4.0, abs=0.1)  # min(t, r) barely moves r
    assert bool((r1 <= t1).all())


def test_the_identity_target_of_the_exact_field_is_the_field_itself():
    """For the point-mass field, u_tgt = v − (t − r)·(v·∂_z u + ∂_t u) = v exactly (the JVP is 0), so the loss is 0
    at every (t, r): the JVP's tangent (v, 0, 1) and the stop-gradient target are right."""
    model = MeanFlowModel(PointMassField())
    x = PointMassField.x0(torch.randn(64, OBS))
    obs = torch.cat([torch.atanh(x.clamp(-0.999, 0.999)), torch.randn(64, OBS - ACT)], dim=-1)
    x = PointMassField.x0(obs)
    loss, raw = meanflow_loss(model, x, obs, torch.Generator().manual_seed(0), flow_share=0.0)
    assert raw.item() < 1e-9 and loss.item() < 1e-6


def test_a_wrong_tangent_would_be_seen():
    """The same field with the velocity scaled (a wrong u) gives a non-zero JVP term and a loss that matches a
    hand computation: u = 2v has u_tgt = v − (t − r)·d(2(z − x0)/t)/dt = v − (t − r)·(2v/t − 2v/t) = v."""
    class Twice(PointMassField):
        def forward(self, z, t, cond):
            return 2 * super().forward(z, t, cond)

    g = torch.Generator().manual_seed(3)
    obs = torch.randn(16, OBS)
    x = PointMassField.x0(obs)
    _, raw = meanflow_loss(MeanFlowModel(Twice()), x, obs, g, flow_share=0.0)
    g = torch.Generator().manual_seed(3)
    t, r = sample_t_r((16,), x, g, 0.0)
    eps = torch.randn(x.shape, generator=g)
    v = eps - x
    assert raw.item() == pytest.approx((v - 2 * v).pow(2).sum(-1).mean().item(), rel=1e-5)


def test_the_adaptive_weight_matches_a_hand_computation():
    class Zero(torch.nn.Module):
        act_dim = ACT

        def forward(self, z, t, cond):
            return torch.zeros_like(z)

    obs, x = torch.randn(8, OBS), torch.rand(8, ACT) * 2 - 1
    loss, raw = meanflow_loss(MeanFlowModel(Zero()), x, obs, torch.Generator().manual_seed(5), flow_share=1.0,
                              adaptive_p=1.0, adaptive_c=1e-3)
    g = torch.Generator().manual_seed(5)
    sample_t_r((8,), x, g, 1.0)
    v = torch.randn(x.shape, generator=g) - x       # r = t: the target is v; u = 0
    err = v.pow(2).sum(-1)
    assert raw.item() == pytest.approx(err.mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx((err / (err + 1e-3)).mean().item(), rel=1e-6)


def test_the_shortcut_rows_learn_the_one_step_map_from_the_two_step_composition():
    """shortcut_share 1: every row at (r, t) = (0, 1), z = ε, trained towards the stop-gradient two-step composition
    (a hand computation with the same draws); share 0 draws nothing more and gives the plain loss bit for bit."""
    torch.manual_seed(0)
    model = MeanFlowModel(IDQLMlp(OBS + H_FEATURES, ACT, emb_dim=16, hidden_dim=32, n_blocks=1, dropout=0.0))
    obs, x = torch.randn(8, OBS), torch.rand(8, ACT) * 2 - 1
    plain = meanflow_loss(model, x, obs, torch.Generator().manual_seed(5))
    zero = meanflow_loss(model, x, obs, torch.Generator().manual_seed(5), shortcut_share=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True))

    loss, raw = meanflow_loss(model, x, obs, torch.Generator().manual_seed(5), shortcut_share=1.0)
    g = torch.Generator().manual_seed(5)
    sample_t_r((8,), x, g)
    eps = torch.randn(x.shape, generator=g)
    ones = torch.ones(8)
    with torch.no_grad():
        u_late = model(eps, ones * 0.5, ones, obs)                        # the step from t = 1 to ½ ...
        u_early = model(eps - 0.5 * u_late, ones * 0.0, ones * 0.5, obs)  # ... then from ½ to 0
        err = (model(eps, ones * 0.0, ones, obs) - 0.5 * (u_late + u_early)).pow(2).sum(-1)
    assert torch.allclose(shortcut_target(model, eps, obs), 0.5 * (u_late + u_early))
    assert raw.item() == pytest.approx(err.mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx((err / (err + 1e-3)).mean().item(), rel=1e-5)
    assert not torch.equal(raw, plain[1])  # the target did change
    raw.backward()  # the gradient reaches the one-step map only (the target is under no_grad)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_sampling_counts_evaluations_and_recovers_the_point_mass(nfe):
    field = PointMassField()
    model = MeanFlowModel(field, x_min=-1.0, x_max=1.0)
    obs = torch.randn(10, OBS)
    noise = torch.randn(nfe, 10, ACT)
    a = meanflow_sample(model, obs, nfe, noise=noise)
    assert field.calls == nfe
    torch.testing.assert_close(a, PointMassField.x0(obs), atol=1e-5, rtol=0)  # exact field: any nfe lands on x0
    assert torch.equal(meanflow_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_one_step_is_noise_minus_u_and_replays_its_noise():
    torch.manual_seed(0)
    net = IDQLMlp(OBS + H_FEATURES, ACT, emb_dim=16, hidden_dim=32, n_blocks=1, expand=2, dropout=0.0)
    model = MeanFlowModel(net, x_min=-10.0, x_max=10.0).eval()
    obs, noise = torch.randn(6, OBS), torch.randn(1, 6, ACT)
    a = meanflow_sample(model, obs, 1, noise=noise)
    by_hand = noise[0] - net(noise[0], torch.ones(6), torch.cat([obs, interval_features(torch.ones(6))], -1))
    torch.testing.assert_close(a, by_hand)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(meanflow_sample(model, obs, 2, generator=g1), meanflow_sample(model, obs, 2, generator=g2))
    with pytest.raises(ConfigError, match="expected shape"):
        meanflow_sample(model, obs, 2, noise=noise)
    with pytest.raises(ConfigError, match="nfe ≥ 1"):
        meanflow_sample(model, obs, 0)


def test_stacked_members_draw_and_lose_as_their_solo_runs():
    """Member k of a stacked model, drawing from generator k, has the loss of the solo model drawing from a
    generator seeded alike (the contract num_seeds relies on)."""
    torch.manual_seed(0)
    nets = [IDQLMlp(OBS + H_FEATURES, ACT, emb_dim=16, hidden_dim=32, n_blocks=1, expand=2, dropout=0.0)
            for _ in range(2)]
    rng = MemberGenerators(2).seed_([11, 12])
    stacked = MeanFlowModel(StackedIDQLMlp.from_members(nets, rng))
    obs, x = torch.randn(2, 8, OBS), torch.rand(2, 8, ACT) * 2 - 1
    loss_s, _ = meanflow_loss(stacked, x, obs, rng, flow_share=0.5)
    for k in range(2):
        solo, _ = meanflow_loss(MeanFlowModel(nets[k]), x[k], obs[k], torch.Generator().manual_seed(11 + k),
                                flow_share=0.5)
        assert loss_s[k].item() == pytest.approx(solo.item(), rel=1e-5)


def test_interval_features_are_smooth_in_h():
    """The JVP differentiates the features of h = t − r: each must change by at most 1 per unit of h (the authors'
    positional embedding). Oscillating features (cos / sin(π·2^k·h)) made du/dt huge and training fail."""
    h = torch.linspace(0, 1, 201, requires_grad=True)
    feats = interval_features(h)
    assert feats.shape == (201, H_FEATURES)
    slopes = torch.stack([torch.autograd.grad(feats[:, j].sum(), h, retain_graph=True)[0] for j in range(H_FEATURES)])
    assert slopes.abs().max().item() <= 1.0 + 1e-6
    assert (feats[-1] - feats[0]).abs().max().item() > 0.5  # and they do tell h = 0 from h = 1
