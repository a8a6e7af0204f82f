"""The MuJoCo rendering backend, chosen once where a process starts (before mujoco creates a renderer)."""

from __future__ import annotations

import os


def configure_rendering() -> None:
    """Headless rendering (EGL) for recorded episodes unless the user set ``MUJOCO_GL`` (egl, osmesa, glfw).

    ``idql-cm`` calls it first thing; a script that records rollouts itself calls it before importing gymnasium."""
    os.environ.setdefault("MUJOCO_GL", "egl")
