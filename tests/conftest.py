"""Under pytest-xdist (``make test``: two workers on two cores) each worker trains with one intra-op thread: two
workers of two threads each oversubscribe the cores, and the in-process fits ran up to 4× slower (measured on the
paid-toy test: 248 s against 58 s alone)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_xdist_worker():
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
