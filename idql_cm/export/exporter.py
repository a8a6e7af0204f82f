"""``export_agent``: trace the agent's decision once and write it as ONNX or TorchScript (see :mod:`idql_cm.export`).

Why ``torch.jit.trace`` and the TorchScript-based ONNX exporter rather than ``torch.export`` (``dynamo=True``): the
samplers check their σ-grid with Python control flow on tensor values (e.g. distinct re-noising levels on a
consistency model's training grid), which ``torch.export`` refuses as data-dependent. A trace runs that Python once,
with the real values, and records the tensor operations, so the samplers may change without touching this module;
the export is then checked against the eager agent before it is written.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from idql_cm.errors import CheckpointError, ConfigError
from idql_cm.export import EXPORT_FORMAT, FORMATS, META_KEY, TS_EXTRA
from idql_cm.export.runtime import load_exported, require_onnx
from idql_cm.fileio import atomic_path

ONNX_OPSET = 17
TOLERANCE = 1e-4  # max |exported − eager| action difference an export is checked against before it is written
_SUFFIX = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}


# ------------------------------------------------------------------------------------------------- the graph
class DecisionGraph(nn.Module):
    """``(obs [B, O], noise [K, Bn, N, A], u [Bu]) → action [B, A]``: the agent's decision at ``nfe`` = K.

    ``Bn`` / ``Bu`` are ``B`` (randomness given) or 0 (drawn here): the given rows are concatenated in front of a
    fresh draw and the first ``B`` kept, which needs no control flow in the graph.
    """

    def __init__(self, agent, nfe: int):
        super().__init__()
        self.agent = agent
        # registered so that the trace sees the weights as parameters of this module
        self.actor_model = agent.actor.model
        self.q_target = None if agent.critic is None else agent.critic.q_target
        self.v = None if agent.critic is None else agent.critic.v
        self.nfe = int(nfe)
        self.candidates = agent.num_candidates if agent.critic is not None else 1

    def forward(self, obs: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, k, n, a = obs.shape[0], self.nfe, self.candidates, self.agent.act_dim
        template = obs[:, :1].reshape(1, b, 1, 1).expand(k, b, n, a)
        noise = torch.cat([noise, torch.randn_like(template)], dim=1)[:, :b]
        if not self.agent.draws_selection:
            return self.agent.act_tensor(obs, k, None, noise, None)
        u = torch.cat([u, torch.rand_like(obs[:, 0])])[:b]
        return self.agent.act_tensor(obs, k, None, noise, u)


class _OptionalRandomness(nn.Module):
    """TorchScript front of the traced graph: ``forward(obs, noise=None, u=None)``."""

    def __init__(self, core: torch.jit.ScriptModule, nfe: int, candidates: int, act_dim: int):
        super().__init__()
        self.core = core
        self.nfe, self.candidates, self.act_dim = nfe, candidates, act_dim

    def forward(self, obs: torch.Tensor, noise: torch.Tensor | None = None,
                u: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.zeros(self.nfe, 0, self.candidates, self.act_dim, dtype=obs.dtype, device=obs.device)
        if u is None:
            u = torch.zeros(0, dtype=obs.dtype, device=obs.device)
        return self.core(obs, noise, u)


# ------------------------------------------------------------------------------------------------ exporting
@dataclass
class ExportResult:
    """What :func:`export_agent` wrote: the file, its metadata and the checked gap to the eager agent."""

    path: str
    metadata: dict[str, Any]
    max_abs_diff: float


def format_for(out: str, fmt: str | None) -> str:
    """The export format: ``fmt`` when given, else from ``out``'s suffix (``.onnx``; ``.pt`` / ``.ts``)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, found {fmt!r}")
        return fmt
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in _SUFFIX:
        raise ConfigError(f"--format: not given and the suffix of --out {out} is {suffix or 'empty'}; expected "
                          f"--format onnx|torchscript or a file ending in {', '.join(_SUFFIX)}")
    return _SUFFIX[suffix]


def check_writable(out: str) -> None:
    """Refuse an output path that cannot be written, before any work: a folder, a path under a file, or a folder
    where no file can be created (tried with a probe file, so that it holds for root and read-only mounts too)."""
    target = os.path.abspath(out)
    if os.path.isdir(target):
        raise ConfigError(f"--out: expected a file path, found the folder {out}")
    folder = os.path.dirname(target)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"--out: expected a folder at {folder}, found a file (cannot write {out})")
    probe = os.path.join(folder, f".idql-cm-export.{os.getpid()}.{secrets.token_hex(4)}.probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise ConfigError(f"--out: cannot write {out}: the folder {folder} is not writable ({e.strerror})") from e
    _unlink(probe)


def build_agent(actor_ckpt: str, critic_ckpt: str | None, candidates: int = 256, temperature: float = 100.0,
                selection: str = "softmax", member: int | None = None):
    """The eager :class:`IDQLAgent` on the CPU, with the export's checks: ``--actor`` must be a behaviour policy
    and ``--critic`` an IQL critic of the same data (sizes and observation normaliser). ``member`` k of ensemble
    checkpoints (``num_seeds``): actor k with critic k (or a solo critic)."""
    from idql_cm.checkpoint import DataFacts, check_fits_data, read_checkpoint
    from idql_cm.eval.agent import IDQLAgent
    from idql_cm.eval.api import critic_member
    from idql_cm.policies import actor_from_checkpoint, critic_from_checkpoint

    try:
        actor = actor_from_checkpoint(str(actor_ckpt), device="cpu", member=member)
    except CheckpointError as e:
        raise CheckpointError(f"--actor: {e}".replace("pass member=k", "pass --member k")) from e
    critic = None
    if critic_ckpt is not None:
        payload = read_checkpoint(str(critic_ckpt), expect_kind="iql", what="--critic")["idql_cm"]
        data = DataFacts(actor.obs_dim, actor.act_dim, actor.obs_mean, actor.obs_std, f"{actor.task} (the --actor's)")
        check_fits_data(DataFacts.of_payload(payload), data, "--critic", str(critic_ckpt))
        try:
            critic = critic_from_checkpoint(str(critic_ckpt), device="cpu", what="--critic",
                                 member=critic_member(str(critic_ckpt), member))
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("pass member=k", "pass --member k")) from e
    return IDQLAgent(actor, critic, num_candidates=candidates, temperature=temperature, selection=selection)


def _bounds(model, act_dim: int) -> tuple[list[float], list[float]]:
    lo = torch.as_tensor(model.x_min, dtype=torch.float32).expand(act_dim)
    hi = torch.as_tensor(model.x_max, dtype=torch.float32).expand(act_dim)
    return lo.tolist(), hi.tolist()


def _metadata(agent, nfe: int, actor_ckpt: str, critic_ckpt: str | None, fmt: str) -> dict[str, Any]:
    from idql_cm._version import __version__
    from idql_cm.fileio import file_sha256

    actor, idql = agent.actor, agent.critic is not None
    n = agent.num_candidates if idql else 1
    low, high = _bounds(actor.model, agent.act_dim)
    return {
        "export_format": EXPORT_FORMAT,
        "format": fmt,
        "idql_cm_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "kind": actor.kind,
        "obs_dim": agent.obs_dim,
        "act_dim": agent.act_dim,
        "action_low": low,
        "action_high": high,
        "nfe": int(nfe),
        "solver": actor.description,
        "candidates": n,
        "temperature": (agent.temperature if math.isfinite(agent.temperature) else "inf") if idql else None,
        "selection": agent.selection if idql else "none (behaviour policy alone)",
        "softmax_draw": agent.draws_selection,  # whether u is used
        "q_weight": float(getattr(actor, "q_weight", 0.0)),  # η of the critic guidance it was trained with (0: none)
        "noise_scale": float(getattr(actor, "noise_scale", 1.0)),  # λ of the initial draw λ·ε (1: as trained)
        "advantage_beta": float(getattr(actor, "advantage_beta", 0.0)),  # β of its advantage weighting (0: none)
        "task": actor.task,
        "env_id": actor.env_id,
        "actor_ckpt": os.path.abspath(actor_ckpt),
        "actor_sha256": file_sha256(actor_ckpt),
        "critic_ckpt": None if critic_ckpt is None else os.path.abspath(critic_ckpt),
        "critic_sha256": None if critic_ckpt is None else file_sha256(critic_ckpt),
        "inputs": {"obs": ["B", agent.obs_dim], "noise": [int(nfe), "B (or 0: drawn)", n, agent.act_dim],
                   "u": ["B (or 0: drawn)"] if agent.draws_selection else ["unused"]},
        "outputs": {"action": ["B", agent.act_dim]},
    }


def _example(agent, nfe: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = agent.num_candidates if agent.critic is not None else 1
    obs = agent.actor.obs_mean + agent.actor.obs_std * torch.randn(b, agent.obs_dim, generator=g)
    noise = torch.randn(nfe, b, n, agent.act_dim, generator=g)
    u = torch.rand(b, generator=g)
    return obs, noise, u


def export_agent(actor_ckpt: str, critic_ckpt: str | None, out: str, nfe: int = 1, candidates: int = 256,
                 temperature: float = 100.0, selection: str = "softmax", fmt: str | None = None,
                 member: int | None = None) -> ExportResult:
    """Export the agent of ``actor_ckpt`` (+ ``critic_ckpt``) at ``nfe`` to ``out`` (ONNX or TorchScript).

    Everything a user can get wrong is refused before anything is written (one-line :class:`IDQLError`): the
    output path, the checkpoints, the NFE (the sampler's own check, e.g. an even NFE for Heun), the candidates,
    temperature and selection. The traced graph is then run against the eager agent on the same noise and
    uniforms; more than :data:`TOLERANCE` apart is refused too. The file is written beside ``out`` and moved into
    place in one ``os.replace`` (:func:`idql_cm.fileio.atomic_path`).
    """
    check_writable(str(out))
    fmt = format_for(str(out), fmt)
    if fmt == "onnx":
        require_onnx("export to ONNX")
    agent = build_agent(actor_ckpt, critic_ckpt, candidates, temperature, selection, member)
    nfe = int(nfe)
    obs, noise, u = _example(agent, nfe, b=3)
    try:
        agent.act(obs, nfe, noise=noise)  # the sampler's own checks of nfe, once, eagerly
    except ConfigError as e:
        raise ConfigError(f"--nfe {nfe}: {e}") from e
    graph = DecisionGraph(agent, nfe).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: the sampler's Python checks run once, at trace time
        traced = torch.jit.trace(graph, (obs, noise, u), check_trace=False)
    metadata = _metadata(agent, nfe, str(actor_ckpt), None if critic_ckpt is None else str(critic_ckpt), fmt)
    if member is not None:
        metadata["member"] = int(member)
    try:
        with atomic_path(out) as tmp:  # the checked file replaces ``out`` only if every check passed
            _write(fmt, traced, (obs, noise, u), metadata, tmp)
            # checked on other states and another batch size than the trace saw
            obs, noise, u = _example(agent, nfe, b=5, seed=1)
            u = u if agent.draws_selection else None
            got = load_exported(tmp).act(obs.numpy(), noise=noise.numpy(), u=None if u is None else u.numpy())
            gap = float(np.abs(got - agent.act(obs, nfe, noise=noise, u=u).numpy()).max())
            if not gap <= TOLERANCE:
                raise CheckpointError(f"export check: expected the exported graph within {TOLERANCE:g} of the "
                                      f"eager agent, found a max |difference| of {gap:.3g} ({fmt}, {metadata['kind']}, "
                                      f"NFE {nfe})")
    except OSError as e:
        raise ConfigError(f"--out: cannot write {out} ({e.strerror or e})") from e
    return ExportResult(path=str(out), metadata=metadata, max_abs_diff=gap)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write(fmt: str, traced, example, metadata: dict[str, Any], path: str) -> None:
    if fmt == "onnx":
        _write_onnx(traced, example, metadata, path)
    else:
        k, n, a = metadata["nfe"], metadata["candidates"], metadata["act_dim"]
        front = torch.jit.script(_OptionalRandomness(traced, k, n, a))
        torch.jit.save(front, path, _extra_files={TS_EXTRA: json.dumps(metadata)})


def _mish_symbolic(g, x):
    """ONNX lowering of ``aten::mish``: ``x · n / (n + 2)`` with ``n = eᵐ(eᵐ + 2)``, ``m = min(x, 20)``; this is
    ``x · tanh(softplus(x))`` (tanh(ln(1 + eˣ)) = n / (n + 2)), and the ratio is 1 in float32 from x = 20 on, where the
    clamp keeps eˣ from overflowing.

    The exporter's own lowering, ``x · Tanh(Softplus(x))``, is exact too, but onnxruntime's CPU Softplus kernel is
    not vectorised, and it took most of a 256-candidate decision (docs/performance.md). Same values within 4e-7
    (relative) of ``torch.nn.functional.mish``.
    """
    two = g.op("Constant", value_t=torch.tensor(2.0))
    e = g.op("Exp", g.op("Min", x, g.op("Constant", value_t=torch.tensor(20.0))))
    n = g.op("Mul", e, g.op("Add", e, two))
    return g.op("Mul", x, g.op("Div", n, g.op("Add", n, two)))


def _write_onnx(traced, example, metadata: dict[str, Any], path: str) -> None:
    onnx = require_onnx("export to ONNX")
    from onnx import helper, numpy_helper

    torch.onnx.register_custom_op_symbolic("aten::mish", _mish_symbolic, ONNX_OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice (see module doc)
            torch.onnx.export(traced, example, path, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["obs", "noise", "u"], output_names=["action"],
                              dynamic_axes={"obs": {0: "batch"}, "noise": {1: "noise_batch"}, "u": {0: "u_batch"},
                                            "action": {0: "batch"}})
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::mish", ONNX_OPSET)
    model = onnx.load(path)
    graph = model.graph
    present = {i.name for i in graph.input}
    k, n, a = metadata["nfe"], metadata["candidates"], metadata["act_dim"]
    if "u" not in present:  # unused (argmax, or no critic): kept in the interface all the same
        graph.input.append(helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, ["u_batch"]))
    # empty defaults: a runtime may leave noise and u out, and the graph draws its own
    graph.initializer.append(numpy_helper.from_array(np.zeros((k, 0, n, a), np.float32), "noise"))
    graph.initializer.append(numpy_helper.from_array(np.zeros((0,), np.float32), "u"))
    model.doc_string = (f"idql-cm {metadata['kind']} IDQL agent: obs [B, {metadata['obs_dim']}] -> action [B, {a}]; "
                        f"optional noise [{k}, B, {n}, {a}] and u [B]")
    helper.set_model_props(model, {META_KEY: json.dumps(metadata)})
    onnx.checker.check_model(model)
    onnx.save(model, path)


