"""Drive the real `idql-cm` command from tests: in-process (fast) or as a subprocess (exit codes, DDP)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def run_cli_subprocess(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``python -m idql_cm ARGS``; returns the CompletedProcess (text stdout/stderr)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("IDQL_CM_DEBUG", None) if env is None or "IDQL_CM_DEBUG" not in env else None
    return subprocess.run([sys.executable, "-m", "idql_cm", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def shrink_config(src: Path, dst: Path, root: Path, dataset: str, steps: int = 2, eval_args: dict | None = None,
                  model_args: dict | None = None, keep_eval: bool = True) -> Path:
    """Copy a shipped config (composed with its base, as the CLI reads it) with tiny step counts, a tmp root, a given
    dataset and small evaluation."""
    from idql_cm.cli import compose_config

    cfg = compose_config(src)
    cfg["trainer"]["max_steps"] = steps
    cfg["trainer"]["default_root_dir"] = str(root)
    cfg["trainer"]["log_every_n_steps"] = 1
    cfg["trainer"]["enable_progress_bar"] = False
    callbacks = []
    for cb in cfg["trainer"].get("callbacks", []):
        if cb["class_path"].endswith("ProgressBar"):
            continue
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = max(1, steps // 2)
        if cb["class_path"].endswith("RolloutEvaluation"):
            if not keep_eval:
                continue
            cb["init_args"].update({"episodes": 2, "num_envs": 2, "num_candidates": 4, "max_episode_steps": 10,
                                    "progress": False, **(eval_args or {})})
        callbacks.append(cb)
    cfg["trainer"]["callbacks"] = callbacks
    cfg["data"]["dataset"] = dataset
    cfg["data"]["batch_size"] = 32
    if model_args:
        cfg["model"].setdefault("init_args", {}).update(model_args)
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst
