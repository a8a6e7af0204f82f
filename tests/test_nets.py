"""Networks: shapes, the parameter counts of the reference, EMA."""

import copy

import pytest
import torch

from idql_cm.nets import EMAWarmup, IDQLMlp, TwinQ, ValueNet, ema_update_


def n_trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("final_activation", [True, False])
def test_idqlmlp_param_count_and_shape(final_activation):
    net = IDQLMlp(17, 6, final_activation=final_activation)
    assert n_trainable(net) == 1_618_886  # CleanDiffuser IDQLMlp on halfcheetah ("IDQL ≈ 1.6M")
    assert net.time_emb[0].freqs.shape == (32,) and "time_emb.0.freqs" in net.state_dict()
    out = net(torch.randn(5, 6), torch.randn(5), torch.randn(5, 17))
    assert out.shape == (5, 6)
    assert isinstance(net.out[0], torch.nn.Mish if final_activation else torch.nn.Identity)


def test_fourier_scale_and_config():
    torch.manual_seed(0)
    small, large = IDQLMlp(3, 2, fourier_scale=0.02), IDQLMlp(3, 2, fourier_scale=16.0)
    assert small.time_emb[0].freqs.abs().max() < 0.1 < large.time_emb[0].freqs.abs().max()
    assert small.config["fourier_scale"] == 0.02 and small.config["hidden_dim"] == 256


def test_critics():
    q, v = TwinQ(17, 6), ValueNet(17)
    assert n_trainable(q) == 146_434 and n_trainable(v) == 71_681
    obs, act = torch.randn(4, 17), torch.randn(4, 6)
    q1, q2 = q.both(obs, act)
    assert q1.shape == q2.shape == (4, 1) and v(obs).shape == (4, 1)
    assert torch.equal(q(obs, act), torch.minimum(q1, q2))


def test_ema_update():
    net = IDQLMlp(3, 2, hidden_dim=8, emb_dim=4, n_blocks=1)
    ema = copy.deepcopy(net).requires_grad_(False)
    old = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.time_emb[0].freqs.mul_(2)
    ema_update_(ema, net, 0.9)
    for p_old, p_ema, p in zip(old, ema.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p_ema, 0.9 * p_old + 0.1 * p)
    assert torch.equal(ema.time_emb[0].freqs, net.time_emb[0].freqs)  # buffers are copied


def test_ema_warmup():
    w = EMAWarmup()
    assert w.decay(0) == 0.0
    assert w.decay(31_622) == pytest.approx(0.999, abs=1e-5)
    assert w.decay(10**9) == 0.9999
    assert EMAWarmup(min_value=0.5).decay(0) == 0.5
