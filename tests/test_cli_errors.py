"""Bad input through the real command: one line on stderr, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from idql_cm.data.synthetic import write_d4rl_file
from tests.cli_utils import CONFIGS, run_cli_subprocess, shrink_config


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("idql-cm: error:")]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return str(write_d4rl_file(tmp_path_factory.mktemp("d") / "c.hdf5", n_episodes=2, episode_len=40,
                               obs_dim=17, act_dim=6))


def test_missing_dataset_file(tmp_path, cli):
    missing = tmp_path / "nowhere.hdf5"
    proc = cli(["fit", "--config", str(CONFIGS / "demo" / "iql.yaml"), "--data.dataset", str(missing),
                               "--trainer.default_root_dir", str(tmp_path / "run")])
    _one_line_error(proc, str(missing))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_d4rl_file_names_file_and_folder(tmp_path, cli):
    proc = cli(["fit", "--config", str(CONFIGS / "hopper-medium-v2" / "iql.yaml"),
                               "--trainer.default_root_dir", str(tmp_path / "run")],
                              env={"D4RL_DATASET_DIR": str(tmp_path)})
    _one_line_error(proc, "hopper_medium-v2.hdf5", str(tmp_path))


def test_debug_env_shows_traceback(tmp_path):
    proc = run_cli_subprocess(["fit", "--config", str(CONFIGS / "demo" / "iql.yaml"),
                               "--data.dataset", str(tmp_path / "x.hdf5")], env={"IDQL_CM_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_wrong_checkpoint_kind_is_refused_before_training(dataset, tmp_path, cli):
    cfg = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / "iql.yaml", tmp_path / "iql", dataset, steps=2)
    assert cli(["fit", "--config", str(cfg)]).returncode == 0
    iql_ckpt = tmp_path / "iql" / "checkpoints" / "last.ckpt"
    edm = shrink_config(CONFIGS / "demo" / "edm.yaml", tmp_path / "edm.yaml", tmp_path / "edm", dataset, steps=2,
                        keep_eval=False)
    proc = cli(["fit", "--config", str(edm), "--ckpt_path", str(iql_ckpt)])
    _one_line_error(proc, "--ckpt_path", "edm", "iql")
    assert not (tmp_path / "edm" / "checkpoints").exists()


def test_not_a_checkpoint(dataset, tmp_path, cli):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"this is not a checkpoint")
    edm = shrink_config(CONFIGS / "demo" / "edm.yaml", tmp_path / "edm.yaml", tmp_path / "edm", dataset, steps=2,
                        keep_eval=False)
    _one_line_error(cli(["fit", "--config", str(edm), "--ckpt_path", str(bogus)]), str(bogus))


def test_missing_teacher_for_cd(dataset, tmp_path, cli):
    cd = shrink_config(CONFIGS / "demo" / "cd.yaml", tmp_path / "cd.yaml", tmp_path / "run" / "cd", dataset, steps=2,
                       keep_eval=False)
    _one_line_error(cli(["fit", "--config", str(cd)]), "teacher_ckpt",
                    str(Path(tmp_path / "run" / "edm" / "checkpoints" / "last.ckpt")))


def test_unknown_config_key_and_wrong_type(tmp_path, cli):
    proc = cli(["fit", "--config", str(CONFIGS / "demo" / "iql.yaml"), "--model.init_args.gamma", "1"])
    # jsonargparse's message, one short line instead of 60 lines of usage
    line = _one_line_error(proc, "gamma", "not accepted", "idql-cm fit --help")
    assert len(proc.stderr.strip().splitlines()) == 1 and len(line) < 300
    proc = cli(["fit", "--config", str(CONFIGS / "demo" / "iql.yaml"), "--trainer.max_steps", "many"])
    assert proc.returncode != 0 and "max_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path, cli):
    proc = cli(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert proc.returncode != 0 and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag,value", [("gradient_clip_val", "1.0"), ("accumulate_grad_batches", "2")])
def test_automatic_optimisation_flags_are_refused_before_anything_is_written(flag, value, dataset, tmp_path, cli):
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct", dataset, steps=2,
                        keep_eval=False)
    proc = cli(["fit", "--config", str(cfg), f"--trainer.{flag}", value])
    _one_line_error(proc, f"trainer.{flag}", "manual optimisation", value)
    assert not (tmp_path / "ct").exists()


def test_help_lists_every_command():
    proc = run_cli_subprocess(["--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith("  ")]
    assert listed == ["fit", "validate", "collect", "report", "export"], proc.stdout


@pytest.mark.parametrize("sub", ["predict", "test"])
def test_subcommands_that_cannot_run_are_not_offered(sub, tmp_path, cli):
    # Trainer.predict / test need a predict_step / test_step the modules do not have: refused by the parser
    proc = cli([sub, "--config", str(CONFIGS / "demo" / "ct.yaml"),
                               "--trainer.default_root_dir", str(tmp_path / "run")])
    line = _one_line_error(proc, repr(sub), "fit", "validate")
    assert "Misconfiguration" not in proc.stderr and "predict'" not in line.split("choose from")[-1]
    assert not (tmp_path / "run").exists()


def test_data_without_environment_trains_and_skips_evaluation_before_asking_for_a_critic(dataset, tmp_path, cli):
    # the shipped CT config names a critic checkpoint that does not exist here; the data names no environment
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct", dataset, steps=2,
                        eval_args={"critic_ckpt": str(tmp_path / "no_iql" / "last.ckpt")})
    proc = cli(["fit", "--config", str(cfg)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    skips = [ln for ln in out.splitlines() if "RolloutEvaluation" in ln]
    assert len(skips) == 1 and "skipping rollouts" in skips[0] and "no environment" in skips[0], skips
    assert (tmp_path / "ct" / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.rglob("eval_report*"))


def test_eval_settings_from_the_command_line(tmp_path, cli):
    """``--eval.<name>`` sets the config's RolloutEvaluation callback (LightningCLI cannot address one entry of
    trainer.callbacks); on a config without one it is refused in one line."""
    import json

    from idql_cm.cli import main
    from idql_cm.data.synthetic import write_d4rl_file

    data = str(write_d4rl_file(tmp_path / "d.hdf5", n_episodes=2, episode_len=60, obs_dim=17, act_dim=6,
                               env_id="HalfCheetah-v5"))
    iql = shrink_config(CONFIGS / "demo" / "iql.yaml", tmp_path / "iql.yaml", tmp_path / "iql", data, steps=2,
                        model_args={"hidden_dim": 16}, keep_eval=False)
    assert main(["fit", "--config", str(iql)]) == 0
    ct = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct", data, steps=2,
                       model_args={"net": {"hidden_dim": 16, "n_blocks": 1, "expand": 2}, "total_steps": 2},
                       eval_args={"critic_ckpt": str(tmp_path / "iql" / "checkpoints" / "last.ckpt")})
    assert main(["fit", "--config", str(ct), "--eval.episodes", "1", "--eval.num_envs", "1", "--eval.nfe", "[2]",
                 "--eval.num_candidates", "3"]) == 0
    rep = json.loads((tmp_path / "ct" / "eval_report.json").read_text())
    assert [r["nfe"] for r in rep["results"]] == [2] and rep["results"][0]["episodes"] == 1
    assert rep["num_candidates"] == 3
    proc = cli(["fit", "--config", str(iql), "--eval.episodes", "3"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "--eval.episodes" in line and "RolloutEvaluation" in line, line
