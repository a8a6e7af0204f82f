"""Faults and bad input through the real ``idql-cm`` command: a clean continuation or one clear line, never a silent
wrong result or a corrupt checkpoint.

1. SIGKILL at a random step, then ``--ckpt_path last``: the same final weights as an uninterrupted run; a kill
   during a checkpoint write leaves the previous file readable (``AtomicCheckpointIO``).
2. NaN / Inf loss or gradient: stop with one line naming module, step and quantity, keeping the last good
   checkpoint; or (``model.init_args.nonfinite: skip``) skip the update, counted, Adam moments and EMA untouched.
3. A CD teacher, an IQL critic or a ``--ckpt_path`` of another task (sizes, normaliser), kind or format: refused
   before any work, naming both sides.
4. Bad data (truncated HDF5, wrong dtype, NaN rows, no rows, out-of-bound actions, duplicated Minari keys): one
   line, exit 2, nothing written.
5. Unstable simulations during evaluation are covered in tests/test_eval_rollout.py
   (``test_nan_observations_end_the_episode_and_are_excluded``).
6. Configuration mistakes: jsonargparse's message as one line, with the expected file for paths.

A few cases run as real subprocesses (launched together, they share the two cores); the full matrix calls the
same entry point, ``idql_cm.cli.main``, in-process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from idql_cm.cli import main
from idql_cm.data.synthetic import make_d4rl_arrays, write_arrays, write_d4rl_file
from tests.cli_utils import CONFIGS, REPO, run_cli_subprocess, shrink_config

SMALL_NET = {"net": {"hidden_dim": 32, "n_blocks": 1, "expand": 2}}


# ------------------------------------------------------------------------------------------------------- helpers
def _config(tmp: Path, name: str, stage: str, dataset: str, steps: int = 2, every: int | None = None,
            callbacks: list[dict] | None = None, model_args: dict | None = None, eval_args: dict | None = None,
            root: Path | None = None) -> Path:
    """A shrunk demo config (tiny nets, CPU) with a checkpoint every ``every`` steps and extra callbacks."""
    extra = {"hidden_dim": 32} if stage == "iql" else ({} if stage == "cd" else dict(SMALL_NET))
    extra["fused_steps"] = 1  # the probes act per Trainer iteration (PoisonAt, StopAtStep at an exact step)
    cfg_path = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp / f"{name}.yaml", root or tmp / name, dataset,
                             steps=steps, model_args={**extra, **(model_args or {})}, eval_args=eval_args,
                             keep_eval=eval_args is not None)
    cfg = yaml.safe_load(cfg_path.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint") and every is not None:
            cb["init_args"]["every_n_train_steps"] = every
    cfg["trainer"]["callbacks"] += callbacks or []
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_path


def _error_line(rc: int, err: str, *needles: str) -> str:
    """The one ``idql-cm: error:`` line of a failed run (exit code 2, no traceback), checked for ``needles``."""
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err and "usage:" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("idql-cm: error:")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _cli(capsys, *args: str) -> tuple[int, str]:
    """``idql-cm ARGS`` in-process (the console script is ``sys.exit(main())``): exit code and stderr."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _env(**extra: str) -> dict:
    # one intra-op thread: several children share the two cores, and spinning OpenMP threads would starve them
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}
    env.pop("IDQL_CM_DEBUG", None)
    return env


def _popen(args: list, log: Path, env: dict | None = None, stdout=None) -> subprocess.Popen:
    """``idql-cm ARGS`` as a child process, stderr into ``log``."""
    with log.open("w") as err:
        return subprocess.Popen([sys.executable, "-m", "idql_cm", *map(str, args)], cwd=REPO, env=env or _env(),
                                stdout=stdout if stdout is not None else subprocess.DEVNULL, stderr=err, text=True)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][key]), torch.as_tensor(sb[i][key])), (i, key)


def kill_then_resume(tmp_path: Path, ref_cfg: Path, run_cfg: Path, steps: int, rng: random.Random) -> dict:
    """Run ``ref_cfg`` uninterrupted alongside ``run_cfg`` (which has a StepReporter), SIGKILL the latter at a random
    point of a random step, resume it with ``--ckpt_path last`` and assert both end the same, exactly. Returns the
    killed run's last checkpoint as it was after the kill."""
    ref = _popen(["fit", "--config", ref_cfg], tmp_path / "ref.log")  # the uninterrupted run, alongside
    victim = _popen(["fit", "--config", run_cfg], tmp_path / "run.log", stdout=subprocess.PIPE)
    kill_step = rng.randint(3, steps - 10)
    try:
        for line in victim.stdout:
            if line.startswith("@step ") and int(line.split()[1]) >= kill_step:
                break
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere inside the next step: forward, backward, EMA or a save
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim.kill()
    assert victim.returncode == -signal.SIGKILL, (tmp_path / "run.log").read_text()[-2000:]
    last = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")  # readable: never a truncated file
    assert 0 < last["global_step"] < steps

    resumed = run_cli_subprocess(["fit", "--config", str(run_cfg), "--ckpt_path", "last"], env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    _assert_same_run(_load(tmp_path / "ref" / "checkpoints" / "last.ckpt"),
                     _load(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    return last


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Dataset A (17/6), B (other sizes, 11/3), C (A's sizes, other content: another normaliser), bad files."""
    d = tmp_path_factory.mktemp("data")
    out = {
        "A": write_d4rl_file(d / "a.hdf5", n_episodes=4, episode_len=100, obs_dim=17, act_dim=6),
        "B": write_d4rl_file(d / "b.hdf5", n_episodes=4, episode_len=100, obs_dim=11, act_dim=3),
        "C": write_d4rl_file(d / "c.hdf5", n_episodes=4, episode_len=100, obs_dim=17, act_dim=6, seed=1),
    }
    raw = out["A"].read_bytes()
    (d / "truncated.hdf5").write_bytes(raw[: len(raw) // 2])
    out["truncated"] = d / "truncated.hdf5"
    arrays = make_d4rl_arrays(n_episodes=4, episode_len=100)
    out["int_obs"] = write_arrays(d / "int_obs.hdf5", {**arrays, "observations": arrays["observations"].astype(np.int64)})
    nan_rew = arrays["rewards"].copy()
    nan_rew[[7, 50]] = np.nan
    out["nan_rows"] = write_arrays(d / "nan_rows.hdf5", {**arrays, "rewards": nan_rew})
    out["no_rows"] = write_arrays(d / "no_rows.hdf5", {k: v[:0] for k, v in arrays.items()})
    wide = arrays["actions"].copy()
    wide[[3, 9, 11], 0] = 1.5
    out["out_of_bounds"] = write_arrays(d / "oob.hdf5", {**arrays, "actions": wide})
    return {k: str(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory) -> Path:
    """Two hand-written Minari datasets: a key twice in metadata.json; one episode id twice in main_data.hdf5."""
    root = tmp_path_factory.mktemp("minari")
    rng = np.random.default_rng(0)

    def episode(f, name, t=20):
        g = f.create_group(name)
        g.attrs["id"] = int(name.split("_")[1])
        g["observations"] = rng.normal(size=(t + 1, 17)).astype(np.float32)
        g["actions"] = rng.uniform(-1, 1, size=(t, 6)).astype(np.float32)
        g["rewards"] = rng.normal(size=t)
        g["terminations"] = np.zeros(t, bool)
        g["truncations"] = np.r_[np.zeros(t - 1, bool), True]

    metadata = '{"dataset_id": "%s", "total_episodes": 2, "total_steps": 40, "minari_version": "0.5.0"'
    for ds_id, episodes, extra in (("test/dupmeta-v0", ["episode_0", "episode_1"], ', "total_steps": 400}'),
                                   ("test/dupepisode-v0", ["episode_0", "episode_1", "episode_01"], "}")):
        data_dir = root / ds_id / "data"
        data_dir.mkdir(parents=True)
        (data_dir / "metadata.json").write_text(metadata % ds_id + extra)
        with h5py.File(data_dir / "main_data.hdf5", "w") as f:
            for name in episodes:
                episode(f, name)
    return root


@pytest.fixture(scope="module")
def artefacts(data, tmp_path_factory) -> dict[str, Path]:
    """Real checkpoints (2 steps each) of EDM and IQL on A, B and C, plus one rewritten as format 0."""
    tmp = tmp_path_factory.mktemp("artefacts")
    out = {}
    for stage, name in (("edm", "A"), ("iql", "A"), ("edm", "B"), ("edm", "C"), ("iql", "B"), ("iql", "C")):
        cfg = _config(tmp, f"{stage}_{name}", stage, data[name])
        assert main(["fit", "--config", str(cfg)]) == 0
        out[f"{stage}_{name}"] = tmp / f"{stage}_{name}" / "checkpoints" / "last.ckpt"
    old = _load(out["edm_A"])
    old["idql_cm"]["format"] = 0
    torch.save(old, tmp / "format0.ckpt")
    out["format0"] = tmp / "format0.ckpt"
    return out


# ---------------------------------------------------------------------------------- 1. kills and atomic saves
def test_sigkill_at_a_random_step_then_resume_is_exact(data, tmp_path):
    """A run killed (SIGKILL) at a random point of a random step, resumed with --ckpt_path last, ends with the
    weights, EMA and Adam moments of an uninterrupted run, exactly."""
    rng = random.Random(1234)
    steps = 40
    ref_cfg = _config(tmp_path, "ref", "edm", data["A"], steps=steps, every=1)
    run_cfg = _config(tmp_path, "run", "edm", data["A"], steps=steps, every=1,
                      callbacks=[{"class_path": "tests.probes.StepReporter"}])
    last = kill_then_resume(tmp_path, ref_cfg, run_cfg, steps, rng)
    assert _all_finite(last["state_dict"])
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


KILLED_MID_SAVE = """
import os, signal, sys, torch
from idql_cm.modules.checkpoint_io import AtomicCheckpointIO

io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"version": 1, "w": torch.arange(1000)}, path)

def dying_save(obj, f, *args, **kwargs):  # half a checkpoint reaches the disk, then the power goes
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
io.save_checkpoint({"version": 2, "w": torch.arange(1000)}, path)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    from idql_cm.modules.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _load(path)["version"] == 1  # the previous checkpoint, whole
    strays = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(strays) == 1 and strays[0].startswith(".last.ckpt.")
    AtomicCheckpointIO().save_checkpoint({"version": 3}, path)
    assert _load(path)["version"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the stray went with the next save


# ------------------------------------------------------------------------ 2.-4., 6. the real command, in parallel
@pytest.fixture(scope="module")
def batch(data, artefacts, tmp_path_factory) -> dict[str, dict]:
    """One case of each kind as a real ``idql-cm`` subprocess, started together: exit code, stderr, run folder."""
    tmp = tmp_path_factory.mktemp("batch")
    jobs = {
        "nan_stop": ["fit", "--config", _config(tmp, "nan_stop", "edm", data["A"], steps=8, every=1, callbacks=[
            {"class_path": "tests.probes.PoisonAt", "init_args": {"steps": [5]}}])],
        "teacher_sizes": ["fit", "--config", _config(tmp, "teacher_sizes", "cd", data["A"]),
                          "--model.init_args.teacher_ckpt", artefacts["edm_B"]],
        "truncated_debug": ["fit", "--config", _config(tmp, "truncated_debug", "edm", data["truncated"])],
        "oob_clip": ["fit", "--config", _config(tmp, "oob_clip", "edm", data["out_of_bounds"])],
    }  # the truncated file's one line (below) and an unknown key (tests/test_cli_errors.py) run in process
    procs = {}
    for name, args in jobs.items():  # oob_clip: Python's default warning filters, as a user has them
        env = _env(PYTHONWARNINGS="default") if name == "oob_clip" else _env()
        if name == "truncated_debug":
            env["IDQL_CM_DEBUG"] = "1"
        procs[name] = _popen(args, tmp / f"{name}.log", env=env)
    results = {}
    for name, proc in procs.items():
        rc = proc.wait(timeout=300)
        results[name] = {"rc": rc, "err": (tmp / f"{name}.log").read_text(), "root": tmp / name}
    return results


def test_the_command_stops_on_nan_refuses_wrong_teacher_and_bad_data_warns_on_clipping(batch, data, artefacts):
    r = batch["nan_stop"]
    line = _error_line(r["rc"], r["err"], "EDMModule", "non-finite loss", "at step 5", "last good checkpoint",
                       "last.ckpt", "nonfinite: skip")
    last = _load(r["root"] / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 5 and _all_finite(last["state_dict"]), line  # the state before the poisoned step
    r = batch["teacher_sizes"]
    _error_line(r["rc"], r["err"], "model.teacher_ckpt", artefacts["edm_B"], "11/3", "17/6", data["A"], data["B"])
    assert not r["root"].exists()  # refused before anything was written
    r = batch["truncated_debug"]  # IDQL_CM_DEBUG=1: the traceback instead of the line
    assert r["rc"] != 0 and "Traceback" in r["err"] and "DataError" in r["err"], r["err"][-3000:]
    r = batch["oob_clip"]  # clipping is the default: one warning line with the count, and the run goes on
    assert r["rc"] == 0, r["err"][-3000:]
    warn = [ln for ln in r["err"].splitlines() if ln.startswith("idql-cm: warning:") and "'actions'" in ln]
    assert len(warn) == 1 and "3 of 2376 entries" in warn[0] and "clipped" in warn[0], r["err"][-3000:]


def test_a_truncated_file_is_refused_in_one_line(data, tmp_path, cli):
    proc = cli(["fit", "--config", str(_config(tmp_path, "truncated", "edm", data["truncated"]))])
    _error_line(proc.returncode, proc.stderr, data["truncated"], "truncated")
    assert not (tmp_path / "truncated").exists()


# --------------------------------------------------------------------------------------- 2. non-finite values
def _poisoned(tmp_path, dataset: str, stage: str, what: str, steps: list[int], mode: str = "stop",
              every: int = 1) -> Path:
    return _config(tmp_path, "run", stage, dataset, steps=8, every=every, model_args={"nonfinite": mode}, callbacks=[
        {"class_path": "tests.probes.PoisonAt", "init_args": {"steps": steps, "what": what}},
        {"class_path": "tests.probes.StateTrace", "init_args": {"out": str(tmp_path / "trace.json")}}])


@pytest.mark.parametrize("stage,what,log_every,needles", [
    # a NaN loss: caught on every step before the update (not only on logging steps: those are every 5 here)
    ("iql", "batch", 5, ["non-finite v_loss and q_loss", "at step 3", "before the update"]),
    # a finite loss with an Inf gradient on a logging step (step 4 is the 5th): caught before the update
    ("iql", "grad@4", 5, ["non-finite gradient norm", "at step 4", "before the update"]),
    # ... and on a step that does not log: stop mode reads gradients only on logging steps, so the update goes
    # through, and the checkpoint after it (one every step here) is refused: the last good one stays
    ("iql", "grad", 5, ["non-finite weights", "after step 3", "checked on logging steps"]),
    ("ct", "grad", 5, ["non-finite weights", "after step 3", "checked on logging steps"]),
])
def test_nonfinite_stops_with_one_line_and_keeps_the_last_good_checkpoint(stage, what, log_every, needles, data,
                                                                           tmp_path, capsys):
    what, _, at = what.partition("@")
    step = int(at or 3)
    cfg = _poisoned(tmp_path, data["A"], stage, what, [step])
    rc, err = _cli(capsys, "fit", "--config", cfg, "--trainer.log_every_n_steps", str(log_every))
    _error_line(rc, err, f"{stage.upper()}Module", *needles, "last good checkpoint")
    last = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step and _all_finite(last["state_dict"])


@pytest.mark.parametrize("every", [1, 100])
def test_deferred_check_of_a_gpu_stops_one_step_late_naming_the_step(every, data, tmp_path, capsys):
    """Stop mode on a GPU reads step k's verdict at step k+1 (no host sync on the hot path): a NaN loss at step 3
    stops the run, named as step 3, and no checkpoint holds the poisoned update (checkpoints every step or never)."""
    cfg = _config(tmp_path, "run", "iql", data["A"], steps=8, every=every, callbacks=[
        {"class_path": "tests.probes.PoisonAt", "init_args": {"steps": [3], "what": "batch"}},
        {"class_path": "tests.probes.DeferFiniteCheck"}])
    rc, err = _cli(capsys, "fit", "--config", cfg, "--trainer.log_every_n_steps", "50")
    _error_line(rc, err, "IQLModule", "non-finite v_loss and q_loss at step 3", "read at step 4", "one step late",
                "last good checkpoint" if every == 1 else "no checkpoint had been written yet")
    if every == 1:
        last = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 3 and _all_finite(last["state_dict"])


def test_a_gradient_that_got_through_stops_at_the_next_loss_with_the_cause(data, tmp_path, capsys):
    """Stop mode, no checkpoint after the poisoned update: the next step's loss is non-finite, and the line says
    why (the weights already were) instead of blaming the data."""
    cfg = _poisoned(tmp_path, data["A"], "iql", "grad", [3], every=100)
    rc, err = _cli(capsys, "fit", "--config", cfg, "--trainer.log_every_n_steps", "5")
    _error_line(rc, err, "IQLModule", "at step 4", "weights were already non-finite", "gradient of step 3",
                "no checkpoint had been written yet")


@pytest.mark.parametrize("stage,what", [("edm", "batch"), ("iql", "grad")])
def test_skip_mode_skips_the_update_counts_it_and_spares_adam_and_ema(stage, what, data, tmp_path, capsys, caplog):
    cfg = _poisoned(tmp_path, data["A"], stage, what, [3, 5], mode="skip")
    with caplog.at_level("WARNING", logger="idql_cm"):
        rc, err = _cli(capsys, "fit", "--config", cfg)
    assert rc == 0, err[-3000:]
    assert "update skipped (1 skipped so far" in caplog.text and "2 training steps were skipped" in caplog.text
    last = _load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8 and last["idql_cm"]["skipped_steps"] == 2
    assert _all_finite(last["state_dict"])
    # Adam counted only the 6 real updates: its moments never saw the poisoned gradients
    assert {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {6.0}
    # weights, EMA / target nets and buffers after a skipped step are those before it (steps 3 and 5 are skipped)
    trace = {int(k): v for k, v in json.loads((tmp_path / "trace.json").read_text()).items()}
    assert trace[4] == trace[3] and trace[6] == trace[5]
    assert trace[3] != trace[2] and trace[5] != trace[4] and trace[7] != trace[6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert max(e.value for e in acc.Scalars("train/skipped_nonfinite_steps")) == 2


# ------------------------------------------------------------------------------------ 3. wrong artefacts, matrix
@pytest.mark.parametrize("case", ["sizes", "normaliser", "kind", "format"])
def test_wrong_teacher(case, data, artefacts, tmp_path, capsys):
    ckpt = {"sizes": artefacts["edm_B"], "normaliser": artefacts["edm_C"], "kind": artefacts["iql_A"],
            "format": artefacts["format0"]}[case]
    needles = {"sizes": ["11/3", "17/6", data["B"], data["A"]], "normaliser": ["normalisers differ", data["C"], data["A"]],
               "kind": ["expected a checkpoint of kind 'edm'", "'iql'"], "format": ["format 0", "format 1"]}[case]
    cfg = _config(tmp_path, "cd", "cd", data["A"])
    rc, err = _cli(capsys, "fit", "--config", cfg, "--model.init_args.teacher_ckpt", ckpt)
    _error_line(rc, err, "model.teacher_ckpt", ckpt, *needles)
    assert not (tmp_path / "cd").exists()


@pytest.mark.parametrize("case", ["sizes", "normaliser", "kind", "format", "missing"])
def test_wrong_critic(case, data, artefacts, tmp_path, capsys):
    ckpt = {"sizes": artefacts["iql_B"], "normaliser": artefacts["iql_C"], "kind": artefacts["edm_A"],
            "format": artefacts["format0"], "missing": tmp_path / "iql" / "last.ckpt"}[case]
    needles = {"sizes": ["11/3", "17/6", data["B"], data["A"]], "normaliser": ["normalisers differ", data["C"], data["A"]],
               "kind": ["expected a checkpoint of kind 'iql'", "'edm'"], "format": ["format 0", "format 1"],
               "missing": ["no IQL checkpoint", "train the IQL stage first"]}[case]
    # the synthetic data names no environment (which skips evaluation before any critic is read): name one here
    cfg = _config(tmp_path, "edm", "edm", data["A"],
                  eval_args={"critic_ckpt": str(ckpt), "env_id": "HalfCheetah-v5"})
    rc, err = _cli(capsys, "fit", "--config", cfg)
    _error_line(rc, err, "RolloutEvaluation.critic_ckpt", ckpt, *needles)
    assert not (tmp_path / "edm").exists()


@pytest.mark.parametrize("case", ["sizes", "normaliser", "kind", "format"])
def test_wrong_ckpt_path(case, data, artefacts, tmp_path, capsys):
    ckpt = {"sizes": artefacts["edm_B"], "normaliser": artefacts["edm_C"], "kind": artefacts["iql_A"],
            "format": artefacts["format0"]}[case]
    needles = {"sizes": ["11/3", "17/6", data["B"], data["A"]], "normaliser": ["normalisers differ", data["C"], data["A"]],
               "kind": ["expected a checkpoint of kind 'edm'", "'iql'"], "format": ["format 0", "format 1"]}[case]
    cfg = _config(tmp_path, "edm", "edm", data["A"])
    rc, err = _cli(capsys, "fit", "--config", cfg, "--ckpt_path", ckpt)
    _error_line(rc, err, "--ckpt_path", ckpt, *needles)
    assert not (tmp_path / "edm").exists()


def test_resume_from_a_last_checkpoint_of_another_dataset(data, artefacts, tmp_path, capsys):
    """``--ckpt_path last`` finds another dataset's last.ckpt in the run folder: refused before the first step
    (the normaliser would otherwise be silently replaced), and the file is left alone."""
    cfg = _config(tmp_path, "edm", "edm", data["A"])
    last = tmp_path / "edm" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    shutil.copy(artefacts["edm_C"], last)
    before = last.read_bytes()
    rc, err = _cli(capsys, "fit", "--config", cfg, "--ckpt_path", "last")
    _error_line(rc, err, "--ckpt_path", last, "normalisers differ", data["C"], data["A"])
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_a_checkpoint_of_the_same_data_is_accepted(data, artefacts, tmp_path, capsys):
    """The checks do not refuse what is right: a checkpoint of this data resumes (sizes and normaliser equal)."""
    cfg = _config(tmp_path, "edm", "edm", data["A"], steps=3)
    rc, err = _cli(capsys, "fit", "--config", cfg, "--ckpt_path", artefacts["edm_A"])
    assert rc == 0, err[-3000:]
    assert _load(tmp_path / "edm" / "checkpoints" / "last.ckpt")["global_step"] == 3


# ------------------------------------------------------------------------------------------ 4. bad data, matrix
@pytest.mark.parametrize("case", ["truncated", "int_obs", "nan_rows", "no_rows", "out_of_bounds", "dup_meta",
                                  "dup_episode"])
def test_bad_data(case, data, minari_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    source = {"dup_meta": "minari:test/dupmeta-v0", "dup_episode": "minari:test/dupepisode-v0"}.get(case, data.get(case))
    needles = {
        "truncated": [data["truncated"], "truncated or corrupt"],
        "int_obs": [data["int_obs"], "'observations'", "int64"],
        "nan_rows": [data["nan_rows"], "'rewards'", "2 of 400 rows", "first at row 7"],
        "no_rows": [data["no_rows"], "at least 2 rows", "no rows"],
        "out_of_bounds": [data["out_of_bounds"], "'actions'", "[-1, 1]", "3 of 2376 entries", "max |a| = 1.5"],
        "dup_meta": ["metadata.json", "'total_steps'", "twice"],
        "dup_episode": ["main_data.hdf5", "episode id 1 twice", "'episode_1'", "'episode_01'"],
    }[case]
    cfg = _config(tmp_path, "run", "edm", source)
    extra = ["--data.out_of_bounds", "error"] if case == "out_of_bounds" else []
    rc, err = _cli(capsys, "fit", "--config", cfg, *extra)
    _error_line(rc, err, *needles)
    assert not (tmp_path / "run").exists()  # nothing half-written: no log folder, no checkpoints


# ------------------------------------------------------------------------------------ 6. configuration mistakes
@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_config", "missing_dataset", "unknown_yaml_key",
                                  "missing_teacher"])
def test_config_mistakes(case, data, tmp_path, capsys):
    iql = CONFIGS / "demo" / "iql.yaml"
    if case == "unknown_key":
        args, needles = ["--config", iql, "--model.init_args.gamma", "1"], ["gamma", "not accepted"]
    elif case == "wrong_type":
        args, needles = ["--config", iql, "--trainer.max_steps", "many"], ["trainer.max_steps", "int", "many"]
    elif case == "missing_config":
        args, needles = ["--config", tmp_path / "nope.yaml"], [tmp_path / "nope.yaml", "does not exist"]
    elif case == "missing_dataset":
        cfg = yaml.safe_load(iql.read_text())
        del cfg["data"]["dataset"]
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        args, needles = ["--config", tmp_path / "c.yaml"], ["data.dataset", "D4RL id", "HDF5"]
    elif case == "unknown_yaml_key":
        cfg = yaml.safe_load(iql.read_text())
        cfg["trainer"]["max_stepz"] = 3
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        args, needles = ["--config", tmp_path / "c.yaml"], ["max_stepz"]
    else:
        cd = _config(tmp_path, "cd", "cd", data["A"], root=tmp_path / "run" / "cd")
        args = ["--config", cd]
        needles = ["model.init_args.teacher_ckpt", tmp_path / "run" / "edm" / "checkpoints" / "last.ckpt", "edm.yaml"]
    rc, err = _cli(capsys, "fit", *args)
    line = _error_line(rc, err, *needles)
    if case != "missing_teacher":
        assert "--help" in line and len(line) < 400, line
