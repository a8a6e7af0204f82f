"""``RolloutEvaluation``: IDQL rollouts from inside ``trainer.fit`` / ``trainer.validate``.

Add it to a behaviour-policy run (EDM, CD or CT module, which exposes ``eval_actor()``)::

    trainer:
      callbacks:
        - class_path: idql_cm.eval.callback.RolloutEvaluation
          init_args: {critic_ckpt: runs/iql/last.ckpt, nfe: [1, 2, 4], episodes: 10, every_n_steps: 100000}

During ``fit`` it evaluates every ``every_n_steps`` optimiser steps and once at the end of training (never twice
for the same step); under ``validate`` (``idql-cm validate --ckpt_path ...``) it evaluates once, in
``on_validation_epoch_end``. Each evaluation runs ``episodes`` episodes per NFE with the current EMA policy, logs
``eval/nfe{k}/normalized_score`` (``_se``), ``eval/nfe{k}/return_mean`` and ``eval/nfe{k}/action_latency_ms``
to the trainer's loggers at the global step, and writes ``eval_report.json`` / ``eval_report.md`` into
``trainer.log_dir`` (rank 0). Under DDP the episodes are split across ranks (rank r runs a contiguous share, each
episode keeping its global seed ``seed + i``) and the per-episode results are gathered on every rank before
reporting, so a DDP evaluation equals a single-process one episode for episode (up to the policy's sampling noise).

Several seeds (``model.init_args.num_seeds: S``): every member is evaluated on the same episodes, member k with
critic member k of an S-member IQL checkpoint (or the one critic of a solo one). The report's ``results`` are then the
across-seed figures (the mean of the per-member means ± the SE across members, IDQL's protocol), and ``members`` holds
each member's own per-NFE results (mean ± SE over its episodes); ``eval/nfe{k}/normalized_score`` is the across-seed
mean and ``eval/nfe{k}/member_{j}/normalized_score`` member j's.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from idql_cm.checkpoint import DataFacts, check_fits_data, read_checkpoint, seeds_in
from idql_cm.data.scores import D4RL_ENV_VERSION
from idql_cm.errors import ConfigError
from idql_cm.eval.agent import SELECTIONS, IDQLAgent
from idql_cm.eval.rollout import VECTOR_MODES, Rollout, evaluate
from idql_cm.policies import critic_from_checkpoint
from idql_cm.seeding import recorded_seed


class EvalActor(Protocol):
    """What the callback reads of ``pl_module.eval_actor()`` (``idql_cm.policies.Actor``): sizes, the data it
    was trained on (``obs_mean`` may be None: nothing to compare), and ``sample``."""

    kind: str
    act_dim: int
    env_id: str | None
    task: str | None
    obs_mean: torch.Tensor | None

    @property
    def obs_dim(self) -> int: ...


class EvalCritic(Protocol):
    """What the callback reads of a loaded critic (``idql_cm.policies.Critic``) besides ``advantage``."""

    act_dim: int
    task: str | None
    obs_mean: torch.Tensor | None

    @property
    def obs_dim(self) -> int: ...


@rank_zero_only
def _warn_line(message: str) -> None:
    """One warning line in the run's log (Lightning's logger, shown whatever PYTHONWARNINGS says)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").warning(message)


def env_choice(name: str | None, env_id: str, version: str) -> str:
    """One sentence for the report: which environment a policy was evaluated in, and why."""
    import gymnasium

    if name in gymnasium.registry and not str(name).endswith(("-v2", "-v3")):
        return f"{env_id}: the environment the data names"
    why = ("the dynamics the D4RL -v2 data came from" if version == "v4" else
           "not the D4RL data's dynamics on Hopper / Walker2d (v5 changed a foot's friction and pays no healthy "
           "reward on a terminating step)")
    return f"{env_id}: D4RL task {name} mapped to the {version} environment, {why}; env_version selects v4 or v5"


def resolve_env_id(name: str | None, version: str = D4RL_ENV_VERSION) -> str | None:
    """A runnable gymnasium id for a task name, D4RL id, dataset path or gymnasium id; ``None`` if unknown.

    Known locomotion families (halfcheetah / hopper / walker2d) map to their gymnasium ``version`` (``"v4"``) unless
    ``name`` already is a runnable gymnasium id of that family (v2/v3 need mujoco_py and are mapped too); any other
    registered gymnasium id is used as it is.
    """
    if not name:
        return None
    import gymnasium

    from idql_cm.data.scores import gym_env_id, task_family

    registered = name in gymnasium.registry
    if not registered and task_family(name) is None and task_family(os.path.basename(name)) is not None:
        name = os.path.basename(name)  # a dataset file such as /data/hopper_medium-v2.hdf5
    if task_family(name) is not None:
        if registered and not name.endswith(("-v2", "-v3")):
            return name
        return gym_env_id(name, version=version)
    return name if registered else None


def _check_critic(path: str, critic: EvalCritic, obs_dim: int, act_dim: int, obs_mean, dataset: str | None) -> None:
    """Refuse an IQL critic trained on other data than the policy (other sizes, or another observation normaliser):
    its advantages would rank the candidates by another task's values. A CheckpointError names both sides."""
    trained = DataFacts(int(critic.obs_dim), int(critic.act_dim), critic.obs_mean,
                        dataset=critic.task)
    check_fits_data(trained, DataFacts(obs_dim, act_dim, obs_mean, dataset=dataset), "RolloutEvaluation.critic_ckpt",
                    path)


def _split(episodes: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous share of ``episodes`` for ``rank``: ``(count, first global episode index)``."""
    base, rem = divmod(episodes, world)
    return base + (1 if rank < rem else 0), rank * base + min(rank, rem)


class RolloutEvaluation(Callback):
    """Evaluate the IDQL agent (behaviour policy + IQL critic) by MuJoCo rollouts at several NFEs.

    Args:
        critic_ckpt: IQL checkpoint whose critic re-ranks the candidates; ``None`` evaluates the behaviour policy
            alone (behaviour cloning, one sample per state), which the report states (``"idql": false``).
        nfe: network evaluations per action to evaluate, each a separate set of episodes.
        episodes: episodes per NFE (split across DDP ranks).
        num_envs: parallel environments (per rank).
        num_candidates: candidates per state (IDQL's N; 256 in the reference).
        temperature: softmax temperature T of ``softmax(T · advantage)`` (task-specific in the reference:
            halfcheetah me 10 / m 400 / mr 100, see docs/design.md).
        selection: ``"softmax"`` (sample from softmax(T · adv), the reference's) or ``"argmax"`` (original IDQL).
        every_n_steps: evaluate every this many optimiser steps during fit; 0 = only at the end of training.
        env_id: gymnasium id to evaluate in; ``None`` derives it from the policy's ``env_id`` / ``task`` (e.g. a
            D4RL id ``halfcheetah-medium-v2`` → ``HalfCheetah-v5``). If it cannot be derived the evaluation is
            skipped with one log line.
        env_version: gymnasium version a D4RL task maps to: ``"v4"`` (default: the dynamics the D4RL data came from;
            Walker2d-v5 gives both feet friction 1.9 where v2-v4 have 0.9 on one, and v5 pays no healthy reward on a
            terminating step) or ``"v5"``. The report states the choice.
        vector_mode: ``"sync"`` (one process, fastest on few cores) or ``"async"`` (one process per env).
        max_episode_steps: episode time limit (1000 as in D4RL).
        record_video: record the first K episodes of each NFE (on rank 0) as MP4 into ``{log_dir}/videos`` (imageio-ffmpeg;
            headless rendering with ``MUJOCO_GL=egl``, about 10 frames/s on a CPU); 0 = off.
        seed: episode i of every NFE resets with seed + i (the same episodes for every NFE and checkpoint), and the
            policy's sampling generator is seeded with it.
        progress: a progress bar per NFE (rank 0).
        one_candidate: also evaluate with one sample per state and no critic at decision time (a critic-guided
            policy acting alone; ``model.q_weight``): a second report ``eval_report_n1``, metrics under ``eval_n1/``.
    """

    def __init__(self, critic_ckpt: str | None = None, nfe: list[int] = [1, 2, 4], episodes: int = 10,  # noqa: B006
                 num_envs: int = 10, num_candidates: int = 256, temperature: float = 100.0,
                 selection: str = "softmax", every_n_steps: int = 0, env_id: str | None = None,
                 env_version: str = D4RL_ENV_VERSION, vector_mode: str = "sync", max_episode_steps: int = 1000,
                 record_video: int = 0, seed: int = 0, progress: bool = True, one_candidate: bool = False) -> None:
        super().__init__()
        nfe = [int(k) for k in ([nfe] if isinstance(nfe, int) else nfe)]
        if not nfe or any(k < 1 for k in nfe):
            raise ConfigError(f"RolloutEvaluation.nfe: expected a non-empty list of integers >= 1, found {nfe}")
        for name, value, low in (("episodes", episodes, 1), ("num_envs", num_envs, 1),
                                 ("num_candidates", num_candidates, 1), ("every_n_steps", every_n_steps, 0),
                                 ("max_episode_steps", max_episode_steps, 1), ("record_video", record_video, 0)):
            if int(value) < low:
                raise ConfigError(f"RolloutEvaluation.{name}: expected an integer >= {low}, found {value}")
        if selection not in SELECTIONS:
            raise ConfigError(f"RolloutEvaluation.selection: expected one of {SELECTIONS}, found {selection!r}")
        if env_version not in ("v4", "v5"):
            raise ConfigError(f"RolloutEvaluation.env_version: expected 'v4' or 'v5', found {env_version!r}")
        if vector_mode not in VECTOR_MODES:
            raise ConfigError(f"RolloutEvaluation.vector_mode: expected one of {VECTOR_MODES}, found {vector_mode!r}")
        if float(temperature) < 0:
            raise ConfigError(f"RolloutEvaluation.temperature: expected a number >= 0, found {temperature}")
        self.critic_ckpt = critic_ckpt
        self.nfe = list(dict.fromkeys(nfe))
        self.episodes = int(episodes)
        self.num_envs = int(num_envs)
        self.num_candidates = int(num_candidates)
        self.temperature = float(temperature)
        self.selection = selection
        self.every_n_steps = int(every_n_steps)
        self.env_id = env_id
        self.env_version = env_version
        self.vector_mode = vector_mode
        self.max_episode_steps = int(max_episode_steps)
        self.record_video = int(record_video)
        self.seed = int(seed)
        self.progress = bool(progress)
        self.one_candidate = bool(one_candidate)

        self._critics: dict[tuple, Any] = {}  # (path, device, member) -> critic
        self._critic_count: tuple[str, int] | None = None  # (path, members it holds)
        self._skip_reason: str | None = None
        self._last_eval_step: int | None = None
        self._last_bucket = 0
        self._ckpt_step: int | None = None
        self._bc_announced = False
        self.last_report: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.env_id is not None and resolve_env_id(self.env_id, self.env_version) is None:
            raise ConfigError(f"RolloutEvaluation.env_id: {self.env_id!r} is neither a gymnasium environment id nor "
                              f"a known D4RL task (halfcheetah / hopper / walker2d)")

    def preflight(self, pl_module, datamodule) -> None:
        """Check ``critic_ckpt`` against the data (sizes and observation normaliser) before any work; the CLI calls
        this after instantiation, before ``fit`` / ``validate`` writes anything. Data that names no environment
        (and no ``env_id`` set here) skips evaluation, said in one warning line, before any critic is asked for."""
        if self.env_id is None and datamodule is not None and self._skip_reason is None:
            env_id, task = datamodule.env_id, datamodule.task
            if all(resolve_env_id(n, self.env_version) is None for n in (env_id, task)):
                self._skip_reason = (f"RolloutEvaluation: skipping rollouts: the data names no environment "
                                     f"(env_id={env_id!r}, task={task!r}); set RolloutEvaluation.env_id to evaluate")
                _warn_line(self._skip_reason)
                return
        if self.critic_ckpt is None:
            return
        path = str(self.critic_ckpt)
        if not os.path.isfile(path):
            raise ConfigError(f"RolloutEvaluation.critic_ckpt: no IQL checkpoint at {path} (train the IQL stage first: "
                              "idql-cm fit --config configs/<task>/iql.yaml, or set critic_ckpt: null to evaluate the "
                              "behaviour policy alone)")
        self._check_member_counts(int(getattr(pl_module, "num_seeds", 1)))
        members = int(getattr(pl_module, "num_seeds", 1))
        critic = (self._load_critic_from(path, "cpu") if members == 1 or self._critic_members() == 1
                  else self._load_critic_from(path, "cpu", 0))
        if datamodule is not None and hasattr(datamodule, "normalizer"):
            norm = datamodule.normalizer
            _check_critic(path, critic, int(datamodule.obs_dim), int(datamodule.act_dim), torch.as_tensor(norm.mean),
                          str(getattr(datamodule, "dataset", None)))

    def on_fit_start(self, trainer, pl_module) -> None:
        # Fail (or announce the skip) now rather than after hours of training.
        members = int(getattr(pl_module, "num_seeds", 1))
        actor = self._actor(pl_module, 0 if members > 1 else None)
        if self._env_for(actor) is not None:
            self._check_member_counts(members)
            critic = self._get_critic(pl_module.device, 0 if members > 1 else None)
            self._check_pair(actor, critic)
            IDQLAgent(actor, critic, self.num_candidates, self.temperature, self.selection)  # size check

    def _check_pair(self, actor: EvalActor, critic: EvalCritic | None) -> None:
        """The critic must come from the actor's dataset: same sizes and observation normaliser."""
        if critic is None:
            return
        _check_critic(str(self.critic_ckpt), critic, int(actor.obs_dim), int(actor.act_dim),
                      actor.obs_mean, actor.task)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._ckpt_step = checkpoint.get("global_step")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0:  # resuming at step s: the next evaluation is at the next multiple, not at once
            self._last_bucket = int(trainer.global_step) // self.every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps <= 0:
            return
        step = int(trainer.global_step)
        bucket = step // self.every_n_steps  # robust to optimisers that advance global_step by more than 1
        if step > 0 and bucket > self._last_bucket:
            self._last_bucket = bucket
            self.run_evaluation(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if self._last_eval_step != step:
            self.run_evaluation(trainer, pl_module, step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(trainer.state.fn, "value", trainer.state.fn) != "validate" or trainer.sanity_checking:
            return
        step = self._ckpt_step if self._ckpt_step is not None else int(trainer.global_step)
        self.run_evaluation(trainer, pl_module, int(step))

    # -------------------------------------------------------------------------------------------- pieces
    @staticmethod
    def _actor(pl_module, member: int | None = None):
        if not callable(getattr(pl_module, "eval_actor", None)):
            raise ConfigError(f"RolloutEvaluation needs a behaviour-policy module with eval_actor() (EDM, CD or CT), "
                              f"found {type(pl_module).__name__}")
        return pl_module.eval_actor() if member is None else pl_module.eval_actor(member=member)

    def _env_for(self, actor: EvalActor) -> tuple[str, str] | None:
        """``(gymnasium id, why that one)`` to evaluate in, or None after announcing (once) why evaluation is
        skipped."""
        if self._skip_reason is not None:
            return None
        if self.env_id is not None:
            resolved = resolve_env_id(self.env_id, self.env_version)
            return resolved, env_choice(self.env_id, resolved, self.env_version)
        env_id, task = actor.env_id, actor.task
        for name in (env_id, task):
            resolved = resolve_env_id(name, self.env_version)
            if resolved is not None:
                return resolved, env_choice(name, resolved, self.env_version)
        self._skip_reason = (f"RolloutEvaluation: skipping rollouts: no environment for this policy (env_id="
                             f"{env_id!r}, task={task!r} is not a known D4RL task or gymnasium id); set "
                             f"RolloutEvaluation.env_id to evaluate")
        rank_zero_info(self._skip_reason)
        return None

    @staticmethod
    def _load_critic_from(path: str, device, member: int | None = None):
        return critic_from_checkpoint(path, device=device, what="RolloutEvaluation.critic_ckpt", member=member)

    def _critic_members(self) -> int:
        """How many members (num_seeds) ``critic_ckpt`` holds (read once per path)."""
        path = str(self.critic_ckpt)
        if self._critic_count is None or self._critic_count[0] != path:
            payload = read_checkpoint(path, expect_kind="iql", what="RolloutEvaluation.critic_ckpt")["idql_cm"]
            self._critic_count = (path, seeds_in(payload))
        return self._critic_count[1]

    def _check_member_counts(self, members: int) -> None:
        """An S-member critic pairs critic k with actor k: it needs an actor of S members (a solo critic serves any)."""
        if self.critic_ckpt is None or members == 1:  # a solo policy: critic_from_checkpoint refuses an S-member critic itself
            return
        ckpt_seeds = self._critic_members()
        if ckpt_seeds > 1 and ckpt_seeds != members:
            raise ConfigError(f"RolloutEvaluation.critic_ckpt: {self.critic_ckpt} holds {ckpt_seeds} IQL members (num_seeds: "
                              f"{ckpt_seeds}), the policy has {members}; critic k pairs with actor k, so train both with the "
                              f"same model.init_args.num_seeds (or use a solo critic)")

    def _get_critic(self, device, member: int | None = None):
        """The critic for actor member ``member`` (None: a solo actor): critic member k of an S-member critic."""
        if self.critic_ckpt is None:
            return None
        which = member if member is not None and self._critic_members() > 1 else None
        key = (str(self.critic_ckpt), str(device), which)
        if key not in self._critics:
            self._critics = {k: v for k, v in self._critics.items() if k[:2] == key[:2]}  # one path and device
            path = str(self.critic_ckpt)
            self._critics[key] = (self._load_critic_from(path, device) if which is None
                                  else self._load_critic_from(path, device, which))
        return self._critics[key]

    @staticmethod
    def _gather(trainer, roll: Rollout) -> Rollout:
        """All ranks' per-episode results, in rank order (= global episode order), gathered by torchmetrics'
        CatMetric (its sync concatenates the ranks' states in rank order, uneven lengths and empty ranks included).
        The values travel as float64 (exact for the Python floats and ints); the scalar reductions are done here, in
        rank order, as before. Videos are recorded on rank 0 only and stay there."""
        from torchmetrics.aggregation import CatMetric

        device = trainer.strategy.root_device
        per_rank = ("seconds", "policy_calls", "latency_sum", "env_steps", "num_envs", "seed")
        local = {"returns": [float(x) for x in roll.returns], "lengths": [float(x) for x in roll.lengths],
                 "unstable": [float(x) for x in roll.unstable],
                 "scalars": [float(roll.seconds), float(roll.policy_calls),
                             float(roll.action_latency_ms) * roll.policy_calls if roll.policy_calls else 0.0,
                             float(roll.env_steps), float(roll.num_envs),
                             float("nan") if roll.seed is None else float(roll.seed)]}
        gathered: dict[str, list[float]] = {}
        for key, values in local.items():  # the same order on every rank: each compute() is one collective
            metric = CatMetric(nan_strategy="disable").to(device).set_dtype(torch.float64)  # .to() after would reset dtype
            metric.update(torch.tensor(values, dtype=torch.float64, device=device))
            value = metric.compute()
            gathered[key] = value.reshape(-1).cpu().tolist() if isinstance(value, torch.Tensor) else []  # 1 value: 0-d
        rows = [dict(zip(per_rank, gathered["scalars"][i:i + len(per_rank)], strict=True))
                for i in range(0, len(gathered["scalars"]), len(per_rank))]
        seconds = max(p["seconds"] for p in rows)
        calls = sum(int(p["policy_calls"]) for p in rows)
        env_steps = sum(int(p["env_steps"]) for p in rows)
        unstable = [bool(x) for x in gathered["unstable"]]
        first_seed = rows[0]["seed"]
        return Rollout(env_id=roll.env_id, nfe=roll.nfe, episodes=len(gathered["returns"]),
                       num_envs=sum(int(p["num_envs"]) for p in rows),
                       seed=None if math.isnan(first_seed) else int(first_seed),
                       returns=gathered["returns"], lengths=[int(x) for x in gathered["lengths"]], unstable=unstable,
                       unstable_episodes=sum(unstable), seconds=seconds,
                       action_latency_ms=sum(p["latency_sum"] for p in rows) / calls if calls else float("nan"),
                       policy_calls=calls, env_steps=env_steps,
                       env_steps_per_second=env_steps / seconds if seconds > 0 else float("nan"),
                       videos=list(roll.videos))

    def _log_video(self, trainer, path: str, tag: str, step: int) -> None:
        rank_zero_info(f"RolloutEvaluation: video {path}")
        exp = getattr(trainer.logger, "experiment", None) if trainer.logger is not None else None
        if exp is None or not hasattr(exp, "add_text"):
            return
        try:
            if importlib.util.find_spec("moviepy") is not None and hasattr(exp, "add_video"):
                import imageio.v2 as imageio
                import numpy as np

                frames = np.stack(imageio.mimread(path, memtest=False))  # [T, H, W, C]
                vid = torch.from_numpy(frames).permute(0, 3, 1, 2).unsqueeze(0)  # [1, T, C, H, W]
                exp.add_video(tag, vid, global_step=step, fps=20)
            else:  # TensorBoard's add_video needs moviepy: log where the MP4 is instead
                exp.add_text(tag, f"`{path}`", global_step=step)
        except Exception as e:  # noqa: BLE001 - optional: never break training for a video
            rank_zero_warn(f"RolloutEvaluation: could not log {path} to TensorBoard ({type(e).__name__}: {e})")

    # ------------------------------------------------------------------------------------------ evaluation
    def _rollouts(self, trainer, agent: IDQLAgent, env_id: str, step: int, task: str | None, video_dir: str,
                  video_tag: str, what: str) -> list[dict[str, Any]]:
        """Every NFE's episodes for one agent (this rank's share), gathered; the per-NFE results on rank 0."""
        from idql_cm.eval.report import nfe_result

        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        n_local, first = _split(self.episodes, world, rank)
        results = []
        for k in self.nfe:
            if n_local > 0:
                roll = evaluate(agent, env_id, episodes=n_local, num_envs=min(self.num_envs, n_local), nfe=k,
                                seed=self.seed + first, vector_mode=self.vector_mode,
                                max_episode_steps=self.max_episode_steps, progress=self.progress and rank == 0,
                                record_episodes=min(self.record_video, n_local) if rank == 0 else 0,
                                video_dir=video_dir, video_prefix=f"step{step}{video_tag}_nfe{k}",
                                desc=f"eval step {step}{what} NFE {k}")
            else:  # more ranks than episodes
                roll = Rollout(env_id=env_id, nfe=k)
            gathered = self._gather(trainer, roll)
            if rank == 0:
                results.append(nfe_result(gathered, task))
        return results

    @staticmethod
    def _line(step: int, what: str, r: dict[str, Any]) -> str:
        score = r.get("normalized_score_mean")
        return (f"RolloutEvaluation step {step}{what} NFE {r['nfe']}: "
                + (f"normalised score {score:.1f} ± {r['normalized_score_se'] or 0:.1f}, " if score is not None else "")
                + (f"return {r['return_mean']:.1f}" if r["return_mean"] is not None else "no stable episode")
                + f" ({r['episodes']} episodes, {r['unstable_episodes']} unstable, {r['seconds']:.1f} s, "
                  f"{r['action_latency_ms']:.2f} ms/action)")

    @staticmethod
    def _metrics(results: list[dict[str, Any]], prefix: str = "", root: str = "eval") -> dict[str, float]:
        metrics: dict[str, float] = {}
        for r in results:
            k = r["nfe"]
            for name, key in (("normalized_score", "normalized_score_mean"), ("normalized_score_se", "normalized_score_se"),
                              ("return_mean", "return_mean"), ("action_latency_ms", "action_latency_ms")):
                if r.get(key) is not None:
                    metrics[f"{root}/nfe{k}/{prefix}{name}"] = float(r[key])
            if r["unstable_episodes"]:
                metrics[f"{root}/nfe{k}/{prefix}unstable_episodes"] = float(r["unstable_episodes"])
        return metrics

    def run_evaluation(self, trainer, pl_module, step: int) -> dict[str, Any] | None:
        """Evaluate every NFE (and every member of an S-member module) at ``step``; returns the report on rank 0
        (None elsewhere or when skipped)."""
        self._last_eval_step = int(step)
        S = int(getattr(pl_module, "num_seeds", 1))
        actors = [self._actor(pl_module)] if S == 1 else [self._actor(pl_module, k) for k in range(S)]
        actor = actors[0]
        env = self._env_for(actor)
        if env is None:
            return None
        env_id, env_note = env
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: call it on every rank
        log_dir = str(log_dir or trainer.default_root_dir)
        task = actor.task or actor.env_id or self.env_id
        if self.critic_ckpt is None and not self._bc_announced:
            self._bc_announced = True
            rank_zero_info("RolloutEvaluation: no critic_ckpt: evaluating the behaviour policy alone "
                           "(behaviour cloning, one sample per state)")
        seeds = [pl_module.member_seed(k) for k in range(S)] if S > 1 else []

        report = self._evaluation_pass(trainer, pl_module, actors, env_id, env_note, step, task, log_dir, seeds,
                                       with_critic=True)
        if self.one_candidate and self.critic_ckpt is not None:
            # the policy's own decision: one sample per state, no critic at decision time (a guided policy's use)
            self._evaluation_pass(trainer, pl_module, actors, env_id, env_note, step, task, log_dir, seeds,
                                  with_critic=False)
        if report is not None:
            self.last_report = report
        return report

    def _evaluation_pass(self, trainer, pl_module, actors, env_id: str, env_note, step: int, task, log_dir: str,
                         seeds: list[int], with_critic: bool) -> dict[str, Any] | None:
        """Every member's rollouts at every NFE, with the critic re-ranking ``num_candidates`` (``with_critic``) or
        with one candidate and no critic; logs, prints and writes the report (``eval_report`` / ``eval_report_n1``,
        metrics under ``eval/`` / ``eval_n1/``). The report on rank 0, None elsewhere."""
        from idql_cm.eval.report import build_report, merge_seeds, write_report

        S = len(actors)
        actor = actors[0]
        device = pl_module.device
        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        video_dir = os.path.join(log_dir, "videos")
        tag, root, name = ("", "eval", "eval_report") if with_critic else (" (one candidate, no critic)", "eval_n1",
                                                                            "eval_report_n1")
        per_member: list[list[dict[str, Any]]] = []
        was_training = pl_module.training
        pl_module.eval()
        fork_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            for k, member_actor in enumerate(actors):
                critic = self._get_critic(device, k if S > 1 else None) if with_critic else None
                self._check_pair(member_actor, critic)
                agent = IDQLAgent(member_actor, critic, self.num_candidates, self.temperature, self.selection)
                what = (f" member {k} (seed {seeds[k]})" if S > 1 else "") + tag
                # every member sees the same episodes and, from the same state, the same sampling seeds
                with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
                    per_member.append(self._rollouts(trainer, agent, env_id, step, task, video_dir,
                                                     (f"_member{k}" if S > 1 else "") + ("" if with_critic else "_n1"), what))
        finally:
            pl_module.train(was_training)
        if rank != 0:
            return None

        common = dict(
            task=task, env_id=env_id, backbone=actor.kind, step=int(step),
            critic=str(self.critic_ckpt) if self.critic_ckpt is not None and with_critic else None, selection=self.selection,
            temperature=self.temperature, num_candidates=self.num_candidates,
            env_choice=env_note, mode=str(getattr(trainer.state.fn, "value", trainer.state.fn)),
            checkpoint=str(trainer.ckpt_path) if getattr(trainer, "ckpt_path", None) else None,
            episodes=self.episodes, num_envs=self.num_envs, seed=self.seed, vector_mode=self.vector_mode,
            max_episode_steps=self.max_episode_steps, world_size=world,
            q_weight=float(getattr(actor, "q_weight", 0.0)), noise_scale=float(getattr(actor, "noise_scale", 1.0)),
            advantage_beta=float(getattr(actor, "advantage_beta", 0.0)))
        base_seed = recorded_seed()
        lines: list[str] = []
        if S == 1:
            results = per_member[0]
            report = build_report(results, **common, train_seed=base_seed)
            metrics = self._metrics(results, root=root)
            lines = [self._line(step, tag, r) for r in results]
        else:
            solo = [build_report(res, **common, train_seed=seeds[k]) for k, res in enumerate(per_member)]
            # the across-seed rows exactly as `idql-cm report` merges solo seeds (one code path, one definition)
            results = merge_seeds([[r] for r in solo])[0]["results"]
            report = build_report(results, **common, seeds=S, seed_everything=base_seed, train_seeds=seeds,
                                  members=[{"member": k, "train_seed": seeds[k], "results": res}
                                           for k, res in enumerate(per_member)])
            metrics = self._metrics(results, root=root)
            for k, res in enumerate(per_member):
                metrics.update(self._metrics(res, f"member_{k}/", root=root))
                lines += [self._line(step, f" member {k} (seed {seeds[k]}){tag}", r) for r in res]
            for r in results:
                score = r.get("normalized_score_mean")
                lines.append(f"RolloutEvaluation step {step} NFE {r['nfe']} over {S} seeds{tag}: "
                             + (f"normalised score {score:.1f} ± {r['normalized_score_se'] or 0:.1f} (mean of the "
                                f"members' means ± SE across members)" if score is not None else
                                f"return {r['return_mean']}"))
        for line in lines:
            rank_zero_info(line)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(step))
            logger.save()
        for res in per_member:
            for r in res:
                for i, path in enumerate(r.get("videos", [])):
                    self._log_video(trainer, path, f"{root}/nfe{r['nfe']}/video{i}", int(step))
        jpath, _ = write_report(report, log_dir, name)
        rank_zero_info(f"RolloutEvaluation: wrote {jpath}")
        return report
