"""``idql-cm export``: the exported ONNX / TorchScript agent against the eager ``load_agent`` (same noise and u →
same actions within 1e-4, EDM / CD / CT at NFE 1, 2, 4, onnxruntime on the CPU), its metadata, its refusals, and
the non-finite-observation guard of the Python API.

The checkpoints are real: the shipped demo configs shrunk to 2 steps and trained through the CLI on a small
synthetic HalfCheetah-shaped file (tests/cli_utils.py, idql_cm/data/synthetic.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from idql_cm import load_actor, load_agent, load_exported
from idql_cm.cli import main
from idql_cm.data.synthetic import write_d4rl_file
from idql_cm.errors import ConfigError, DataError
from idql_cm.eval.agent import sample_actions, select_candidates
from idql_cm.export.exporter import TOLERANCE, export_agent
from idql_cm.fileio import file_sha256
from idql_cm.policies import actor_from_checkpoint
from tests.cli_utils import CONFIGS, run_cli_subprocess, shrink_config

OBS_DIM, ACT_DIM, N = 17, 6, 8


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """iql, edm (Euler), edm_heun, cd (from edm), ct on one dataset; iql_other (same sizes, other data) and
    iql_small (other sizes)."""
    tmp = tmp_path_factory.mktemp("export")
    data = write_d4rl_file(tmp / "a.hdf5", n_episodes=2, episode_len=40, obs_dim=OBS_DIM, act_dim=ACT_DIM,
                           env_id="HalfCheetah-v5")
    other = write_d4rl_file(tmp / "b.hdf5", n_episodes=2, episode_len=40, obs_dim=OBS_DIM, act_dim=ACT_DIM, seed=1)
    small = write_d4rl_file(tmp / "c.hdf5", n_episodes=2, episode_len=40, obs_dim=11, act_dim=3)
    runs = {"iql": ("iql", data, None), "edm": ("edm", data, None), "edm_heun": ("edm", data, {"eval_solver": "heun"}),
            "cd": ("cd", data, None), "ct": ("ct", data, None), "meanflow": ("meanflow", data, None),
            "iql_other": ("iql", other, None),
            "iql_small": ("iql", small, None)}
    out = {}
    for name, (stage, dataset, model_args) in runs.items():
        root = tmp / "run" / name  # cd finds its teacher at {root}/../edm
        cfg = shrink_config(CONFIGS / "demo" / f"{stage}.yaml", tmp / f"{name}.yaml", root, str(dataset), steps=2,
                            keep_eval=False, model_args=model_args)
        assert main(["fit", "--config", str(cfg)]) == 0, name
        out[name] = str(root / "checkpoints" / "last.ckpt")
    return out


def _inputs(nfe: int, b: int, n: int = N, seed: int = 7):
    g = np.random.default_rng(seed)
    obs = g.normal(size=(b, OBS_DIM)).astype(np.float32)
    noise = g.standard_normal(size=(nfe, b, n, ACT_DIM)).astype(np.float32)
    u = g.uniform(size=b).astype(np.float32)
    return obs, noise, u


def _one_line_error(capsys, code: int, *needles: str) -> str:
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("idql-cm: error: ")
    for n in needles:
        assert n in err, (n, err)
    return err


def _nothing_written(folder: Path, name: str) -> None:
    assert not (folder / name).exists()
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp") or p.endswith(".probe")], os.listdir(folder)


# ------------------------------------------------------------------------------------------------------ parity
# ONNX at every NFE of every backbone; TorchScript (the same trace, another writer) at NFE 2 of each
PARITY = [(kind, nfe, "onnx") for kind in ("edm", "cd", "ct", "meanflow") for nfe in (1, 2, 4)] + [
    (kind, 2, "torchscript") for kind in ("edm", "cd", "ct", "meanflow")]


@pytest.mark.parametrize("kind,nfe,fmt", PARITY)
def test_exported_agent_matches_load_agent(ckpts, tmp_path, kind, nfe, fmt):
    out = tmp_path / f"{kind}{nfe}.{'onnx' if fmt == 'onnx' else 'pt'}"
    res = export_agent(ckpts[kind], ckpts["iql"], str(out), nfe=nfe, candidates=N, temperature=10.0)
    assert res.max_abs_diff <= TOLERANCE
    obs, noise, u = _inputs(nfe, b=6)
    eager = load_agent(ckpts[kind], ckpts["iql"], num_candidates=N, temperature=10.0, device="cpu")
    want = eager.act(obs, nfe=nfe, noise=noise, u=u)
    got = load_exported(out).act(obs, noise=noise, u=u)
    assert got.shape == (6, ACT_DIM) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    if fmt == "onnx":  # a plain runtime, without idql-cm's wrapper
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        raw = sess.run(["action"], {"obs": obs, "noise": noise, "u": u})[0]
        assert np.abs(raw - want).max() <= 1e-4
    else:
        ts = torch.jit.load(str(out))
        raw = ts(torch.from_numpy(obs), torch.from_numpy(noise), torch.from_numpy(u)).numpy()
        assert np.abs(raw - want).max() <= 1e-4


def test_heun_odd_nfe_argmax_and_behaviour_policy_alone(ckpts, tmp_path):
    obs, noise, u = _inputs(3, b=4)
    export_agent(ckpts["edm_heun"], ckpts["iql"], str(tmp_path / "heun.onnx"), nfe=3, candidates=N)
    want = load_agent(ckpts["edm_heun"], ckpts["iql"], num_candidates=N, device="cpu").act(obs, 3, noise=noise, u=u)
    assert np.abs(load_exported(tmp_path / "heun.onnx").act(obs, noise=noise, u=u) - want).max() <= 1e-4

    export_agent(ckpts["ct"], ckpts["iql"], str(tmp_path / "argmax.onnx"), nfe=3, candidates=N, selection="argmax")
    argmax = load_exported(tmp_path / "argmax.onnx")
    want = load_agent(ckpts["ct"], ckpts["iql"], num_candidates=N, selection="argmax", device="cpu").act(
        obs, 3, noise=noise)
    assert np.abs(argmax.act(obs, noise=noise) - want).max() <= 1e-4
    with pytest.raises(ConfigError, match="does not draw"):
        argmax.act(obs, noise=noise, u=u)

    for fmt in ("onnx", "torchscript"):
        path = tmp_path / f"bc.{fmt}"
        export_agent(ckpts["cd"], None, str(path), nfe=2, fmt=fmt)
        bc = load_exported(path)
        assert bc.metadata["candidates"] == 1 and bc.metadata["critic_sha256"] is None
        z = noise[:2, :, :1]                                   # [K, B, 1, A]
        want = load_actor(ckpts["cd"], device="cpu").sample(obs, nfe=2, noise=z[:, :, 0])
        assert np.abs(bc.act(obs, noise=z) - want).max() <= 1e-4


def test_without_noise_and_u_the_exported_graph_draws_its_own(ckpts, tmp_path):
    obs, _, _ = _inputs(1, b=3)
    for fmt, name in (("onnx", "a.onnx"), ("torchscript", "a.pt")):
        export_agent(ckpts["ct"], ckpts["iql"], str(tmp_path / name), nfe=2, candidates=N)
        policy = load_exported(tmp_path / name)
        assert policy.format == fmt
        a, b = policy.act(obs), policy.act(obs)
        assert a.shape == (3, ACT_DIM) and np.isfinite(a).all() and (np.abs(a) <= 1.0).all()
        assert not np.array_equal(a, b)                          # fresh draws per call
        assert policy.act(obs[0]).shape == (ACT_DIM,)            # one state in, one action out
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["obs"]        # noise and u have (empty) defaults
    assert sess.run(None, {"obs": obs[:1]})[0].shape == (1, ACT_DIM)
    ts = torch.jit.load(str(tmp_path / "a.pt"))
    assert ts(torch.from_numpy(obs)).shape == (3, ACT_DIM)


def test_given_noise_path_is_the_samplers_own_draws(ckpts):
    """``sample_actions`` with noise repeats ``Actor.sample``: drawing the same normals in the sampler's order must
    give the same actions, bit for bit (a change to ``Actor.sample`` not mirrored there fails here)."""
    obs = torch.randn(5, OBS_DIM, generator=torch.Generator().manual_seed(0))
    for kind in ("edm", "edm_heun", "cd", "ct", "meanflow"):
        actor = actor_from_checkpoint(ckpts[kind], device="cpu")
        for nfe in ((1, 3, 5) if kind == "edm_heun" else (1, 2, 4)):
            ref = actor.sample(obs, nfe, generator=torch.Generator().manual_seed(3))
            g = torch.Generator().manual_seed(3)
            noise = torch.stack([torch.randn(5, ACT_DIM, generator=g) for _ in range(nfe)])
            assert torch.equal(sample_actions(actor, obs, nfe, noise=noise), ref), (kind, nfe)


def test_softmax_draw_by_inverse_cdf():
    adv = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]]).clamp_min(1e-30))   # temperature 1: probs as written
    picks = [select_candidates(adv, 1.0, u=torch.tensor([x])).item() for x in (0.0, 0.05, 0.1, 0.69, 0.71, 0.999)]
    assert picks == [0, 0, 2, 2, 3, 3]                           # candidate 1 (probability 0) is never chosen
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(select_candidates(adv.expand(40000, -1), 1.0, u=u), minlength=4) / 40000
    assert torch.allclose(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.012)
    dead = torch.full((1, 4), float("nan"))                      # no finite advantage: uniform
    assert select_candidates(dead, 1.0, u=torch.tensor([0.6])).item() == 2


# ---------------------------------------------------------------------------------------------------- metadata
def test_metadata_and_inspect(ckpts, tmp_path, capsys):
    out = tmp_path / "ct.onnx"
    assert main(["export", "--actor", ckpts["ct"], "--critic", ckpts["iql"], "--nfe", "2", "--candidates", "16",
                 "--temperature", "30", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ts = tmp_path / "ct.pt"
    assert main(["export", "--actor", ckpts["ct"], "--critic", ckpts["iql"], "--selection", "argmax",
                 "--format", "torchscript", "--out", str(ts)]) == 0
    import idql_cm

    for path, fmt in ((out, "onnx"), (ts, "torchscript")):
        metadata = load_exported(path).metadata
        assert metadata["format"] == fmt and metadata["kind"] == "ct" and metadata["idql_cm_version"] == idql_cm.__version__
        assert (metadata["obs_dim"], metadata["act_dim"]) == (OBS_DIM, ACT_DIM)
        assert metadata["action_low"] == [-1.0] * ACT_DIM and metadata["action_high"] == [1.0] * ACT_DIM
        assert metadata["env_id"] == "HalfCheetah-v5" and metadata["task"].endswith("a.hdf5")
        assert metadata["actor_sha256"] == file_sha256(ckpts["ct"]) and metadata["critic_sha256"] == file_sha256(ckpts["iql"])
    metadata = load_exported(out).metadata
    assert (metadata["nfe"], metadata["candidates"], metadata["temperature"], metadata["selection"]) == (2, 16, 30.0, "softmax")
    assert load_exported(ts).metadata["selection"] == "argmax"
    capsys.readouterr()
    assert main(["export", "--inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    for key in ("obs_dim", "action_low", "nfe", "candidates", "temperature", "selection", "env_id", "task",
                "actor_sha256", "critic_sha256", "idql_cm_version"):
        assert key in printed, key
    assert json.loads(ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map["idql_cm"])["nfe"] == 2


# ------------------------------------------------------------------------------------------------------ errors
def test_refusals_are_one_line_and_write_nothing(ckpts, tmp_path, capsys):
    out = tmp_path / "x.onnx"
    base = ["export", "--actor", ckpts["ct"], "--critic", ckpts["iql"], "--out", str(out)]
    # a critic of another task: other data (same sizes, other normaliser), other sizes
    _one_line_error(capsys, main([*base[:4], ckpts["iql_other"], *base[5:]]), "--critic", "normalisers differ")
    _one_line_error(capsys, main([*base[:4], ckpts["iql_small"], *base[5:]]), "--critic", "11/3", "17/6")
    # a non-actor checkpoint as --actor
    _one_line_error(capsys, main(["export", "--actor", ckpts["iql"], "--out", str(out)]), "--actor", "'iql'")
    # an NFE the sampler cannot honour: even for Heun; below 1
    _one_line_error(capsys, main(["export", "--actor", ckpts["edm_heun"], "--nfe", "2", "--out", str(out)]),
                    "--nfe 2", "heun", "odd")
    _one_line_error(capsys, main(["export", "--actor", ckpts["ct"], "--nfe", "0", "--out", str(out)]), "--nfe 0")
    # unwritable output paths: a folder, a path under a file
    _one_line_error(capsys, main([*base[:-1], str(tmp_path)]), "--out", "folder")
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, main([*base[:-1], str(tmp_path / "afile" / "x.onnx")]), "--out", "afile")
    _nothing_written(tmp_path, "x.onnx")
    # a refused export leaves an existing file as it was
    out.write_bytes(b"previous")
    _one_line_error(capsys, main(["export", "--actor", ckpts["edm_heun"], "--nfe", "4", "--out", str(out)]), "--nfe")
    assert out.read_bytes() == b"previous"
    _one_line_error(capsys, main(["export", "--inspect", str(out)]), str(out))
    _one_line_error(capsys, main(["export", "--inspect", ckpts["ct"]]), "idql_cm")


def test_real_command_exit_code_and_one_line(ckpts, tmp_path):
    proc = run_cli_subprocess(["export", "--actor", ckpts["edm_heun"], "--nfe", "2", "--out", str(tmp_path / "h.onnx")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [proc.stderr.strip()]
    assert "--nfe 2" in proc.stderr
    _nothing_written(tmp_path, "h.onnx")


def test_exported_and_python_api_refuse_bad_observations(ckpts, tmp_path):
    obs, _, _ = _inputs(1, b=5)
    obs[1, 3], obs[4, 0] = np.nan, np.inf
    export_agent(ckpts["ct"], ckpts["iql"], str(tmp_path / "a.onnx"), candidates=N)
    export_agent(ckpts["ct"], ckpts["iql"], str(tmp_path / "a.pt"), candidates=N)
    agent = load_agent(ckpts["ct"], ckpts["iql"], num_candidates=N, device="cpu")
    actor = load_actor(ckpts["ct"], device="cpu")
    for call in (load_exported(tmp_path / "a.onnx").act, load_exported(tmp_path / "a.pt").act, agent.act,
                 actor.sample, lambda o: agent.act(torch.from_numpy(o))):
        with pytest.raises(DataError, match=r"row\(s\) 1, 4 of 5"):
            call(obs)
        with pytest.raises(DataError, match=r"\[B, 17\]"):
            call(np.zeros((2, 16), np.float32))
    with pytest.raises(ConfigError, match=r"noise of shape \[1, 5, 8, 6\]"):
        load_exported(tmp_path / "a.onnx").act(np.zeros((5, OBS_DIM), np.float32), noise=np.zeros((1, 5, 6)))
    with pytest.raises(ConfigError, match=r"u in \[0, 1\)"):
        agent.act(np.zeros((1, OBS_DIM)), u=np.array([1.0]))


def test_onnx_mish_lowering_matches_torch(tmp_path):
    """The export lowers aten::mish to Exp/Mul/Div (onnxruntime's Softplus is slow): same values, edge cases too."""
    from idql_cm.export.exporter import ONNX_OPSET, _mish_symbolic

    x = torch.tensor([-1e4, -100, -30, -10, -1, 0, 1e-8, 1, 10, 19.9, 20, 20.1, 50, 100, 1e4, np.inf, np.nan])
    x = torch.cat([x, torch.linspace(-40, 40, 4001)])
    torch.onnx.register_custom_op_symbolic("aten::mish", _mish_symbolic, ONNX_OPSET)
    try:
        torch.onnx.export(torch.nn.Mish(), (x,), str(tmp_path / "mish.onnx"), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"])
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::mish", ONNX_OPSET)
    got = ort.InferenceSession(str(tmp_path / "mish.onnx")).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, torch.nn.functional.mish(x).numpy(), rtol=1e-6, atol=1e-7, equal_nan=True)
