"""Evaluation: the IDQL agent, vector-env rollouts, the Lightning callback, reports and the inference API.

- :mod:`idql_cm.eval.agent`: ``IDQLAgent``, ``ActorPolicy``, ``select_candidates``
- :mod:`idql_cm.eval.rollout`: ``evaluate`` (whole episodes, exact return bookkeeping)
- :mod:`idql_cm.eval.callback`: ``RolloutEvaluation`` (Lightning callback)
- :mod:`idql_cm.eval.report`: per-NFE results, JSON/Markdown, multi-seed tables and plots, ``idql-cm report``
- :mod:`idql_cm.eval.api`: ``load_actor``, ``load_agent``

Names are imported lazily so that ``import idql_cm.eval`` stays cheap (no gymnasium or Lightning until used).
"""

from __future__ import annotations

_EXPORTS = {
    "IDQLAgent": "agent", "ActorPolicy": "agent", "select_candidates": "agent",
    "evaluate": "rollout",
    "RolloutEvaluation": "callback",
    "build_report": "report", "nfe_result": "report", "write_report": "report", "render_markdown": "report",
    "combined_table": "report", "merge_seeds": "report", "plot_scores": "report",
    "load_actor": "api", "load_agent": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"idql_cm.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'idql_cm.eval' has no attribute {name!r}")
