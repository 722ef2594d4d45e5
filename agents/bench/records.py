"""Recording a benchmark run and its record on disk.

:class:`EvalRecorder` is the one extra callback a benchmark run trains with: it records the
evaluation curve in both action modes and the clock with evaluation excluded, and keeps that
state in ``<run_dir>/benchmark_progress.json`` so a resumed run continues it. When the run
finishes, :func:`build_record` turns the state into one JSON *record*, written to
``<out>/records/<suite>/<task>__<label>__<seed>.json`` (schema: :data:`RECORD_KEYS`, one
curve point: :data:`POINT_KEYS`); :func:`load_record` reads and validates one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from agents.bench.suite import EVAL_MODES, REPO_ROOT, BenchmarkError, RunSpec, Threshold
from agents.experiment.config import ExperimentConfig
from agents.experiment.io import atomic_write_text, global_rng_preserved
from agents.experiment.training import RunCallbacks

SCHEMA_VERSION = 1

PROGRESS_FILE = "benchmark_progress.json"
"""The recorder's state in the run directory (the curve so far, the clock at checkpoints)."""
RECORD_KEYS = (
    "schema",
    "suite",
    "task",
    "env",
    "agent",
    "agent_kind",
    "seed",
    "budget",
    "overrides",
    "commit",
    "timesteps",
    "eval_episodes",
    "curve",
    "final",
    "threshold",
    "wall_s",
    "train_wall_s",
    "eval_wall_s",
    "train_fps",
    "peak_rss_mb",
    "sessions",
    "run_dir",
    "finished_at",
    "host",
)
"""Keys every record has. ``curve`` is a list of points (:data:`POINT_KEYS`), ``final`` the
last point, ``threshold`` ``{metric, value, mode, reached: {mode: {timesteps, wall_s,
train_wall_s} | None}}``. Records written since the harness stored it also have ``config``,
the run's resolved config (every key, as ``config.yaml``): the report checks it against
the suite, so that a changed default is caught as well as a changed override. Older records
had it added afterwards, as the suite resolved at ``config_resolved_at`` (a commit at which
no default had changed since they ran). Optional measurements of the final model, read with
``.get`` (older records lack them): ``mission_sensitivity``
(:func:`agents.experiment.mission_sensitivity.mission_sensitivity`) and, on MiniGrid-Memory
envs, ``memory_diagnosis`` (:func:`agents.experiment.memory_diagnosis.summarize`); each None
where it does not apply and ``{"error": ...}`` where it failed."""
POINT_KEYS = ("timesteps", "wall_s", "train_wall_s", *EVAL_MODES)
"""One evaluation: env steps, wall seconds since training started and training seconds
(evaluation excluded) when it started, and ``{mode: {mean_reward, success_rate, episodes}}``."""

# --------------------------------------------------------------------------------------
# Recording a run
# --------------------------------------------------------------------------------------


def _evaluate(model: Any, env: Any, n_episodes: int, deterministic: bool) -> dict[str, Any]:
    """``{mean_reward, success_rate, episodes}`` of ``n_episodes`` on the vec env ``env``."""
    successes: list[float] = []

    def collect(locals_: dict[str, Any], globals_: dict[str, Any]) -> None:
        if locals_["done"]:
            success = locals_["info"].get("is_success")
            if success is not None:
                successes.append(float(success))

    with global_rng_preserved():  # recording both modes must not change training
        rewards, _ = evaluate_policy(
            model,
            env,
            n_eval_episodes=n_episodes,
            deterministic=deterministic,
            return_episode_rewards=True,
            callback=collect,
            warn=False,
        )
    return {
        "mean_reward": float(np.mean(rewards)),
        "success_rate": float(np.mean(successes)) if successes else None,
        "episodes": len(rewards),
    }


def _mode(deterministic: bool) -> str:
    return "deterministic" if deterministic else "stochastic"


def _peak_rss_mb() -> float:
    """This process' peak resident memory in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class EvalRecorder(BaseCallback):
    """Record the evaluation curve in both action modes and a clock without evaluation time.

    After each :class:`agents.experiment.callbacks.PeriodicEval` evaluation (the run's own, in
    ``train.eval_deterministic`` mode) it evaluates the same number of episodes in the other
    mode, and appends one point (:data:`POINT_KEYS`). The other mode plays on ``other_env``,
    a copy of the run's eval envs (:func:`agents.experiment.training.make_eval_env`), so the run's
    own
    evaluations see the episodes they would see under ``scripts/train_agent.py``. When the
    budget is reached it evaluates both modes once more unless the last evaluation was at that step.
    The state is written to ``<run_dir>/benchmark_progress.json`` after every evaluation and
    every checkpoint, with the clock at each checkpoint, so a resumed run continues the curve
    and the clock from its checkpoint.

    :param run: the run's own callbacks (from :data:`agents.experiment.training.ExtraCallbacks`).
    :param progress_path: where the state goes.
    :param total_timesteps: the budget (the final evaluation happens when it is reached).
    :param state: the state to continue (see :func:`_state_at_checkpoint`), or None.
    :param other_env: eval envs for the other mode (the caller closes them).
    """

    def __init__(
        self,
        run: RunCallbacks,
        progress_path: str | os.PathLike[str],
        total_timesteps: int,
        state: dict[str, Any] | None,
        other_env: VecEnv,
    ) -> None:
        super().__init__()
        if run.evaluation is None:
            raise BenchmarkError("a benchmark run needs train.eval_freq > 0")
        self.evaluation = run.evaluation
        self.checkpoint = run.checkpoint
        self.other_env = other_env  # wrapped for the model at training start
        self.progress_path = Path(progress_path)
        self.total_timesteps = total_timesteps
        state = state or {}
        self.curve: list[dict[str, Any]] = list(state.get("curve", []))
        self.marks: dict[str, dict[str, float]] = dict(state.get("marks", {}))
        clock = state.get("clock", {})
        self._wall_offset = float(clock.get("wall_s", 0.0))
        self._eval_s = float(clock.get("eval_wall_s", 0.0))
        self.sessions = int(state.get("sessions", 0)) + 1
        self.peak_rss_mb = float(state.get("peak_rss_mb", 0.0))
        self.finished = False
        self._t0 = 0.0
        self._seen = 0
        # The clock when the current rollout began: a stop mid-rollout checkpoints that step
        # (SB3 discards the partial rollout), so its mark must be this clock, not the stop's.
        self._rollout_clock: dict[str, float] | None = None

    # The clock ---------------------------------------------------------------------

    def wall_s(self) -> float:
        """Seconds since training started, over all sessions (setup excluded)."""
        return self._wall_offset + time.monotonic() - self._t0

    def clock(self) -> dict[str, float]:
        wall = self.wall_s()
        return {"wall_s": wall, "eval_wall_s": self._eval_s, "train_wall_s": wall - self._eval_s}

    # Callback hooks ----------------------------------------------------------------

    def _on_training_start(self) -> None:
        self.other_env = type(self.model)._wrap_env(
            self.other_env, verbose=0, monitor_wrapper=False
        )
        self._t0 = time.monotonic()
        self._seen = self.evaluation.n_evaluations

    def _on_step(self) -> bool:
        if self.evaluation.n_evaluations == self._seen:
            return True
        self._seen = self.evaluation.n_evaluations
        own_mode = _mode(self.evaluation.deterministic)
        eval_seconds = self.evaluation.last_eval_seconds or 0.0
        wall_at = self.wall_s() - eval_seconds
        point: dict[str, Any] = {
            "timesteps": int(self.num_timesteps),
            "wall_s": wall_at,
            "train_wall_s": wall_at - self._eval_s,
            own_mode: {
                "mean_reward": float(self.evaluation.last_mean_reward),
                "success_rate": self.evaluation.last_success_rate,
                "episodes": int(self.evaluation.n_eval_episodes),
            },
        }
        started = time.monotonic()
        other = not self.evaluation.deterministic
        point[_mode(other)] = _evaluate(
            self.model, self.other_env, self.evaluation.n_eval_episodes, other
        )
        self._eval_s += eval_seconds + time.monotonic() - started
        self.curve.append(point)
        self._save()
        return True

    def _on_rollout_start(self) -> None:
        self._mark_checkpoint()
        self._rollout_clock = self.clock()

    def _on_rollout_end(self) -> None:
        self._rollout_clock = None

    def _on_training_end(self) -> None:
        # SB3 does not refresh a callback's count here, and the checkpoint callback (which
        # runs first) may have wound the model's back to the rollout start.
        wound_back = self.model.num_timesteps < self.num_timesteps
        self.num_timesteps = self.model.num_timesteps
        if self.num_timesteps >= self.total_timesteps and (
            not self.curve or self.curve[-1]["timesteps"] != self.num_timesteps
        ):
            started = time.monotonic()
            wall_at = self.wall_s()
            point = {
                "timesteps": int(self.num_timesteps),
                "wall_s": wall_at,
                "train_wall_s": wall_at - self._eval_s,
            }
            for deterministic in (False, True):
                own = deterministic == self.evaluation.deterministic
                point[_mode(deterministic)] = _evaluate(
                    self.model,
                    self.evaluation.eval_env if own else self.other_env,
                    self.evaluation.n_eval_episodes,
                    deterministic,
                )
            self._eval_s += time.monotonic() - started
            self.curve.append(point)
        self.finished = self.num_timesteps >= self.total_timesteps
        self._mark_checkpoint(self._rollout_clock if wound_back else None)
        self._save()

    # State -------------------------------------------------------------------------

    def _mark_checkpoint(self, clock: dict[str, float] | None = None) -> None:
        """Store the clock (now, unless given) for a checkpoint saved at the current step."""
        saved = self.checkpoint.last_saved
        if saved is not None and saved.timesteps == self.num_timesteps:
            key = str(saved.timesteps)
            if key not in self.marks:
                self.marks[key] = clock if clock is not None else self.clock()
                self._save()

    def state(self) -> dict[str, Any]:
        """What ``benchmark_progress.json`` holds."""
        self.peak_rss_mb = max(self.peak_rss_mb, _peak_rss_mb())
        return {
            "timesteps": int(self.num_timesteps),
            "finished": self.finished,
            "curve": self.curve,
            "marks": self.marks,
            "clock": self.clock(),
            "sessions": self.sessions,
            "peak_rss_mb": self.peak_rss_mb,
        }

    def _save(self) -> None:
        atomic_write_text(self.progress_path, json.dumps(self.state(), indent=1))


def _state_at_checkpoint(state: dict[str, Any], timesteps: int) -> dict[str, Any]:
    """The recorder state as it was at the checkpoint of ``timesteps`` env steps.

    Points after the checkpoint are dropped (the resumed run evaluates them again), and the
    clock is the one marked at that checkpoint (time a crashed session spent after its last
    checkpoint is not counted).
    """
    marks = {k: v for k, v in state.get("marks", {}).items() if int(k) <= timesteps}
    curve = [p for p in state.get("curve", []) if p["timesteps"] <= timesteps]
    if str(timesteps) in marks:
        clock = marks[str(timesteps)]
    elif curve:  # no mark (an older file): the clock of the last kept evaluation
        clock = {
            "wall_s": curve[-1]["wall_s"],
            "eval_wall_s": curve[-1]["wall_s"] - curve[-1]["train_wall_s"],
        }
    else:
        clock = {"wall_s": 0.0, "eval_wall_s": 0.0}
    return {**state, "curve": curve, "marks": marks, "clock": clock}


def git_commit(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def record_path(out: Path, run: RunSpec) -> Path:
    """``<out>/records/<suite>/<task>__<label>__<seed>.json`` (a shared run: the other
    suite's folder)."""
    return Path(out) / "records" / run.record_suite / f"{run.key}.json"


def run_dir_of(runs_dir: Path, run: RunSpec) -> Path:
    """``<runs_dir>/<suite>/<task>__<label>__<seed>/``: the run's training directory (a
    shared run: the other suite's)."""
    return Path(runs_dir) / run.record_suite / run.key


def build_record(
    run: RunSpec,
    config: ExperimentConfig,
    state: dict[str, Any],
    threshold: Threshold,
    eval_mode: str,
    commit: str,
    run_dir: Path,
) -> dict[str, Any]:
    """The record of a finished run from the recorder's state (:data:`RECORD_KEYS`)."""
    import torch

    curve = state["curve"]
    clock = state["clock"]
    timesteps = int(state["timesteps"])
    train_wall = float(clock["train_wall_s"])
    return {
        "schema": SCHEMA_VERSION,
        "suite": run.record_suite,
        "task": run.task,
        "env": run.env_id,
        "agent": run.label,
        "agent_kind": run.agent,
        "seed": run.seed,
        "budget": run.budget,
        "overrides": list(run.overrides),
        "config": dataclasses.asdict(config),
        "commit": commit,
        "timesteps": timesteps,
        "eval_episodes": config.train.eval_episodes,
        "eval_freq": config.train.eval_freq,
        "curve": curve,
        "final": curve[-1] if curve else None,
        "mission_sensitivity": state.get("mission_sensitivity"),
        "memory_diagnosis": state.get("memory_diagnosis"),
        "threshold": {
            "metric": threshold.metric,
            "value": threshold.value,
            "mode": eval_mode,
            "reached": {
                mode: first_reach(curve, threshold.metric, threshold.value, mode)
                for mode in EVAL_MODES
            },
        },
        "wall_s": float(clock["wall_s"]),
        "train_wall_s": train_wall,
        "eval_wall_s": float(clock["eval_wall_s"]),
        "train_fps": timesteps / train_wall if train_wall > 0 else None,
        "peak_rss_mb": float(state.get("peak_rss_mb", 0.0)),
        "sessions": int(state.get("sessions", 1)),
        "run_dir": str(run_dir),
        "finished_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": {
            "machine": platform.machine(),
            "system": platform.system(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": config.train.torch_threads,
            "device": config.train.device,
        },
    }


def first_reach(
    curve: Sequence[dict[str, Any]], metric: str, value: float, mode: str
) -> dict[str, float] | None:
    """The first point whose ``mode`` evaluation has ``metric >= value``, as
    ``{timesteps, wall_s, train_wall_s}``; None if no point reaches it.

    >>> curve = [{"timesteps": 10, "wall_s": 1.0, "train_wall_s": 0.5,
    ...           "stochastic": {"mean_reward": 0.2}},
    ...          {"timesteps": 20, "wall_s": 2.0, "train_wall_s": 1.5,
    ...           "stochastic": {"mean_reward": 0.95}}]
    >>> first_reach(curve, "mean_reward", 0.9, "stochastic")
    {'timesteps': 20, 'wall_s': 2.0, 'train_wall_s': 1.5}
    """
    for point in curve:
        measured = (point.get(mode) or {}).get(metric)
        if measured is not None and measured >= value:
            return {k: point[k] for k in ("timesteps", "wall_s", "train_wall_s")}
    return None


# --------------------------------------------------------------------------------------
# Records and the report
# --------------------------------------------------------------------------------------


def validate_record(record: Any, source: str = "record") -> dict[str, Any]:
    """Check a record has every key of :data:`RECORD_KEYS` and well-formed curve points.

    :raises BenchmarkError: naming the file and the missing or malformed key.
    """
    if not isinstance(record, dict):
        raise BenchmarkError(f"{source}: a record must be a JSON object")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise BenchmarkError(f"{source}: missing keys {', '.join(missing)}")
    if record["schema"] != SCHEMA_VERSION:
        raise BenchmarkError(
            f"{source}: schema {record['schema']!r} is not {SCHEMA_VERSION}; run it again"
        )
    if not isinstance(record["curve"], list) or not record["curve"]:
        raise BenchmarkError(f"{source}: curve must be a non-empty list of evaluations")
    for i, point in enumerate(record["curve"]):
        lacking = [k for k in POINT_KEYS if k not in point]
        if lacking:
            raise BenchmarkError(f"{source}: curve[{i}] lacks {', '.join(lacking)}")
    return record


def load_records(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every ``*.json`` record in ``folder``, validated, sorted by file name."""
    return [load_record(path) for path in sorted(Path(folder).glob("*.json"))]


def load_record(path: Path) -> dict[str, Any]:
    """One record file, validated (:func:`validate_record`)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path} is not valid JSON: {exc}") from None
    return validate_record(data, str(path))


def _metric_at(record: dict[str, Any], metric: str, mode: str, by: int | None) -> float | None:
    """``metric`` at the last evaluation at or before ``by`` env steps (the last one if None)."""
    points = [p for p in record["curve"] if by is None or p["timesteps"] <= by]
    if not points:
        return None
    return (points[-1].get(mode) or {}).get(metric)
