"""Under pytest-xdist (``make test``: two workers on two cores) each worker trains with one intra-op thread: two
workers of two threads each oversubscribe the cores, and the in-process fits ran up to 4× slower (measured on the
paid-toy test: 248 s against 58 s alone)."""

from __future__ import annotations

import os
import sys

import pytest

#: the heaviest files first (CPU seconds measured in a full run, largest first): `make test` hands whole files to
#: its two workers in collection order (``--dist loadfile --no-loadscope-reorder``; by default xdist orders files by
#: their number of tests), and a heavy file handed out last leaves one worker idle while the other finishes it
#: (measured in a fresh clone: 406 s of wall for ~11 CPU-minutes in xdist's default order)
HEAVY_FIRST = ("test_toy_fidelity.py", "test_pipeline.py", "test_guidance.py", "test_ensemble_faults.py",
               "test_reliability.py", "test_ensemble_training.py", "test_training.py", "test_collect.py",
               "test_custom_backbone.py", "test_bench_smoke.py", "test_export.py", "test_configs_smoke.py",
               "test_cli_errors.py", "test_consistency_modules.py", "test_eval_callback.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


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
    console script, without a new interpreter's start-up per case. What only a process shows keeps its subprocess
    test (IDQL_CM_DEBUG read at start-up, ``--help``, DDP, SIGKILL and resume, PYTHONPATH, the reliability batch)."""
    from types import SimpleNamespace

    from idql_cm.cli import main

    def run(args: list[str], env: dict | None = None):
        monkeypatch.delenv("IDQL_CM_DEBUG", raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        _stderr_handlers_to_this_test()
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


class _CurrentStderr:
    """A stream that writes to whatever ``sys.stderr`` is at the time of the write."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        if not getattr(sys.stderr, "closed", False):
            sys.stderr.flush()


def _stderr_handlers_to_this_test() -> None:
    """Lightning's and torch's loggers carry plain ``StreamHandler``s bound to whatever ``sys.stderr`` was when they
    were first imported: under pytest, possibly an earlier test's capture, closed by now ("--- Logging error ---"
    and a traceback on the next log line). A new process binds the real stderr; here they write to the stderr of the
    moment (this test's capture). pytest's own capture handlers are subclasses and are left alone."""
    import logging

    import lightning.pytorch  # noqa: F401 - its loggers' handlers exist from here on

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStderr):
                handler.setStream(_CurrentStderr())
