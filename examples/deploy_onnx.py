"""Drive HalfCheetah-v5 from an exported IDQL agent with onnxruntime and NumPy only: no torch, no idql-cm import.

After ``make demo``::

    .venv/bin/python examples/deploy_onnx.py            # exports the demo CT agent once, then runs 2 episodes

The first run exports ``results/demo/ct/checkpoints/last.ckpt`` (+ the demo IQL critic) to
``results/demo/export/ct_nfe1.onnx`` with the demo evaluation's settings (NFE 1, 32 candidates, softmax T = 100),
in a separate ``idql-cm export`` process; this process then loads only onnxruntime, NumPy and Gymnasium. With
``--model FILE`` any exported agent runs (its metadata names the environment).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnxruntime as ort

DEMO = Path(__file__).resolve().parents[1] / "results" / "demo"


def export_demo_agent(model: Path, actor: Path, critic: Path) -> None:
    """Run ``idql-cm export`` in its own process (that one needs torch; this one does not)."""
    for ckpt in (actor, critic):
        if not ckpt.is_file():
            sys.exit(f"deploy_onnx.py: expected the checkpoint {ckpt} (run `make demo` first, or pass --model FILE)")
    cmd = [sys.executable, "-m", "idql_cm", "export", "--actor", str(actor), "--critic", str(critic), "--nfe", "1",
           "--candidates", "32", "--temperature", "100", "--selection", "softmax", "--out", str(model)]
    print("$ idql-cm", " ".join(cmd[3:]))
    if subprocess.run(cmd).returncode != 0:
        sys.exit("deploy_onnx.py: the export failed (see the line above)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO / "export" / "ct_nfe1.onnx", help="an exported ONNX agent")
    p.add_argument("--actor", type=Path, default=DEMO / "ct" / "checkpoints" / "last.ckpt")
    p.add_argument("--critic", type=Path, default=DEMO / "iql" / "checkpoints" / "last.ckpt")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=1000, help="steps per episode (HalfCheetah's limit: 1000)")
    p.add_argument("--env", default=None, help="Gymnasium id (default: the one in the model's metadata)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if not args.model.is_file():
        export_demo_agent(args.model, args.actor, args.critic)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # noise and u have defaults (overridable initializers); ORT notes that once
    session = ort.InferenceSession(str(args.model), opts, providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map["idql_cm"])
    env_id = args.env or metadata["env_id"]
    if not env_id:
        sys.exit(f"deploy_onnx.py: {args.model} names no environment (trained on {metadata['task']}); pass --env ID")
    low, high = np.asarray(metadata["action_low"], np.float32), np.asarray(metadata["action_high"], np.float32)
    print(f"{args.model}: {metadata['kind']} agent, NFE {metadata['nfe']}, {metadata['candidates']} candidates, "
          f"{metadata['selection']}, obs {metadata['obs_dim']} -> action {metadata['act_dim']}, env {env_id}")

    env = gym.make(env_id, max_episode_steps=args.max_steps)
    if env.observation_space.shape != (metadata["obs_dim"],) or env.action_space.shape != (metadata["act_dim"],):
        sys.exit(f"deploy_onnx.py: {env_id} has obs/act shapes {env.observation_space.shape}/"
                 f"{env.action_space.shape}, the model expects ({metadata['obs_dim']},)/({metadata['act_dim']},)")
    returns, decide_s, steps = [], 0.0, 0
    for ep in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + ep)
        total, done = 0.0, False
        while not done:
            x = np.asarray(obs, np.float32)[None]                          # [1, obs_dim] raw observation
            if not np.isfinite(x).all():
                sys.exit(f"deploy_onnx.py: the environment returned a non-finite observation at step {steps}")
            t0 = time.perf_counter()
            action = session.run(["action"], {"obs": x})[0][0]             # the graph draws its own noise and u
            decide_s += time.perf_counter() - t0
            obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high))
            total += float(reward)
            steps += 1
            done = terminated or truncated
        returns.append(total)
        print(f"episode {ep + 1}: return {total:8.1f}")
    env.close()
    print(f"mean return {np.mean(returns):.1f} over {len(returns)} episode(s); "
          f"{1e3 * decide_s / steps:.2f} ms per decision ({steps} decisions)")
    assert "torch" not in sys.modules, "this example must run without torch"
    return 0


if __name__ == "__main__":
    sys.exit(main())
