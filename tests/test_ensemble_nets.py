"""Stacked member networks and per-member optimisation (idql_cm.nets.ensemble / member_optim): member k of a stacked
net trains as the solo net built under seed s + k, with its own generator.

Two ways of running the stacked layers are compared with the solo nets (``set_batched``):
- per member (the CPU default): the solo ops on each member's slice, so the comparison is exact (tolerance 0);
- batched (the GPU default, forced here on CPU): one ``baddbmm`` per linear layer and LayerNorm's affine as one
  ``addcmul``. Two sums then run in another order: a 1-wide output layer (F.linear's matrix-vector product vs a
  batched GEMM) and the LayerNorm affine's gradients (summed over the batch by autograd, not by LayerNorm's fused
  backward). Tolerance 1e-6 absolute on outputs, weights, EMA and first moments, 1e-6 relative on second moments,
  after 50 Adam steps at lr 1e-3; measured (1-thread CPU): 7e-8 on critic outputs, 1.2e-7 on weights, target and
  EMA, a few float32 ulps, which leaves ~8x headroom.
Each assertion message prints the measured maximum difference.
"""

from __future__ import annotations

import copy

import pytest
import torch

from idql_cm.nets import EMAWarmup, IDQLMlp, TwinQ, ValueNet, ema_update_
from idql_cm.nets.ensemble import (
    MemberDropout,
    MemberGenerators,
    StackedIDQLMlp,
    StackedLinear,
    StackedTwinQ,
    StackedValueNet,
    set_batched,
)
from idql_cm.nets.member_optim import MemberAdam, member_ema_update_, member_finite, per_member_grad_norm

S, SEED, B, OBS, ACT = 3, 7, 32, 5, 3
TOLERANCE = {False: 0.0, True: 1e-6}  # by set_batched mode
MLP = dict(emb_dim=16, hidden_dim=32, n_blocks=2, expand=2, dropout=0.1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def solo_nets(cls, *args, **kwargs):
    """The solo nets of seeds SEED + k, each built right after manual_seed (as a solo run builds under its seed)."""
    nets = []
    for k in range(S):
        torch.manual_seed(SEED + k)
        nets.append(cls(*args, **kwargs))
    return nets


def update_seed(k: int, step: int) -> int:
    return 1_000_003 * (SEED + k) + step  # stands in for step_seed(seed + k, rank, step, 1)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def test_dropout_draws_what_nn_dropout_draws():
    x = torch.randn(S, B, 40)
    rng = MemberGenerators(S).seed_([update_seed(k, 0) for k in range(S)])
    out = MemberDropout(0.1, rng).train()(x)
    drop = torch.nn.Dropout(0.1).train()
    for k in range(S):
        torch.default_generator.manual_seed(update_seed(k, 0))  # the solo update's seeding
        assert torch.equal(out[k], drop(x[k])), f"member {k}: mask differs from nn.Dropout's"
    # both streams continue alike after the masks
    torch.default_generator.manual_seed(update_seed(0, 0))
    drop(x[0])
    assert torch.equal(torch.randn(8), torch.randn(8, generator=rng.generators[0]))
    assert torch.equal(MemberDropout(0.1, rng).eval()(x), x) and torch.equal(MemberDropout(0.0).train()(x), x)
    with pytest.raises(RuntimeError, match="bind_rng"):
        MemberDropout(0.1).train()(x)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("out", [64, 1])
def test_stacked_linear_equals_per_member_linear(batched, out):
    lins = solo_nets(torch.nn.Linear, 23, out)
    st = StackedLinear(S, 23, out)
    st.batched = batched
    with torch.no_grad():
        st.weight.copy_(torch.stack([lin.weight for lin in lins]))
        st.bias.copy_(torch.stack([lin.bias for lin in lins]))
    x = torch.randn(S, B, 23)
    d = max((st(x)[k] - lins[k](x[k])).abs().max().item() for k in range(S))
    assert d <= TOLERANCE[batched], f"stacked linear vs nn.Linear: max abs difference {d:.3g}"


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "twin_q", "value"])
def test_member_state_dict_round_trip(kind, batched):
    if kind == "mlp":
        nets, cls = solo_nets(IDQLMlp, OBS, ACT, **MLP), StackedIDQLMlp
        args = (torch.randn(S, B, ACT), torch.randn(S, B), torch.randn(S, B, OBS))
    elif kind == "twin_q":
        nets, cls = solo_nets(TwinQ, OBS, ACT, 32), StackedTwinQ
        args = (torch.randn(S, B, OBS), torch.randn(S, B, ACT))
    else:
        nets, cls = solo_nets(ValueNet, OBS, 32), StackedValueNet
        args = (torch.randn(S, B, OBS),)
    st = cls.from_members(nets).eval()
    set_batched(st, batched)
    assert [n for n, _ in st.named_parameters()] == [n for n, _ in nets[0].named_parameters()]
    with torch.no_grad():
        out = st(*args)
        for k, net in enumerate(nets):
            state = st.member_state_dict(k)
            assert list(state) == list(net.state_dict())
            assert all(torch.equal(state[key], v) for key, v in net.state_dict().items()), f"member {k} not copied"
            fresh = st.member(k).eval()  # a solo net of the solo class, loaded from member k
            assert torch.equal(fresh(*(a[k] for a in args)), net.eval()(*(a[k] for a in args)))
            d = (out[k] - net(*(a[k] for a in args))).abs().max().item()
            assert d <= TOLERANCE[batched], f"{kind} member {k}: stacked forward vs solo: max abs difference {d:.3g}"
    # members differ (their own seeds), and the copy does not alias the solo net
    assert not torch.equal(st.member_state_dict(0)[next(iter(net.state_dict()))], st.member_state_dict(1)[
        next(iter(net.state_dict()))])
    with torch.no_grad():
        next(iter(nets[0].parameters())).add_(1.0)
    assert not torch.equal(next(iter(nets[0].parameters())), next(iter(st.parameters()))[0])


def test_from_members_refuses_mixed_architectures():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="differ in architecture"):
        StackedIDQLMlp.from_members([IDQLMlp(OBS, ACT, **MLP), IDQLMlp(OBS, ACT, **{**MLP, "hidden_dim": 16})])
    with pytest.raises(TypeError, match="expected IDQLMlp"):
        StackedIDQLMlp.from_members([ValueNet(OBS, 8)])


def edm_like_loss(model, x0, obs, sigma, eps):
    """A denoising loss with noise level sigma [B] and eps [B, A] (the EDM loss' draws), per sample mean."""
    c_noise = 0.25 * sigma.log()
    pred = model(x0 + sigma[..., None] * eps, c_noise, obs)
    return ((pred - x0) ** 2).mean(dim=(-2, -1))


@pytest.mark.parametrize(("optim", "batched"), [("torch_adam", False), ("member_adam", False), ("member_adam", True)])
def test_stacked_mlp_trains_like_solo_runs(optim, batched):
    """50 steps with dropout on: loss noise, then dropout masks, from each member's generator (the solo order)."""
    nets = solo_nets(IDQLMlp, OBS, ACT, **MLP)
    rng = MemberGenerators(S)
    st = StackedIDQLMlp.from_members(nets, rng).train()
    set_batched(st, batched)
    tol = TOLERANCE[batched]
    ema_solo = [copy.deepcopy(n).requires_grad_(False).eval() for n in nets]
    ema_st = copy.deepcopy(st).requires_grad_(False).eval()
    solo_opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]
    opt = (torch.optim.Adam(st.parameters(), lr=1e-3) if optim == "torch_adam"
           else MemberAdam(st.parameters(), S, lr=1e-3))
    warm = EMAWarmup(power=2 / 3, max_value=0.999)
    data = torch.Generator().manual_seed(1)
    x0, obs = torch.rand(S, 256, ACT, generator=data) * 2 - 1, torch.randn(S, 256, OBS, generator=data)
    for step in range(50):
        rows = [torch.randint(256, (B,), generator=torch.Generator().manual_seed(update_seed(k, -step)))
                for k in range(S)]  # member k's own batch
        bx, bo = torch.stack([x0[k, r] for k, r in enumerate(rows)]), torch.stack([obs[k, r] for k, r in enumerate(rows)])
        rng.seed_([update_seed(k, step) for k in range(S)])
        sigma = (rng.randn((B,)) * 1.2 - 1.2).exp()
        eps = rng.randn((B, ACT))
        loss = edm_like_loss(st, bx, bo, sigma, eps)  # [S]
        opt.zero_grad()
        loss.sum().backward()  # the sum: member k's gradient is its own loss' gradient
        opt.step()
        member_ema_update_(ema_st, st, warm.decay(step))
        for k, net in enumerate(nets):
            torch.default_generator.manual_seed(update_seed(k, step))
            s_k = (torch.randn(B) * 1.2 - 1.2).exp()
            e_k = torch.randn(B, ACT)
            solo_opts[k].zero_grad()
            edm_like_loss(net, bx[k], bo[k], s_k, e_k).backward()
            solo_opts[k].step()
            ema_update_(ema_solo[k], net, warm.decay(step))
    for k, net in enumerate(nets):
        dw = max_diff(st.member_state_dict(k), net.state_dict())
        de = max_diff(ema_st.member_state_dict(k), ema_solo[k].state_dict())
        assert dw <= tol and de <= tol, f"member {k}: weights differ by {dw:.3g}, EMA by {de:.3g} (tolerance {tol})"
        for p_st, p in zip(st.parameters(), net.parameters(), strict=True):
            mine = opt.state[p_st]
            ref = solo_opts[k].state[p]
            m = (mine["exp_avg"][k] - ref["exp_avg"]).abs().max().item()
            v = ((mine["exp_avg_sq"][k] - ref["exp_avg_sq"]).abs() / ref["exp_avg_sq"].clamp_min(1e-30)).max().item()
            step_k = mine["step"] if optim == "torch_adam" else mine["step"][k]
            assert float(step_k) == float(ref["step"]) == 50.0
            assert m <= tol and v <= tol, f"member {k}: exp_avg differs by {m:.3g}, exp_avg_sq by {v:.3g} (relative)"
    assert max_diff(st.member_state_dict(0), st.member_state_dict(1)) > 1e-3  # the members are not one net


@pytest.mark.parametrize("batched", [False, True])
def test_stacked_critics_train_like_solo_runs(batched):
    """IQL's critic update (expectile V on the target twin-min Q, TD on V, Polyak target) for 50 steps."""
    qs, vs = solo_nets(TwinQ, OBS, ACT, 32), solo_nets(ValueNet, OBS, 32)
    q_t = [copy.deepcopy(q).requires_grad_(False) for q in qs]
    sq, sv = StackedTwinQ.from_members(qs), StackedValueNet.from_members(vs)
    set_batched(sq, batched)
    set_batched(sv, batched)
    sq_t = copy.deepcopy(sq).requires_grad_(False)
    tol = TOLERANCE[batched]
    opts = [torch.optim.Adam(list(q.parameters()) + list(v.parameters()), lr=1e-3) for q, v in zip(qs, vs, strict=True)]
    opt = torch.optim.Adam(list(sq.parameters()) + list(sv.parameters()), lr=1e-3)

    def loss_fn(q, qt, v, obs, act, rew, nxt):
        with torch.no_grad():
            target_q = qt(obs, act)
            td = rew + 0.99 * v(nxt)
        val = v(obs)
        u = target_q - val
        v_loss = (torch.where(u < 0, 0.3, 0.7) * u.square()).mean(dim=(-2, -1))
        q1, q2 = q.both(obs, act)
        return v_loss + ((q1 - td).square() + (q2 - td).square()).mean(dim=(-2, -1))

    data = torch.Generator().manual_seed(2)
    for _ in range(50):
        obs, act = torch.randn(S, B, OBS, generator=data), torch.rand(S, B, ACT, generator=data)
        rew, nxt = torch.randn(S, B, 1, generator=data), torch.randn(S, B, OBS, generator=data)
        opt.zero_grad()
        loss_fn(sq, sq_t, sv, obs, act, rew, nxt).sum().backward()
        opt.step()
        member_ema_update_(sq_t, sq, 0.995)
        for k in range(S):
            opts[k].zero_grad()
            loss_fn(qs[k], q_t[k], vs[k], obs[k], act[k], rew[k], nxt[k]).backward()
            opts[k].step()
            ema_update_(q_t[k], qs[k], 0.995)
    for k in range(S):
        d = max(max_diff(sq.member_state_dict(k), qs[k].state_dict()),
                max_diff(sv.member_state_dict(k), vs[k].state_dict()),
                max_diff(sq_t.member_state_dict(k), q_t[k].state_dict()))
        assert d <= tol, f"member {k}: Q / V / target differ by {d:.3g} (tolerance {tol})"


@pytest.mark.parametrize("decoupled", [False, True])
def test_member_adam_with_skipped_members_is_solo_adam(decoupled):
    """Given the same gradients, MemberAdam's member k equals torch's Adam (AdamW) on member k bit for bit, also when
    some members skip updates (their step count, weights and moments stay)."""
    torch.manual_seed(3)
    shapes = [(S, 16, 7), (S, 16), (S, 1)]
    stacked = [torch.randn(*s, requires_grad=True) for s in shapes]
    solo = [[p[k].detach().clone().requires_grad_() for p in stacked] for k in range(S)]
    kw = dict(lr=1e-2, weight_decay=0.01 if decoupled else 0.1)
    box: list = [None]  # what the check inside the closure decides (nonfinite: skip in on_before_optimizer_step)
    opt = MemberAdam(stacked, S, decoupled=decoupled, members_after_closure=lambda: box[0], **kw)
    ref = [(torch.optim.AdamW if decoupled else torch.optim.Adam)(ps, **kw) for ps in solo]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    ref_sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=60) for o in ref]
    skip = {(5, 1), (6, 1), (20, 0), (20, 2), (33, 1)}  # (step, member)
    for step in range(50):
        grads = [torch.randn(*s) for s in shapes]
        mask = torch.tensor([(step, k) not in skip for k in range(S)])
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g.clone()
        if step % 2:
            opt.step(members=mask)
        else:  # the mask a check inside the closure decides, asked for after the closure ran
            box[0] = None
            opt.step(closure=lambda m=mask: box.__setitem__(0, m))
        sched.step()
        for k in range(S):
            if mask[k]:
                for p, g in zip(solo[k], grads, strict=True):
                    p.grad = g[k].clone()
                ref[k].step()
            ref_sched[k].step()  # the schedule counts every update, skipped or not (as the modules do)
    for k in range(S):
        for p, q in zip(stacked, solo[k], strict=True):
            assert torch.equal(p[k], q), f"member {k}: weights differ by {(p[k] - q).abs().max().item():.3g}"
            mine, theirs = opt.member_state(p, k), ref[k].state[q]
            assert float(mine["step"]) == float(theirs["step"]) == 50 - sum(1 for _, m in skip if m == k)
            assert torch.equal(mine["exp_avg"], theirs["exp_avg"]) and torch.equal(mine["exp_avg_sq"],
                                                                                     theirs["exp_avg_sq"])


def test_member_adam_refuses_unstacked_parameters():
    with pytest.raises(ValueError, match=r"expected parameters \[3, ...\]"):
        MemberAdam([torch.zeros(4, 2, requires_grad=True)], 3)


def test_per_member_grad_norm_and_finiteness():
    torch.manual_seed(4)
    params = [torch.randn(S, 8, 4, requires_grad=True), torch.randn(S, 8, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    norms = per_member_grad_norm(params, S)
    for k in range(S):
        solo = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad[k] for p in params])))
        assert torch.allclose(norms[k], solo, rtol=1e-6), f"member {k}: {norms[k]} vs solo {solo}"
    assert member_finite([p.grad for p in params] + [norms], S).all()
    params[1].grad[1, 3] = float("nan")
    loss = torch.tensor([0.5, 0.1, float("inf")])
    assert member_finite([p.grad for p in params], S).tolist() == [True, False, True]
    assert member_finite([loss, per_member_grad_norm(params, S)], S).tolist() == [True, False, False]


def test_member_ema_with_rates_and_skips_is_solo_ema():
    nets = solo_nets(IDQLMlp, OBS, ACT, **MLP)
    st = StackedIDQLMlp.from_members(nets)
    ema_solo = [copy.deepcopy(n) for n in nets]
    ema_st = copy.deepcopy(st)
    warm = EMAWarmup(power=2 / 3, max_value=0.999)
    skip = {(2, 0), (3, 2)}
    for step in range(10):
        with torch.no_grad():
            for p in st.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            for k, n in enumerate(nets):
                for p, q in zip(n.parameters(), st.parameters(), strict=True):
                    p.copy_(q[k])
        mask = torch.tensor([(step, k) not in skip for k in range(S)])
        rates = torch.tensor([warm.decay(step + k) for k in range(S)], dtype=torch.float64)  # a rate per member
        member_ema_update_(ema_st, st, rates, mask)
        for k in range(S):
            if mask[k]:
                ema_update_(ema_solo[k], nets[k], warm.decay(step + k))
    for k in range(S):
        d = max_diff(ema_st.member_state_dict(k), ema_solo[k].state_dict())
        assert d == 0.0, f"member {k}: EMA differs by {d:.3g}"


def test_fork_shares_dropout_masks_as_ct_does():
    """CT's student and teacher forwards share their masks (torch.random.fork_rng in ct_loss): ``rng.fork()``."""
    nets = solo_nets(IDQLMlp, OBS, ACT, **MLP)
    rng = MemberGenerators(S).seed_([update_seed(k, 9) for k in range(S)])
    st = StackedIDQLMlp.from_members(nets, rng).train()
    x, c, o = torch.randn(S, B, ACT), torch.randn(S, B), torch.randn(S, B, OBS)
    with rng.fork():
        student = st(x, c, o)
    with torch.no_grad():
        teacher = st(x, c, o)
    after = rng.randn((4,))
    assert torch.equal(student, teacher)
    for k, net in enumerate(nets):
        torch.default_generator.manual_seed(update_seed(k, 9))
        with torch.random.fork_rng(devices=[]):
            s_k = net.train()(x[k], c[k], o[k])
        with torch.no_grad():
            t_k = net(x[k], c[k], o[k])
        assert torch.equal(torch.randn(4), after[k]), f"member {k}: the stream moved on differently"
        d = max((s_k - student[k]).abs().max().item(), (t_k - teacher[k]).abs().max().item())
        assert d == 0.0, f"member {k}: CT forwards differ by {d:.3g}"
