"""Behaviour backbones: one :class:`BackboneSpec` per generative policy, in one registry.

A spec says everything the rest of the package needs to know about a backbone: its ``kind`` (the name in
checkpoints, configs and reports), the class path of its LightningModule, how to rebuild its sampling model from a
checkpoint payload, its sampler (exactly ``nfe`` network evaluations; ``noise`` replays), how the payload sets the
sampler's options, its config file and the training curve a report plots. The runtime policy, the checkpoint
readers, the CLI, the exporter, the reports, the pipeline and the benchmarks read specs; none of them branches on a
kind.

EDM, CD and CT are the three entries registered here. A backbone from outside the package registers its own spec
(:func:`register_backbone`, or a module-level ``BackboneSpec`` in the file that defines its LightningModule: a
checkpoint records that module, and :func:`backbone` imports it when it meets an unknown kind). Installed packages
can also offer specs through the ``idql_cm.backbones`` entry-point group.

This module is torch-only (no Lightning, no files beyond the payload it is handed).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch
from torch import nn

from idql_cm.checkpoint import MODULE_KEY, load_weights
from idql_cm.diffusion.consistency import ConsistencyModel, cm_one_step, cm_sample
from idql_cm.diffusion.edm import EDMDenoiser, edm_sample
from idql_cm.diffusion.meanflow import H_FEATURES, MeanFlowModel, meanflow_one_step, meanflow_sample
from idql_cm.diffusion.schedules import karras_sigmas
from idql_cm.errors import CheckpointError, ConfigError
from idql_cm.nets.ensemble import StackedIDQLMlp
from idql_cm.nets.mlp import IDQLMlp

ENTRY_POINT_GROUP = "idql_cm.backbones"


class Sampler(Protocol):
    """``sample(model, obs_n [B, obs_dim] normalised, nfe, generator=None, noise=None, **options) -> [B, act_dim]``:
    exactly ``nfe`` evaluations of ``model``; ``noise [nfe, B, act_dim]`` standard normals replace every draw."""

    def __call__(self, model: nn.Module, obs: torch.Tensor, nfe: int, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, **options: Any) -> torch.Tensor: ...


def _no_options(payload: Mapping[str, Any], device: Any = None) -> dict[str, Any]:
    return {}


def _kind_name(payload: Mapping[str, Any]) -> str:
    return str(payload.get("kind"))


@dataclass(frozen=True)
class BackboneSpec:
    """One behaviour backbone.

    Attributes:
        kind: its name in checkpoints, configs, reports and on the command line (``edm``).
        title: one line for reports and help.
        module: class path of its LightningModule (``idql_cm.modules.behaviour.EDMModule``).
        rebuild: ``(payload, state or None, where) -> model``: the sampling model a checkpoint payload describes,
            with the weights under ``ema_model.`` of ``state`` (None: fresh weights); ``where`` starts an error.
        sample: the sampler (:class:`Sampler`).
        options: ``(payload, device) -> dict``: the sampler's keyword options recorded in a payload.
        describe: ``payload -> str``: how it samples, in a word (an exported file's ``solver`` field).
        config: its config file name in ``configs/<task>/`` (or a path, for a backbone outside the package).
        loss_curve: the regex of the TensorBoard tag a report plots as its training curve.
        needs: stages whose checkpoints it reads (CD reads an EDM teacher), so a pipeline runs those first.
        one_step: ``(model, obs_n, noise) -> action``: the backbone's one-step map with gradients (``noise`` the
            standard normals ``[..., B, act_dim]``), or None. A backbone with one can be guided by the critic
            (``model.q_weight``, :mod:`idql_cm.modules.guidance`).
    """

    kind: str
    title: str
    module: str
    rebuild: Callable[[Mapping[str, Any], Mapping[str, torch.Tensor] | None, str], nn.Module]
    sample: Sampler
    options: Callable[[Mapping[str, Any], Any], dict[str, Any]] = _no_options
    describe: Callable[[Mapping[str, Any]], str] = _kind_name
    config: str | None = None
    loss_curve: str = r"^train/loss$"
    needs: tuple[str, ...] = field(default_factory=tuple)
    one_step: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


_REGISTRY: dict[str, BackboneSpec] = {}
_entry_points_read = False


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry (again with the same spec: a no-op; another spec of a taken kind: refused)."""
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"register_backbone: expected a BackboneSpec, found {type(spec).__name__}")
    if spec.kind == "iql":
        raise ConfigError("register_backbone: 'iql' is the critic's kind, not a behaviour backbone")
    taken = _REGISTRY.get(spec.kind)
    if taken is not None and taken != spec:
        raise ConfigError(f"register_backbone: kind {spec.kind!r} is already registered by {taken.module}; "
                          f"{spec.module} needs another kind")
    _REGISTRY[spec.kind] = spec
    return spec


def registered() -> tuple[BackboneSpec, ...]:
    """Every registered backbone, the package's own first (EDM, CD, CT), in registration order."""
    _read_entry_points()
    return tuple(_REGISTRY.values())


def builtin_kinds() -> tuple[str, ...]:
    """The kinds whose spec lives in this package (the stages of ``make pipeline`` and ``make demo``)."""
    return tuple(k for k, s in _REGISTRY.items() if s.module.startswith("idql_cm."))


def _read_entry_points() -> None:
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the package's own backbones
            print(f"idql-cm: warning: entry point {ep.name} ({ep.value}) of {ENTRY_POINT_GROUP} could not be loaded "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            continue
        register_backbone(spec)


def _specs_in(module_name: str) -> None:
    """Import ``module_name`` and register the specs it defines at module level (if it did not itself)."""
    mod = importlib.import_module(module_name)
    for value in vars(mod).values():
        if isinstance(value, BackboneSpec):
            register_backbone(value)


def backbone(kind: str, module: str | None = None, where: str = "backbone") -> BackboneSpec:
    """The spec of ``kind``. An unknown kind is looked up in the entry points, then in ``module`` (a class path or
    module name recorded in a checkpoint, or a config's class path), which is imported. Unknown after that: a
    :class:`ConfigError` naming ``where``, the kinds known and what to do."""
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    _read_entry_points()
    if kind not in _REGISTRY and module:
        name = module if module in sys.modules else module.rsplit(".", 1)[0]
        try:
            _specs_in(name)
        except ImportError as e:
            raise CheckpointError(f"{where}: its backbone {kind!r} is defined in the Python module {name!r}, which "
                                  f"cannot be imported ({type(e).__name__}: {e}); put the folder that holds it on "
                                  "PYTHONPATH") from e
    if kind not in _REGISTRY:
        known = ", ".join(repr(k) for k in _REGISTRY)
        raise ConfigError(f"{where}: expected a behaviour backbone of a registered kind ({known}), found {kind!r}"
                          + (f" (no BackboneSpec of that kind in {module})" if module else "")
                          + "; define a BackboneSpec beside its module (idql_cm.backbones.register_backbone)")
    return _REGISTRY[kind]


def spec_of_payload(payload: Mapping[str, Any], where: str) -> BackboneSpec:
    """The spec of a behaviour checkpoint's payload (importing the module it names when the kind is not known)."""
    return backbone(str(payload.get("kind")), payload.get(MODULE_KEY), where)


# ------------------------------------------------------------------------------------------ the package's own
def edm_from_payload(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None,
                     where: str = "EDM checkpoint", prefix: str = "ema_model.", num_seeds: int = 1) -> EDMDenoiser:
    """The EDM denoiser an ``edm`` payload describes (network and method hyper-parameters), with the weights under
    ``prefix`` of ``state`` (the EMA copy by default; ``state=None``: fresh weights). ``where`` starts the error.
    ``num_seeds`` S > 1: the S-member denoiser of an S-member state (``[S, ...]`` weights)."""
    dims = (payload["obs_dim"], payload["act_dim"])
    net = IDQLMlp(*dims, **payload["net"]) if num_seeds == 1 else StackedIDQLMlp(num_seeds, *dims, **payload["net"])
    model = EDMDenoiser(net, **payload["method"])
    if state is not None:
        load_weights(model, state, prefix, where)
    return model


# the constructor arguments of a consistency model among a behaviour payload's "method" (EDM adds P_mean, P_std)
_CM_METHOD_KEYS = ("sigma_data", "sigma_min", "sigma_max", "rho", "x_min", "x_max")


def consistency_from_payload(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None,
                             where: str) -> ConsistencyModel:
    """The consistency model (CT or CD) a payload describes, with the EMA weights of ``state``."""
    method = payload["method"]
    model = ConsistencyModel(IDQLMlp(payload["obs_dim"], payload["act_dim"], **payload["net"]),
                             **{k: method[k] for k in _CM_METHOD_KEYS})
    if state is not None:
        load_weights(model, state, "ema_model.", where)
    return model


def edm_options(payload: Mapping[str, Any], device: Any = None) -> dict[str, Any]:
    """EDM samples with the recorded solver from ``sample_sigma_max`` on a grid of ρ ``sample_rho`` (None: the
    model's own σ_max and ρ)."""
    return {"solver": payload.get("solver", "euler"), "sigma_max": payload.get("sample_sigma_max"),
            "rho": payload.get("sample_rho")}


def consistency_options(payload: Mapping[str, Any], device: Any = None) -> dict[str, Any]:
    """A consistency model re-noises on its training grid when the payload says so (``renoise: train_grid``), and
    starts from ``sample_sigma_max`` (None: σ_max)."""
    intervals = payload.get("train_intervals")
    grid = None
    if payload.get("renoise") == "train_grid" and intervals:
        m = payload["method"]
        grid = karras_sigmas(int(intervals), m["sigma_min"], m["sigma_max"], m["rho"], device=device)
    return {"train_grid": grid, "renoise_min": payload.get("renoise_min"), "sigma_max": payload.get("sample_sigma_max")}


EDM = register_backbone(BackboneSpec(
    kind="edm", title="Karras-style diffusion model (Euler or Heun sampling)",
    module="idql_cm.modules.behaviour.EDMModule", rebuild=edm_from_payload, sample=edm_sample,
    options=edm_options, describe=lambda p: str(p.get("solver", "euler")), config="edm.yaml"))
CD = register_backbone(BackboneSpec(
    kind="cd", title="consistency model distilled from a frozen EDM teacher",
    module="idql_cm.modules.behaviour.CDModule", rebuild=consistency_from_payload, sample=cm_sample,
    options=consistency_options, describe=lambda p: "consistency", config="cd.yaml", needs=("edm",),
    one_step=cm_one_step))
CT = register_backbone(BackboneSpec(
    kind="ct", title="consistency model trained directly (improved consistency training)",
    module="idql_cm.modules.behaviour.CTModule", rebuild=consistency_from_payload, sample=cm_sample,
    options=consistency_options, describe=lambda p: "consistency", config="ct.yaml",
    loss_curve=r"^train/unweighted_loss$", one_step=cm_one_step))



def meanflow_from_payload(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None,
                          where: str) -> MeanFlowModel:
    """The MeanFlow model a payload describes (its net sees the observation and the interval features)."""
    net = IDQLMlp(payload["obs_dim"] + H_FEATURES, payload["act_dim"], **payload["net"])
    model = MeanFlowModel(net, payload["method"]["x_min"], payload["method"]["x_max"])
    if state is not None:
        load_weights(model, state, "ema_model.", where)
    return model


MEANFLOW = register_backbone(BackboneSpec(
    kind="meanflow", title="MeanFlow: average-velocity flow map, one step from noise (Geng et al. 2025)",
    module="idql_cm.modules.behaviour.MeanFlowModule", rebuild=meanflow_from_payload, sample=meanflow_sample,
    describe=lambda p: "meanflow", config="meanflow.yaml", loss_curve=r"^train/unweighted_loss$",
    one_step=meanflow_one_step))
