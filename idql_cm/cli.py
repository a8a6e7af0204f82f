"""The ``idql-cm`` command.

``idql-cm fit|validate --config cfg.yaml`` is LightningCLI (Lightning 2.6 ships no ``lightning``
command, so this is the project's form of ``lightning fit --config``); ``idql-cm collect`` writes a
D4RL-layout dataset from a MuJoCo env; ``idql-cm report`` merges evaluation reports; ``idql-cm export`` writes
a trained agent as one ONNX or TorchScript file (``idql_cm.export``).

Errors a user can cause print one line on stderr and exit with code 2; ``IDQL_CM_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from idql_cm.errors import ConfigError, IDQLError

#: the LightningCLI subcommands offered: the modules have training and validation steps (validate runs the
#: RolloutEvaluation callback on a checkpoint), no test or predict step, so Trainer.test / predict cannot run
LIGHTNING_SUBCOMMANDS = ("fit", "validate")
AUX_COMMANDS = ("collect", "report", "export")

_TOP_HELP = """usage: idql-cm <command> [options]   (idql-cm <command> --help lists a command's options)

commands:
  fit       train a stage (EDM, CD, CT or IQL) from a config: idql-cm fit --config cfg.yaml
  validate  evaluate a checkpoint by rollouts: idql-cm validate --config cfg.yaml --ckpt_path ckpt
  collect   write a D4RL-layout dataset from a MuJoCo environment
  report    merge evaluation reports into one table
  export    write a trained agent as one ONNX or TorchScript file
"""


@runtime_checkable
class ChecksTrainer(Protocol):
    """A module that refuses Trainer settings it cannot honour (before ``fit`` writes anything)."""

    def check_trainer(self, trainer) -> None: ...


@runtime_checkable
class ModulePreflight(Protocol):
    """A module that checks its partner files (CD teacher) against the data before any work."""

    def preflight(self, datamodule) -> None: ...


@runtime_checkable
class CallbackPreflight(Protocol):
    """A callback that checks its files (RolloutEvaluation's critic) against the data before any work."""

    def preflight(self, pl_module, datamodule) -> None: ...


def _debug() -> bool:
    return os.environ.get("IDQL_CM_DEBUG", "0") not in ("", "0")


def _quiet_warnings() -> None:
    import warnings

    # Lightning's hints that do not apply to an on-device endless batch stream or a step-based run.
    for pat in (".*does not have many workers.*", ".*The number of training batches.*",
                ".*`isinstance\\(treespec, LeafSpec\\)`.*", ".*Total length of `.*` across ranks is zero.*",
                ".*The `srun` command is available.*", ".*You defined a `validation_step` but have no.*",
                ".*Your `IterableDataset` has `__len__` defined.*", ".*sanity.*",
                ".*module\\(s\\) in eval mode at the start of training.*",  # the EMA copy, deliberately
                # the modules step their optimisers themselves, and a checkpoint of step k holds the state after
                # update k on purpose (as with automatic optimisation): nothing to save "before optimisation"
                ".*Using ModelCheckpoint with manual optimization.*"):
        warnings.filterwarnings("ignore", message=pat)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())


class _NoTips(logging.Filter):
    """Drops Lightning 2.6's advertisement of a logging service and its accelerator inventory when it says nothing
    (no GPU, no TPU / HPU), printed at every fit: three lines a stage that bury the project's own."""

    SILENT = ("💡 Tip", "GPU available: False", "TPU available: False", "HPU available: False")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.SILENT)


def build_cli(args: list[str] | None = None, run: bool = True):
    """Create the LightningCLI (``args`` lets tests drive it in-process)."""
    import lightning.pytorch as pl
    import torch
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from idql_cm.data.datamodule import TDDataModule
    from idql_cm.modules.common import IDQLModule

    class IDQLParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            # jsonargparse prints the whole usage (60 lines) before its message: say the message in one line
            # (IDQL_CM_DEBUG=1 keeps jsonargparse's full output).
            if _debug():
                return super().error(message, ex)
            raise ParserConfigError(message) from ex

    class IDQLCLI(LightningCLI):
        _ckpt_payload: dict | None = None  # the --ckpt_path file's idql_cm payload, read by _parse_ckpt_path

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_SUBCOMMANDS}

        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            self.parser_class = IDQLParser
            return super().init_parser(**kwargs)

        def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except ParserConfigError as e:
                argv = sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []
                sub = next((a for a in argv if isinstance(a, str) and a in LIGHTNING_SUBCOMMANDS), "")
                raise ConfigError(_short_parser_message(e.message, sub)) from e

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            _add_eval_arguments(parser)

        def before_instantiate_classes(self) -> None:
            sub = self.subcommand
            cfg = self.config.get(sub, self.config) if sub else self.config
            _apply_eval_arguments(cfg)
            root = _get(cfg, "trainer.default_root_dir") or os.getcwd()
            _substitute_root(cfg, os.path.normpath(root))
            teacher = _get(cfg, "model.init_args.teacher_ckpt")
            if teacher is not None and not os.path.isfile(teacher):
                raise ConfigError(f"model.init_args.teacher_ckpt: no EDM checkpoint at {teacher} "
                                  "(train the EDM stage first: idql-cm fit --config configs/<task>/edm.yaml)")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI replaces the configured model by the one recorded in a --ckpt_path file, so a
            # wrong checkpoint would silently swap the model: check it against the config first, before any
            # data is loaded or any step is run.
            sub = self.config.get("subcommand")
            cfg = self.config.get(sub) if sub else None
            ckpt = cfg.get("ckpt_path") if cfg is not None else None
            if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
                from idql_cm.checkpoint import read_checkpoint

                model = cfg.get("model")
                kind = _kind_of(str(getattr(model, "class_path", model)))
                self._ckpt_payload = read_checkpoint(ckpt, expect_kind=kind, what="--ckpt_path")["idql_cm"]
            super()._parse_ckpt_path()

        def _preflight(self) -> None:
            """Everything a run needs, checked before anything is written (no log folder, no checkpoints): the
            data (read and validated once, kept for the run), the partner checkpoints of the model (CD teacher)
            and of the callbacks (RolloutEvaluation critic), and a --ckpt_path file, against the data."""
            dm = self.datamodule
            if not isinstance(dm, TDDataModule):
                return
            dm.obs_dim  # noqa: B018 - loads and checks the dataset (DataError)
            if isinstance(self.model, ChecksTrainer) and self.subcommand == "fit":
                self.model.check_trainer(self.trainer)
            self._default_guiding_critic()
            if isinstance(self.model, ModulePreflight):
                self.model.preflight(dm)
            for cb in self.trainer.callbacks:
                if isinstance(cb, CallbackPreflight):
                    cb.preflight(self.model, dm)
            payload = self._ckpt_payload
            if payload is not None:
                from idql_cm.checkpoint import DataFacts, check_fits_data

                fitting = self.subcommand == "fit"
                norm = dm.normalizer
                data = DataFacts(int(dm.obs_dim), int(dm.act_dim), norm.mean if fitting else None,
                                 norm.std if fitting else None, str(dm.dataset))
                check_fits_data(DataFacts.of_payload(payload), data, "--ckpt_path",
                                str(self.config[self.subcommand].get("ckpt_path")))

        def _default_guiding_critic(self) -> None:
            """A backbone that trains with the critic (``q_weight`` or ``advantage_beta`` > 0) without ``critic_ckpt``
            uses the critic that evaluates it:
            the IQL stage beside this one, as the config's RolloutEvaluation names it."""
            model = self.model
            if not (getattr(model, "uses_critic", False) and getattr(model, "critic_ckpt", "") is None):
                return
            from idql_cm.eval.callback import RolloutEvaluation

            for cb in self.trainer.callbacks:
                if isinstance(cb, RolloutEvaluation) and cb.critic_ckpt is not None:
                    model.critic_ckpt = str(cb.critic_ckpt)
                    return

        def before_fit(self) -> None:
            self._preflight()

        def before_validate(self) -> None:
            self._preflight()

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> pl.Trainer:
            root = config.get("default_root_dir") or os.getcwd()
            if config.get("precision") is None:
                # One config for both machines: bf16 autocast on CUDA, fp32 on CPU (bf16 is ~5x slower on
                # CPUs without AVX-512 bf16, docs/performance.md). An explicit --trainer.precision wins.
                on_gpu = torch.cuda.is_available() and config.get("accelerator") in (None, "auto", "gpu", "cuda")
                config["precision"] = "bf16-mixed" if on_gpu else "32-true"
            if torch.cuda.is_available():
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            if config.get("logger") in (None, True):
                from lightning.pytorch.loggers import TensorBoardLogger

                # A fixed folder (no version_N) so reports, checkpoints and TensorBoard files of a stage
                # stay in one predictable place across resumes.
                config["logger"] = TensorBoardLogger(save_dir=root, name="", version="", default_hp_metric=False)
            plugins = config.get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                from idql_cm.modules.checkpoint_io import AtomicCheckpointIO

                # A kill or power cut during a save must not leave a truncated last.ckpt (see AtomicCheckpointIO).
                plugins.append(AtomicCheckpointIO())
            config["plugins"] = plugins
            from idql_cm.modules.callbacks import FinalCheckpoint

            trainer = super()._instantiate_trainer(config, [*callbacks, FinalCheckpoint()])
            for cb in trainer.callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                    cb.dirpath = os.path.join(root, "checkpoints")
            return trainer

    _quiet_warnings()
    _one_line_data_warnings()
    return IDQLCLI(
        model_class=IDQLModule,
        subclass_mode_model=True,
        datamodule_class=TDDataModule,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={"num_sanity_val_steps": 0, "enable_model_summary": False},
        parser_kwargs={"default_env": False},
        args=args,
        run=run,
    )


def _one_line_data_warnings() -> None:
    """Print data repairs (DataWarning: clipped actions, unscaled rewards) as one ``idql-cm: warning:`` line."""
    import warnings

    from idql_cm.data.d4rl import DataWarning

    shown = warnings.showwarning
    if getattr(shown, "_idql_cm", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, DataWarning):
            print(f"idql-cm: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show._idql_cm = True
    warnings.showwarning = show


class ParserConfigError(ConfigError, argparse.ArgumentError):
    """A command-line or config-file mistake found by jsonargparse (an ArgumentError to jsonargparse itself, which
    catches those while it tries the alternatives of a union)."""

    def __init__(self, message: str) -> None:
        argparse.ArgumentError.__init__(self, None, message)

    def __str__(self) -> str:
        return self.message


#: jsonargparse explanation lines that say nothing the remaining lines do not
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
                 "Expected a <class 'NoneType'>", "Given value type:", "Given value:")


def _short_parser_message(message: str, subcommand: str = "") -> str:
    """jsonargparse's multi-line message as one line, with a hint for the options or the expected file."""
    kept: list[str] = []
    for ln in str(message).splitlines():
        ln = ln.strip()
        ln = ln[2:] if ln.startswith("- ") else ln
        if ln and not ln.startswith(_PARSER_NOISE) and ln not in kept:
            kept.append(ln)
    text = " ".join(kept)
    if "required:" in text and "data.dataset" in text:
        text += (" (expected data.dataset: a D4RL id like halfcheetah-medium-v2, the path of a D4RL-layout HDF5 file, "
                 "or minari:<dataset id>)")
    return f"{text} (idql-cm {subcommand + ' ' if subcommand else ''}--help lists the options)"


#: the evaluation callback's class path, whose arguments ``--eval.<name>`` sets
EVAL_CALLBACK = "idql_cm.eval.callback.RolloutEvaluation"


def _add_eval_arguments(parser) -> None:
    """``--eval.<name>`` for every argument of the config's RolloutEvaluation callback (``--eval.episodes 10
    --eval.num_candidates 64``): LightningCLI cannot address one entry of ``trainer.callbacks`` from the command line.
    Unset (None) means the config's value."""
    import inspect
    import typing

    from idql_cm.eval.callback import RolloutEvaluation

    hints = typing.get_type_hints(RolloutEvaluation.__init__)
    for name in inspect.signature(RolloutEvaluation.__init__).parameters:
        if name in hints and name != "return":
            parser.add_argument(f"--eval.{name}", type=typing.Optional[hints[name]], default=None,  # noqa: UP045
                                help=f"RolloutEvaluation {name} (default: the config's)")


def _apply_eval_arguments(cfg) -> None:
    """Copy the given ``--eval.<name>`` values into the config's RolloutEvaluation callback(s)."""
    ev = cfg.get("eval")
    given = {k: v for k, v in vars(ev).items() if v is not None} if ev is not None else {}
    if not given:
        return
    callbacks = [cb for cb in (_get(cfg, "trainer.callbacks") or [])
                 if str(getattr(cb, "class_path", "")) == EVAL_CALLBACK]
    if not callbacks:
        flags = ", ".join(f"--eval.{k}" for k in given)
        raise ConfigError(f"{flags}: expected a {EVAL_CALLBACK} callback in trainer.callbacks to set, found none in "
                          "this config (the critic stage has no evaluation)")
    for cb in callbacks:
        for key, value in given.items():
            setattr(cb.init_args, key, value)


def parse_set_overrides(items: list[str], prog: str) -> dict[str, Any]:
    """``--set key=value`` items of ``make pipeline`` / ``make quality`` as a dict (each value read as YAML); a bad
    item exits with ``prog: error: ...``."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            sys.exit(f"{prog}: error: --set expects key=value, found {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def compose_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config file as ``idql-cm fit --config`` reads it, as one plain dict: the files its ``config:`` key names
    (a base, relative to the file; recursively) merged under it (mappings merge key by key, anything else
    replaces), and its ``eval:`` settings written into its RolloutEvaluation callback. For scripts and tests that
    edit a shipped config before running it."""
    import yaml

    def merged(base: Any, top: Any) -> Any:
        if isinstance(base, dict) and isinstance(top, dict):
            return {**base, **{k: merged(base.get(k), v) for k, v in top.items()}}
        return top

    def read(p: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
        if p in seen:
            raise ConfigError(f"--config: {p} includes itself (config: keys {' -> '.join(map(str, seen))})")
        try:
            cfg = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--config: cannot read {p} ({e.strerror or e})") from e
        bases = cfg.pop("config", None) or []
        for key in [k for k in cfg if "." in k]:  # a dotted key sets one value (as on the command line)
            *head, last = key.split(".")
            node = cfg
            for part in head:
                node = node.setdefault(part, {})
            node[last] = cfg.pop(key)
        out: dict[str, Any] = {}
        for b in [bases] if isinstance(bases, str) else bases:
            out = merged(out, read((p.parent / b).resolve(), (*seen, p)))
        return merged(out, cfg)

    cfg = read(Path(path).resolve(), ())
    ev = cfg.pop("eval", None) or {}
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        if cb.get("class_path") == EVAL_CALLBACK:
            cb.setdefault("init_args", {}).update(ev)
    return cfg


def _get(cfg, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        try:
            cur = cur[part] if not hasattr(cur, part) else getattr(cur, part)
        except (KeyError, TypeError, AttributeError):
            return None
        if cur is None:
            return None
    return cur


def _substitute_root(node, root: str):
    """Replace "{root}" in every string of the config by trainer.default_root_dir (in place)."""
    from jsonargparse import Namespace

    if isinstance(node, Namespace):
        for key in list(vars(node)):
            setattr(node, key, _substitute_root(getattr(node, key), root))
    elif isinstance(node, dict):
        for key in list(node):
            node[key] = _substitute_root(node[key], root)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            node[i] = _substitute_root(item, root)
    elif isinstance(node, str) and "{root}" in node:
        return os.path.normpath(node.replace("{root}", root))
    return node


def _kind_of(class_path: str) -> str:
    """The ``kind`` a model class writes into its checkpoints (the class is imported, as LightningCLI does)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name).kind


def _aux_main(argv: list[str]) -> int:
    from idql_cm.data.collect import add_collect_parser, run_collect
    from idql_cm.eval.report import add_report_parser, run_report
    from idql_cm.export.cli import add_export_parser, run_export

    parser = argparse.ArgumentParser(prog="idql-cm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_collect_parser(sub)
    add_report_parser(sub)
    add_export_parser(sub)
    args = parser.parse_args(argv)
    handler = {"collect": run_collect, "report": run_report, "export": run_export}[args.command]
    result = handler(args)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    from idql_cm.eval.rendering import configure_rendering

    configure_rendering()  # once, before anything imports mujoco
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(_TOP_HELP, end="", file=sys.stdout if argv else sys.stderr)
            return 0 if argv else 2
        if argv[0] in AUX_COMMANDS:
            return _aux_main(argv)
        build_cli(None if from_shell else argv)  # None: LightningCLI reads sys.argv itself
        return 0
    except IDQLError as e:
        if _debug():
            raise
        print(f"idql-cm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("idql-cm: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse / jsonargparse: they already printed their message
        return int(e.code) if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - the CLI promises one line, not a traceback
        if _debug():
            raise
        cause = _user_cause(e)
        if cause is not None:
            print(f"idql-cm: error: {cause}", file=sys.stderr)
            return cause.exit_code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"idql-cm: error: {type(e).__name__}: {first} (set IDQL_CM_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


def _user_cause(e: BaseException) -> IDQLError | None:
    """An IDQLError wrapped by Lightning or jsonargparse (raised inside a hook or a class constructor)."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, IDQLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
