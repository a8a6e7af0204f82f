"""The seeding rules of a run (standard library only): the global seed, and the seed of every step.

- :func:`recorded_seed`: the seed ``lightning.seed_everything`` recorded for this process (``PL_GLOBAL_SEED``), or
  None when none was set. The one place that reads it.
- :func:`resolve_seed`: a given seed, else the recorded one, else 0.
- :func:`step_seed`: the seed of step ``step`` on ``rank`` for one stream (0: the data's batch indices; 1: the
  modules' noise and dropout). Seeding every step from it makes a run's randomness independent of how it was
  interrupted (exact resume, no RNG state saved); member k of an ensemble uses the seed ``s + k`` of its solo run.
"""

from __future__ import annotations

import hashlib
import os
import struct


def recorded_seed() -> int | None:
    """The seed ``seed_everything`` recorded (``PL_GLOBAL_SEED``), None when unset or unreadable."""
    try:
        return int(os.environ["PL_GLOBAL_SEED"])
    except (KeyError, ValueError):
        return None


def resolve_seed(seed: int | None) -> int:
    """``seed`` if given, else the seed ``lightning.seed_everything`` recorded, else 0."""
    if seed is not None:
        return int(seed)
    recorded = recorded_seed()
    return 0 if recorded is None else recorded


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A 63-bit BLAKE2b hash of ``(seed, rank, step[, stream])``: the seed of step ``step`` on ``rank``."""
    fields = (int(seed), int(rank), int(step)) + ((int(stream),) if stream else ())
    digest = hashlib.blake2b(struct.pack("<" + "q" * len(fields), *fields), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
