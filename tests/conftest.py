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


@pytest.fixture
def cli(capsys, monkeypatch):
    """``idql-cm ARGS`` in this process (its exit code and output), for the refusals: the same ``main`` as the
    console script, without a new interpreter's start-up per case. Exit codes and environment variables that must
    be read at start-up keep their subprocess tests (test_debug_env_shows_traceback, the data-without-environment
    run, test_help_lists_every_command)."""
    from types import SimpleNamespace

    from idql_cm.cli import main

    def run(args: list[str], env: dict | None = None):
        monkeypatch.delenv("IDQL_CM_DEBUG", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run
