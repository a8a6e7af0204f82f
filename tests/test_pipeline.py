"""The pipeline runner (`make pipeline`, `make demo`) stage by stage on a tiny D4RL-layout file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from idql_cm.backbones import builtin_kinds
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import REPO

TINY = ["--set", "trainer.log_every_n_steps=1", "--set", "data.batch_size=16", "--set", "eval.episodes=2", "--set", "eval.num_envs=2",
        "--set", "eval.num_candidates=4", "--set", "eval.max_episode_steps=10", "--set", "eval.progress=false",
        "--set", "edm.model.init_args.net={hidden_dim: 32, n_blocks: 1, expand: 2}",
        "--set", "ct.model.init_args.net={hidden_dim: 32, n_blocks: 1, expand: 2}",
        "--set", "iql.model.init_args.hidden_dim=32"]


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/run_pipeline.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_pipeline_runs_skips_and_resumes(tmp_path):
    data = write_d4rl_file(tmp_path / "cheetah.hdf5", n_episodes=3, episode_len=60, obs_dim=17, act_dim=6,
                           env_id="HalfCheetah-v5")
    out = tmp_path / "run"
    base = ["--task", "halfcheetah-medium-v2", "--out", str(out), "--set", f"data.dataset={data}", *TINY]
    for ckpt_every in ("2",):
        base += ["--set", f"trainer.callbacks.0.init_args.every_n_train_steps={ckpt_every}"]
    first = _pipeline(*base, "--set", "trainer.max_steps=4")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # Lightning's hint about checkpoints "before optimisation" does not apply (and prints a page of example code)
    assert "pre-optimization" not in first.stdout + first.stderr and "Traceback" not in first.stderr
    assert "litlogger" not in first.stdout + first.stderr  # nor its advertisement
    assert "TPU available" not in first.stdout + first.stderr  # nor its inventory of absent accelerators
    assert "settotalmass" not in first.stdout + first.stderr  # nor MuJoCo's deprecation notice
    for stage in ("iql", *builtin_kinds()):
        assert f"{stage.upper()}: training 4 steps" in first.stdout
        assert (out / f"{stage}.yaml").exists() and (out / stage / "checkpoints" / "last.ckpt").exists()
    report = json.loads((out / "report.json").read_text())
    assert sorted(r["backbone"] for r in report["reports"]) == sorted(builtin_kinds())
    assert all([x["nfe"] for x in r["results"]] == [1, 2, 4] for r in report["reports"])
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Environment | NFE |" in (out / "report.md").read_text()

    again = _pipeline(*base, "--set", "trainer.max_steps=4")
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 1 + len(builtin_kinds())

    # an interrupted stage resumes from last.ckpt (here: a stage asked for more steps; not CD, whose teacher would
    # change and which is then refused by its hash check)
    longer = _pipeline(*base, "--set", "trainer.max_steps=6", "--stages", "ct")
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert longer.stdout.count("resuming from step 4") == 1
    assert torch.load(out / "ct" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6


def test_pipeline_missing_d4rl_file_stops_at_once(tmp_path):
    import os

    proc = subprocess.run([sys.executable, "scripts/run_pipeline.py", "--task", "walker2d-medium-v2",
                           "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "D4RL_DATASET_DIR": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    assert "walker2d_medium-v2.hdf5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "iql").exists()


@pytest.mark.parametrize("content", [b"not an hdf5 file at all", "wrong_layout"])
def test_pipeline_bad_d4rl_file_stops_at_once(tmp_path, content):
    import os

    import h5py

    path = tmp_path / "walker2d_medium-v2.hdf5"
    if content == "wrong_layout":  # HDF5, but no 'actions' and observations of another length
        with h5py.File(path, "w") as f:
            f["observations"] = [[0.0]] * 5
            f["rewards"] = [0.0] * 4
            f["terminals"] = [0] * 4
    else:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "scripts/run_pipeline.py", "--task", "walker2d-medium-v2",
                           "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "D4RL_DATASET_DIR": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path) in err and ("HDF5" in err if content != "wrong_layout" else "'actions'" in err), err
    assert not (tmp_path / "run" / "iql").exists()


@pytest.mark.slow
def test_pipeline_with_seeds_trains_every_stage_as_an_ensemble_and_reports_across_seeds(tmp_path):
    """`make pipeline SEEDS=2`: each stage a 2-member ensemble (CD member k from EDM member k, actor k with critic
    k), and the report's table is the mean ± SE across the two seeds. The stages IQL, EDM and CD: the teacher
    dependency is the pipeline's own concern; every backbone's ensemble training is tested in
    tests/test_ensemble_training.py, tests/test_custom_backbone.py and the MeanFlow tests."""
    import yaml

    data = write_d4rl_file(tmp_path / "cheetah.hdf5", n_episodes=3, episode_len=60, obs_dim=17, act_dim=6,
                           env_id="HalfCheetah-v5")
    out = tmp_path / "seeds"
    proc = _pipeline("--task", "halfcheetah-medium-v2", "--out", str(out), "--seeds", "2", "--seed", "3",
                     "--set", f"data.dataset={data}", *TINY, "--set", "trainer.max_steps=4",
                     "--set", "eval.nfe=[1, 2]", "--stages", "iql,edm,cd")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("iql", "edm", "cd"):
        cfg = yaml.safe_load((out / f"{stage}.yaml").read_text())
        assert cfg["model"]["init_args"]["num_seeds"] == 2 and cfg["seed_everything"] == 3
        payload = torch.load(out / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["idql_cm"]
        assert payload["num_seeds"] == 2 and payload["seed"] == 3
    report = json.loads((out / "report.json").read_text())
    assert sorted(r["backbone"] for r in report["reports"]) == ["cd", "edm"]
    for r in report["reports"]:
        assert r["train_seeds"] == [3, 4] and [m["member"] for m in r["members"]] == [0, 1]
        assert all(x["se_over"] == "seeds" for x in r["results"])
    text = (out / "report.md").read_text()
    assert "mean ± standard error over 2 training seeds" in text and "| Environment | NFE |" in text
    bad = _pipeline("--task", "halfcheetah-medium-v2", "--out", str(out), "--seeds", "0")
    assert bad.returncode == 2 and "--seeds: expected a positive integer, found 0" in bad.stderr
