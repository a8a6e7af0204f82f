"""Faults of an ensemble run (``num_seeds: S``), through the real CLI: a non-finite member stops the run with a line
naming it (``nonfinite: stop``) or has only its own update skipped and counted (``skip``); SIGKILL then
``--ckpt_path last`` ends exactly where an uninterrupted ensemble run ends; DDP over two CPU ranks (gloo) trains
member k as the two-rank solo run of seed s + k."""

from __future__ import annotations

import random

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from idql_cm.checkpoint import member_state
from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import run_cli_subprocess
from tests.test_reliability import _all_finite, _config, _error_line, _load, kill_then_resume

S, SEED = 3, 0  # the demo configs' seed_everything is 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "cheetah.hdf5"
    return str(write_d4rl_file(path, n_episodes=4, episode_len=100, obs_dim=17, act_dim=6))


def _poisoned(tmp_path, dataset, stage, what, steps, mode, name="run", members=S):
    return _config(tmp_path, name, stage, dataset, steps=8, every=1,
                   model_args={"nonfinite": mode, "num_seeds": members},
                   callbacks=[{"class_path": "tests.probes.PoisonAt",
                               "init_args": {"steps": steps, "what": what, "member": 1}}] if steps else [])


@pytest.mark.parametrize("stage,what,needles", [
    ("edm", "batch", ["non-finite loss and gradient norm of member 1 (seed 1) at step 3", "before the update"]),
    ("iql", "grad", ["non-finite gradient norm of member 1 (seed 1) at step 3", "before the update"]),
])
def test_stop_names_the_member_and_keeps_the_last_good_checkpoint(stage, what, needles, dataset, tmp_path, cli):
    proc = cli(["fit", "--config", str(_poisoned(tmp_path, dataset, stage, what, [3], "stop"))])
    _error_line(proc.returncode, proc.stderr, f"{stage.upper()}Module", *needles, "last good checkpoint", "skip only that member")
    last = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and _all_finite(last["state_dict"])


@pytest.mark.parametrize("stage,what", [("iql", "grad"), ("edm", "batch")])
def test_skip_skips_only_that_members_update_and_counts_it_per_member(stage, what, dataset, tmp_path, caplog):
    """Member 1 poisoned at steps 3 and 5: its update (Adam, EMA / target) is skipped twice; members 0 and 2 train
    as if nothing happened, bit for bit equal to the same ensemble run without poison."""
    with caplog.at_level("WARNING", logger="idql_cm"):
        assert main(["fit", "--config", str(_poisoned(tmp_path, dataset, stage, what, [3, 5], "skip"))]) == 0
    assert "of member 1 (seed 1) at step 3: that update skipped" in caplog.text
    assert "per member (member 0: 0, member 1: 2, member 2: 0" in caplog.text
    last = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8 and last["idql_cm"]["skipped_steps"] == [0, 2, 0]
    assert _all_finite(last["state_dict"])
    for state in last["optimizer_states"][0]["state"].values():  # Adam counted member 1's 6 real updates
        assert state["step"].tolist() == [8.0, 6.0, 8.0]
    assert main(["fit", "--config", str(_poisoned(tmp_path, dataset, stage, what, [], "skip", name="clean"))]) == 0
    clean = _load(tmp_path / "clean" / "checkpoints" / "last.ckpt")
    for k in (0, 2):
        mine, theirs = member_state(last["state_dict"], k), member_state(clean["state_dict"], k)
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs), k
    poisoned, healthy = member_state(last["state_dict"], 1), member_state(clean["state_dict"], 1)
    assert any(not torch.equal(poisoned[key], healthy[key]) for key in healthy)
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert max(e.value for e in acc.Scalars("train/skipped_nonfinite_steps/member_1")) == 2
    assert max(e.value for e in acc.Scalars("train/skipped_nonfinite_steps/member_0")) == 0


def test_sigkill_then_resume_of_an_ensemble_is_exact(dataset, tmp_path, cli):
    """An S = 2 CT run killed (SIGKILL) inside a random step and resumed ends with every member's weights, EMA and
    Adam state (per-member step counts included) of the uninterrupted run, exactly."""
    rng = random.Random(77)
    steps = 30
    args = {"num_seeds": 2, "total_steps": steps, "s0": 2, "s1": 8}
    ref_cfg = _config(tmp_path, "ref", "ct", dataset, steps=steps, every=1, model_args=args)
    run_cfg = _config(tmp_path, "run", "ct", dataset, steps=steps, every=1, model_args=args,
                      callbacks=[{"class_path": "tests.probes.StepReporter"}])
    last = kill_then_resume(tmp_path, ref_cfg, run_cfg, steps, rng)
    assert last["idql_cm"]["num_seeds"] == 2 and _all_finite(last["state_dict"])
    # resuming with another member count is refused in one line
    wrong = cli(["fit", "--config", str(run_cfg), "--ckpt_path", "last", "--model.init_args.num_seeds", "3"])
    _error_line(wrong.returncode, wrong.stderr, "holds 2 member(s)", "num_seeds: 3")


def _ddp(dataset, tmp_path, name, seed, members):
    cfg = _config(tmp_path, name, "edm", dataset, steps=6, every=3,
                  model_args={"num_seeds": members} if members > 1 else {})
    proc = run_cli_subprocess(["fit", "--config", str(cfg), "--seed_everything", str(seed), "--trainer.accelerator",
                               "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"], timeout=240,
                              env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _load(tmp_path / name / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_ddp_two_cpu_ranks_with_an_ensemble(dataset, tmp_path):
    """Two gloo ranks, S = 2: each member's gradients are averaged over the ranks as a solo run's are, so member 1
    ends as the two-rank solo run of seed 1 (weights, EMA, Adam; tolerance 1e-6: all-reduce sums in its own order)."""
    ens = _ddp(dataset, tmp_path, "ens", SEED, 2)
    solo = _ddp(dataset, tmp_path, "solo", SEED + 1, 1)
    mine = member_state(ens["state_dict"], 1)
    for key, value in solo["state_dict"].items():
        torch.testing.assert_close(mine[key], value, rtol=1e-6, atol=1e-6, msg=key)
    sa, sb = ens["optimizer_states"][0]["state"], solo["optimizer_states"][0]["state"]
    for i in sb:
        torch.testing.assert_close(sa[i]["exp_avg"][1], sb[i]["exp_avg"], rtol=1e-6, atol=1e-6)
    m0 = member_state(ens["state_dict"], 0)
    assert not torch.equal(m0["model.net.inp.weight"], mine["model.net.inp.weight"])
