"""Evaluating an ensemble run (``num_seeds: 2``) through the real CLI, MuJoCo HalfCheetah-v5 and TensorBoard:

- member k is evaluated with critic member k on the same episodes, and its results equal the solo run of seed s + k
  evaluated alone (training is bit-identical, tests/test_ensemble_training.py; the episodes and sampling seeds are
  the same), so the per-member figures are the solo seeds' own;
- the across-seed figure is the mean of the members' means ± the SE across members (checked by hand);
- TensorBoard holds per-member losses and scores plus their mean, read back from the event file;
- ``idql-cm report`` merges the ensemble with a solo run of one of its seeds as the same seeds;
- a critic of another member count is refused in one line, before training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, shrink_config

SEED, S, STEPS = 5, 2, 20
NET = {"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.1}}
EVAL = {"nfe": [1, 2], "episodes": 3, "num_envs": 3, "num_candidates": 4, "max_episode_steps": 15}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "cheetah.hdf5"
    return str(write_d4rl_file(path, n_episodes=4, episode_len=100, obs_dim=17, act_dim=6, env_id="HalfCheetah-v5"))


def _fit(stage: str, dataset: str, out: Path, seed: int, model_args: dict) -> Path:
    """Train ``configs/demo/<stage>.yaml``, shrunk, into ``out/<stage>`` (the CT's critic is ``out/iql``)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", out / f"{stage}.yaml", out / stage, dataset, steps=STEPS,
                        model_args=model_args, eval_args=EVAL, keep_eval=stage != "iql")
    doc = yaml.safe_load(cfg.read_text())
    doc["seed_everything"] = seed
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["fit", "--config", str(cfg)]) == 0
    return out / stage


def _ct_extra() -> dict:
    return {**NET, "total_steps": STEPS, "s0": 2, "s1": 8}


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """An S = 2 IQL + CT ensemble of seeds 5, 6 and the solo IQL + CT run of seed 6."""
    root = tmp_path_factory.mktemp("runs")
    _fit("iql", dataset, root / "ens", SEED, {"hidden_dim": 32, "num_seeds": S})
    ens = _fit("ct", dataset, root / "ens", SEED, {**_ct_extra(), "num_seeds": S})
    _fit("iql", dataset, root / "solo6", SEED + 1, {"hidden_dim": 32})
    solo = _fit("ct", dataset, root / "solo6", SEED + 1, _ct_extra())
    return {"ens": ens, "solo6": solo}


def _report(run: Path) -> dict:
    return json.loads((next(run.rglob("eval_report.json"))).read_text())


def test_every_member_is_evaluated_as_its_solo_seed_and_the_across_seed_figure_is_idqls(runs):
    ens, solo = _report(runs["ens"]), _report(runs["solo6"])
    assert ens["seeds"] == S and ens["train_seeds"] == [SEED, SEED + 1] and ens["seed_everything"] == SEED
    members = ens["members"]
    assert [m["member"] for m in members] == [0, 1] and [m["train_seed"] for m in members] == [SEED, SEED + 1]
    # member 1 (critic member 1, the same episodes) == the solo run of seed 6 with its solo critic, episode for episode
    for mine, theirs in zip(members[1]["results"], solo["results"], strict=True):
        assert mine["nfe"] == theirs["nfe"] and mine["episodes"] == EVAL["episodes"]
        np.testing.assert_allclose(mine["returns"], theirs["returns"], rtol=1e-6, atol=1e-6)
    # the two members are different policies
    assert members[0]["results"][0]["returns"] != members[1]["results"][0]["returns"]
    # across seeds: the mean of the per-member means ± sample std of them / sqrt(S)
    for row in ens["results"]:
        means = [next(r for r in m["results"] if r["nfe"] == row["nfe"])["normalized_score_mean"] for m in members]
        assert row["se_over"] == "seeds" and row["seeds"] == S
        assert row["normalized_score_mean"] == pytest.approx(sum(means) / S, rel=1e-12)
        by_hand = math.sqrt(sum((x - sum(means) / S) ** 2 for x in means) / (S - 1)) / math.sqrt(S)
        assert row["normalized_score_se"] == pytest.approx(by_hand, rel=1e-12)
        assert row["episodes"] == S * EVAL["episodes"]
    text = next(runs["ens"].rglob("eval_report.md")).read_text()
    assert f"over {S} training seeds ({SEED}, {SEED + 1}" in text and f"member 1 (seed {SEED + 1})" in text


def test_tensorboard_holds_per_member_losses_and_scores_and_their_mean(runs):
    event_dir = next(runs["ens"].rglob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("train/loss", "train/grad_norm", "eval/nfe1/normalized_score"):
        assert {name, *(f"{name.rsplit('/', 1)[0]}/member_{k}/{name.rsplit('/', 1)[1]}" if name.startswith("eval")
                        else f"{name}/member_{k}" for k in range(S))} <= tags, sorted(tags)
    mean = {e.step: e.value for e in acc.Scalars("train/loss")}
    per = [{e.step: e.value for e in acc.Scalars(f"train/loss/member_{k}")} for k in range(S)]
    assert len(mean) >= 5 and all(set(p) == set(mean) for p in per)
    for step, value in mean.items():
        assert value == pytest.approx(sum(p[step] for p in per) / S, rel=1e-6, abs=1e-7)
    assert per[0] != per[1]  # members train on their own batches and noise
    report = _report(runs["ens"])
    for k, m in enumerate(report["members"]):
        (last,) = [e for e in acc.Scalars(f"eval/nfe1/member_{k}/normalized_score") if e.step == STEPS]
        assert last.value == pytest.approx(m["results"][0]["normalized_score_mean"], rel=1e-6)


def test_idql_cm_report_merges_ensemble_members_and_solo_seeds_alike(runs, tmp_path, cli):
    ens = _report(runs["ens"])
    alone = cli(["report", str(runs["ens"]), "--out", str(tmp_path / "a")])
    assert alone.returncode == 0, alone.stderr
    row = ens["results"][0]
    cell = f"{row['normalized_score_mean']:.1f}±{row['normalized_score_se']:.1f}"
    assert f"| 1 | {cell} |" in alone.stdout and f"over {S} training seeds" in alone.stdout
    # the solo run of seed 6 is the ensemble's member 1: together they are still the two seeds 5 and 6
    both = cli(["report", str(runs["ens"]), str(runs["solo6"]), "--out", str(tmp_path / "b")])
    assert both.returncode == 0, both.stderr
    assert f"| 1 | {cell} |" in both.stdout
    merged = json.loads((tmp_path / "b" / "combined_report.json").read_text())["reports"]
    assert [r["seeds"] for r in merged] == [S] and merged[0]["train_seeds"] == [SEED, SEED + 1]


def test_a_critic_of_another_member_count_is_refused_in_one_line(runs, dataset, tmp_path, cli):
    from tests.test_cli_errors import _one_line_error

    critic = runs["ens"].parent / "iql" / "checkpoints" / "last.ckpt"
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct", dataset, steps=2,
                        model_args={**_ct_extra(), "num_seeds": 3}, eval_args={**EVAL, "critic_ckpt": str(critic)})
    _one_line_error(cli(["fit", "--config", str(cfg)]), "holds 2 IQL members", "the policy has 3")
    assert not (tmp_path / "ct" / "checkpoints").exists()
    solo = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "solo.yaml", tmp_path / "solo", dataset, steps=2,
                         model_args=_ct_extra(), eval_args={**EVAL, "critic_ckpt": str(critic)})
    _one_line_error(cli(["fit", "--config", str(solo)]), "RolloutEvaluation.critic_ckpt",
                    "holds 2 members")
    assert not (tmp_path / "solo" / "checkpoints").exists()


def test_loading_a_checkpoint_leaves_torchs_generator_alone(runs):
    """The CLI's preflight loads the evaluation critic after seed_everything and before the module builds its nets;
    a load that drew from torch's generator made a solo run's initial weights depend on the critic (measured: the solo
    CT of seed 6 then differed from ensemble member 1 by 0.67 in a weight after 20 steps; with the load RNG-neutral,
    0.0)."""
    from idql_cm.policies import actor_from_checkpoint, critic_from_checkpoint

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    critic_from_checkpoint(str(runs["solo6"].parent / "iql" / "checkpoints" / "last.ckpt"), device="cpu")
    actor_from_checkpoint(str(runs["solo6"] / "checkpoints" / "last.ckpt"), device="cpu")
    critic_from_checkpoint(str(runs["ens"].parent / "iql" / "checkpoints" / "last.ckpt"), device="cpu", member=1)
    assert torch.equal(torch.rand(4), expected)


def test_export_takes_one_member_and_refuses_an_ensemble_without_member(runs, tmp_path, cli):
    from tests.test_cli_errors import _one_line_error

    actor = runs["ens"] / "checkpoints" / "last.ckpt"
    critic = runs["ens"].parent / "iql" / "checkpoints" / "last.ckpt"
    _one_line_error(cli(["export", "--actor", str(actor), "--critic", str(critic), "--out",
                                        str(tmp_path / "a.onnx")]), "holds 2 members", "pass --member k")
    assert not (tmp_path / "a.onnx").exists()
    ok = cli(["export", "--actor", str(actor), "--critic", str(critic), "--member", "1",
                             "--candidates", "4", "--out", str(tmp_path / "m1.onnx")])
    assert ok.returncode == 0, ok.stderr[-2000:]
    shown = cli(["export", "--inspect", str(tmp_path / "m1.onnx")])
    assert shown.returncode == 0 and "member" in shown.stdout and "1" in shown.stdout.split("member", 1)[1][:20]
