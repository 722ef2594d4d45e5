"""The one training entry point: ``train(config) -> run_dir`` and ``resume(run_dir)``.

Used by ``scripts/train_agent.py`` and by the benchmark harness. A run directory
``runs/<env>__<agent>__<seed>__<time>/`` holds::

    config.yaml              the resolved config (load_config(run_dir / "config.yaml") rebuilds it)
    tb/                      tensorboard events (one curve, continued by every resume)
    checkpoints/             step_<timesteps>.safetensors + .json (timesteps, RNG states), atomic
    best_model.safetensors   the model with the best evaluation mean reward so far
    final_model.safetensors  the model when training reached train.total_timesteps
    videos/                  evaluation videos (train.video=true)

Every model file is a :mod:`agents.experiment.model_files` file: weights and optimizer state as
safetensors, everything else as JSON/YAML, the run's config included; loading one never
unpickles anything. Runs saved by older versions as stable-baselines3 zips are converted once
with ``scripts/convert_run.py RUN --trust-pickle``.

Everything that can be checked is checked before the run directory is created: the config,
the env id, building the envs and the agent. A run stopped by SIGINT/SIGTERM saves a
checkpoint and raises :class:`TrainingInterrupted`; a non-finite loss or parameter raises
:class:`agents.experiment.callbacks.NonFiniteTrainingError` and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from omegaconf import OmegaConf
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import HParam, configure
from stable_baselines3.common.vec_env import VecEnv

import envs
from agents.baselines import FoldObservationStatistics, normalizing_extractors
from agents.constants import PPO_SCHEDULE_DEFAULTS
from agents.experiment.callbacks import (
    EvalVideo,
    NonFiniteGuard,
    PeriodicCheckpoint,
    PeriodicEval,
    ProgressCallback,
    SaveBestModel,
    StopOnSignal,
    best_model_reward,
    tensorboard_writer,
    with_sigint_ignored,
)
from agents.experiment.config import (
    ConfigError,
    ExperimentConfig,
    config_from_yaml_text,
    config_to_yaml,
    load_config,
    save_config,
    sections_ignored_by,
    validate_config,
)
from agents.experiment.hints import script_command, shell_path
from agents.experiment.io import (
    RUN_LOCK_NAME,
    CheckpointInfo,
    DiskFullError,
    atomic_save_model,
    disk_full_message,
    is_disk_full,
    latest_checkpoint,
    latest_good_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
    run_lock,
)
from agents.experiment.model_files import (
    MODEL_SUFFIX,
    PickledModelError,
    apply_model_file,
    attach_config,
    load_pickled_model,
    pickled_model_message,
    read_model_file,
)
from agents.registry import AGENT_SPECS, spec
from agents.runtime import tune_allocator
from agents.schedules import EntropySchedule

__all__ = [
    "EVAL_SEED_OFFSET",
    "LoadedModel",
    "FIXED_ON_RESUME_KEYS",
    "RESUMABLE_SECTIONS",
    "ExtraCallbacks",
    "RunCallbacks",
    "ResumePlan",
    "RunPaths",
    "TrainingInterrupted",
    "agent_class",
    "build_agent",
    "load_model",
    "make_eval_env",
    "make_run_dir",
    "plan_resume",
    "append_history",
    "refuse_pickled_run",
    "resume",
    "resumed_config",
    "train",
]

EVAL_SEED_OFFSET = 1_000_000
"""Eval env ``i`` gets seed ``train.seed + EVAL_SEED_OFFSET + i``: layouts unseen in training."""
RESUMABLE_SECTIONS = ("ppo", "thalamus_ppo", "train")
"""Config sections that ``resume`` may override; the others fix the env and the network."""
SECTIONS_ADDED_LATER = ("baseline", "exploration")
"""Config sections newer than some runs' ``config.yaml``: a run's file without one trained with
its schema defaults (which keep the old behaviour), so it is read with them."""
FIXED_ON_RESUME_KEYS = (
    "train.seed",
    "train.runs_dir",
    "thalamus_ppo.aux_past_view_coef",
    "thalamus_ppo.aux_past_view_lags",
)
"""Keys in :data:`RESUMABLE_SECTIONS` that ``resume`` still refuses: the run's envs are seeded
from ``train.seed`` (the eval envs too), its directory is already chosen, and the past-view
loss's coefficient and lags decide whether the policy has the past-view head and its shape."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint.

    :ivar run_dir: the run directory (pass it to ``resume``).
    :ivar signum: the signal received.
    :ivar checkpoint: the checkpoint saved on the way out.
    """

    def __init__(self, run_dir: Path, signum: int, checkpoint: CheckpointInfo | None) -> None:
        name = signal.Signals(signum).name
        where = f" at step {checkpoint.timesteps:,}" if checkpoint is not None else ""
        super().__init__(
            f"{name} received: stopped{where} and saved a checkpoint in "
            f"{shell_path(run_dir / 'checkpoints')}. Continue with: "
            + script_command("train_agent.py", "--resume", run_dir)
        )
        self.run_dir = run_dir
        self.signum = signum
        self.checkpoint = checkpoint


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_model(self) -> Path:
        return self.root / f"best_model{MODEL_SUFFIX}"

    @property
    def final_model(self) -> Path:
        return self.root / f"final_model{MODEL_SUFFIX}"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / RUN_LOCK_NAME


class RunCallbacks(NamedTuple):
    """The run's own callbacks, handed to an :data:`ExtraCallbacks` factory.

    :ivar evaluation: the periodic evaluation (None when ``train.eval_freq`` is 0).
    :ivar checkpoint: the periodic checkpoint (``last_saved`` is the newest checkpoint).
    """

    evaluation: PeriodicEval | None
    checkpoint: PeriodicCheckpoint


ExtraCallbacks = Callable[[RunCallbacks], Sequence[BaseCallback]]
"""Builds more callbacks for a run from its own ones (e.g. the benchmark's eval recorder).

They run after the checkpoint and evaluation callbacks at every step, rollout start and
training end, so they see an evaluation or a checkpoint in the same step it happened.
"""


def agent_class(kind: str) -> type[BaseAlgorithm]:
    """The algorithm class of ``agent.kind`` (what ``load`` must be called on)."""
    if kind not in AGENT_SPECS:
        raise ConfigError(
            f"agent.kind = {kind!r} is not a valid choice; choose one of: {', '.join(AGENT_SPECS)}"
        )
    return AGENT_SPECS[kind].algorithm_class()


def make_run_dir(config: ExperimentConfig, now: _dt.datetime | None = None) -> Path:
    """Create ``<runs_dir>/<env>__<agent>__<seed>__<YYYYmmdd-HHMMSS>/`` (suffixed if taken)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    env_name = re.sub(r"[^A-Za-z0-9._-]", "_", config.env.id)
    base = (
        Path(config.train.runs_dir)
        / f"{env_name}__{config.agent.kind}__{config.train.seed}__{stamp}"
    )
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}_{n}")


def _hyperparameters(config: ExperimentConfig) -> dict[str, Any]:
    """Algorithm arguments of ``agents.make_agent`` / ``load``: the shared ``ppo`` section,
    the kind's own ``algorithm_sections`` (``thalamus_ppo`` for the thalamus agent) and, with
    ``exploration.mixing = value_head``, the intrinsic value head's settings. The ``ppo``
    keys the training loop applies itself (:data:`PPO_SCHEDULE_DEFAULTS`: the entropy
    schedule, :func:`_callbacks`) are left out."""
    hyperparams = {
        key: value
        for key, value in dataclasses.asdict(config.ppo).items()
        if key not in PPO_SCHEDULE_DEFAULTS
    }
    for section in spec(config.agent.kind).algorithm_sections:
        hyperparams.update(dataclasses.asdict(getattr(config, section)))
    exploration = config.exploration
    if exploration.mixing == "value_head":  # reward mixing: the algorithms as they always were
        hyperparams.update(
            intrinsic_value_head=True,
            intrinsic_gamma=exploration.intrinsic_gamma,
            intrinsic_adv_coef=exploration.intrinsic_adv_coef,
        )
    return hyperparams


def build_agent(config: ExperimentConfig, env: VecEnv) -> BaseAlgorithm:
    """The untrained agent ``config`` describes, on ``env`` (``agents.make_agent``).

    :raises ConfigError: the agent rejected its settings.
    """
    from agents import make_agent

    try:
        model = make_agent(
            config.agent.kind,
            env,
            seed=config.train.seed,
            device=config.train.device,
            policy_kwargs=spec(config.agent.kind).policy_kwargs_from_config(config),
            **_hyperparameters(config),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"agent settings rejected: {exc}") from None
    attach_config(model, config)  # every model file it writes carries its config
    return model


def _configure_process(config: ExperimentConfig) -> None:
    """Torch threads as configured, and an allocator that keeps freed activations."""
    tune_allocator()
    if config.train.torch_threads is not None:
        import torch

        torch.set_num_threads(config.train.torch_threads)


def _build_vec_env(config: ExperimentConfig, n_envs: int, seed: int) -> VecEnv:
    """``config``'s env as a vec env, built with SIGINT ignored in workers."""
    try:
        return with_sigint_ignored(
            lambda: envs.make_vec_env(
                config.env.id,
                n_envs=n_envs,
                seed=seed,
                vec_env=config.env.vec_env,  # type: ignore[arg-type]
                trial_episodes=config.env.trial_episodes,
                **config.env.env_kwargs,
            )
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"env settings (env.*) rejected: {exc}") from None


def make_eval_env(config: ExperimentConfig) -> VecEnv:
    """The eval envs of a run of ``config``: ``train.eval_n_envs`` envs seeded from
    ``train.seed + EVAL_SEED_OFFSET``. A second one plays the same episodes as the run's own
    (the benchmark evaluates its other action mode on one)."""
    return _build_vec_env(config, config.train.eval_n_envs, config.train.seed + EVAL_SEED_OFFSET)


def _make_envs(config: ExperimentConfig) -> tuple[VecEnv, VecEnv | None]:
    """Training envs, with ``exploration``'s intrinsic reward, and (if evaluating) eval envs,
    which never get it."""
    train_env = _build_vec_env(config, config.env.n_envs, config.train.seed)
    if config.exploration.kind != "none":
        from agents.exploration import wrap_exploration

        exploration = config.exploration
        train_env = wrap_exploration(
            train_env,
            exploration.kind,
            exploration.coef,
            add_to_reward=exploration.mixing == "reward",
        )
    if config.train.eval_freq == 0:
        return train_env, None
    try:
        return train_env, make_eval_env(config)
    except BaseException:
        train_env.close()
        raise


def _close_envs(train_env: VecEnv, eval_env: VecEnv | None) -> None:
    """Close what :func:`_make_envs` made (subprocess workers included)."""
    train_env.close()
    if eval_env is not None:
        eval_env.close()


def _configure_logger(model: BaseAlgorithm, paths: RunPaths) -> None:
    """Log to ``tb/`` only (progress goes through ProgressCallback), the same folder on resume."""
    model.set_logger(configure(str(paths.tensorboard), ["tensorboard"]))


def _log_config(model: BaseAlgorithm, config: ExperimentConfig) -> None:
    """The resolved config as text, and the flat hyperparameters for tensorboard's HPARAMS tab."""
    writer = tensorboard_writer(model)
    if writer is None:
        return
    text = "\n".join("    " + line for line in config_to_yaml(config).splitlines())
    writer.add_text("config", text, 0)
    flat = OmegaConf.to_container(OmegaConf.structured(config))
    hparams: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, bool | int | float | str) or node is None:
            hparams[prefix[:-1]] = node
        else:
            hparams[prefix[:-1]] = str(node)

    walk(flat, "")
    model.logger.record(
        "hparams",
        HParam(hparams, {"eval/mean_reward": 0.0, "rollout/ep_rew_mean": 0.0}),
        exclude=("stdout", "log", "json", "csv"),
    )
    model.logger.dump(0)


def _mark_restart(model: BaseAlgorithm, timesteps: int) -> None:
    """Write a tensorboard ``SessionLog.START`` just after the checkpoint's step.

    Everything logged at or before a checkpoint's step precedes it (it is taken right after
    an update, see PeriodicCheckpoint); TensorBoard drops the events after that step that an
    interrupted session logged past its last checkpoint, so a resumed run shows one curve
    with one value per step.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer = tensorboard_writer(model)
    if writer is not None:
        event = Event(step=timesteps + 1, wall_time=time.time())
        event.session_log.status = SessionLog.START
        writer._get_file_writer().add_event(event)
        writer.flush()


def _pending_log(model: BaseAlgorithm) -> dict[str, Any]:
    """Logged values not yet written to tensorboard (the ``train/*`` values of the update just
    before a checkpoint, written at the next rollout's end): the checkpoint keeps them so a
    resume writes them at the step an uninterrupted run would."""
    values, excluded = {}, {}
    for key, value in model.logger.name_to_value.items():
        if isinstance(value, bool | int | float | np.floating | np.integer):
            values[key] = float(value)
            skip = model.logger.name_to_excluded.get(key)
            if skip:
                excluded[key] = [skip] if isinstance(skip, str) else list(skip)
    return {"values": values, "excluded": excluded}


def _restore_pending_log(model: BaseAlgorithm, pending: dict[str, Any]) -> None:
    """Record :func:`_pending_log`'s values again (they are written at the first dump)."""
    excluded = pending.get("excluded", {})
    for key, value in pending.get("values", {}).items():
        skip = excluded.get(key)
        model.logger.record(key, value, exclude=tuple(skip) if skip else None)


def _callbacks(
    config: ExperimentConfig,
    paths: RunPaths,
    eval_env: VecEnv | None,
    model: BaseAlgorithm,
    total_timesteps: int,
) -> tuple[
    list[BaseCallback], NonFiniteGuard, StopOnSignal, PeriodicCheckpoint, PeriodicEval | None
]:
    evaluation = None
    if eval_env is not None:
        after_eval = None
        if config.train.video:
            after_eval = EvalVideo(
                make_env=lambda seed: envs.make_env(
                    config.env.id,
                    seed=seed,
                    render_mode="rgb_array",
                    trial_episodes=config.env.trial_episodes,
                    **config.env.env_kwargs,
                ),
                video_dir=paths.videos,
                seed=config.train.seed + EVAL_SEED_OFFSET,
                fps=config.train.video_fps,
                deterministic=config.train.eval_deterministic,
            )
        evaluation = PeriodicEval(
            type(model)._wrap_env(eval_env, verbose=0, monitor_wrapper=False),
            eval_freq=config.train.eval_freq,
            n_eval_episodes=config.train.eval_episodes,
            deterministic=config.train.eval_deterministic,
            callback_on_new_best=SaveBestModel(paths.best_model),
            callback_after_eval=after_eval,
        )

    def extra_state() -> dict[str, Any]:
        state: dict[str, Any] = {"pending_log": _pending_log(model)}
        if evaluation is not None:
            state["eval"] = evaluation.state()
        return state

    checkpoint = PeriodicCheckpoint(
        paths.checkpoints,
        save_freq=config.train.checkpoint_freq,
        keep=config.train.keep_checkpoints,
        extra_state=extra_state,
    )

    def hint() -> str:
        last = latest_checkpoint(paths.checkpoints)
        if last is None:
            return (
                "No checkpoint was saved before it; lower ppo.learning_rate or ppo.max_grad_norm."
            )
        return (
            f"The last good checkpoint is {last.model_path} (step {last.timesteps:,}); resume "
            "from it with: "
            + script_command("train_agent.py", "--resume", paths.root)
            + " ppo.learning_rate=<lower>"
        )

    # An update can take minutes: a signal also asks the algorithm to stop it (ThalamusPPO
    # undoes it after the current minibatch; the baselines finish it).
    request_stop = getattr(model, "request_stop", None)
    guard = NonFiniteGuard(hint)
    stop = StopOnSignal(on_signal=(lambda _: request_stop()) if request_stop else None)
    callbacks: list[BaseCallback] = [guard, stop, checkpoint]
    if normalizing_extractors(model.policy):
        # Before the checkpoint: both act at a rollout start, and the checkpoint must hold the
        # statistics the coming rollout uses.
        callbacks.insert(0, FoldObservationStatistics())
    if config.exploration.kind != "none":
        from agents.exploration import ExplorationLogger

        callbacks.append(
            ExplorationLogger(
                coef=config.exploration.coef, decay_steps=config.exploration.decay_steps
            )
        )
    if config.ppo.ent_decay_steps > 0:
        callbacks.append(EntropySchedule(config.ppo.ent_coef, config.ppo.ent_decay_steps))
    if evaluation is not None:
        callbacks.append(evaluation)
    callbacks.append(
        ProgressCallback(
            total_timesteps,
            mode=config.train.progress,
            log_every_s=config.train.log_every_s,
            evaluation=evaluation,
        )
    )
    return callbacks, guard, stop, checkpoint, evaluation


def _learn(
    model: BaseAlgorithm,
    config: ExperimentConfig,
    paths: RunPaths,
    eval_env: VecEnv | None,
    resumed: CheckpointInfo | None,
    extra_callbacks: ExtraCallbacks | None = None,
) -> Path:
    total = config.train.total_timesteps
    callbacks, guard, stop, checkpoint, evaluation = _callbacks(
        config, paths, eval_env, model, total
    )
    if extra_callbacks is not None:
        # Before the progress callback (the last one), after everything else.
        callbacks[-1:-1] = list(extra_callbacks(RunCallbacks(evaluation, checkpoint)))
    if resumed is not None:
        extra = resumed.load_meta().get("extra", {})
        _restore_pending_log(model, extra.get("pending_log", {}))
        if evaluation is not None:
            evaluation.load_state(
                extra.get("eval", {}), best_on_disk=best_model_reward(paths.best_model)
            )
    try:
        try:
            with guard.watching():
                model.learn(
                    total_timesteps=total - model.num_timesteps,
                    callback=CallbackList(callbacks),
                    reset_num_timesteps=resumed is None,
                    tb_log_name="",
                )
        finally:
            model.logger.close()
            model.get_env().close()
            if eval_env is not None:
                eval_env.close()
        # A signal during the last update still lets the run finish: the budget is trained.
        if stop.received is not None and model.num_timesteps < total:
            raise TrainingInterrupted(paths.root, stop.received, checkpoint.last_saved)
        atomic_save_model(model, paths.final_model)  # a signal now waits for the save
        if stop.received is not None:
            print(
                f"note: {signal.Signals(stop.received).name} received after the last update: "
                f"the saves finished and the run is complete ({paths.final_model})",
                file=sys.stderr,
                flush=True,
            )
    finally:
        stop.restore()  # kept through on_training_end and the final save, which it protects
    return paths.root


def train(
    config: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    extra_callbacks: ExtraCallbacks | None = None,
) -> Path:
    """Train an agent as ``config`` says; return its run directory.

    :param config: a validated config (``load_config``); validated again here.
    :param run_dir: where to write (must not exist or be empty); default
        ``<train.runs_dir>/<env>__<agent>__<seed>__<time>``.
    :param extra_callbacks: builds more callbacks from the run's own (see
        :data:`ExtraCallbacks`); the benchmark harness records its evaluation curve this way.
    :raises ConfigError: the config, the env or the agent settings are invalid (nothing
        has been written yet).
    :raises TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved.
    :raises NonFiniteTrainingError: a non-finite loss or parameter; the last good
        checkpoint is kept.
    """
    validate_config(config)
    if run_dir is not None and Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise ConfigError(f"run directory {run_dir} exists and is not empty; use resume() for it")
    _configure_process(config)
    train_env, eval_env = _make_envs(config)
    try:
        model = build_agent(config, train_env)
    except ConfigError:
        _close_envs(train_env, eval_env)
        raise

    if run_dir is None:
        root = make_run_dir(config)
    else:
        root = Path(run_dir)
        root.mkdir(parents=True, exist_ok=True)
    paths = RunPaths(root)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(run_lock(paths.root))
            save_config(config, paths.config)
            append_history(paths, {"event": "start", "overrides": []})
            _configure_logger(model, paths)
            _log_config(model, config)
        except BaseException:  # e.g. a full disk: close the envs (and any workers) first
            _close_envs(train_env, eval_env)
            raise
        return _learn(model, config, paths, eval_env, resumed=None, extra_callbacks=extra_callbacks)


def _checked_overrides(overrides: Iterable[str], total_timesteps: int | None) -> list[str]:
    """``overrides`` (plus ``total_timesteps``) if a resumed run may take them.

    :raises ConfigError: one outside :data:`RESUMABLE_SECTIONS` or in
        :data:`FIXED_ON_RESUME_KEYS`.
    """
    overrides = list(overrides)
    if total_timesteps is not None:
        overrides.append(f"train.total_timesteps={total_timesteps}")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] not in RESUMABLE_SECTIONS:
            raise ConfigError(
                f"override '{item}' cannot change a resumed run: only "
                f"{', '.join(s + '.*' for s in RESUMABLE_SECTIONS)} may change (env.*, agent.*, "
                "thalamus.*, tokenizer.*, policy.*, lstm.* and baseline.* fix the data and the "
                "network); start a new run instead"
            )
        if key in FIXED_ON_RESUME_KEYS:
            raise ConfigError(
                f"override '{item}' cannot change a resumed run: {key} stays what the run "
                "started with (the envs are seeded from train.seed, and the run directory is "
                "given); start a new run instead"
            )
    return overrides


def _flat_config(config: ExperimentConfig) -> dict[str, Any]:
    """``{"env.id": ..., "thalamus.top_k": ..., ...}``: every leaf of ``config``."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(config)), "")
    return flat


def _fixes_the_run(key: str, kind: str) -> bool:
    """Whether ``key`` defines the run (a resume cannot change it): outside
    :data:`RESUMABLE_SECTIONS` or in :data:`FIXED_ON_RESUME_KEYS`, and read by ``kind``."""
    section = key.split(".")[0]
    if section in sections_ignored_by(kind):
        return False
    return section not in RESUMABLE_SECTIONS or key in FIXED_ON_RESUME_KEYS


def _read_run_config(path: Path) -> ExperimentConfig:
    """``config.yaml`` of a run, strictly: empty, unparsable or incomplete files are refused
    (the schema's defaults would silently fill them in).

    :raises ConfigError: naming the file and what to do.
    """
    restore = (
        f"delete {path} and resume again: it is written back from the config the latest "
        "checkpoint was trained with"
    )
    try:
        text = path.read_text()
        layer = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); {restore}") from None
    if not isinstance(layer, dict) or not layer:
        raise ConfigError(f"{path} is empty or not a mapping of sections; {restore}")
    missing = [
        f.name
        for f in dataclasses.fields(ExperimentConfig)
        if f.name not in layer and f.name not in SECTIONS_ADDED_LATER
    ]
    if missing:
        raise ConfigError(
            f"{path} is incomplete: it has no {', '.join(missing)} section(s) (a run's "
            f"config.yaml holds every section); {restore}"
        )
    return config_from_yaml_text(text, str(path))


class ResumePlan(NamedTuple):
    """What :func:`resume` will do: the config to train with, and where it starts from.

    :ivar config: config.yaml (or, without one, the checkpoint's config) plus the overrides.
    :ivar base: the same without this resume's overrides (what config.yaml keeps if the
        resume fails).
    :ivar checkpoint: the newest readable checkpoint (None: the run has none).
    :ivar model_file: that checkpoint's model file, read.
    :ivar overrides: this resume's overrides.
    :ivar restored_config: config.yaml was missing and is rebuilt from the checkpoint.
    """

    config: ExperimentConfig
    base: ExperimentConfig
    checkpoint: CheckpointInfo | None
    model_file: Any
    overrides: list[str]
    restored_config: bool


def plan_resume(
    run_dir: str | Path,
    overrides: Iterable[str] = (),
    *,
    total_timesteps: int | None = None,
    warn: Callable[[str], None] | None = None,
) -> ResumePlan:
    """Check a resume of ``run_dir``: its config.yaml against the config its latest readable
    checkpoint was trained with, and the overrides.

    The keys that define the run (:func:`_fixes_the_run`: env, agent, network, seed) must be
    the checkpoint's; ``ppo.*``, ``thalamus_ppo.*`` and ``train.*`` come from config.yaml and
    then the overrides (differences from the checkpoint are noted through ``warn``).

    :raises ConfigError: not a run directory, an unreadable or incomplete config.yaml, keys
        that differ from the checkpoint's (each named with both values), or an override a
        resumed run cannot take.
    """
    warn = warn if warn is not None else _note
    paths = RunPaths(Path(run_dir))
    overrides = _checked_overrides(overrides, total_timesteps)
    if not paths.root.is_dir():
        raise ConfigError(f"{run_dir} is not a run directory")
    refuse_pickled_run(paths)
    checkpoint = latest_good_checkpoint(paths.checkpoints, warn=warn)
    model_file = read_model_file(checkpoint.model_path) if checkpoint is not None else None
    restored = False
    if paths.config.exists():
        base = _read_run_config(paths.config)
    elif model_file is not None:
        base, restored = model_file.config, True
        warn(
            f"note: {paths.config} is missing: using the config checkpoint "
            f"{checkpoint.model_path.name} was trained with (written back to config.yaml)"
        )
    else:
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.yaml")
    if model_file is not None:
        trained = _flat_config(model_file.config)
        now = _flat_config(base)
        kind = model_file.config.agent.kind
        keys = sorted(set(trained) | set(now))
        conflicts = [
            f"{key} = {now.get(key)!r} in config.yaml, {trained.get(key)!r} in the checkpoint"
            for key in keys
            if trained.get(key) != now.get(key) and _fixes_the_run(key, kind)
        ]
        if conflicts:
            raise ConfigError(
                f"{paths.config} differs from the config checkpoint {checkpoint.model_path.name} "
                f"was trained with: {'; '.join(conflicts)}. These keys fix the data and the "
                "network, so a resume cannot change them: put the checkpoint's values back in "
                "config.yaml (or delete it: it is written back from the checkpoint), or start a "
                "new run with: " + script_command("train_agent.py", "--config", paths.config)
            )
        changed = [
            f"{key} {trained.get(key)!r} -> {now.get(key)!r}"
            for key in keys
            if trained.get(key) != now.get(key) and key.split(".")[0] in RESUMABLE_SECTIONS
        ]
        if changed:
            warn(
                f"note: config.yaml changes settings the checkpoint was trained with: "
                f"{', '.join(changed)}"
            )
    config = (
        config_from_yaml_text(config_to_yaml(base), str(paths.config), overrides)
        if overrides
        else base
    )
    return ResumePlan(config, base, checkpoint, model_file, overrides, restored)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resumed_config(
    run_dir: str | Path,
    overrides: Iterable[str] = (),
    *,
    total_timesteps: int | None = None,
) -> ExperimentConfig:
    """The config a :func:`resume` of ``run_dir`` with these overrides would train with
    (:func:`plan_resume`).

    :raises ConfigError: see :func:`plan_resume`.
    """
    return plan_resume(run_dir, overrides, total_timesteps=total_timesteps).config


def append_history(paths: RunPaths, entry: dict[str, Any], *, required: bool = True) -> None:
    """Add one line to the run's ``history.jsonl`` (starts, resumes with their overrides,
    and how each session ended).

    :param required: False for the line that records how a session ended, written while an
        error propagates: a failure to write it must not replace that error.
    :raises DiskFullError: the disk is full (``required`` only).
    """
    entry = {"time": _dt.datetime.now().isoformat(timespec="seconds"), **entry}
    line = json.dumps(entry) + "\n"
    try:
        with open(paths.history, "a") as f:
            f.write(line)
    except OSError as exc:
        if not required:
            return
        if is_disk_full(exc):
            raise DiskFullError(disk_full_message(paths.history, len(line))) from None
        raise


def resume(
    run_dir: str | Path,
    overrides: Iterable[str] = (),
    *,
    total_timesteps: int | None = None,
    extra_callbacks: ExtraCallbacks | None = None,
) -> Path:
    """Continue a run from its latest checkpoint, in the same directory and tensorboard curve.

    Restores the weights, the optimizer state, the timestep counter, the global RNG states
    and the best evaluation reward. The envs start fresh episodes (an episode in progress
    cannot be saved), seeded from ``train.seed`` and the checkpoint's step so they do not
    replay the run's first layouts. A checkpoint that does not read is skipped with a warning
    (the newest good one is used).

    The config is checked by :func:`plan_resume`. The overrides are recorded in the run's
    ``history.jsonl`` and written into ``config.yaml`` only when the session ends well (the
    budget trained, or a signal stopped it): a resume that stops on a non-finite value or an
    error leaves ``config.yaml`` as it was, so a plain ``--resume`` does not repeat a bad value.

    :param run_dir: a run directory written by :func:`train`.
    :param overrides: dotted ``key=value`` changes, only under ``ppo.``, ``thalamus_ppo.`` and
        ``train.`` (e.g. ``train.total_timesteps=400000``, ``ppo.learning_rate=1e-4``), and
        not ``train.seed`` or ``train.runs_dir``.
    :param total_timesteps: shorthand for ``train.total_timesteps=...``.
    :param extra_callbacks: as for :func:`train`.
    :raises ConfigError: not a run directory, no checkpoint, a config that differs from the
        checkpoint's, a forbidden override, nothing left to train, or another process
        writing the run.
    """
    paths = RunPaths(Path(run_dir))
    _checked_overrides(overrides, total_timesteps)
    with run_lock(paths.root):
        for folder in (paths.root, paths.checkpoints):
            remove_stale_temp_files(folder)  # left by saves a kill -9 or a power cut interrupted
        plan = plan_resume(paths.root, overrides, total_timesteps=total_timesteps)
        config, checkpoint = plan.config, plan.checkpoint
        if checkpoint is None:
            raise ConfigError(
                f"{paths.checkpoints} holds no complete checkpoint to resume from (the run "
                "stopped before its first one); start it again with the same config: "
                + script_command("train_agent.py", "--config", paths.config)
            )
        if checkpoint.timesteps >= config.train.total_timesteps:
            raise ConfigError(
                f"the run already reached step {checkpoint.timesteps:,} of "
                f"train.total_timesteps = {config.train.total_timesteps:,}; pass a larger "
                "--total-timesteps to train further"
            )
        meta = checkpoint.load_meta()

        _configure_process(config)
        train_env, eval_env = _make_envs(config)
        try:
            model = build_agent(config, train_env)
            apply_model_file(model, plan.model_file)
        except BaseException:  # close the envs (and any subprocess workers) before re-raising
            _close_envs(train_env, eval_env)
            raise
        restore_rng_state(meta["rng"])
        model.get_env().seed(config.train.seed + checkpoint.timesteps)
        if plan.restored_config:
            save_config(plan.base, paths.config)
        append_history(
            paths,
            {"event": "resume", "from_step": checkpoint.timesteps, "overrides": plan.overrides},
        )
        _configure_logger(model, paths)
        _mark_restart(model, checkpoint.timesteps)
        print(f"resuming {paths.root} from step {checkpoint.timesteps:,}", flush=True)
        try:
            result = _learn(
                model, config, paths, eval_env, resumed=checkpoint, extra_callbacks=extra_callbacks
            )
        except TrainingInterrupted as exc:
            save_config(config, paths.config)  # stopped on request: the overrides were fine
            append_history(
                paths,
                {"event": "end", "step": model.num_timesteps, "outcome": str(exc)},
                required=False,
            )
            raise
        except BaseException as exc:
            append_history(
                paths,
                {
                    "event": "end",
                    "step": model.num_timesteps,
                    "outcome": f"{type(exc).__name__}: {exc}; config.yaml keeps its values",
                },
                required=False,
            )
            raise
        save_config(config, paths.config)
        append_history(paths, {"event": "end", "step": model.num_timesteps, "outcome": "done"})
        return result


def refuse_pickled_run(paths: RunPaths) -> None:
    """Refuse a run saved by an older version (stable-baselines3 zips): point to the converter.

    :raises PickledModelError: the run's checkpoints are zips only.
    """
    safe = (
        list(paths.checkpoints.glob(f"step_*{MODEL_SUFFIX}")) if paths.checkpoints.is_dir() else []
    )
    pickled = list(paths.checkpoints.glob("step_*.zip")) if paths.checkpoints.is_dir() else []
    if pickled and not safe:
        raise PickledModelError(
            f"{paths.root} was saved by an older version as stable-baselines3 zips, which hold "
            "pickled Python objects (loading one runs any code its author put in it). If you "
            "trust the run, convert it once with: "
            + script_command("convert_run.py", paths.root, "--trust-pickle")
        )


class LoadedModel(NamedTuple):
    """What :func:`load_model` found: the model, its config, and where they are."""

    model: BaseAlgorithm
    config: ExperimentConfig
    model_path: Path
    run_dir: Path


_PICKLED_NAMES = ("final_model.zip", "best_model.zip")


def _run_dir_model(paths: RunPaths) -> Path | None:
    """The model of a run directory to evaluate: ``final_model``, else ``best_model``, else
    the newest checkpoint that reads; a final model older than the latest checkpoint is
    skipped (the run was resumed past it with a larger budget and has not finished again)."""
    last = latest_checkpoint(paths.checkpoints)
    final: Path | None = paths.final_model
    try:
        if (
            last is not None
            and final.is_file()
            and last.model_path.stat().st_mtime_ns > final.stat().st_mtime_ns
        ):
            final = None  # superseded: the run went on from it
    except FileNotFoundError:  # pruned since it was listed
        pass
    for candidate in (final, paths.best_model):
        if candidate is not None and candidate.is_file():
            return candidate
    good = latest_good_checkpoint(paths.checkpoints)
    return good.model_path if good is not None else None


def load_model(
    path: str | Path, device: str = "auto", *, trust_pickle: bool = False
) -> LoadedModel:
    """Load a model and the config it was trained with, from a run directory or a model file.

    A run directory gives ``final_model.safetensors``, else ``best_model.safetensors``, else
    its newest readable checkpoint (see :func:`_run_dir_model`). A model file carries its
    config; its run directory (for the default output paths) is the folder holding
    ``config.yaml``: the file's folder or the one above.

    :param trust_pickle: also read stable-baselines3 ``.zip`` models (old runs, or files made
        elsewhere), with the ``config.yaml`` beside them. **Loading a zip runs code from it.**
    :raises ConfigError: no model, an unreadable one (naming the file), a zip without
        ``trust_pickle``, or no config for a zip.
    """
    path = Path(path)
    if path.is_dir():
        paths = RunPaths(path)
        for _ in range(5):  # a checkpoint pruned between listing and reading: list again
            model_path = _run_dir_model(paths)
            if model_path is None:
                break
            try:
                model_file = read_model_file(model_path)
            except FileNotFoundError:
                continue
            return _loaded(model_file, device, paths.root)
        pickled = [paths.root / name for name in _PICKLED_NAMES if (paths.root / name).is_file()]
        pickled += (
            sorted(paths.checkpoints.glob("step_*.zip"))[-1:] if paths.checkpoints.is_dir() else []
        )
        if pickled and trust_pickle:
            return _loaded_pickled(pickled[0], device, paths.config)
        if pickled:
            raise PickledModelError(pickled_model_message(pickled[0], paths.root))
        raise ConfigError(
            f"{path} holds no final_model{MODEL_SUFFIX}, best_model{MODEL_SUFFIX} or checkpoint"
        )
    if not path.is_file():
        raise ConfigError(f"{path} is neither a run directory nor a model file")
    config_path = next(
        (
            p / "config.yaml"
            for p in (path.parent, path.parent.parent)
            if (p / "config.yaml").is_file()
        ),
        path.parent / "config.yaml",
    )
    try:
        model_file = read_model_file(path)
    except PickledModelError:
        if not trust_pickle:
            raise
        return _loaded_pickled(path, device, config_path)
    except FileNotFoundError:
        raise ConfigError(f"{path} was deleted while it was being opened") from None
    return _loaded(model_file, device, config_path.parent)


def _loaded(model_file: Any, device: str, run_dir: Path) -> LoadedModel:
    from agents.experiment.model_files import model_from_file

    # The device to evaluate on, not the one the run trained on (which may be absent here).
    config = dataclasses.replace(
        model_file.config, train=dataclasses.replace(model_file.config.train, device=device)
    )
    model = model_from_file(model_file, device=device, config=config)
    return LoadedModel(model, config, model_file.path, run_dir)


def _loaded_pickled(model_path: Path, device: str, config_path: Path) -> LoadedModel:
    """The ``--trust-pickle`` path: a stable-baselines3 zip and the config.yaml beside it."""
    if not config_path.is_file():
        raise ConfigError(
            f"no config.yaml beside {model_path} (or one folder up): a stable-baselines3 zip "
            "does not say which agent and env it was trained for"
        )
    config = load_config(config_path, [f"train.device={device}"], defaults_file=None)
    model = load_pickled_model(model_path, config.agent.kind, device=device)
    return LoadedModel(model, config, model_path, config_path.parent)
