"""``sample_noise_scale`` (λ): every backbone's sampler starts from λ·ε; 1 leaves sampling as it was; the checkpoint,
the evaluation report and the export carry it; a bad value is refused in one line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from idql_cm import load_actor
from tests.cli_utils import CONFIGS, shrink_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of every shipped demo backbone on a small HalfCheetah-layout file, CT also at λ 0.5 with an
    evaluation (IQL critic, NFE 1)."""
    from idql_cm.cli import main
    from idql_cm.data.synthetic import write_d4rl_file

    root = tmp_path_factory.mktemp("noise_scale")
    data = str(write_d4rl_file(root / "cheetah.hdf5", n_episodes=2, episode_len=40, env_id="HalfCheetah-v5"))
    iql = shrink_config(CONFIGS / "demo" / "iql.yaml", root / "iql.yaml", root / "iql", data, steps=2)
    assert main(["fit", "--config", str(iql)]) == 0
    critic = str(root / "iql" / "checkpoints" / "last.ckpt")
    ckpts = {}
    for kind in ("edm", "ct", "meanflow"):
        cfg = shrink_config(CONFIGS / "demo" / f"{kind}.yaml", root / f"{kind}.yaml", root / kind, data, steps=2,
                            keep_eval=False)
        assert main(["fit", "--config", str(cfg)]) == 0
        ckpts[kind] = str(root / kind / "checkpoints" / "last.ckpt")
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", root / "ct_half.yaml", root / "ct_half", data, steps=2,
                        eval_args={"nfe": [1], "critic_ckpt": critic}, model_args={"sample_noise_scale": 0.5})
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpts["ct_half"] = str(root / "ct_half" / "checkpoints" / "last.ckpt")
    return root, ckpts


@pytest.mark.parametrize("kind", ["edm", "ct", "meanflow"])
def test_the_initial_draw_is_scaled_and_nothing_else(trained, kind):
    actor = load_actor(trained[1][kind], device="cpu").actor
    assert actor.noise_scale == 1.0  # not recorded: as trained
    obs, nfe = torch.randn(16, actor.obs_dim), 2
    z = torch.randn(nfe, 16, actor.act_dim, generator=torch.Generator().manual_seed(3))
    half = dataclasses.replace(actor, noise_scale=0.5)
    scaled = torch.cat([0.5 * z[:1], z[1:]])
    assert torch.equal(half.sample(obs, nfe, noise=z), actor.sample(obs, nfe, noise=scaled))
    # drawn: the same generator gives the same draws, scaled
    drawn = half.sample(obs, nfe, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, actor.sample(obs, nfe, noise=scaled))
    assert not torch.equal(drawn, actor.sample(obs, nfe, noise=z))  # so the check can fail
    # λ 1 is the sampler untouched: the sampler's own draws, bit for bit
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    one = dataclasses.replace(actor, noise_scale=1.0)
    assert torch.equal(one.sample(obs, nfe, generator=g1),
                       actor.spec.sample(actor.model, (obs - actor.obs_mean) / actor.obs_std, nfe, generator=g2,
                                         **actor.options))


def test_the_checkpoint_the_evaluation_and_the_export_carry_it(trained, tmp_path):
    root, ckpts = trained
    assert load_actor(ckpts["ct_half"], device="cpu").actor.noise_scale == 0.5
    assert torch.load(ckpts["ct_half"], weights_only=False)["idql_cm"]["sample_noise_scale"] == 0.5
    assert json.loads((root / "ct_half" / "eval_report.json").read_text())["noise_scale"] == 0.5
    from idql_cm.cli import main

    out = tmp_path / "ct.pt"
    assert main(["export", "--actor", ckpts["ct_half"], "--nfe", "1", "--format", "torchscript", "--out",
                 str(out)]) == 0
    from idql_cm.export.runtime import read_metadata

    assert read_metadata(str(out))["noise_scale"] == 0.5


@pytest.mark.parametrize("bad", ["-0.5", "nan", "inf"])
def test_a_noise_scale_that_is_not_a_finite_number_at_least_zero_is_refused(trained, tmp_path, capsys, bad):
    import os

    from idql_cm.cli import main

    root, _ = trained
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct",
                        str(root / "cheetah.hdf5"), keep_eval=False)
    os.environ.pop("IDQL_CM_DEBUG", None)
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "--model.init_args.sample_noise_scale", bad]) != 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("idql-cm: error:")]
    assert len(err) == 1 and "sample_noise_scale" in err[0] and bad in err[0].lower()
    assert not (tmp_path / "ct").exists()


def test_renoise_min_is_recorded_and_used_and_a_level_outside_the_range_is_refused(trained, tmp_path, capsys):
    """``model.renoise_min`` on a consistency backbone: the checkpoint records it and the loaded policy re-noises no
    lower (counted levels); 0.001 (below σ_min) and 80 (σ_max) are refused in one line before any work."""
    import os

    from idql_cm.cli import main

    root, _ = trained
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct",
                        str(root / "cheetah.hdf5"), keep_eval=False, model_args={"renoise_min": 2.5})
    assert main(["fit", "--config", str(cfg)]) == 0
    actor = load_actor(str(tmp_path / "ct" / "checkpoints" / "last.ckpt"), device="cpu").actor
    assert actor.options["renoise_min"] == 2.5
    seen = []
    actor.model.net.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1].flatten()[0])))
    actor.sample(torch.randn(3, actor.obs_dim), 4, generator=torch.Generator().manual_seed(0))
    sigmas = [float(torch.exp(torch.tensor(4 * c))) for c in seen]  # c_noise = ¼ ln σ
    assert len(sigmas) == 4 and 2.5 * 0.99 <= min(sigmas) < 3.0  # snapped to the (2-step) curriculum grid
    os.environ.pop("IDQL_CM_DEBUG", None)
    for bad in ("0.001", "80"):
        capsys.readouterr()
        assert main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "bad"),
                     "--model.init_args.renoise_min", bad]) != 0
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("idql-cm: error:")]
        assert len(err) == 1 and "model.renoise_min" in err[0] and bad in err[0]
    assert not (tmp_path / "bad").exists()


def test_sample_sigma_max_is_recorded_and_used_and_a_bad_level_is_refused(trained, tmp_path, capsys):
    """``model.sample_sigma_max`` on a consistency backbone: the checkpoint records it, the loaded policy's first
    evaluation is at the training-grid point nearest to it (counted, NFE 1 and 2), and the export replays it; a level
    outside (σ_min, σ_max] or a ``renoise_min`` not below it is refused in one line before any work."""
    import os

    from idql_cm.cli import main
    from idql_cm.diffusion import karras_sigmas

    root, _ = trained
    cfg = shrink_config(CONFIGS / "demo" / "ct.yaml", tmp_path / "ct.yaml", tmp_path / "ct",
                        str(root / "cheetah.hdf5"), keep_eval=False, model_args={"sample_sigma_max": 2.5})
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = str(tmp_path / "ct" / "checkpoints" / "last.ckpt")
    assert torch.load(ckpt, weights_only=False)["idql_cm"]["sample_sigma_max"] == 2.5
    actor = load_actor(ckpt, device="cpu").actor
    assert actor.options["sigma_max"] == 2.5
    grid = actor.options["train_grid"]
    start = float(grid[(grid.log() - torch.tensor(2.5).log()).abs().argmin()])
    assert start != pytest.approx(2.5, rel=1e-3) and 1.0 < start < 6.0  # a grid point, not the level asked for
    seen = []
    actor.model.net.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1].flatten()[0])))
    for nfe in (1, 2):
        seen.clear()
        actor.sample(torch.randn(3, actor.obs_dim), nfe, generator=torch.Generator().manual_seed(0))
        sigmas = [float(torch.exp(torch.tensor(4 * c))) for c in seen]  # c_noise = ¼ ln σ
        assert len(sigmas) == nfe and sigmas[0] == pytest.approx(start, rel=1e-4)
    # without it: σ_max, as before
    plain = load_actor(trained[1]["ct"], device="cpu").actor
    assert plain.options["sigma_max"] is None and karras_sigmas(1)[-1] == 80.0
    out = tmp_path / "ct.pt"
    assert main(["export", "--actor", ckpt, "--nfe", "1", "--format", "torchscript", "--out", str(out)]) == 0
    from idql_cm.export.runtime import load_exported

    exported = load_exported(str(out))
    assert exported.candidates == 1
    obs, z = torch.randn(4, actor.obs_dim), torch.randn(1, 4, actor.act_dim)
    assert torch.allclose(torch.as_tensor(exported(obs.numpy(), z.unsqueeze(2).numpy())), actor.sample(obs, 1, noise=z),
                          atol=1e-5)
    from_top = dataclasses.replace(actor, options={k: v for k, v in actor.options.items() if k != "sigma_max"})
    assert not torch.allclose(from_top.sample(obs, 1, noise=z), actor.sample(obs, 1, noise=z), atol=1e-3)
    os.environ.pop("IDQL_CM_DEBUG", None)
    for bad, key in (("0.001", "sample_sigma_max"), ("100", "sample_sigma_max"), ("2.4:3.0", "renoise_min")):
        capsys.readouterr()
        args = (["--model.init_args.sample_sigma_max", bad] if ":" not in bad else
                ["--model.init_args.sample_sigma_max", bad.split(":")[0], "--model.init_args.renoise_min",
                 bad.split(":")[1]])
        assert main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "bad"), *args]) != 0
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("idql-cm: error:")]
        assert len(err) == 1 and f"model.{key}" in err[0] and bad.split(":")[-1] in err[0], err
    assert not (tmp_path / "bad").exists()
