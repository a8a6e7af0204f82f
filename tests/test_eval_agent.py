"""IDQLAgent: batching, input kinds, checks, selection math and re-ranking on a toy bandit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idql_cm.errors import CheckpointError, ConfigError, DataError, IDQLError
from idql_cm.eval.agent import ActorPolicy, IDQLAgent, select_candidates


class UniformActor:
    """Behaviour policy with actions uniform in [-1, 1]; records the batch shapes it was called with."""

    kind = "ct"
    env_id = None
    task = None

    def __init__(self, obs_dim=1, act_dim=1):
        self.obs_dim, self.act_dim, self.device = obs_dim, act_dim, torch.device("cpu")
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def sample(self, obs, nfe, generator=None):
        self.calls.append((tuple(obs.shape), nfe))
        return torch.rand(obs.shape[0], self.act_dim, generator=generator) * 2 - 1


class BanditCritic:
    """1-step contextual bandit: Q(s, a) = -(a_0 - s_0)^2, V = 0, so the advantage is Q."""

    def __init__(self, obs_dim=1, act_dim=1):
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.calls: list[tuple[int, ...]] = []

    def advantage(self, obs, act):
        self.calls.append(tuple(act.shape))
        return -(act[:, 0] - obs[:, 0]) ** 2


def test_one_batched_actor_call_and_one_critic_call():
    actor, critic = UniformActor(3, 2), BanditCritic(3, 2)
    agent = IDQLAgent(actor, critic, num_candidates=7, temperature=10.0)
    out = agent.act(torch.zeros(5, 3), nfe=2)
    assert out.shape == (5, 2)
    assert actor.calls == [((35, 3), 2)]          # obs repeated N times: [B·N, O], requested NFE passed on
    assert critic.calls == [(35, 2)]


def test_chosen_actions_are_candidates_of_their_own_state():
    # argmax with distinct states: each state's action must be its own best candidate (checks the [B, N] reshape)
    actor, critic = UniformActor(1, 1), BanditCritic(1, 1)
    agent = IDQLAgent(actor, critic, num_candidates=512, selection="argmax")
    s = torch.tensor([[-0.9], [0.0], [0.9]])
    a = agent.act(s, nfe=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, s, atol=0.02)


def test_behaviour_policy_alone_without_critic():
    actor = UniformActor(4, 2)
    agent = IDQLAgent(actor, None)
    out = agent.act(np.zeros((6, 4)), nfe=1)
    assert actor.calls == [((6, 4), 1)] and out.shape == (6, 2)
    assert not agent.is_idql


def test_numpy_in_numpy_out_tensor_in_tensor_out():
    agent = IDQLAgent(UniformActor(3, 2), BanditCritic(3, 2), num_candidates=4)
    a = agent.act(np.zeros((2, 3), dtype=np.float64), nfe=1)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (2, 2)
    single = agent.act(np.zeros(3), nfe=1)
    assert isinstance(single, np.ndarray) and single.shape == (2,)
    t = agent.act(torch.zeros(2, 3), nfe=1)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 2)
    assert t.is_inference()                        # ran under torch.inference_mode
    p = ActorPolicy(UniformActor(3, 2))
    assert p.kind == "ct" and p.obs_dim == 3
    assert isinstance(p.sample(np.zeros((4, 3)), nfe=1), np.ndarray)


def test_generator_makes_actions_reproducible():
    agent = IDQLAgent(UniformActor(2, 2), BanditCritic(2, 2), num_candidates=16, temperature=3.0)
    obs = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    a1 = agent.act(obs, 1, generator=torch.Generator().manual_seed(5))
    a2 = agent.act(obs, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2)


def test_obs_shape_checked_with_a_one_line_error():
    agent = IDQLAgent(UniformActor(17, 6), None)
    with pytest.raises(DataError) as e:
        agent.act(np.zeros((4, 11)), nfe=1)
    msg = str(e.value)
    assert "17" in msg and "[4, 11]" in msg and "\n" not in msg
    with pytest.raises(DataError):
        agent.act(np.zeros((2, 3, 17)), nfe=1)


def test_critic_of_another_task_is_refused_naming_both_sides():
    with pytest.raises(CheckpointError) as e:
        IDQLAgent(UniformActor(17, 6), BanditCritic(11, 3))
    msg = str(e.value)
    assert "critic" in msg and "11/3" in msg and "17/6" in msg  # both sides: the critic's sizes and the actor's
    assert isinstance(e.value, IDQLError) and "\n" not in msg


@pytest.mark.parametrize("kwargs", [dict(selection="best"), dict(num_candidates=0), dict(temperature=-1.0)])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        IDQLAgent(UniformActor(), BanditCritic(), **kwargs)


# ---------------------------------------------------------------------------------------------- selection math
ADV = torch.tensor([[0.0, 0.3, 0.1, 0.29]])


def _frequencies(temperature, n=40000, selection="softmax", adv=ADV):
    g = torch.Generator().manual_seed(123)
    idx = select_candidates(adv.expand(n, -1), temperature, selection, generator=g)
    return torch.bincount(idx, minlength=adv.shape[1]).double() / n


def test_large_temperature_is_argmax():
    assert torch.equal(_frequencies(1e5), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(_frequencies(math.inf), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(_frequencies(1.0, selection="argmax"), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_zero_temperature_is_uniform_over_candidates():
    f = _frequencies(0.0)
    # 40000 draws: the binomial std of a frequency is sqrt(.25*.75/40000) ≈ 0.0022; allow 5 std
    assert torch.all((f - 0.25).abs() < 0.011), f


def test_moderate_temperature_matches_softmax_probabilities():
    f = _frequencies(10.0)
    p = torch.softmax(10.0 * ADV[0].double(), dim=0)
    assert torch.all((f - p).abs() < 0.012), (f, p)


def test_non_finite_advantages_never_win():
    adv = torch.tensor([[float("nan"), 0.0, float("-inf"), -1.0]])
    assert set(select_candidates(adv.expand(1000, -1), 1.0, generator=torch.Generator().manual_seed(0)).tolist()) \
        <= {1, 3}
    assert select_candidates(adv, 1.0, "argmax").item() == 1


# -------------------------------------------------------------------------------------------------- toy bandit
def test_idql_reranking_beats_the_behaviour_policy_on_a_bandit():
    """Behaviour actions uniform in [-1, 1], Q(s, a) = -(a - s)^2: re-ranking must pick clearly better actions."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2000, 1, generator=g) * 2 - 1
    critic = BanditCritic()

    def mean_q(agent):
        a = agent.act(s, nfe=1, generator=torch.Generator().manual_seed(1))
        return critic.advantage(s, a).mean().item()

    q_bc = mean_q(IDQLAgent(UniformActor(), None))
    q_soft = mean_q(IDQLAgent(UniformActor(), critic, num_candidates=64, temperature=100.0))
    q_argmax = mean_q(IDQLAgent(UniformActor(), critic, num_candidates=64, selection="argmax"))
    # E[-(a - s)^2] for a ~ U[-1, 1], s ~ U[-1, 1] is -2/3
    assert abs(q_bc + 2 / 3) < 0.05
    assert q_soft > q_bc + 0.5 and q_soft > -0.05
    assert q_argmax >= q_soft - 1e-3 and q_argmax > -0.01
