"""The private-Lightning adapter: each touchpoint reads the installed Lightning, and fails loudly when it changes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from idql_cm import lightning_compat as lc
from idql_cm.errors import IDQLError


def _trainer(tmp_path, **kw):
    return L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", **kw)


def test_the_touchpoints_exist_in_the_installed_lightning(tmp_path):
    ckpt = ModelCheckpoint(every_n_train_steps=7)
    t = _trainer(tmp_path, callbacks=[ckpt], log_every_n_steps=1)
    assert lc.consumed_batches(t) == 0
    lc.set_logging_step(t, 41)
    assert t.fit_loop.epoch_loop._batches_that_stepped == 41
    assert lc.logs_this_iteration(t) is True  # log_every_n_steps = 1: every iteration logs
    assert lc.checkpoint_every_n_train_steps(ckpt) == 7 and lc.last_saved_step(ckpt) == 0
    assert lc.trainer_of(L.LightningModule()) is None
    assert lc.logs_this_iteration(None) is False  # not attached: nothing logs


def test_the_installed_lightning_is_in_the_pinned_range():
    major, minor = (int(x) for x in L.__version__.split(".")[:2])
    assert lc.SUPPORTED == "lightning>=2.6,<2.7" and (major, minor) == (2, 6)
    cfg = (Path(__file__).parents[1] / "setup.cfg").read_text()
    assert "    lightning>=2.6,<2.7\n" in cfg


@pytest.mark.parametrize("call,stand_in,attribute", [
    (lc.logs_this_iteration, SimpleNamespace(_logger_connector=SimpleNamespace()),
     "Trainer._logger_connector.should_update_logs"),
    (lc.logs_this_iteration, SimpleNamespace(), "Trainer._logger_connector"),
    (lambda t: lc.set_logging_step(t, 3), SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace())),
     "Trainer.fit_loop.epoch_loop._batches_that_stepped"),
    (lc.consumed_batches, SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
        batch_progress=SimpleNamespace(total=SimpleNamespace())))), "batch_progress.total.ready"),
    (lc.checkpoint_every_n_train_steps, SimpleNamespace(), "SimpleNamespace._every_n_train_steps"),
    (lc.last_saved_step, SimpleNamespace(), "SimpleNamespace._last_global_step_saved"),
    (lc.trainer_of, SimpleNamespace(), "SimpleNamespace._trainer"),
])
def test_a_renamed_attribute_fails_with_one_clear_line(call, stand_in, attribute):
    with pytest.raises(lc.UnsupportedLightning) as e:
        call(stand_in)
    msg = str(e.value)
    assert isinstance(e.value, IDQLError) and "\n" not in msg
    assert attribute in msg and lc.SUPPORTED in msg and L.__version__ in msg, msg


def test_a_renamed_attribute_never_reads_as_a_default():
    """The old ``except AttributeError: return False`` turned a renamed logging flag into no logging at all."""
    stand_in = SimpleNamespace(_logger_connector=SimpleNamespace(renamed_should_update_logs=True))
    with pytest.raises(lc.UnsupportedLightning):
        lc.logs_this_iteration(stand_in)
    epoch_loop = SimpleNamespace()
    with pytest.raises(lc.UnsupportedLightning):
        lc.set_logging_step(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=epoch_loop)), 5)
    assert not hasattr(epoch_loop, "_batches_that_stepped")  # nothing written on a Lightning it does not know
