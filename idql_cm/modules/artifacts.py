"""Checkpoints as self-contained inference artefacts.

A checkpoint alone rebuilds its policy or critic: ``checkpoint["idql_cm"]`` holds the kind, sizes,
architecture hyper-parameters, action bounds and observation normaliser; ``checkpoint["state_dict"]``
holds the weights (actors are rebuilt from their EMA copy).
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from idql_cm.diffusion.consistency import ConsistencyModel, cm_sample
from idql_cm.diffusion.edm import EDMDenoiser, edm_sample
from idql_cm.diffusion.schedules import karras_sigmas
from idql_cm.errors import CheckpointError
from idql_cm.modules.common import FORMAT_VERSION
from idql_cm.nets.critics import TwinQ, ValueNet
from idql_cm.nets.mlp import IDQLMlp

ACTOR_KINDS = ("edm", "cd", "ct")


def read_checkpoint(path: str, expect_kind: str | tuple[str, ...] | None = None, what: str = "checkpoint") -> dict[str, Any]:
    """Load a checkpoint on the CPU and check that it is an idql-cm checkpoint of the expected kind.

    ``what`` names the flag or key the path came from, so the error says where to look.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{what}: {path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]})") from e
    meta = ckpt.get("idql_cm") if isinstance(ckpt, dict) else None
    if meta is None:
        raise CheckpointError(f"{what}: {path} is not an idql-cm checkpoint (no 'idql_cm' payload)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{what}: {path} has checkpoint format {meta.get('format')}, this idql-cm reads "
                              f"format {FORMAT_VERSION}; retrain or use the idql-cm version that wrote it")
    kinds = (expect_kind,) if isinstance(expect_kind, str) else expect_kind
    if kinds and meta.get("kind") not in kinds:
        raise CheckpointError(f"{what}: expected a checkpoint of kind {' or '.join(repr(k) for k in kinds)}, "
                              f"{path} is a '{meta.get('kind')}' checkpoint")
    return ckpt


def check_fits_data(meta: dict[str, Any], what: str, path: str, obs_dim: int, act_dim: int,
                    obs_mean: torch.Tensor | None = None, obs_std: torch.Tensor | None = None,
                    dataset: str | None = None) -> None:
    """Refuse a checkpoint (payload ``meta``, read from ``path`` given as ``what``) trained on other data.

    Other observation / action sizes, or (when ``obs_mean`` / ``obs_std`` are given) another observation
    normaliser, i.e. another dataset, raise a :class:`CheckpointError` naming both sides.
    """
    src = meta.get("dataset")
    if (meta.get("obs_dim"), meta.get("act_dim")) != (obs_dim, act_dim):
        raise CheckpointError(f"{what}: {path} has obs/act size {meta.get('obs_dim')}/{meta.get('act_dim')} "
                              f"(trained on {src}), the data {dataset} has {obs_dim}/{act_dim}")
    if obs_mean is None:
        return
    norm = meta.get("normalizer") or {}
    mean = torch.as_tensor(norm.get("mean", []), dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(norm.get("std", []), dtype=torch.float32).reshape(-1)
    obs_mean = torch.as_tensor(obs_mean, dtype=torch.float32).detach().cpu().reshape(-1)
    obs_std = torch.as_tensor(obs_std if obs_std is not None else std, dtype=torch.float32).detach().cpu().reshape(-1)
    same = (mean.shape == obs_mean.shape and std.shape == obs_std.shape
            and torch.allclose(mean, obs_mean, rtol=1e-4, atol=1e-4)
            and torch.allclose(std, obs_std, rtol=1e-4, atol=1e-4))
    if not same:
        gap = float((mean - obs_mean).abs().max()) if mean.shape == obs_mean.shape else float("nan")
        raise CheckpointError(f"{what}: {path} was trained on {src}, this run's data is {dataset}: their observation "
                              f"normalisers differ (max |mean difference| {gap:.3g}); use a checkpoint of this dataset")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill or a power cut cannot leave half-done.

    The bytes go to a temporary file in the target's own folder (``.<name>.<pid>.<random>.tmp``), are flushed to
    the disk (``fsync``), and replace the target in one ``os.replace``; the folder is synced after. A crash during
    a save leaves the previous file intact and at worst a stray temporary file, which the next save of the same
    file removes. Lightning's ``_atomic_save`` stages local files in the system temporary folder and moves them with
    ``shutil.move``, which copies (not atomically) when that folder is on another file system, and never syncs.
    Remote URLs (``s3://`` ...) go through Lightning's writer. ``idql-cm`` installs this plugin unless the
    configuration names its own ``CheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = os.fspath(path)
        if "://" in target and not target.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        target = os.path.abspath(target.removeprefix("file://"))
        folder, name = os.path.split(target)
        os.makedirs(folder, exist_ok=True)
        for stale in os.listdir(folder):  # left by a save that was killed
            if _is_stale_temp(stale, name):
                try:
                    os.unlink(os.path.join(folder, stale))
                except OSError:
                    pass
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(folder)


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _is_stale_temp(entry: str, name: str) -> bool:
    """A temporary file of :class:`AtomicCheckpointIO` that no save will finish: one for ``name`` (this save
    replaces it), or one whose writing process is gone."""
    m = _TEMP.match(entry)
    if m is None:
        return False
    if m["name"] == name:
        return True
    pid = int(m["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def state_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class Actor:
    """A behaviour policy ready to sample: raw observations in, clipped actions out."""

    kind: str
    model: torch.nn.Module
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_dim: int
    env_id: str | None = None
    task: str | None = None
    solver: str = "euler"
    sample_sigma_max: float | None = None
    sample_rho: float | None = None
    train_grid: torch.Tensor | None = None  # consistency models: re-noise on these σ (see cm_sample)

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.numel())

    @property
    def device(self) -> torch.device:
        return self.obs_mean.device

    @torch.inference_mode()
    def sample(self, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """``obs: [B, obs_dim]`` raw → ``act: [B, act_dim]`` with ``nfe`` network evaluations each; ``noise``: the
        sampler's standard normals ``[nfe, B, act_dim]`` instead of draws from ``generator``."""
        obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
        if self.kind == "edm":
            return edm_sample(self.model, obs_n, nfe, solver=self.solver, generator=generator,
                              sigma_max=self.sample_sigma_max, rho=self.sample_rho, noise=noise)
        return cm_sample(self.model, obs_n, nfe, generator=generator, noise=noise, train_grid=self.train_grid)


@dataclass
class Critic:
    """The IQL critic at inference: ``advantage(obs, act) = min(Q_target) − V`` on raw observations."""

    q_target: TwinQ
    v: ValueNet
    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    act_dim: int
    env_id: str | None = None
    task: str | None = None

    @property
    def obs_dim(self) -> int:
        return int(self.obs_mean.numel())

    @torch.inference_mode()
    def advantage(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """``[B]`` float32, computed in fp32 even inside an autocast region (see IQLModule.loss_step: selection
        ranks advantage differences that bf16 cannot represent at Q ≈ 90)."""
        with torch.autocast(self.obs_mean.device.type, enabled=False):
            obs_n = (obs.to(self.obs_mean.device, torch.float32) - self.obs_mean) / self.obs_std
            act = act.to(obs_n.device, torch.float32)
            return (self.q_target(obs_n, act) - self.v(obs_n)).squeeze(-1)


def sampling_options(meta: dict[str, Any], device=None) -> dict[str, Any]:
    """How a checkpoint's policy samples, from its payload (one rule for ``load_policy`` and the training module's
    ``eval_actor``): the EDM solver and start, and a consistency model's training grid when it re-noises on it."""
    intervals = meta.get("train_intervals")
    grid = None
    if meta.get("renoise") == "train_grid" and intervals:
        m = meta["method"]
        grid = karras_sigmas(int(intervals), m["sigma_min"], m["sigma_max"], m["rho"], device=device)
    edm = meta.get("kind") == "edm"
    return {"solver": meta.get("solver", "euler") if edm else "euler",
            "sample_sigma_max": meta.get("sample_sigma_max") if edm else None,
            "sample_rho": meta.get("sample_rho") if edm else None, "train_grid": grid}


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(path: str, device=None) -> Actor:
    """Rebuild the EMA behaviour policy of an EDM, CD or CT checkpoint."""
    ckpt = read_checkpoint(path, expect_kind=ACTOR_KINDS, what="actor checkpoint")
    meta, state = ckpt["idql_cm"], ckpt["state_dict"]
    net = IDQLMlp(meta["obs_dim"], meta["act_dim"], **meta["net"])
    method = dict(meta["method"])
    if meta["kind"] == "edm":
        model = EDMDenoiser(net, **method)
    else:
        model = ConsistencyModel(net, **{k: method[k] for k in ("sigma_data", "sigma_min", "sigma_max", "rho",
                                                               "x_min", "x_max")})
    try:
        model.load_state_dict(state_prefix(state, "ema_model."))
    except RuntimeError as e:
        raise CheckpointError(f"actor checkpoint {path}: weights do not fit the recorded architecture "
                              f"({str(e).splitlines()[0][:160]})") from e
    dev = _device(device)
    model = model.to(dev).eval().requires_grad_(False)
    norm = meta["normalizer"]
    return Actor(kind=meta["kind"], model=model, obs_mean=torch.tensor(norm["mean"], device=dev),
                 obs_std=torch.tensor(norm["std"], device=dev), act_dim=int(meta["act_dim"]),
                 env_id=meta.get("env_id"), task=meta.get("dataset"), **sampling_options(meta, dev))


def load_critic(path: str, device=None, what: str = "critic checkpoint") -> Critic:
    """Rebuild the target twin-Q and V of an IQL checkpoint (``what`` names where the path came from)."""
    ckpt = read_checkpoint(path, expect_kind="iql", what=what)
    meta, state = ckpt["idql_cm"], ckpt["state_dict"]
    q = TwinQ(meta["obs_dim"], meta["act_dim"], meta["hidden_dim"])
    v = ValueNet(meta["obs_dim"], meta["hidden_dim"])
    try:
        q.load_state_dict(state_prefix(state, "q_target."))
        v.load_state_dict(state_prefix(state, "v."))
    except RuntimeError as e:
        raise CheckpointError(f"{what} {path}: weights do not fit the recorded architecture "
                              f"({str(e).splitlines()[0][:160]})") from e
    dev = _device(device)
    norm = meta["normalizer"]
    return Critic(q_target=q.to(dev).eval().requires_grad_(False), v=v.to(dev).eval().requires_grad_(False),
                  obs_mean=torch.tensor(norm["mean"], device=dev), obs_std=torch.tensor(norm["std"], device=dev),
                  act_dim=int(meta["act_dim"]), env_id=meta.get("env_id"), task=meta.get("dataset"))
