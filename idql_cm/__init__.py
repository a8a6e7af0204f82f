"""idql-cm: IDQL with EDM, consistency-distilled (CD) and consistency-trained (CT) behaviour policies.

Inference API::

    from idql_cm import load_actor, load_agent
    actor = load_actor("ct.ckpt")                 # actor.sample(obs, nfe=1) -> actions
    agent = load_agent("ct.ckpt", "iql.ckpt")     # agent.act(obs, nfe=1)    -> actions
    policy = load_exported("ct.onnx")             # policy.act(obs)          -> actions (idql-cm export)
"""

from __future__ import annotations

from idql_cm._version import __version__

__all__ = ["__version__", "load_actor", "load_agent", "load_exported"]


def __getattr__(name):  # lazy: importing the package must not import torch/gymnasium eagerly
    if name in ("load_actor", "load_agent"):
        from idql_cm.eval import api

        return getattr(api, name)
    if name == "load_exported":
        from idql_cm.export.runtime import load_exported

        return load_exported
    raise AttributeError(name)
