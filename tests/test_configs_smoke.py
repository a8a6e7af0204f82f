"""Every shipped config trains through the real CLI: composed from configs/, shrunk to a few CPU steps,
on a small synthetic D4RL-layout file of the task's shape (iql, then every registered backbone of the package in
registry order: edm → cd from that edm → ct → meanflow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idql_cm.backbones import backbone, builtin_kinds
from idql_cm.cli import compose_config, main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, shrink_config

SHAPES = {"halfcheetah": (17, 6), "hopper": (11, 3), "walker2d": (17, 6)}
TASK_DIRS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("demo", "base"))
STAGES = ("iql", *builtin_kinds())
#: a task's critic-guided stage and the backbone it guides (its base: configs/base/ct.yaml)
GUIDED = ("guided", "ct")


def test_every_task_and_the_demo_have_a_config_per_stage():
    assert len(TASK_DIRS) == 9
    expected = sorted(["iql.yaml", *(backbone(k).config for k in builtin_kinds())])
    for folder in [*TASK_DIRS, "demo"]:
        extra = [] if folder == "demo" else ["guided.yaml"]
        assert sorted(p.name for p in (CONFIGS / folder).glob("*.yaml")) == sorted(expected + extra), folder


def test_task_configs_are_their_base_plus_the_task_s_own_lines():
    """configs/<task>/<stage>.yaml names configs/base/<backbone>.yaml and sets only what differs by task (its data,
    its folder, its temperature; the guided stage also q_weight and one_candidate): a change to a base reaches the
    nine tasks, and the composed config is the base with those values."""
    import yaml

    for task in TASK_DIRS:
        for path in sorted((CONFIGS / task).glob("*.yaml")):
            raw = yaml.safe_load(path.read_text())
            assert raw["config"] == f"../base/{_kind(path.stem)}.yaml", path
            allowed = {"config", "trainer.default_root_dir", "data.dataset", "eval.temperature"}
            if path.stem == GUIDED[0]:
                allowed |= {"eval.one_candidate", "model.init_args.q_weight"}
            if path.stem == "cd" and "medium-expert" in path.parent.name:  # two-policy data (docs/quality.md)
                allowed |= {"model.init_args.renoise_min"}
            assert set(raw) <= allowed and {"data.dataset", "trainer.default_root_dir"} <= set(raw), path
            composed, base = compose_config(path), compose_config(CONFIGS / "base" / f"{_kind(path.stem)}.yaml")
            assert composed["data"]["dataset"] == task and composed["model"]["class_path"] == base["model"]["class_path"]
            assert composed["trainer"]["max_steps"] == base["trainer"]["max_steps"]
            ev = [cb for cb in composed["trainer"]["callbacks"] if cb["class_path"].endswith("RolloutEvaluation")]
            assert (ev[0]["init_args"]["temperature"] == raw["eval.temperature"]) if ev else path.stem == "iql"
            floor = composed["model"]["init_args"].get("renoise_min")
            assert floor == (2.515 if path.stem == "cd" and "medium-expert" in task else None), path


def _kind(stage: str) -> str:
    return GUIDED[1] if stage == GUIDED[0] else stage


def _train_all_stages(cfg_dir: Path, tmp: Path, dataset: str, steps: int = 2) -> Path:
    out = tmp / "run"
    for stage in STAGES if cfg_dir.name == "demo" else (*STAGES, GUIDED[0]):
        cfg = shrink_config(cfg_dir / f"{stage}.yaml", tmp / f"{stage}.yaml", out / stage, dataset, steps=steps)
        assert main(["fit", "--config", str(cfg)]) == 0, f"{cfg_dir.name}/{stage}.yaml failed"
        ckpt = torch.load(out / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == steps
        assert ckpt["idql_cm"]["kind"] == _kind(stage)
        if stage == GUIDED[0]:  # guided by the IQL stage beside it, as its evaluation's critic
            assert ckpt["idql_cm"]["q_weight"] > 0 and ckpt["idql_cm"]["critic_ckpt"].endswith("iql/checkpoints/last.ckpt")
    return out


# One task per environment family trains every stage (the replay task also reads float64 data); the other six are
# composed and instantiated by the real parser without a fit: their configs differ from these in the task's name,
# data and temperature only (the rest is configs/base/), which instantiation checks.
def backbone_needs(stage: str) -> tuple[str, ...]:
    return () if stage == "iql" else backbone(stage).needs


TRAINED = ("halfcheetah-medium-replay-v2", "hopper-medium-expert-v2", "walker2d-medium-v2")


@pytest.mark.parametrize("task", [t for t in TASK_DIRS if t not in TRAINED])
def test_task_configs_instantiate(task, tmp_path):
    from idql_cm.cli import build_cli

    obs_dim, act_dim = SHAPES[task.split("-")[0]]
    data = write_d4rl_file(tmp_path / "synthetic.hdf5", n_episodes=2, episode_len=20, obs_dim=obs_dim,
                           act_dim=act_dim)
    for stage in (*STAGES, GUIDED[0]):
        # a distilled stage's teacher is read when the fit starts, not here: any existing file stands in for it
        teacher = {"teacher_ckpt": str(data)} if backbone_needs(_kind(stage)) else None
        cfg = shrink_config(CONFIGS / task / f"{stage}.yaml", tmp_path / f"{stage}.yaml", tmp_path / "run" / stage,
                            str(data), steps=2, model_args=teacher)
        cli = build_cli(["--config", str(cfg)], run=False)
        assert cli.model.kind == _kind(stage) and cli.trainer.max_steps == 2


@pytest.mark.slow
@pytest.mark.parametrize("task", TRAINED)
def test_task_configs_train_on_cpu(task, tmp_path):
    obs_dim, act_dim = SHAPES[task.split("-")[0]]
    data = write_d4rl_file(tmp_path / "synthetic.hdf5", n_episodes=3, episode_len=50, obs_dim=obs_dim,
                           act_dim=act_dim, dtype="float64" if "replay" in task else "float32")
    out = _train_all_stages(CONFIGS / task, tmp_path, str(data))
    cd = torch.load(out / "cd" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # the teacher is recorded by path and hash, not re-saved inside the CD checkpoint
    assert cd["idql_cm"]["teacher_sha256"] and not any("teacher" in k for k in cd["state_dict"])


def test_demo_configs_train_on_cpu(tmp_path):
    data = write_d4rl_file(tmp_path / "demo.hdf5", n_episodes=3, episode_len=50, obs_dim=17, act_dim=6)
    _train_all_stages(CONFIGS / "demo", tmp_path, str(data))


ACTOR_CONFIGS = sorted(p for d in ["demo", *TASK_DIRS] for p in (CONFIGS / d).glob("*.yaml") if p.stem != "iql")


def _init_args(path: Path) -> dict:

    return compose_config(path)["model"]["init_args"]


@pytest.mark.parametrize("path", ACTOR_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_actor_configs_set_their_optimiser_explicitly(path):
    """The reference's AdamW ran at PyTorch's hidden default decay 0.01; every shipped actor config says what it
    uses (Adam, no decay: AdamW 0.01 measured no better, docs/quality.md)."""
    args = _init_args(path)
    assert args.get("optimizer") == "adam" and args.get("weight_decay") == 0.0, path


@pytest.mark.parametrize("path", [p for p in ACTOR_CONFIGS if p.stem in ("ct", "guided")],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ct_time_embedding_sees_the_noise_level(path):
    """CT's Fourier features of c_noise = ¼·ln σ must vary over [σ_min, σ_max]: the phase span at 3 std of the
    frequencies is 1.0 rad at the reference's scale 0.02 (the net can hardly tell σ = 0.002 from 80); on the toys,
    scales 0.2-0.5 (10-25 rad) were best, 1 (50 rad) a little worse, 4 and more (200+ rad) broke NFE 1
    (docs/quality.md)."""
    import math

    scale = _init_args(path)["fourier_scale"]
    span = 2 * math.pi * 3 * scale * 0.25 * (math.log(80.0) - math.log(0.002))
    assert 3.0 <= span <= 60.0, f"{path}: phase span {span:.2f} rad (fourier_scale {scale})"
