"""``torch.func`` ensembles against the stacked twins of ``idql_cm.nets.ensemble``: exactness and speed.

PyTorch's own way to run S copies of a module is ``stack_module_state`` + ``functional_call`` under ``vmap``. The
project keeps hand-written stacked twins because member k of an ensemble must equal the solo run of seed s + k bit
for bit (tests/test_ensemble_*.py). This measures, on the demo's network (IDQLMlp 128 × 2 blocks, S = 5, B = 256, one
thread): one forward against the solo nets, the gradients, 300 Adam steps of member 0 inside the ensemble against
member 0 alone, and the time of a forward + backward. Prints JSON; the figures are in docs/performance.md.

    python -m benchmarks.func_ensemble
"""

from __future__ import annotations

import copy
import json
import time

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from idql_cm.nets.ensemble import StackedIDQLMlp
from idql_cm.nets.mlp import IDQLMlp

S, B, OBS, A = 5, 256, 17, 6


def _ms(fn, n: int = 30) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1e3, 1)


def main() -> dict:
    torch.set_num_threads(1)
    nets = []
    for k in range(S):
        torch.manual_seed(100 + k)
        nets.append(IDQLMlp(OBS, A, hidden_dim=128, n_blocks=2, expand=4, dropout=0.0, fourier_scale=0.2))
    stacked = StackedIDQLMlp.from_members(nets)
    params, buffers = stack_module_state(nets)
    skeleton = copy.deepcopy(nets[0]).to("meta")

    def one(p, b, x, c, o):
        return functional_call(skeleton, (p, b), (x, c, o))

    many = vmap(one)
    g = torch.Generator().manual_seed(0)
    x, c, o = torch.randn(S, B, A, generator=g), torch.randn(S, B, generator=g), torch.randn(S, B, OBS, generator=g)
    with torch.no_grad():
        solo = torch.stack([nets[k](x[k], c[k], o[k]) for k in range(S)])
        out = {"forward_max_abs_diff_vs_solo": {"stacked": float((stacked(x, c, o) - solo).abs().max()),
                                                "torch_func": float((many(params, buffers, x, c, o) - solo).abs().max())}}

    def loss(p, b, x, c, o):
        return (one(p, b, x, c, o) ** 2).mean()

    grads = vmap(grad(loss))(params, buffers, x, c, o)
    worst = 0.0
    for k in range(S):
        nets[k].zero_grad()
        (nets[k](x[k], c[k], o[k]) ** 2).mean().backward()
        worst = max(worst, max(float((grads[n][k].detach() - p.grad).abs().max()) for n, p in nets[k].named_parameters()))
    out["grad_max_abs_diff_vs_solo"] = {"torch_func": worst}

    alone = copy.deepcopy(nets[0])
    p_ens = {n: t.detach().clone().requires_grad_(True) for n, t in stack_module_state(nets)[0].items()}
    opt_alone = torch.optim.Adam(alone.parameters(), lr=1e-3)
    opt_ens = torch.optim.Adam(p_ens.values(), lr=1e-3)
    drift = {}
    for step in range(1, 301):
        xb, cb, ob = torch.randn(S, B, A, generator=g), torch.randn(S, B, generator=g), torch.randn(S, B, OBS, generator=g)
        opt_alone.zero_grad()
        ((alone(xb[0], cb[0], ob[0]) - xb[0]) ** 2).mean().backward()
        opt_alone.step()
        opt_ens.zero_grad()
        ((many(p_ens, buffers, xb, cb, ob) - xb) ** 2).mean(dim=(1, 2)).sum().backward()
        opt_ens.step()
        if step in (1, 10, 100, 300):
            drift[step] = max(float((p_ens[n][0] - q).abs().max()) for n, q in alone.named_parameters())
    out["member0_weight_drift_vs_solo_after_adam_steps"] = drift

    def stacked_step():
        stacked.zero_grad()
        (stacked(x, c, o) ** 2).mean(dim=(1, 2)).sum().backward()

    def func_step():
        vmap(grad(loss))(params, buffers, x, c, o)

    def solo_step():
        for k in range(S):
            nets[k].zero_grad()
            (nets[k](x[k], c[k], o[k]) ** 2).mean().backward()

    out["ms_forward_backward"] = {"stacked": _ms(stacked_step), "torch_func": _ms(func_step), "solo_loop": _ms(solo_step)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
