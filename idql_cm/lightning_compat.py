"""Every use of a private Lightning attribute, in one place (the rest of the package uses public API only).

Fused steps (``model.fused_steps``) and manual optimisation need a few of Lightning's internals, which a release
may rename without notice. Each function below reads or writes exactly one of them and says why. A missing
attribute raises :class:`UnsupportedLightning` naming it and the supported range, never a silent default: a
logging flag that quietly became False would stop all logging.

This module sits below the data layer and the training modules (both use it) and imports Lightning only.
"""

from __future__ import annotations

import copy
from typing import Any

from idql_cm.errors import IDQLError

#: The Lightning releases the tests cover (setup.cfg pins the same range).
SUPPORTED = "lightning>=2.6,<2.7"


class UnsupportedLightning(IDQLError):
    """The installed Lightning lacks an internal attribute idql-cm relies on."""


def _get(obj: Any, path: str, owner: str) -> Any:
    """``obj.<path>`` (dotted), or :class:`UnsupportedLightning` naming the first missing attribute."""
    for name in path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise UnsupportedLightning(_missing(f"{owner}.{path}", name)) from None
    return obj


def _missing(full: str, name: str) -> str:
    import lightning

    return (f"Lightning {lightning.__version__}: expected the attribute {full} (missing: {name}); idql-cm "
            f"supports {SUPPORTED}: install a release in that range")


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None. Reads ``LightningModule._trainer``: the public
    ``module.trainer`` raises when none is attached, and the modules ask outside a fit too (tests, ``setup``)."""
    return _get(module, "_trainer", type(module).__name__)


def logs_this_iteration(trainer: Any) -> bool:
    """Whether Lightning writes this training iteration's logged metrics (every ``log_every_n_steps``). Reads
    ``trainer._logger_connector.should_update_logs``: the modules log only then, as a logged tensor costs a host
    read-back when written. False without a trainer, and in loops where Lightning does not log by step."""
    if trainer is None:
        return False
    connector = _get(trainer, "_logger_connector", "Trainer")
    try:
        return bool(_get(connector, "should_update_logs", "Trainer._logger_connector"))
    except NotImplementedError:  # Lightning's answer for a loop it has no logging period for
        return False


def set_logging_step(trainer: Any, step: int) -> None:
    """Set the count of Lightning's logging period and x-axis, ``fit_loop.epoch_loop._batches_that_stepped``.
    Lightning counts iterations there (and adds 1 after each); with K fused updates per iteration the modules set
    it to the index of the iteration's last update, so that logging periods and steps count updates."""
    loop = _get(trainer, "fit_loop.epoch_loop", "Trainer")
    _get(loop, "_batches_that_stepped", "Trainer.fit_loop.epoch_loop")
    loop._batches_that_stepped = int(step)


def consumed_batches(trainer: Any) -> int:
    """Training batches the trainer has drawn so far, ``fit_loop.epoch_loop.batch_progress.total.ready`` (restored
    from a checkpoint on resume): the data module starts its per-step batch seeds there."""
    return int(_get(trainer, "fit_loop.epoch_loop.batch_progress.total.ready", "Trainer"))


def checkpoint_every_n_train_steps(callback: Any) -> int:
    """``ModelCheckpoint``'s period in steps (0: none), ``_every_n_train_steps``: Lightning keeps the constructor
    argument only there. Fused steps need it to end every period on an iteration's last update."""
    return int(_get(callback, "_every_n_train_steps", type(callback).__name__) or 0)


def last_saved_step(callback: Any) -> int:
    """The global step ``ModelCheckpoint`` last saved at, ``_last_global_step_saved`` (-1 or 0 before any save):
    :class:`~idql_cm.modules.callbacks.FinalCheckpoint` saves ``last.ckpt`` unless it already holds the final step,
    and a non-finite stop names the step of the checkpoint it keeps."""
    return int(_get(callback, "_last_global_step_saved", type(callback).__name__))


def migrate_loop_progress(checkpoint: dict[str, Any]) -> None:
    """Copy the step count of a checkpoint written under automatic optimisation (idql-cm 0.1.0) to where manual
    optimisation reads it (in place, before the loops load); else Lightning would resume at step 0. Reads and writes
    the layout of ``checkpoint["loops"]["fit_loop"]`` (Lightning's loop state, not a documented format); a layout
    without these keys is left alone, as the checkpoint then needs no migration."""
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    auto = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
    manual = fit.get("epoch_loop.manual_optimization.optim_step_progress")
    if auto and manual is not None and manual.get("total", {}).get("completed", 0) == 0 \
            and auto.get("total", {}).get("completed", 0) > 0:
        fit["epoch_loop.manual_optimization.optim_step_progress"] = copy.deepcopy(auto)
