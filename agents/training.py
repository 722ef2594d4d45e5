"""The one training entry point: ``train(config) -> run_dir`` and ``resume(run_dir)``.

Used by ``scripts/train_agent.py`` and by the benchmark harness. A run directory
``runs/<env>__<agent>__<seed>__<time>/`` holds::

    config.yaml          the resolved config (load_config(run_dir / "config.yaml") rebuilds it)
    tb/                  tensorboard events (one curve, continued by every resume)
    checkpoints/         step_<timesteps>.zip + .json (timesteps, RNG states), atomic
    best_model.zip       the model with the best evaluation mean reward so far
    final_model.zip      the model when training reached train.total_timesteps
    videos/              evaluation videos (train.video=true)

Everything that can be checked is checked before the run directory is created: the config,
the env id, building the envs and the agent. A run stopped by SIGINT/SIGTERM saves a
checkpoint and raises :class:`TrainingInterrupted`; a non-finite loss or parameter raises
:class:`agents.callbacks.NonFiniteTrainingError` and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import OmegaConf
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import HParam, configure
from stable_baselines3.common.vec_env import VecEnv

import envs
from agents.callbacks import (
    CheckpointInfo,
    EvalVideo,
    NonFiniteGuard,
    PeriodicCheckpoint,
    PeriodicEval,
    ProgressCallback,
    SaveBestModel,
    StopOnSignal,
    atomic_save_model,
    best_model_reward,
    latest_checkpoint,
    restore_rng_state,
    tensorboard_writer,
    with_sigint_ignored,
)
from agents.config import (
    ConfigError,
    ExperimentConfig,
    config_to_yaml,
    load_config,
    save_config,
    validate_config,
)
from agents.hints import script_command, shell_path
from agents.runtime import tune_allocator

__all__ = [
    "EVAL_SEED_OFFSET",
    "LoadedModel",
    "FIXED_ON_RESUME_KEYS",
    "RESUMABLE_SECTIONS",
    "ExtraCallbacks",
    "RunCallbacks",
    "RunPaths",
    "TrainingInterrupted",
    "agent_class",
    "build_agent",
    "load_model",
    "make_eval_env",
    "make_run_dir",
    "resume",
    "resumed_config",
    "train",
]

EVAL_SEED_OFFSET = 1_000_000
"""Eval env ``i`` gets seed ``train.seed + EVAL_SEED_OFFSET + i``: layouts unseen in training."""
RESUMABLE_SECTIONS = ("ppo", "thalamus_ppo", "train")
"""Config sections that ``resume`` may override; the others fix the env and the network."""
FIXED_ON_RESUME_KEYS = ("train.seed", "train.runs_dir")
"""Keys in :data:`RESUMABLE_SECTIONS` that ``resume`` still refuses: the run's envs are seeded
from ``train.seed`` (the eval envs too), and its directory is already chosen."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped the run after saving a checkpoint.

    :ivar run_dir: the run directory (pass it to ``resume``).
    :ivar signum: the signal received.
    :ivar checkpoint: the checkpoint saved on the way out.
    """

    def __init__(self, run_dir: Path, signum: int, checkpoint: CheckpointInfo | None) -> None:
        import signal

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
        return self.root / "best_model.zip"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model.zip"

    @property
    def videos(self) -> Path:
        return self.root / "videos"


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
    from agents.factory import AGENT_CLASSES as classes

    if kind not in classes:
        raise ConfigError(
            f"agent.kind = {kind!r} is not a valid choice; choose one of: {', '.join(classes)}"
        )
    return classes[kind]


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
    and ``thalamus_ppo`` for the thalamus agent."""
    hyperparams = dataclasses.asdict(config.ppo)
    if config.agent.kind == "thalamus":
        hyperparams.update(dataclasses.asdict(config.thalamus_ppo))
    return hyperparams


def build_agent(config: ExperimentConfig, env: VecEnv) -> BaseAlgorithm:
    """The untrained agent ``config`` describes, on ``env`` (``agents.make_agent``).

    :raises ConfigError: the agent rejected its settings.
    """
    from agents import make_agent

    policy_kwargs: dict[str, Any] | None = None
    if config.agent.kind == "thalamus":
        policy_kwargs = {
            "thalamus": dataclasses.asdict(config.thalamus),
            "tokenizer": dataclasses.asdict(config.tokenizer),
            **dataclasses.asdict(config.policy),
        }
    elif config.agent.kind == "lstm":
        policy_kwargs = dataclasses.asdict(config.lstm)
    try:
        return make_agent(
            config.agent.kind,  # type: ignore[arg-type]
            env,
            seed=config.train.seed,
            device=config.train.device,
            policy_kwargs=policy_kwargs,
            **_hyperparameters(config),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"agent settings rejected: {exc}") from None


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
    """Training envs and (if evaluating) eval envs."""
    train_env = _build_vec_env(config, config.env.n_envs, config.train.seed)
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
    checkpoint = PeriodicCheckpoint(
        paths.checkpoints,
        save_freq=config.train.checkpoint_freq,
        keep=config.train.keep_checkpoints,
        extra_state=(lambda: {"eval": evaluation.state()}) if evaluation is not None else None,
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

    guard, stop = NonFiniteGuard(hint), StopOnSignal()
    callbacks: list[BaseCallback] = [guard, stop, checkpoint]
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
    if resumed is not None and evaluation is not None:
        evaluation.load_state(
            resumed.load_meta().get("extra", {}).get("eval", {}),
            best_on_disk=best_model_reward(paths.best_model),
        )
    try:
        with guard.watching():
            model.learn(
                total_timesteps=total - model.num_timesteps,
                callback=CallbackList(callbacks),
                reset_num_timesteps=resumed is None,
                tb_log_name="",
            )
    finally:
        stop.restore()  # learn skips on_training_end when an exception escapes it
        model.logger.close()
        model.get_env().close()
        if eval_env is not None:
            eval_env.close()
    # A signal during the last update still lets the run finish: the budget is trained.
    if stop.received is not None and model.num_timesteps < total:
        raise TrainingInterrupted(paths.root, stop.received, checkpoint.last_saved)
    atomic_save_model(model, paths.final_model)
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
    save_config(config, paths.config)
    _configure_logger(model, paths)
    _log_config(model, config)
    return _learn(model, config, paths, eval_env, resumed=None, extra_callbacks=extra_callbacks)


def resumed_config(
    run_dir: str | Path,
    overrides: Iterable[str] = (),
    *,
    total_timesteps: int | None = None,
) -> ExperimentConfig:
    """The config a :func:`resume` of ``run_dir`` with these overrides would train with.

    :raises ConfigError: not a run directory, or an override that a resumed run cannot take
        (outside :data:`RESUMABLE_SECTIONS`, or one of :data:`FIXED_ON_RESUME_KEYS`).
    """
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.yaml")
    overrides = list(overrides)
    if total_timesteps is not None:
        overrides.append(f"train.total_timesteps={total_timesteps}")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] not in RESUMABLE_SECTIONS:
            raise ConfigError(
                f"override '{item}' cannot change a resumed run: only "
                f"{', '.join(s + '.*' for s in RESUMABLE_SECTIONS)} may change (env.*, agent.*, "
                "thalamus.*, tokenizer.*, policy.* and lstm.* fix the data and the network); "
                "start a new run instead"
            )
        if key in FIXED_ON_RESUME_KEYS:
            raise ConfigError(
                f"override '{item}' cannot change a resumed run: {key} stays what the run "
                "started with (the envs are seeded from train.seed, and the run directory is "
                "given); start a new run instead"
            )
    return load_config(paths.config, overrides, defaults_file=None)


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
    replay the run's first layouts.

    :param run_dir: a run directory written by :func:`train`.
    :param overrides: dotted ``key=value`` changes, only under ``ppo.``, ``thalamus_ppo.`` and
        ``train.`` (e.g. ``train.total_timesteps=400000``, ``ppo.learning_rate=1e-4``), and
        not ``train.seed`` or ``train.runs_dir``.
    :param total_timesteps: shorthand for ``train.total_timesteps=...``.
    :param extra_callbacks: as for :func:`train`.
    :raises ConfigError: not a run directory, no checkpoint, a forbidden override, or nothing
        left to train.
    """
    paths = RunPaths(Path(run_dir))
    config = resumed_config(paths.root, overrides, total_timesteps=total_timesteps)
    checkpoint = latest_checkpoint(paths.checkpoints)
    if checkpoint is None:
        raise ConfigError(
            f"{paths.checkpoints} holds no complete checkpoint to resume from (the run stopped "
            "before its first one); start it again with the same config: "
            + script_command("train_agent.py", "--config", paths.config)
        )
    if checkpoint.timesteps >= config.train.total_timesteps:
        raise ConfigError(
            f"the run already reached step {checkpoint.timesteps:,} of train.total_timesteps = "
            f"{config.train.total_timesteps:,}; pass a larger --total-timesteps to train further"
        )
    meta = checkpoint.load_meta()

    _configure_process(config)
    train_env, eval_env = _make_envs(config)
    try:
        model = agent_class(config.agent.kind).load(
            checkpoint.model_path,
            env=train_env,
            device=config.train.device,
            **_hyperparameters(config),
        )
    except BaseException:  # close the envs (and any subprocess workers) before re-raising
        _close_envs(train_env, eval_env)
        raise
    restore_rng_state(meta["rng"])
    model.get_env().seed(config.train.seed + checkpoint.timesteps)
    save_config(config, paths.config)
    _configure_logger(model, paths)
    _mark_restart(model, checkpoint.timesteps)
    print(f"resuming {paths.root} from step {checkpoint.timesteps:,}", flush=True)
    return _learn(
        model, config, paths, eval_env, resumed=checkpoint, extra_callbacks=extra_callbacks
    )


class LoadedModel(NamedTuple):
    """What :func:`load_model` found: the model, its run's config, and where they are."""

    model: BaseAlgorithm
    config: ExperimentConfig
    model_path: Path
    run_dir: Path


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """Load a model and its run's config from a run directory or a model zip inside one.

    A run directory gives ``final_model.zip``, else ``best_model.zip``, else its latest
    checkpoint; a ``final_model.zip`` older than the latest checkpoint is skipped (the run
    was resumed past it with a larger budget and has not finished again). A zip is looked
    up in its folder and the folder above for ``config.yaml``.

    :raises ConfigError: no model or no config found.
    """
    path = Path(path)
    if path.is_dir():
        paths = RunPaths(path)
        last = latest_checkpoint(paths.checkpoints)
        final: Path | None = paths.final_model
        if (
            last is not None
            and final.is_file()
            and last.model_path.stat().st_mtime_ns > final.stat().st_mtime_ns
        ):
            final = None  # superseded: the run went on from it
        for candidate in (final, paths.best_model, last.model_path if last else None):
            if candidate is not None and candidate.is_file():
                model_path = candidate
                break
        else:
            raise ConfigError(f"{path} holds no final_model.zip, best_model.zip or checkpoint")
        config_path = paths.config
    elif path.is_file():
        model_path = path
        config_path = next(
            (
                p / "config.yaml"
                for p in (path.parent, path.parent.parent)
                if (p / "config.yaml").is_file()
            ),
            path.parent / "config.yaml",
        )
    else:
        raise ConfigError(f"{path} is neither a run directory nor a model file")
    if not config_path.is_file():
        raise ConfigError(
            f"no config.yaml beside {model_path} (or one folder up): evaluate needs the run's "
            "config to know the agent and the env"
        )
    # The device to evaluate on, not the one the run trained on (which may be absent here).
    config = load_config(config_path, [f"train.device={device}"], defaults_file=None)
    model = agent_class(config.agent.kind).load(model_path, device=device)
    return LoadedModel(model, config, model_path, config_path.parent)
