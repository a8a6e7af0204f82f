"""Training through the real CLI: exact resume, TensorBoard scalars read back, DDP on two CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, run_cli_subprocess, shrink_config

SMALL_NET = {"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2, "dropout": 0.1}}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "cheetah.hdf5"
    return str(write_d4rl_file(path, n_episodes=4, episode_len=100, obs_dim=17, act_dim=6))


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _add_callback(cfg_path: Path, class_path: str, **init_args) -> None:
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": class_path, "init_args": init_args})
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # the optimiser state (Adam moments) resumes too
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)


def _as_automatic_optimisation_checkpoint(path: Path) -> None:
    """Rewrite a checkpoint's loop state to the layout idql-cm 0.1.0 wrote (Lightning's automatic optimisation
    counted the steps, the manual loop's count was 0)."""
    ck = _state(path)
    fit = ck["loops"]["fit_loop"]
    manual = fit["epoch_loop.manual_optimization.optim_step_progress"]
    fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"] = manual
    fit["epoch_loop.manual_optimization.optim_step_progress"] = {
        "total": {"ready": 0, "completed": 0}, "current": {"ready": 0, "completed": 0}}
    torch.save(ck, path)


@pytest.mark.parametrize("stage,legacy", [("ct", False), ("iql", False), ("iql", True)])
def test_resume_is_exact(stage, legacy, dataset, tmp_path):
    """2N steps in one run == N steps, stop, resume from last, N more (sampler RNG, curriculum, EMA, Adam).
    ``legacy``: the checkpoint at N has the loop state of idql-cm 0.1.0, which resumes at step N too."""
    steps, half = 12, 6
    extra = {**SMALL_NET, "total_steps": 12, "s0": 2, "s1": 8} if stage == "ct" else {"hidden_dim": 32}
    src = CONFIGS / "demo" / f"{stage}.yaml"
    a = shrink_config(src, tmp_path / "a.yaml", tmp_path / "a", dataset, steps=steps, model_args=extra, keep_eval=False)
    assert main(["fit", "--config", str(a)]) == 0
    b = shrink_config(src, tmp_path / "b.yaml", tmp_path / "b", dataset, steps=steps, model_args=extra, keep_eval=False)
    _add_callback(b, "tests.probes.StopAtStep", step=half)
    assert main(["fit", "--config", str(b)]) == 0
    assert _state(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == half
    if legacy:
        _as_automatic_optimisation_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    b2 = shrink_config(src, tmp_path / "b2.yaml", tmp_path / "b", dataset, steps=steps, model_args=extra, keep_eval=False)
    assert main(["fit", "--config", str(b2), "--ckpt_path", "last"]) == 0
    _assert_same_weights(_state(tmp_path / "a" / "checkpoints" / "last.ckpt"),
                         _state(tmp_path / "b" / "checkpoints" / "last.ckpt"))


def _scalars(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


EXPECTED_SCALARS = {
    "iql": {"train/q_loss", "train/v_loss", "train/q_mean", "train/v_mean", "train/adv_mean", "train/lr",
            "train/grad_norm"},
    "edm": {"train/loss", "train/lr", "train/grad_norm", "train/ema_decay"},
    "ct": {"train/loss", "train/unweighted_loss", "train/curriculum_N", "train/lr", "train/grad_norm",
           "train/ema_decay"},
    "cd": {"train/loss", "train/lr", "train/grad_norm", "train/ema_decay"},
}


def test_tensorboard_scalars_for_every_stage(dataset, tmp_path):
    out = tmp_path / "run"
    for stage in ("iql", "edm", "cd", "ct"):
        extra = {"hidden_dim": 32} if stage == "iql" else ({} if stage == "cd" else SMALL_NET)
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"{stage}.yaml", out / stage, dataset,
                            steps=4, model_args=extra, keep_eval=False)
        assert main(["fit", "--config", str(cfg)]) == 0
        tags = _scalars(out / stage)
        assert EXPECTED_SCALARS[stage] <= tags, f"{stage}: missing {EXPECTED_SCALARS[stage] - tags}"


def _ddp_run(dataset, tmp_path: Path, name: str, fused: int) -> tuple[Path, dict, dict]:
    root = tmp_path / name
    cfg = shrink_config(CONFIGS / "demo" / "edm.yaml", tmp_path / f"{name}.yaml", root, dataset, steps=4,
                        model_args={**SMALL_NET, "fused_steps": fused}, keep_eval=False)
    root.mkdir(parents=True)
    _add_callback(cfg, "tests.probes.RankProbe", out=str(root))
    proc = run_cli_subprocess(["fit", "--config", str(cfg), "--trainer.accelerator", "cpu",
                               "--trainer.devices", "2", "--trainer.strategy", "ddp",
                               "--trainer.log_every_n_steps", "2"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, *(json.loads((root / f"probe_rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.slow
def test_ddp_two_cpu_ranks(dataset, tmp_path):
    """Real DDP (gloo, 2 processes) through the console script: ranks draw different batches, end with identical
    (averaged-gradient) weights, and only rank 0 writes checkpoints and event files. With fused_steps = 2 (two
    backward passes, two gradient all-reduces per Trainer iteration) the ranks end with the same weights as K = 1."""
    root, p0, p1 = _ddp_run(dataset, tmp_path, "ddp", 1)
    _, f0, f1 = _ddp_run(dataset, tmp_path, "ddp_fused", 2)
    assert f0["param_sum"] == f1["param_sum"] == p0["param_sum"] and f0["param_sq"] == p0["param_sq"]
    assert len(f0["batches"]) == 2  # iterations, of two updates each
    assert p0["world_size"] == p1["world_size"] == 2
    assert len(p0["batches"]) == len(p1["batches"]) == 4
    assert all(abs(x - y) > 1e-6 for x, y in zip(p0["batches"], p1["batches"], strict=True)), "ranks drew the same batches"
    assert p0["param_sum"] == pytest.approx(p1["param_sum"], rel=1e-6, abs=1e-6)
    assert p0["param_sq"] == pytest.approx(p1["param_sq"], rel=1e-6)
    assert len(list(root.glob("events.out.tfevents.*"))) == 1
    ckpts = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and all(not n.endswith(".tmp") for n in ckpts)


@pytest.mark.parametrize("stage", ["edm", "ct"])
def test_ema_warm_up_counts_updates_from_zero(stage, dataset, tmp_path):
    """k-diffusion's warm-up: update 0 uses decay 0 (the EMA copies the weights), update 1 uses decay(1)."""
    from idql_cm.nets.ema import EMAWarmup

    extra = {**SMALL_NET, "total_steps": 2, "s0": 2, "s1": 8} if stage == "ct" else dict(SMALL_NET)
    runs = {}
    for steps in (1, 2):
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"{steps}.yaml", tmp_path / f"r{steps}",
                            dataset, steps=steps, model_args=extra, keep_eval=False)
        assert main(["fit", "--config", str(cfg)]) == 0
        runs[steps] = _state(tmp_path / f"r{steps}" / "checkpoints" / "last.ckpt")["state_dict"]
    keys = [k[len("model."):] for k in runs[1] if k.startswith("model.")]
    for k in keys:
        assert torch.equal(runs[1][f"ema_model.{k}"], runs[1][f"model.{k}"]), k
    decay = EMAWarmup(power=2 / 3, max_value=0.999).decay(1)  # the demo configs' ema_decay is 0.999
    for k in keys:
        want = decay * runs[1][f"ema_model.{k}"] + (1 - decay) * runs[2][f"model.{k}"]
        assert torch.allclose(runs[2][f"ema_model.{k}"], want, atol=1e-6), k


def _scalar_series(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("stage", ["iql", "ct"])
def test_fused_steps_train_the_same_weights_and_count_updates(stage, dataset, tmp_path):
    """K = 4 updates per Trainer iteration over 10 steps (two full iterations, then one of 2) == K = 1, bit for bit
    (weights, EMA / target, Adam); checkpoints every 4 steps land on the same steps; TensorBoard's x-axis counts
    updates (the same points and values as K = 1)."""
    extra = {**SMALL_NET, "total_steps": 10, "s0": 2, "s1": 8} if stage == "ct" else {"hidden_dim": 32}
    for k in (1, 4):
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp_path / f"k{k}.yaml", tmp_path / f"k{k}", dataset,
                            steps=10, model_args={**extra, "fused_steps": k}, keep_eval=False)
        y = yaml.safe_load(cfg.read_text())
        y["trainer"]["log_every_n_steps"] = 4
        for cb in y["trainer"]["callbacks"]:
            if cb["class_path"].endswith("ModelCheckpoint"):
                cb["init_args"]["every_n_train_steps"] = 4
        cfg.write_text(yaml.safe_dump(y, sort_keys=False))
        assert main(["fit", "--config", str(cfg)]) == 0
    a, b = (_state(tmp_path / f"k{k}" / "checkpoints" / "last.ckpt") for k in (1, 4))
    _assert_same_weights(a, b)
    assert b["global_step"] == 10
    names = {k: sorted(p.name for p in (tmp_path / f"k{k}" / "checkpoints").iterdir()) for k in (1, 4)}
    assert names[1] == names[4] == ["last.ckpt", "step=8.ckpt"]  # save_top_k 1: the newest periodic one
    tag = "train/q_loss" if stage == "iql" else "train/loss"
    s1, s4 = (_scalar_series(tmp_path / f"k{k}", tag) for k in (1, 4))
    assert [s for s, _ in s4] == [s for s, _ in s1] == [3, 7] and s4 == s1


def test_fused_steps_are_lowered_to_divide_the_periods_with_a_warning(dataset, tmp_path, caplog):
    cfg = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / "k.yaml", tmp_path / "k", dataset, steps=12,
                        model_args={"hidden_dim": 32, "fused_steps": 8}, keep_eval=False)  # checkpoints every 6
    with caplog.at_level("WARNING", logger="idql_cm"):
        assert main(["fit", "--config", str(cfg), "--trainer.log_every_n_steps", "4"]) == 0
    assert "model.fused_steps" in caplog.text and "8" in caplog.text  # where, and the value found
    assert "every_n_train_steps = 6" in caplog.text and "using 2" in caplog.text
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == ["last.ckpt", "step=12.ckpt"]
    assert [s for s, _ in _scalar_series(tmp_path / "k", "train/q_loss")] == [3, 7, 11]


def test_fused_steps_resume_exactly(dataset, tmp_path):
    """Stop after 8 of 16 steps with K = 4, resume with K = 2: the same weights as 16 steps with K = 1."""
    extra = {"hidden_dim": 32}
    src = CONFIGS / "demo" / "iql.yaml"
    a = shrink_config(src, tmp_path / "a.yaml", tmp_path / "a", dataset, steps=16, model_args=extra, keep_eval=False)
    assert main(["fit", "--config", str(a)]) == 0
    b = shrink_config(src, tmp_path / "b.yaml", tmp_path / "b", dataset, steps=16,
                      model_args={**extra, "fused_steps": 4}, keep_eval=False)
    _add_callback(b, "tests.probes.StopAtStep", step=8)
    assert main(["fit", "--config", str(b)]) == 0
    assert _state(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == 8
    b2 = shrink_config(src, tmp_path / "b2.yaml", tmp_path / "b", dataset, steps=16,
                       model_args={**extra, "fused_steps": 2}, keep_eval=False)
    assert main(["fit", "--config", str(b2), "--ckpt_path", "last"]) == 0
    _assert_same_weights(_state(tmp_path / "a" / "checkpoints" / "last.ckpt"),
                         _state(tmp_path / "b" / "checkpoints" / "last.ckpt"))


def test_step_progress_bar_counts_updates(dataset, tmp_path, capsys):
    """The configs' bar counts gradient steps: with 4 updates per iteration it still shows 4/10, 8/10 and 10/10."""
    cfg = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / "k.yaml", tmp_path / "k", dataset, steps=10,
                        model_args={"hidden_dim": 32, "fused_steps": 4}, keep_eval=False)
    y = yaml.safe_load(cfg.read_text())
    y["trainer"]["enable_progress_bar"] = True
    y["trainer"]["log_every_n_steps"] = 4
    for cb in y["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 4
    y["trainer"]["callbacks"].append({"class_path": "idql_cm.modules.callbacks.StepProgressBar",
                                      "init_args": {"refresh_rate": 4}})
    cfg.write_text(yaml.safe_dump(y, sort_keys=False))
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out  # Lightning's bars write to stdout
    assert "4/10" in out and "8/10" in out and "10/10" in out, out[-2000:]
    assert "3/10" not in out and "1/10" not in out  # iterations would show as 1/10, 2/10, 3/10
