"""Export a trained IDQL agent, raw observation to action, as one portable file (ONNX or TorchScript).

The exported graph is :meth:`IDQLAgent.act_tensor` traced with ``torch.jit.trace``: the checkpoint's observation
normaliser, ``N`` candidates per state from the EMA behaviour policy at exactly ``K`` network evaluations (the
samplers ``edm_sample`` / ``cm_sample`` themselves, traced through, never re-written), the IQL critic's advantage
``min(Q_target) − V`` and the selection (:func:`~idql_cm.eval.agent.select_candidates`). Both formats come from
the same trace.

Inputs and output (``B`` is dynamic)::

    obs    [B, obs_dim]            float32, raw observations
    noise  [K, B, N, act_dim]      float32, optional: standard normals (initial draw, then re-noising draws)
    u      [B]                     float32, optional: uniforms in [0, 1) for the softmax draw (inverse CDF)
    action [B, act_dim]            float32

Without ``noise`` / ``u`` the graph draws its own (ONNX: ``RandomNormalLike`` / ``RandomUniformLike``; the ONNX
file gives both inputs empty defaults, ``[K, 0, N, act_dim]`` and ``[0]``, so a runtime may leave them out). With
them it answers what ``load_agent(...).act(obs, nfe=K, noise=noise, u=u)`` answers. Without a critic the graph is
the behaviour policy alone (``N = 1``, ``u`` unused).

- :mod:`idql_cm.export.exporter`: ``export_agent`` (what ``idql-cm export`` runs)
- :mod:`idql_cm.export.runtime`: ``load_exported``, ``read_metadata`` (``idql-cm export --inspect``)
- :mod:`idql_cm.export.cli`: the ``idql-cm export`` parser (no torch import until it runs)
"""

from __future__ import annotations

FORMATS = ("onnx", "torchscript")
META_KEY = "idql_cm"          # ONNX metadata_props key / TorchScript extra file stem: one JSON object
TS_EXTRA = f"{META_KEY}.json"
EXPORT_FORMAT = 1             # version of the metadata layout

_LAZY = {"export_agent": "exporter", "ExportResult": "exporter", "DecisionGraph": "exporter",
         "load_exported": "runtime", "read_metadata": "runtime", "ExportedPolicy": "runtime"}

__all__ = ["EXPORT_FORMAT", "FORMATS", "META_KEY", *sorted(_LAZY)]


def __getattr__(name):  # lazy: the CLI's parser imports this package without torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"idql_cm.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'idql_cm.export' has no attribute {name!r}")
