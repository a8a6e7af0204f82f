"""Gymnasium environments made with the stock MuJoCo model, minus the compiler's deprecated ``settotalmass``.

Gymnasium's ``half_cheetah.xml`` sets ``<compiler settotalmass="14"/>``. Recent MuJoCo releases deprecate that
attribute and print a warning on stderr (and append it to ``MUJOCO_LOG.TXT`` in the working directory) every time
the model is compiled, i.e. once per environment made. :func:`make_env` gives such an environment an equivalent model
instead: the stock XML with every body's mass, inertia and inertial frame written out explicitly, as the compiler
computes them (geoms' inertia, then ``mj_setTotalmass``). The compiled ``mjModel`` is identical, array for array,
to the stock one, so every simulated number is unchanged; ``tests/test_quiet_env.py`` checks that.

The equivalent XML is derived at run time from the installed gymnasium's file by the installed MuJoCo, so it follows
both if they change. It exists on disk only while the environment is constructed (MuJoCo reads the file once), so
``gymnasium.make(env.spec)`` cannot re-create such an environment: use :func:`make_env` again.
"""

from __future__ import annotations

import functools
import os
import tempfile
import xml.etree.ElementTree as ET
from typing import Any

__all__ = ["make_env", "explicit_mass_xml"]

#: Gymnasium ids whose stock model uses ``settotalmass`` and that accept ``xml_file``, with that model's file name.
#: (v4 ids have the same model but no ``xml_file`` argument; Hopper's and Walker2d's models do not use it.)
_TOTALMASS_MODELS = {"HalfCheetah-v5": "half_cheetah.xml"}


def make_env(env_id: str, **kwargs: Any):
    """``gymnasium.make(env_id, **kwargs)``, with the equivalent explicit-mass model where the stock one would make
    MuJoCo print its ``settotalmass`` deprecation warning. An explicit ``xml_file`` is passed on untouched."""
    import gymnasium

    name = _TOTALMASS_MODELS.get(env_id)
    text = None if name is None or "xml_file" in kwargs else explicit_mass_xml(name)
    if text is None:
        return gymnasium.make(env_id, **kwargs)
    with tempfile.TemporaryDirectory(prefix="idql-cm-model-") as folder:
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return gymnasium.make(env_id, xml_file=path, **kwargs)


@functools.cache
def explicit_mass_xml(name: str) -> str | None:
    """Gymnasium's MuJoCo model ``name`` (``"half_cheetah.xml"``) without ``settotalmass``, each body given the
    ``<inertial>`` that the stock model compiles to; ``None`` if the stock model does not set a total mass."""
    import gymnasium.envs.mujoco
    import mujoco

    src = os.path.join(os.path.dirname(gymnasium.envs.mujoco.__file__), "assets", name)
    root = ET.parse(src).getroot()
    compiler = root.find("compiler")
    if compiler is None or "settotalmass" not in compiler.attrib:
        return None
    total = float(compiler.attrib.pop("settotalmass"))
    # Compiled without settotalmass (no warning), then scaled by the very function the compiler calls for it, so
    # the masses and inertias are the compiler's to the last bit.
    model = mujoco.MjModel.from_xml_string(ET.tostring(root, encoding="unicode"))
    if total > 0:  # the compiler ignores a non-positive total mass
        mujoco.mj_setTotalmass(model, total)
    compiler.set("inertiafromgeom", "false")  # every body below has its <inertial>; a missed one fails to compile

    def num(values) -> str:  # repr: the shortest decimal that reads back as the same double
        return " ".join(repr(float(v)) for v in values)

    for body in root.find("worldbody").iter("body"):
        for old in body.findall("inertial"):  # ignored by the stock model (inertiafromgeom="true")
            body.remove(old)
        b = model.body(body.attrib["name"])
        body.insert(0, ET.Element("inertial", pos=num(b.ipos), quat=num(b.iquat), mass=num(b.mass),
                                  diaginertia=num(b.inertia)))
    return ET.tostring(root, encoding="unicode")
