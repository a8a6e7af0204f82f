"""IDQL action selection (ms per call) and evaluation throughput (env steps/s of ``evaluate``), random weights."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import numpy as np
import torch

from benchmarks.harness import ACT_DIM, ACTOR_KINDS, NFES, OBS_DIM, make_module, sync_fn


def random_actor_and_critic(kind: str, cfg: dict[str, Any]):
    """An actor of ``kind`` and a critic at the benchmark's net sizes, random weights (time, not quality)."""
    from idql_cm.backbones import backbone
    from idql_cm.nets.critics import TwinQ, ValueNet
    from idql_cm.policies import Actor, Critic

    torch.manual_seed(0)
    dev = torch.device(cfg.get("device", "cpu"))
    spec = backbone(kind)
    # the module's own net and method (CT's Fourier scale differs); a distilled backbone's net is its teacher's
    module = make_module(spec.needs[0] if spec.needs else kind, cfg)
    payload = {"kind": kind, "obs_dim": OBS_DIM, "act_dim": ACT_DIM, "env_id": "HalfCheetah-v5",
               "net": module.default_net(), "method": dict(module.method)}
    model = spec.rebuild(payload, None, f"random {kind}").eval().requires_grad_(False).to(dev)
    zeros, ones = torch.zeros(OBS_DIM, device=dev), torch.ones(OBS_DIM, device=dev)
    actor = Actor.of_payload(spec, payload, model, zeros, ones, dev)
    h = cfg["iql_hidden"]
    critic = Critic(q_target=TwinQ(OBS_DIM, ACT_DIM, h).eval().requires_grad_(False).to(dev),
                    v=ValueNet(OBS_DIM, h).eval().requires_grad_(False).to(dev), obs_mean=zeros, obs_std=ones,
                    act_dim=ACT_DIM, env_id="HalfCheetah-v5")
    return actor, critic


def bench_action(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    from idql_cm.eval.agent import IDQLAgent

    dev = torch.device(cfg.get("device", "cpu"))
    sync = sync_fn(dev.type)
    obs = torch.randn(cfg["action_envs"], OBS_DIM, generator=torch.Generator().manual_seed(0)).to(dev)
    out: dict[str, Any] = {}
    for kind in ACTOR_KINDS:
        actor, critic = random_actor_and_critic(kind, cfg)
        agent = IDQLAgent(actor, critic, num_candidates=cfg["action_candidates"], temperature=100.0)
        out[kind] = {}
        for nfe in NFES:
            g = torch.Generator(device=dev).manual_seed(0)
            for _ in range(3 if dev.type == "cuda" else 1):  # warm-up (CUDA: kernels and allocator)
                agent.act_tensor(obs, nfe, generator=g)
            times: list[float] = []
            t_all = time.perf_counter()
            while len(times) < cfg["action_min_calls"] or time.perf_counter() - t_all < cfg["action_min_seconds"]:
                sync()
                t0 = time.perf_counter()
                a = agent.act_tensor(obs, nfe, generator=g)
                sync()
                times.append(time.perf_counter() - t0)
            assert a.shape == (cfg["action_envs"], ACT_DIM)
            out[kind][f"nfe{nfe}"] = 1e3 * statistics.median(times)
        # the same decision by a critic-guided policy (q_weight > 0): one sample, no critic (its N = 1 agent)
        g = torch.Generator(device=dev).manual_seed(0)
        times = _timed(functools.partial(actor.sample, obs, 1, generator=g), sync, cfg, dev)
        out[kind]["alone_nfe1"] = 1e3 * statistics.median(times)
        log(f"  {kind:4s} " + "  ".join(f"NFE {n}: {out[kind][f'nfe{n}']:8.2f} ms" for n in NFES)
            + f"  one candidate, no critic, NFE 1: {out[kind]['alone_nfe1']:6.2f} ms")
    return out


def _timed(call, sync, cfg: dict[str, Any], dev: torch.device) -> list[float]:
    with torch.inference_mode():
        for _ in range(3 if dev.type == "cuda" else 1):
            call()
        times: list[float] = []
        t_all = time.perf_counter()
        while len(times) < cfg["action_min_calls"] or time.perf_counter() - t_all < cfg["action_min_seconds"]:
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
    return times


def bench_eval(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    from idql_cm.eval.agent import IDQLAgent
    from idql_cm.eval.rollout import evaluate, make_vector_env

    actor, critic = random_actor_and_critic(cfg["eval_kind"], cfg)
    agent = IDQLAgent(actor, critic, num_candidates=cfg["eval_candidates"], temperature=100.0)
    evaluate(agent, "HalfCheetah-v5", episodes=1, num_envs=1, nfe=cfg["eval_nfe"], max_episode_steps=5)  # warm-up
    res = evaluate(agent, "HalfCheetah-v5", episodes=cfg["eval_episodes"], num_envs=cfg["eval_envs"],
                   nfe=cfg["eval_nfe"], seed=0, max_episode_steps=cfg["eval_max_steps"])
    # context: the same vector env stepped with random actions (no policy)
    vec = make_vector_env("HalfCheetah-v5", cfg["eval_envs"], max_episode_steps=cfg["eval_max_steps"])
    vec.reset(seed=0)
    rng = np.random.default_rng(0)
    steps = cfg["eval_max_steps"]
    t0 = time.perf_counter()
    for _ in range(steps):
        vec.step(rng.uniform(-1, 1, size=(cfg["eval_envs"], ACT_DIM)).astype(np.float32))
    env_only = steps * cfg["eval_envs"] / (time.perf_counter() - t0)
    vec.close()
    out = {"env_steps_per_s": res.env_steps_per_second, "env_steps": res.env_steps, "seconds": res.seconds,
           "action_latency_ms": res.action_latency_ms, "policy_calls": res.policy_calls,
           "env_only_steps_per_s": env_only}
    log(f"  evaluate: {out['env_steps_per_s']:.0f} env steps/s ({res.env_steps} steps in {res.seconds:.2f} s, "
        f"{out['action_latency_ms']:.2f} ms per action call); env alone {env_only:.0f} steps/s")
    return out
