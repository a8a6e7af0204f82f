"""MeanFlow's design choices on a toy whose modes are known: the ablation behind docs/quality.md's MeanFlow table.

A standalone loop over the package's own MeanFlow math (``idql_cm.diffusion.meanflow``: model, loss, sampler) on one
of ``make quality``'s 2-D toys, one thread; the variants swap in the alternatives that were measured against the
shipped choices. Usage (key=value; defaults are the shipped MeanFlow settings)::

    python -m benchmarks.meanflow_toy toy=counts steps=5000 seed=0
    python -m benchmarks.meanflow_toy steps=1500 sampler=paper features=octaves      # the first design
    python -m benchmarks.meanflow_toy toy=wide6 data_seed=1 share=0.5                 # any quality toy and layout

``sampler``: ``code`` (the authors' code: t ~ LN(-0.6, 1.6), r ~ LN(-4, 1.6), r = t on ``share``, r <= t; shipped) or
``paper`` (one LN(-0.4, 1.0) for both, ordered, r = t on ``share``); ``share``: the r = t share (0.25 with ``code``,
0.75 with ``paper`` unless given); ``features``: ``positional`` (shipped), ``octaves`` (cos / sin(pi 2^k h),
k = 0..7) or ``low`` (cos / sin(pi f h), f <= 2); ``fs``: the time embedding's Fourier scale; ``p``: the adaptive
weight's power; ``pmt``: the mean of t's logit-normal (``code``: -0.6); ``tone``: the share of the r != t pairs
drawn at t = 1 exactly, the one-step map's starting time (0: none, shipped); ``shortcut``: the share of each batch
at (r, t) = (0, 1) trained towards the two-step composition (``meanflow_loss(shortcut_share=...)``; 0: none,
shipped), ``shortcut_from=ema``: that target from the EMA network; ``toy`` / ``data_seed``: any toy of
``make quality`` and its mode layout. Prints one JSON line: precision and the worst mode's share / true share at NFE 1, 2, 4.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import numpy as np
import torch

from idql_cm.data.toys import RADIUS
from idql_cm.data.toys import toy as make_toy
from idql_cm.diffusion import meanflow as mf
from idql_cm.eval.fidelity import mode_stats
from idql_cm.nets.ema import ema_update_
from idql_cm.nets.mlp import IDQLMlp


def _features(kind: str):
    if kind == "positional":
        return mf.interval_features
    n = mf.H_FEATURES // 2

    def octaves(h):
        phase = math.pi * h[..., None] * 2.0 ** torch.arange(n, dtype=h.dtype)
        return torch.cat([phase.cos(), phase.sin()], dim=-1)

    def low(h):
        phase = math.pi * h[..., None] * torch.linspace(0.25, 2.0, n, dtype=h.dtype)
        return torch.cat([phase.cos(), phase.sin()], dim=-1)

    return {"octaves": octaves, "low": low}[kind]


def _paper_sample_t_r(shape, like, generator, flow_share, P_mean_t, P_std_t, *_):
    """The paper's image setting: one logit-normal for t and r, ordered (t >= r), then r = t on the share."""
    a = torch.sigmoid(torch.randn(shape) * P_std_t + P_mean_t)
    b = torch.sigmoid(torch.randn(shape) * P_std_t + P_mean_t)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.rand(shape) < flow_share, t, r)


def _with_t_one(sample_t_r, tone: float):
    """The code's sampler, with a share ``tone`` of the r != t pairs moved to t = 1 (r kept, so r <= t holds)."""

    def sample(shape, like, generator, flow_share, *rest):
        t, r = sample_t_r(shape, like, generator, flow_share, *rest)
        at_one = (torch.rand(shape) < tone) & (r < t)
        return torch.where(at_one, torch.ones_like(t), t), r

    return sample


def main(argv: list[str]) -> dict:
    args = dict(a.split("=", 1) for a in argv)
    toy = make_toy(args.get("toy", "counts"), int(args.get("data_seed", 0)))
    steps, seed = int(args.get("steps", 5000)), int(args.get("seed", 0))
    sampler = args.get("sampler", "code")
    share = float(args.get("share", 0.25 if sampler == "code" else 0.75))
    t_r = (float(args.get("pmt", -0.6)), 1.6, -4.0, 1.6) if sampler == "code" else (-0.4, 1.0, -0.4, 1.0)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = 50_000
    o_data, x, _ = toy.draw(n, rng)
    mean, std = o_data.mean(0), o_data.std(0, ddof=1)
    X = torch.tensor(x, dtype=torch.float32)
    obs = torch.tensor((o_data - mean) / std, dtype=torch.float32)
    mf.interval_features = _features(args.get("features", "positional"))  # the model reads it at call time
    if sampler == "paper":
        mf.sample_t_r = _paper_sample_t_r
    if float(args.get("tone", 0.0)) > 0:
        mf.sample_t_r = _with_t_one(mf.sample_t_r, float(args["tone"]))
    net = IDQLMlp(toy.obs_dim + mf.H_FEATURES, toy.act_dim, hidden_dim=128, n_blocks=2, expand=4, dropout=0.0,
                  fourier_scale=float(args.get("fs", 4.0)))
    model = mf.MeanFlowModel(net)
    ema = copy.deepcopy(model).requires_grad_(False)
    if args.get("shortcut_from") == "ema":  # the composition target from the EMA network, as consistency targets are
        own = mf.shortcut_target
        mf.shortcut_target = lambda _model, eps, o: own(ema, eps, o)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    for k in range(steps):
        i = torch.randint(0, n, (256,))
        loss, _ = mf.meanflow_loss(model, X[i], obs[i], None, share, *t_r, float(args.get("p", 1.0)), 1e-3,
                                   float(args.get("shortcut", 0.0)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema_update_(ema, model, min(0.999, (1 + k) / (10 + k)))
    res = {"final_loss": float(loss.detach())}
    for nfe in (1, 2, 4):
        rows = []
        for c in range(toy.num_conditions):
            o = torch.tensor((toy.obs(c, 2000) - mean) / std, dtype=torch.float32)
            with torch.no_grad():
                a = mf.meanflow_sample(ema, o, nfe, generator=torch.Generator().manual_seed(1)).numpy()
            st = mode_stats(a, toy.centres(c), toy.weights(c), RADIUS)
            rows.append((st.precision, st.min_share_ratio))
        res[nfe] = {"precision": round(float(np.mean([p for p, _ in rows])), 3),
                    "min_share_ratio": round(float(np.min([s for _, s in rows])), 2)}
    out = {"args": args, "results": res, "seconds": round(time.time() - t0)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
