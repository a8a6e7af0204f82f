"""Running an exported agent: ``load_exported(FILE).act(obs)`` and ``read_metadata(FILE)`` (see :mod:`idql_cm.export`).

The input checks are the Python agent's own (``idql_cm.eval.agent``): observations of the wrong width or with
NaN/Inf are refused with one line naming the rows, before the runtime sees them.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np
import torch

from idql_cm.errors import CheckpointError, ConfigError
from idql_cm.eval.agent import _as_obs_batch, _given_noise, _given_u
from idql_cm.export import META_KEY, TS_EXTRA


def require_onnx(what: str):
    """The ``onnx`` module, checking that ``onnxruntime`` is there too (the ``[export]`` extra)."""
    try:
        import onnx
        import onnxruntime  # noqa: F401 - exports are checked with it, and run by it
    except ImportError as e:
        raise ConfigError(f"{what}: expected the packages onnx and onnxruntime, found {e.name} missing; install "
                          f"them with pip install -e \".[export]\"") from e
    return onnx


def detect_format(path: str) -> str:
    """``torchscript`` (a zip archive) or ``onnx``; refuses a missing file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"exported policy: no file at {path}")
    return "torchscript" if zipfile.is_zipfile(path) else "onnx"


def read_metadata(path: str) -> dict[str, Any]:
    """The ``idql_cm`` metadata of an exported file (ONNX or TorchScript), without running it."""
    fmt = detect_format(path)
    raw = None
    if fmt == "torchscript":
        with zipfile.ZipFile(path) as z:
            names = [nm for nm in z.namelist() if nm.endswith(f"/extra/{TS_EXTRA}")]
            raw = z.read(names[0]).decode() if names else None
    else:
        onnx = require_onnx(f"reading {path}")
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise CheckpointError(f"exported policy: {path} is neither a TorchScript archive nor an ONNX model "
                                  f"({type(e).__name__})") from e
        raw = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
    if raw is None:
        raise CheckpointError(f"exported policy: expected an idql-cm export with '{META_KEY}' metadata, {path} "
                              f"({fmt}) has none")
    return json.loads(raw)


class ExportedPolicy:
    """An exported agent ready to act: ``act(obs, noise=None, u=None)``, NumPy in, NumPy out.

    Refuses observations of the wrong width or with NaN/Inf (one-line ``DataError``) like ``IDQLAgent.act``;
    ``metadata`` is the file's ``idql_cm`` record, ``format`` ``onnx`` or ``torchscript``.
    """

    def __init__(self, path: str, threads: int | None = None):
        self.path = str(path)
        self.metadata = read_metadata(self.path)
        self.format = detect_format(self.path)
        self.obs_dim, self.act_dim = int(self.metadata["obs_dim"]), int(self.metadata["act_dim"])
        self.nfe, self.candidates = int(self.metadata["nfe"]), int(self.metadata["candidates"])
        self.draws_selection = bool(self.metadata["softmax_draw"])
        if self.format == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3  # not the notice that noise / u have defaults (overridable initializers)
            if threads:
                opts.intra_op_num_threads = int(threads)
            self._session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        else:
            self._module = torch.jit.load(self.path, map_location="cpu").eval()

    def act(self, obs, noise=None, u=None) -> np.ndarray:
        """Raw observations ``[B, obs_dim]`` (or one ``[obs_dim]``) → actions ``[B, act_dim]`` (or ``[act_dim]``);
        ``noise [nfe, B, candidates, act_dim]`` and ``u [B]`` as in ``IDQLAgent.act``."""
        where = f"exported policy {self.path}"
        t, _, single = _as_obs_batch(obs, self.obs_dim, "cpu", where)
        if single:
            noise = None if noise is None else torch.as_tensor(noise).unsqueeze(1)
            u = None if u is None else torch.as_tensor(u).reshape(1)
        noise = _given_noise(noise, (self.nfe, t.shape[0], self.candidates, self.act_dim), "cpu", where)
        u = _given_u(u, t.shape[0], "cpu", where, self.draws_selection)
        if self.format == "onnx":
            feed = {"obs": t.numpy()}
            if noise is not None:
                feed["noise"] = noise.numpy()
            if u is not None:
                feed["u"] = u.numpy()
            act = self._session.run(["action"], feed)[0]
        else:
            with torch.inference_mode():
                act = self._module(t, noise, u).numpy()
        return act[0] if single else act

    __call__ = act

    def __repr__(self) -> str:
        m = self.metadata
        return (f"ExportedPolicy({self.format}, kind={m['kind']!r}, obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
                f"nfe={self.nfe}, candidates={self.candidates}, selection={m['selection']!r})")


def load_exported(path: str, threads: int | None = None) -> ExportedPolicy:
    """An exported agent (``idql-cm export``), ONNX (run by onnxruntime on the CPU) or TorchScript."""
    return ExportedPolicy(path, threads=threads)
