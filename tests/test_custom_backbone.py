"""A backbone from outside the package (examples/custom_backbone.py, kind ``gauss``) works with every command.

Driven from the user's side: ``idql-cm`` subprocesses with ``PYTHONPATH=examples`` and the shipped example config,
shrunk. It trains with the rollout callback (critic re-ranking on MuJoCo HalfCheetah-v5), validates, trains as a
2-member ensemble, loads (``load_actor`` / ``load_agent``, member k), exports to ONNX (run by onnxruntime) and
reports, and no file of ``idql_cm`` names it. Without the example on ``PYTHONPATH`` its checkpoint is refused in one
line that says where its backbone lives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, REPO, run_cli_subprocess, shrink_config

EXAMPLES = REPO / "examples"
USER_ENV = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
NET = {"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.1}}
EVAL = {"nfe": [1], "episodes": 2, "num_envs": 2, "num_candidates": 4, "max_episode_steps": 10}


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("custom")
    data = str(write_d4rl_file(root / "cheetah.hdf5", n_episodes=4, episode_len=100, obs_dim=17, act_dim=6,
                               env_id="HalfCheetah-v5"))
    iql = shrink_config(CONFIGS / "demo" / "iql.yaml", root / "iql.yaml", root / "iql", data, steps=8,
                        model_args={"hidden_dim": 32}, keep_eval=False)
    assert main(["fit", "--config", str(iql)]) == 0
    critic = root / "iql" / "checkpoints" / "last.ckpt"
    out = {"root": root, "data": Path(data), "critic": critic}
    for name, extra in (("solo", {}), ("ens", {"num_seeds": 2})):
        cfg = shrink_config(EXAMPLES / "custom_backbone.yaml", root / f"{name}.yaml", root / name, data, steps=16,
                            model_args={**NET, **extra}, eval_args={**EVAL, "critic_ckpt": str(critic)})
        if name == "solo":  # as the README says: PYTHONPATH=examples idql-cm fit --config ...
            _ok(run_cli_subprocess(["fit", "--config", str(cfg)], env=USER_ENV))
        else:  # the same command in this process (the example on sys.path as PYTHONPATH puts it)
            sys.path.insert(0, str(EXAMPLES))
            try:
                assert main(["fit", "--config", str(cfg)]) == 0
            finally:
                sys.path.remove(str(EXAMPLES))
        out[name] = root / name
    return out


def test_fit_evaluates_with_the_critic_and_validate_reruns_it(runs):
    rep = json.loads((runs["solo"] / "eval_report.json").read_text())
    assert rep["backbone"] == "gauss" and rep["idql"] and [r["nfe"] for r in rep["results"]] == [1]
    assert np.isfinite(rep["results"][0]["normalized_score_mean"])
    ens = json.loads((runs["ens"] / "eval_report.json").read_text())
    assert len(ens["members"]) == 2 and ens["seeds"] == 2
    proc = _ok(run_cli_subprocess(["validate", "--config", str(runs["root"] / "solo.yaml"), "--ckpt_path",
                                   str(runs["solo"] / "checkpoints" / "last.ckpt")], env=USER_ENV))
    assert "Traceback" not in proc.stderr


def test_load_actor_and_agent_in_a_fresh_process(runs):
    """A new process that never imports the example itself: the checkpoint's recorded module brings it in."""
    script = f"""
import numpy as np, torch, sys
from idql_cm import load_actor, load_agent
solo, ens, critic = {str(runs["solo"] / "checkpoints" / "last.ckpt")!r}, {str(runs["ens"] / "checkpoints" / "last.ckpt")!r}, {str(runs["critic"])!r}
p = load_actor(solo, device="cpu")
obs = np.random.default_rng(0).normal(size=(5, 17)).astype(np.float32)
a = p.sample(obs, nfe=1)
assert a.shape == (5, 6) and np.isfinite(a).all() and np.abs(a).max() <= 1.0, a
noise = np.random.default_rng(1).normal(size=(1, 5, 6)).astype(np.float32)
assert np.array_equal(p.sample(obs, nfe=1, noise=noise), p.sample(obs, nfe=1, noise=noise))
assert not np.array_equal(p.sample(obs, nfe=1, noise=noise), p.sample(obs, nfe=1, noise=noise + 1))
try:
    p.sample(obs, nfe=2)
    raise SystemExit("nfe=2 was accepted by a one-step policy")
except Exception as e:
    assert "expected nfe 1" in str(e), e
agent = load_agent(solo, critic, num_candidates=8, device="cpu")
assert agent.act(obs, nfe=1).shape == (5, 6)
m0, m1 = (load_actor(ens, device="cpu", member=k) for k in (0, 1))
a0, a1 = m0.sample(obs, nfe=1, noise=noise), m1.sample(obs, nfe=1, noise=noise)
assert not np.allclose(a0, a1)  # two seeds, two policies
print(p.kind, type(p.actor.model).__module__)
"""
    proc = _ok(subprocess.run([sys.executable, "-c", script], env={**os.environ, **USER_ENV}, capture_output=True,
                              text=True, cwd=runs["root"]))
    assert proc.stdout.split() == ["gauss", "custom_backbone"]


def test_export_runs_in_onnxruntime_and_report_has_its_column(runs, cli):
    ort = pytest.importorskip("onnxruntime")
    out = runs["root"] / "gauss.onnx"
    _ok(run_cli_subprocess(["export", "--actor", str(runs["solo"] / "checkpoints" / "last.ckpt"), "--critic",
                            str(runs["critic"]), "--candidates", "8", "--out", str(out)], env=USER_ENV))
    sess = ort.InferenceSession(str(out))
    obs = np.zeros((3, 17), np.float32)
    feeds = {i.name: v for i, v in zip(sess.get_inputs(), (obs, np.zeros((1, 0, 8, 6), np.float32),
                                                            np.zeros((0,), np.float32)), strict=False)}
    act = sess.run(None, feeds)[0]
    assert act.shape == (3, 6) and np.isfinite(act).all()
    metadata = dict(ln.split(None, 1) for ln in _ok(cli(["export", "--inspect", str(out)])).stdout.splitlines())
    assert metadata["kind"] == "gauss" and metadata["solver"] == "gauss"  # the exported file runs without the example
    table = _ok(cli(["report", str(runs["solo"]), str(runs["ens"])])).stdout
    assert "GAUSS" in table and "| 1 |" in table


def test_without_the_example_on_the_path_the_checkpoint_is_refused_in_one_line(runs):
    proc = run_cli_subprocess(["export", "--actor", str(runs["solo"] / "checkpoints" / "last.ckpt"), "--out",
                               str(runs["root"] / "x.onnx")], env={"PYTHONPATH": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "'custom_backbone'" in line and "PYTHONPATH" in line, line
    assert not (runs["root"] / "x.onnx").exists()


def test_the_package_names_no_outside_backbone():
    for path in (REPO / "idql_cm").rglob("*.py"):
        text = path.read_text()
        assert "custom_backbone" not in text and "GaussianBC" not in text, path


def test_the_example_config_composes_with_the_parser():
    cfg = yaml.safe_load((EXAMPLES / "custom_backbone.yaml").read_text())
    assert cfg["model"]["class_path"] == "custom_backbone.GaussianBC"
