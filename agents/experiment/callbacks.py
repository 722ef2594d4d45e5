"""Training callbacks: checkpoints, evaluation, a non-finite guard, signals, progress.

Each callback does one job and plugs into stable-baselines3's ``learn(callback=[...])``:

- :class:`NonFiniteGuard` stops the run with :class:`NonFiniteTrainingError` as soon as an
  update leaves a non-finite loss or parameter, before the next rollout uses it.
- :class:`PeriodicCheckpoint` writes a checkpoint (:func:`agents.experiment.io.save_checkpoint`)
  every ``save_freq`` env steps and when training ends.
- :class:`StopOnSignal` turns the first SIGINT/SIGTERM into a clean stop (the checkpoint
  callback then saves); a second SIGINT aborts at once.
- :class:`PeriodicEval` is SB3's ``EvalCallback`` triggered on env steps, with an atomic
  best-model save (:class:`SaveBestModel`) and optionally an overlay video of one episode
  after each evaluation (:class:`EvalVideo`).
- :class:`ProgressCallback` shows a progress bar with reward and fps on a terminal and
  prints plain log lines otherwise.

The files they write are written by :mod:`agents.experiment.io`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat
from stable_baselines3.common.utils import safe_mean

from agents.experiment.io import (
    CheckpointInfo,
    atomic_save_model,
    atomic_write_text,
    global_rng_preserved,
    list_checkpoints,
    save_checkpoint,
)

__all__ = [
    "EvalVideo",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "PeriodicCheckpoint",
    "PeriodicEval",
    "ProgressCallback",
    "SaveBestModel",
    "StopOnSignal",
    "best_model_reward",
    "tensorboard_writer",
    "with_sigint_ignored",
]


class NonFiniteTrainingError(RuntimeError):
    """An update produced a non-finite loss or parameter; the run stopped before using it."""


_log = logging.getLogger(__name__)


def tensorboard_writer(model: BaseAlgorithm) -> Any | None:
    """The ``SummaryWriter`` behind the model's logger, if it logs to tensorboard."""
    for output in model.logger.output_formats:
        if isinstance(output, TensorBoardOutputFormat):
            return output.writer
    return None


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------


def _crossed(previous: int, now: int, every: int) -> bool:
    """True when a multiple of ``every`` lies in ``(previous, now]``."""
    return every > 0 and now // every > previous // every


class NonFiniteGuard(BaseCallback):
    """Raise :class:`NonFiniteTrainingError` when an update left a NaN/inf loss or parameter.

    It checks at each rollout start (right after the previous update, before its
    parameters act) and when training ends, so the bad parameters are never checkpointed.

    :param hint: appended to the error message, e.g. where the last good checkpoint is.
    """

    def __init__(self, hint: Callable[[], str] | None = None) -> None:
        super().__init__()
        self._hint = hint

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        self.check()

    def _on_training_end(self) -> None:
        self.check()

    def problems(self) -> list[str]:
        """What is non-finite now: logged ``train/*`` values and policy parameters."""
        found = []
        for key, value in self.logger.name_to_value.items():
            numeric = isinstance(value, float | int | np.floating)
            if key.startswith("train/") and numeric and not math.isfinite(float(value)):
                found.append(f"{key} = {value}")
        for name, param in self.model.policy.named_parameters():
            bad = (~torch.isfinite(param.detach())).sum().item()
            if bad:
                found.append(f"parameter {name} has {bad} non-finite value(s)")
        return found

    def check(self) -> None:
        """Raise :class:`NonFiniteTrainingError` if :meth:`problems` finds anything."""
        problems = self.problems()
        if problems:
            shown = "; ".join(problems[:5])
            if len(problems) > 5:
                shown += f"; ... ({len(problems)} in all)"
            raise NonFiniteTrainingError(self._message(shown))

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Wrap ``model.learn``: an error raised inside an update because values went
        non-finite (NaN parameters, or torch.distributions rejecting NaN logits) becomes a
        :class:`NonFiniteTrainingError` with the same clear message."""
        try:
            yield
        except NonFiniteTrainingError:
            raise
        except ValueError as exc:
            problems = self.problems() if self.model is not None else []
            if not problems and _NAN_DISTRIBUTION in str(exc):
                problems = [f"the action distribution got non-finite parameters ({exc})"]
            if not problems:
                raise
            raise NonFiniteTrainingError(self._message("; ".join(problems[:5]))) from exc

    def _message(self, problems: str) -> str:
        message = f"training stopped at step {self.num_timesteps}: {problems}."
        if self._hint is not None:
            message += " " + self._hint()
        return message


# torch.distributions' argument validation, e.g. Categorical(logits=NaN): "Expected parameter
# logits (...) to satisfy the constraint ..., but found invalid values".
_NAN_DISTRIBUTION = "but found invalid values"


class PeriodicCheckpoint(BaseCallback):
    """Checkpoint every ``save_freq`` env steps and when training ends (stop included).

    Periodic checkpoints are taken at a rollout start, right after an update, so the saved
    weights have learned from every step counted in ``num_timesteps``. A stop in the middle
    of a rollout (SB3 then leaves ``learn`` without training on it) sets ``num_timesteps``
    back to that rollout's start before the end checkpoint, so a resume collects those steps
    again instead of skipping them.

    :param checkpoint_dir: where ``step_*.zip``/``.json`` go.
    :param save_freq: env steps between checkpoints; 0 saves only at the end.
    :param keep: how many checkpoints to keep; older ones are deleted.
    :param extra_state: returns JSON-able state to store in each checkpoint's sidecar.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        save_freq: int,
        keep: int = 3,
        extra_state: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep = {keep} must be >= 1 (the latest checkpoint is always kept)")
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_freq = save_freq
        self.keep = keep
        self._extra_state = extra_state
        self._last_check = 0
        self._rollout_start: int | None = None  # set while a rollout is being collected
        self.last_saved: CheckpointInfo | None = None

    def _on_training_start(self) -> None:
        self._last_check = self.num_timesteps

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        self.num_timesteps = self.model.num_timesteps
        if _crossed(self._last_check, self.num_timesteps, self.save_freq):
            self.save()
        self._last_check = self.num_timesteps
        self._rollout_start = self.num_timesteps

    def _on_rollout_end(self) -> None:
        self._rollout_start = None

    def _on_training_end(self) -> None:
        if self._rollout_start is not None:  # stopped mid-rollout: those steps were discarded
            self.model.num_timesteps = self.num_timesteps = self._rollout_start
            self._rollout_start = None
        if self.last_saved is None or self.last_saved.timesteps != self.num_timesteps:
            self.save()

    def save(self) -> CheckpointInfo:
        """Write a checkpoint now and prune old ones."""
        extra = self._extra_state() if self._extra_state is not None else {}
        self.last_saved = save_checkpoint(self.model, self.checkpoint_dir, extra)
        for old in list_checkpoints(self.checkpoint_dir)[: -self.keep]:
            old.meta_path.unlink(missing_ok=True)  # the sidecar first: never a JSON without zip
            old.model_path.unlink(missing_ok=True)
        return self.last_saved


class StopOnSignal(BaseCallback):
    """Stop training cleanly on the first SIGINT or SIGTERM.

    The handler only sets a flag; the next env step returns ``False``, SB3 leaves its loop
    and every callback's ``on_training_end`` runs (the checkpoint callback saves). A second
    SIGINT raises ``KeyboardInterrupt`` at once. Handlers are installed for the duration of
    ``learn`` and the saves after it (the caller calls :meth:`restore`), and only from the
    main thread.
    """

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.received: int | None = None
        self._on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self._on_signal is not None:
            self._on_signal(signum)

    def _on_training_start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _on_step(self) -> bool:
        return self.received is None

    def restore(self) -> None:
        """Put back the handlers installed before ``learn`` (idempotent). The handlers stay
        through ``on_training_end`` (the end checkpoint is saved there, after this callback
        ran) and the caller's final save; callers call this in ``finally``."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class SaveBestModel(BaseCallback):
    """``callback_on_new_best`` of :class:`PeriodicEval`: save the model atomically, then
    its mean reward and step in a ``.json`` beside it (:func:`best_model_reward` reads it
    back, so a run resumed from an older checkpoint does not replace a better model)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)

    def _on_step(self) -> bool:
        atomic_save_model(self.model, self.path)
        best = getattr(self.parent, "best_mean_reward", None)
        if best is not None and math.isfinite(best):
            meta = {"mean_reward": float(best), "timesteps": int(self.model.num_timesteps)}
            atomic_write_text(self.path.with_suffix(".json"), json.dumps(meta) + "\n")
        return True


def best_model_reward(path: str | os.PathLike[str]) -> float | None:
    """The mean reward :class:`SaveBestModel` recorded beside the model at ``path``, or
    None when there is no readable record."""
    try:
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        return float(meta["mean_reward"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PeriodicEval(EvalCallback):
    """SB3's ``EvalCallback``, run every ``eval_freq`` env steps instead of every N calls.

    It logs ``eval/mean_reward``, ``eval/mean_ep_length`` and ``eval/success_rate`` (from
    ``info["is_success"]``); recurrent models keep their state through SB3's
    ``evaluate_policy``. ``best_mean_reward`` is restored on resume, so a resumed run does
    not overwrite ``best_model.zip`` with a worse model. Each evaluation's wall time (the
    episodes, the best-model save and ``callback_after_eval``) is kept in
    ``last_eval_seconds`` and counted in ``n_evaluations``, so a caller can tell training
    time from evaluation time.

    :param eval_env: envs seeded apart from the training envs.
    :param eval_freq: env steps between evaluations (> 0).
    :param kwargs: passed to ``EvalCallback`` (``n_eval_episodes``, ``deterministic``,
        ``callback_on_new_best``, ``callback_after_eval``, ...).
    """

    def __init__(self, eval_env: Any, eval_freq: int, **kwargs: Any) -> None:
        if eval_freq < 1:
            raise ValueError(f"eval_freq = {eval_freq} must be >= 1 env step")
        kwargs.setdefault("verbose", 0)
        super().__init__(eval_env, eval_freq=1, **kwargs)
        self.every = eval_freq
        self._last_check = 0
        self.last_success_rate: float | None = None
        self.last_eval_timesteps: int | None = None
        self.last_eval_seconds: float | None = None
        self.n_evaluations = 0

    def _init_callback(self) -> None:
        # The training env may carry wrappers the eval env must not (the intrinsic reward of
        # agents.exploration), so SB3's "not of the same type" warning would be a false alarm.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Training and eval env are not of the same")
            super()._init_callback()

    def _on_training_start(self) -> None:
        self._last_check = self.num_timesteps

    def _on_step(self) -> bool:
        if not _crossed(self._last_check, self.num_timesteps, self.every):
            self._last_check = self.num_timesteps
            return True
        self._last_check = self.num_timesteps
        started = time.monotonic()
        with global_rng_preserved():  # the evaluation settings must not change training
            continue_training = super()._on_step()
        self.last_eval_seconds = time.monotonic() - started
        self.n_evaluations += 1
        self.last_eval_timesteps = self.num_timesteps
        self.last_success_rate = (
            float(np.mean(self._is_success_buffer)) if self._is_success_buffer else None
        )
        return continue_training

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback."""
        best = self.best_mean_reward
        return {"best_mean_reward": None if not math.isfinite(best) else float(best)}

    def load_state(self, state: dict[str, Any], best_on_disk: float | None = None) -> None:
        """Restore :meth:`state` from a checkpoint; ``best_on_disk`` is the reward of the
        ``best_model.zip`` already written (an evaluation after the checkpoint may have
        saved a better one before the process died): the larger of the two is kept."""
        candidates = [
            float(b) for b in (state.get("best_mean_reward"), best_on_disk) if b is not None
        ]
        if candidates:
            self.best_mean_reward = max(candidates)


class ProgressCallback(BaseCallback):
    """Progress with reward and fps: a rich progress bar on a terminal, log lines otherwise.

    :param total_timesteps: the run's target step count (resumed runs included).
    :param mode: ``"bar"``, ``"log"``, ``"none"`` or ``"auto"`` (bar iff stdout is a TTY).
    :param log_every_s: seconds between log lines in ``"log"`` mode (the first is printed when
        training starts, the last when it ends).
    :param evaluation: the eval callback, whose latest result is shown.
    :param stream: where log lines go (default stdout).
    """

    def __init__(
        self,
        total_timesteps: int,
        mode: str = "auto",
        log_every_s: float = 30.0,
        evaluation: PeriodicEval | None = None,
        stream: Any = None,
    ) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        if mode not in ("bar", "log", "none"):
            raise ValueError(f"mode = {mode!r} is not one of auto, bar, log, none")
        self.mode = mode
        self.total_timesteps = total_timesteps
        self.log_every_s = log_every_s
        self.evaluation = evaluation
        self._progress: Any = None
        self._task: Any = None
        self._start_time = 0.0
        self._start_steps = 0
        self._last_update = 0.0

    def _on_training_start(self) -> None:
        self._start_time = self._last_update = time.monotonic()
        self._start_steps = self.num_timesteps
        if self.mode == "bar":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.table import Column

            def fixed(width: int) -> Column:
                return Column(no_wrap=True, min_width=width)

            steps = len(str(self.total_timesteps))
            self._progress = Progress(
                BarColumn(bar_width=24, table_column=fixed(24)),
                MofNCompleteColumn(table_column=fixed(2 * steps + 1)),
                TimeElapsedColumn(table_column=fixed(7)),
                TextColumn("eta", table_column=fixed(3)),
                TimeRemainingColumn(table_column=fixed(7)),
                # The stats take the rest of the line and are cut first on a narrow terminal.
                TextColumn("{task.fields[stats]}", table_column=Column(no_wrap=True)),
                refresh_per_second=4,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total_timesteps, completed=self.num_timesteps, stats=""
            )
        elif self.mode == "log":  # at once: a run must not be silent until log_every_s
            print(
                f"[{100 * self.num_timesteps / max(self.total_timesteps, 1):5.1f}%] step "
                f"{self.num_timesteps:,}/{self.total_timesteps:,} | training started; a line "
                f"every {self.log_every_s:g} s and at the end",
                file=self.stream,
                flush=True,
            )

    def _on_step(self) -> bool:
        now = time.monotonic()
        if self.mode == "bar" and now - self._last_update >= 0.25:
            self._last_update = now
            self._progress.update(self._task, completed=self.num_timesteps, stats=self.summary())
        elif self.mode == "log" and now - self._last_update >= self.log_every_s:
            self._last_update = now
            self._log_line()
        return True

    def _on_training_end(self) -> None:
        if self.mode == "bar" and self._progress is not None:
            self._progress.update(self._task, completed=self.num_timesteps, stats=self.summary())
            self._progress.stop()
        elif self.mode == "log":
            self._log_line()

    def fps(self) -> float:
        """Env steps per second since this ``learn`` call started."""
        elapsed = max(time.monotonic() - self._start_time, 1e-9)
        return (self.num_timesteps - self._start_steps) / elapsed

    def summary(self) -> str:
        """``fps 812 | reward 0.53 | ep_len 31.2 | success 0.62 | eval 0.91 (success 0.95)``:
        the latest episodes and evaluation."""
        parts = [f"fps {self.fps():.0f}"]
        episodes = self.model.ep_info_buffer
        if episodes:
            parts.append(f"reward {safe_mean([e['r'] for e in episodes]):.3f}")
            parts.append(f"ep_len {safe_mean([e['l'] for e in episodes]):.1f}")
        if self.model.ep_success_buffer:
            parts.append(f"success {safe_mean(list(self.model.ep_success_buffer)):.2f}")
        evaluation = self.evaluation
        if evaluation is not None and evaluation.last_eval_timesteps is not None:
            text = f"eval {evaluation.last_mean_reward:.3f}"
            if evaluation.last_success_rate is not None:
                text += f" (success {evaluation.last_success_rate:.2f})"
            parts.append(text)
        return " | ".join(parts)

    def _log_line(self) -> None:
        done = self.num_timesteps / max(self.total_timesteps, 1)
        elapsed = time.monotonic() - self._start_time
        fps = self.fps()
        remaining = (self.total_timesteps - self.num_timesteps) / fps if fps > 0 else float("inf")
        eta = _format_seconds(remaining) if math.isfinite(remaining) else "?"
        print(
            f"[{100 * done:5.1f}%] step {self.num_timesteps:,}/{self.total_timesteps:,} | "
            f"{self.summary()} | elapsed {_format_seconds(elapsed)} | eta {eta}",
            file=self.stream,
            flush=True,
        )


def _format_seconds(seconds: float) -> str:
    """``3725.0`` -> ``'1:02:05'``."""
    return str(_dt.timedelta(seconds=round(max(seconds, 0.0))))


def with_sigint_ignored(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with SIGINT ignored, so worker processes it forks inherit the ignore.

    Subprocess envs would otherwise die on the terminal's Ctrl-C before the main process
    can checkpoint; with SIGINT ignored they keep running until the main process closes them.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGINT, previous)


class EvalVideo(BaseCallback):
    """``callback_after_eval`` of :class:`PeriodicEval`: record one episode with the overlay.

    Writes ``<video_dir>/eval_<timesteps>.mp4`` and logs the episode to tensorboard as an
    animated GIF under ``eval/video`` (tensorboard's image tab plays it).

    :param make_env: builds a single env with ``render_mode="rgb_array"`` from a seed.
    :param video_dir: where the MP4 files go.
    :param seed: base seed; the episode recorded at step ``t`` resets with ``seed + t``, so a
        resumed run records new layouts rather than replaying its first ones.
    :param fps: frames per second.
    :param deterministic: take the most likely action.
    """

    def __init__(
        self,
        make_env: Callable[[int], Any],
        video_dir: str | os.PathLike[str],
        seed: int,
        fps: int = 4,
        deterministic: bool = True,
    ) -> None:
        super().__init__()
        self._make_env = make_env
        self.video_dir = Path(video_dir)
        self._seed = seed
        self.fps = fps
        self.deterministic = deterministic

    def _on_step(self) -> bool:
        from agents.experiment.video import encode_gif, run_episode, write_mp4

        env = self._make_env(self._seed + self.num_timesteps)
        try:
            episode = run_episode(
                self.model, env, deterministic=self.deterministic, frames="overlay"
            )
        finally:
            env.close()
        write_mp4(self.video_dir / f"eval_{self.num_timesteps:012d}.mp4", episode.frames, self.fps)
        writer = tensorboard_writer(self.model)
        if writer is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            height, width = episode.frames[0].shape[:2]
            image = Summary.Image(
                height=height,
                width=width,
                colorspace=3,
                encoded_image_string=encode_gif(episode.frames, self.fps),
            )
            summary = Summary(value=[Summary.Value(tag="eval/video", image=image)])
            writer._get_file_writer().add_summary(summary, self.num_timesteps)
        return True
