"""Benchmark suites: env x agent x seed x budget, run through :mod:`agents.experiment.training`.

A *suite* is a YAML file (``configs/benchmarks/*.yaml``) that lists tasks (an env id with
a threshold, targets and config overrides) and run entries (a task, agents, seeds, a
budget, more overrides). Every run is an ordinary training run: its config is built by
:func:`agents.experiment.config.load_config` from the env's file in ``configs/`` plus the overrides,
and it is trained by :func:`agents.experiment.training.train` (or continued by
:func:`agents.experiment.training.resume`), with one extra callback, :class:`EvalRecorder`, that
records the evaluation curve in both action modes and the clock with evaluation excluded.

When a run finishes, one JSON *record* is written to
``<out>/records/<suite>/<task>__<label>__<seed>.json`` (schema: :data:`RECORD_KEYS`, one
curve point: :data:`POINT_KEYS`). A run with a record is done; a run without one restarts
from its latest checkpoint. :func:`write_report` turns records into a Markdown report with
one table per task and plots of reward against env steps and against training wall-clock.

Suite file format::

    name: quick                      # the records folder and the report section
    description: one line            # shown in the report
    output: runs/benchmark_reports/quick   # default --out (relative to the repo root)
    eval_mode: stochastic            # the evaluation the tables, thresholds and targets use
    fps_baseline: lstm               # the row every row's fps is compared with (default)
    overrides: [train.torch_threads=1]     # dotted config overrides for every run
    tasks:
      MiniGrid-DoorKey-5x5-v0:       # a task name: an env id, or any name with `env:`
        env: MiniGrid-DoorKey-5x5-v0 # optional; default: the task name
        budget: 150000               # optional default budget of its runs
        overrides: [train.eval_freq=10000]
        threshold: {metric: mean_reward, value: 0.9}
        targets:
          - {agent: thalamus, metric: mean_reward, value: 0.9, by: 100000}
        fps_baseline: lstm           # optional; default: the suite's
    runs:
      - task: MiniGrid-DoorKey-5x5-v0
        agents: [thalamus, ppo, lstm] # agent.kind values
        seeds: [0, 1, 2]
        budget: 150000               # env steps (train.total_timesteps)
        label: nofeedback            # optional, one agent only: the row name (default: kind)
        overrides: [thalamus.use_feedback=false]
      - task: MiniGrid-MemoryS7-v0   # a run another suite has too: trained once
        agents: [thalamus]
        seeds: [0, 1, 2]
        shared_with: full            # that suite's runs of the same key (task, label, seed);
                                     # full.yaml beside this file, else in configs/benchmarks/

A run entry with ``shared_with`` names runs that another suite lists with the same key,
budget and config (checked when the suite loads): they are trained once, and their
records and run directories are that suite's, so that e.g. the ablation suite's full-agent
row is the full suite's runs rather than a second copy of them.

Overrides apply in the order suite, task, run entry; the harness then sets ``agent.kind``,
``train.seed`` and ``train.total_timesteps`` from the entry (overrides may not set them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from agents.experiment.config import (
    ConfigError,
    ExperimentConfig,
    find_config_for_env,
    load_config,
    resolve_yaml_file,
    sections_ignored_by,
)
from agents.experiment.io import (
    CheckpointInfo,
    atomic_write_text,
    global_rng_preserved,
    latest_checkpoint,
)
from agents.experiment.training import RunCallbacks, RunPaths
from agents.factory import AGENT_KINDS

__all__ = [
    "BASELINE_AGENT",
    "EVAL_MODES",
    "METRICS",
    "POINT_KEYS",
    "RECORD_KEYS",
    "SCHEMA_VERSION",
    "SUITE_DIR",
    "BenchmarkError",
    "EvalRecorder",
    "RunSpec",
    "Suite",
    "Target",
    "TaskSpec",
    "Threshold",
    "execute_run",
    "first_reach",
    "git_commit",
    "load_record",
    "load_records",
    "load_suite",
    "pending_runs",
    "plot_curves",
    "record_path",
    "report_markdown",
    "run_status",
    "run_suite",
    "summarize_task",
    "target_result",
    "validate_record",
    "write_report",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE_DIR = REPO_ROOT / "configs" / "benchmarks"
"""Where suites live; a bare suite name is looked up here."""
SCHEMA_VERSION = 1
METRICS = ("mean_reward", "success_rate")
"""Evaluation metrics a threshold or target may name."""
EVAL_MODES = ("stochastic", "deterministic")
"""Both are recorded at every evaluation: sampled actions and the most likely action."""
BASELINE_AGENT = "lstm"
"""The default ``fps_baseline``: the row whose training fps the others are compared with
(sb3-contrib RecurrentPPO)."""
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
no default had changed since they ran)."""
POINT_KEYS = ("timesteps", "wall_s", "train_wall_s", *EVAL_MODES)
"""One evaluation: env steps, wall seconds since training started and training seconds
(evaluation excluded) when it started, and ``{mode: {mean_reward, success_rate, episodes}}``."""
_FORBIDDEN_OVERRIDES = {
    "agent.kind": "agents",
    "train.seed": "seeds",
    "train.total_timesteps": "budget",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BenchmarkError(ValueError):
    """A suite or a record is invalid; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Threshold:
    """Frames (and seconds) to reach ``metric >= value`` are reported for every run."""

    metric: str
    value: float

    def describe(self) -> str:
        return f"{_METRIC_TEXT[self.metric]} >= {_number(self.value)}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What an agent should reach: the median over seeds of ``metric`` at the last
    evaluation at or before ``by`` env steps (the run's last evaluation when ``by`` is None)
    is at least ``value``."""

    agent: str
    metric: str
    value: float
    by: int | None = None

    def describe(self) -> str:
        text = f"{self.agent}: {_METRIC_TEXT[self.metric]} >= {_number(self.value)}"
        return text + (f" by {_steps(self.by)} steps" if self.by is not None else " at the end")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task of a suite: an env id, its overrides, threshold and targets.

    :ivar fps_baseline: the row label whose median fps the table divides every row's by.
    """

    name: str
    env_id: str
    threshold: Threshold
    targets: tuple[Target, ...] = ()
    overrides: tuple[str, ...] = ()
    fps_baseline: str = BASELINE_AGENT


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a suite.

    :ivar label: the row name in tables and file names (the agent kind unless given).
    :ivar overrides: suite, task and entry overrides, in that order (for a shared run: the
        other suite's, which give the same config).
    :ivar shared_with: the suite whose run this is too (``shared_with`` in the suite file):
        its record and run directory are that suite's. None: the run is this suite's own.
    """

    suite: str
    task: str
    env_id: str
    agent: str
    label: str
    seed: int
    budget: int
    overrides: tuple[str, ...] = ()
    shared_with: str | None = None

    @property
    def record_suite(self) -> str:
        """The suite whose records folder and runs folder hold this run."""
        return self.shared_with or self.suite

    @property
    def key(self) -> str:
        """``<task>__<label>__<seed>``: the record's file stem and the run directory's name."""
        return f"{self.task}__{self.label}__{self.seed}"

    def config_overrides(self) -> list[str]:
        """The overrides :func:`load_config` gets: the entry's, then kind, seed and budget."""
        return [
            *self.overrides,
            f"agent.kind={self.agent}",
            f"train.seed={self.seed}",
            f"train.total_timesteps={self.budget}",
        ]

    def load_config(self) -> ExperimentConfig:
        """The run's config: ``configs/`` file for the env (if any), then the overrides.

        :raises ConfigError: an override is invalid.
        """
        return load_config(find_config_for_env(self.env_id), self.config_overrides())


@dataclasses.dataclass(frozen=True)
class Suite:
    """A parsed suite file (see the module docstring for the format)."""

    name: str
    description: str
    path: Path
    output: Path
    eval_mode: str
    tasks: dict[str, TaskSpec]
    runs: tuple[RunSpec, ...]

    def labels(self, task: str) -> list[str]:
        """The row names of ``task``, in the order the suite lists them."""
        return list(dict.fromkeys(r.label for r in self.runs if r.task == task))


def resolve_suite_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A suite file from a path or a bare name in ``configs/benchmarks/``.

    >>> resolve_suite_path("quick").name
    'quick.yaml'
    """
    return resolve_yaml_file(name_or_path, SUITE_DIR, "suite", BenchmarkError)


def load_suite(
    name_or_path: str | os.PathLike[str],
    *,
    check_configs: bool = True,
    resolve_shared: bool = True,
) -> Suite:
    """Parse and validate a suite file.

    :param name_or_path: a path or a name in ``configs/benchmarks/`` (``quick``, ``full``).
    :param check_configs: also build every run's config (catches bad override keys and
        values before any training starts).
    :param resolve_shared: load the suites that ``shared_with`` names and check the shared
        runs against them; False leaves those entries out (used for that very check, so
        that two suites naming each other cannot recurse).
    :raises BenchmarkError: what is wrong, where, and what is valid.
    """
    path = resolve_suite_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BenchmarkError(f"suite {path} is not valid YAML: {exc}") from None
    where = f"suite {path}"
    data = _mapping(data, where)
    _known_keys(
        data,
        where,
        (
            "name",
            "description",
            "output",
            "eval_mode",
            "fps_baseline",
            "overrides",
            "tasks",
            "runs",
        ),
    )
    name = _required(data, "name", where, str)
    if not _NAME.match(name):
        raise BenchmarkError(f"{where}: name = {name!r} must be letters, digits, '.', '_', '-'")
    eval_mode = data.get("eval_mode", "stochastic")
    if eval_mode not in EVAL_MODES:
        raise BenchmarkError(
            f"{where}: eval_mode = {eval_mode!r} is not valid; choose one of: "
            + ", ".join(EVAL_MODES)
        )
    output = Path(data.get("output", f"runs/benchmark_reports/{name}"))
    suite_overrides = _overrides(data.get("overrides", []), f"{where}: overrides")
    suite_baseline = _label(data.get("fps_baseline", BASELINE_AGENT), f"{where}: fps_baseline")

    tasks: dict[str, TaskSpec] = {}
    budgets: dict[str, int | None] = {}
    raw_tasks = _mapping(_required(data, "tasks", where, dict), f"{where}: tasks")
    for task_name, raw in raw_tasks.items():
        task_where = f"{where}: tasks.{task_name}"
        if not isinstance(task_name, str) or not _NAME.match(task_name):
            raise BenchmarkError(
                f"{task_where}: a task name must be letters, digits, '.', '_', '-'"
            )
        raw = _mapping(raw, task_where)
        _known_keys(
            raw,
            task_where,
            ("env", "budget", "overrides", "threshold", "targets", "fps_baseline"),
        )
        env_id = raw.get("env", task_name)
        _check_env(env_id, task_where)
        threshold = _mapping(_required(raw, "threshold", task_where, dict), task_where)
        _known_keys(threshold, f"{task_where}.threshold", ("metric", "value"))
        tasks[task_name] = TaskSpec(
            name=task_name,
            env_id=env_id,
            threshold=Threshold(
                _metric(threshold.get("metric"), f"{task_where}.threshold"),
                _number_field(threshold, "value", f"{task_where}.threshold"),
            ),
            targets=tuple(
                _target(t, f"{task_where}.targets[{i}]")
                for i, t in enumerate(raw.get("targets") or [])
            ),
            overrides=_overrides(raw.get("overrides", []), f"{task_where}.overrides"),
            fps_baseline=_label(
                raw.get("fps_baseline", suite_baseline), f"{task_where}.fps_baseline"
            ),
        )
        budgets[task_name] = _positive_int(raw, "budget", task_where, required=False)

    runs: list[RunSpec] = []
    raw_runs = _required(data, "runs", where, list)
    if not raw_runs:
        raise BenchmarkError(f"{where}: runs is empty; list at least one run entry")
    for i, raw in enumerate(raw_runs):
        run_where = f"{where}: runs[{i}]"
        raw = _mapping(raw, run_where)
        _known_keys(
            raw,
            run_where,
            ("task", "agents", "agent", "seeds", "budget", "label", "overrides", "shared_with"),
        )
        task_name = _required(raw, "task", run_where, str)
        if task_name not in tasks:
            raise BenchmarkError(
                f"{run_where}: task = {task_name!r} is not defined under tasks; defined: "
                + ", ".join(tasks)
            )
        task = tasks[task_name]
        agents = _agents(raw, run_where)
        seeds = raw.get("seeds")
        if not isinstance(seeds, list) or not seeds:
            raise BenchmarkError(f"{run_where}: seeds must be a non-empty list, e.g. [0, 1, 2]")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise BenchmarkError(f"{run_where}: seeds = {seeds!r} must be integers >= 0")
        budget = _positive_int(raw, "budget", run_where, required=False) or budgets[task_name]
        if budget is None:
            raise BenchmarkError(
                f"{run_where}: no budget; give budget (env steps) here or under tasks.{task_name}"
            )
        label = raw.get("label")
        if label is not None:
            if len(agents) != 1:
                raise BenchmarkError(
                    f"{run_where}: label names one agent but agents = {agents}; give one "
                    "entry per agent"
                )
            _label(label, f"{run_where}: label")
        overrides = _overrides(raw.get("overrides", []), f"{run_where}.overrides")
        shared_with = raw.get("shared_with")
        entry_runs = [
            RunSpec(
                suite=name,
                task=task_name,
                env_id=task.env_id,
                agent=agent,
                label=label or agent,
                seed=seed,
                budget=budget,
                overrides=(*suite_overrides, *task.overrides, *overrides),
            )
            for agent in agents
            for seed in seeds
        ]
        if shared_with is not None:
            if not resolve_shared:
                continue
            entry_runs = _shared_runs(entry_runs, shared_with, path, name, run_where, check_configs)
        runs.extend(entry_runs)
    seen: dict[str, RunSpec] = {}
    for run in runs:
        if run.key in seen:
            fix = (
                "list each seed once"
                if (seen[run.key].budget, seen[run.key].overrides) == (run.budget, run.overrides)
                else "give one of them a different label"
            )
            raise BenchmarkError(f"{where}: run {run.key} is listed twice; {fix}")
        seen[run.key] = run
    for task in tasks.values():
        labels = {r.label for r in runs if r.task == task.name}
        for target in task.targets:
            if target.agent not in labels:
                raise BenchmarkError(
                    f"{where}: tasks.{task.name} has a target for agent {target.agent!r}, but "
                    f"no run of that task has that label; labels: {', '.join(sorted(labels))}"
                )
        explicit = raw_tasks[task.name].get("fps_baseline", data.get("fps_baseline"))
        if explicit is not None and task.fps_baseline not in labels:
            raise BenchmarkError(
                f"{where}: tasks.{task.name} compares fps with {task.fps_baseline!r} "
                f"(fps_baseline), but no run of that task has that label; labels: "
                f"{', '.join(sorted(labels))}"
            )
    suite = Suite(
        name, str(data.get("description", "")), path, output, eval_mode, tasks, tuple(runs)
    )
    if check_configs:
        for run in suite.runs:
            if run.shared_with is not None:
                continue  # checked against the other suite's run by _shared_runs
            try:
                config = run.load_config()
            except ConfigError as exc:
                raise BenchmarkError(f"{where}: run {run.key}: {exc}") from None
            if config.train.eval_freq <= 0 or config.train.eval_freq > run.budget:
                raise BenchmarkError(
                    f"{where}: run {run.key}: train.eval_freq = {config.train.eval_freq} gives "
                    f"no evaluation within the budget of {run.budget}; set train.eval_freq "
                    "between 1 and the budget in the overrides"
                )
    return suite


def _shared_runs(
    runs: list[RunSpec],
    other_name: Any,
    suite_path: Path,
    suite_name: str,
    where: str,
    check_configs: bool,
) -> list[RunSpec]:
    """``runs`` as runs of suite ``other_name`` (a run entry's ``shared_with``): the suite
    file ``<other_name>.yaml`` beside this suite's file, else in ``configs/benchmarks/``.

    Each run must be in the other suite under the same key with the same env and budget,
    and (with ``check_configs``) the same config, training length and logging aside.

    :raises BenchmarkError: the other suite is missing or invalid, or a run differs.
    """
    if not isinstance(other_name, str) or not _NAME.match(other_name):
        raise BenchmarkError(f"{where}: shared_with = {other_name!r} must be a suite name")
    if other_name == suite_name:
        raise BenchmarkError(f"{where}: shared_with names this suite; name another suite")
    try:
        beside = suite_path.parent / f"{other_name}.yaml"
        other = load_suite(
            beside if beside.is_file() else other_name, check_configs=False, resolve_shared=False
        )
    except BenchmarkError as exc:
        raise BenchmarkError(f"{where}: shared_with = {other_name!r}: {exc}") from None
    theirs = {r.key: r for r in other.runs}  # its own runs: shared entries were left out
    shared = []
    for run in runs:
        match = theirs.get(run.key)
        if match is None or (match.env_id, match.budget) != (run.env_id, run.budget):
            raise BenchmarkError(
                f"{where}: shared_with = {other_name!r}, but suite {other_name} has no run "
                f"{run.key} with env {run.env_id} and budget {run.budget}; share only runs "
                "that suite lists, or drop shared_with to run them here"
            )
        if check_configs:
            try:
                differences = _config_differences(run.load_config(), match.load_config())
            except ConfigError as exc:
                raise BenchmarkError(f"{where}: run {run.key}: {exc}") from None
            if differences:
                raise BenchmarkError(
                    f"{where}: run {run.key} is shared with suite {other_name}, but its config "
                    f"differs there in {', '.join(differences)}; give both the same overrides "
                    "or drop shared_with"
                )
        shared.append(dataclasses.replace(run, overrides=match.overrides, shared_with=other_name))
    return shared


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise BenchmarkError(
            f"{where} = {value!r} must be a row label (letters, digits, '.', '_', '-')"
        )
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BenchmarkError(f"{where} must be a mapping (key: value), not {type(value).__name__}")
    return value


def _known_keys(data: dict[str, Any], where: str, known: Sequence[str]) -> None:
    for key in data:
        if key not in known:
            raise BenchmarkError(f"{where}: unknown key {key!r}; valid keys: {', '.join(known)}")


def _required(data: dict[str, Any], key: str, where: str, kind: type) -> Any:
    if key not in data or data[key] is None:
        raise BenchmarkError(f"{where}: missing required key {key!r}")
    if not isinstance(data[key], kind):
        raise BenchmarkError(f"{where}: {key} = {data[key]!r} must be a {kind.__name__}")
    return data[key]


def _positive_int(data: dict[str, Any], key: str, where: str, required: bool) -> int | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BenchmarkError(f"{where}: {key} = {value!r} must be an integer >= 1 (env steps)")
    return value


def _number_field(data: dict[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise BenchmarkError(f"{where}: {key} = {value!r} must be a number")
    return float(value)


def _metric(value: Any, where: str) -> str:
    if value not in METRICS:
        raise BenchmarkError(
            f"{where}: metric = {value!r} is not valid; choose one of: {', '.join(METRICS)}"
        )
    return value


def _target(raw: Any, where: str) -> Target:
    raw = _mapping(raw, where)
    _known_keys(raw, where, ("agent", "metric", "value", "by"))
    return Target(
        agent=_required(raw, "agent", where, str),
        metric=_metric(raw.get("metric"), where),
        value=_number_field(raw, "value", where),
        by=_positive_int(raw, "by", where, required=False),
    )


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BenchmarkError(
            f"{where} must be a list of 'key=value' strings, e.g. [thalamus.use_feedback=false]"
        )
    for item in value:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise BenchmarkError(f"{where}: '{item}' must look like key=value")
        if key.strip() in _FORBIDDEN_OVERRIDES:
            raise BenchmarkError(
                f"{where}: '{item}' sets {key.strip()}, which the run entry's "
                f"{_FORBIDDEN_OVERRIDES[key.strip()]} field sets; use that field"
            )
    return tuple(value)


def _agents(raw: dict[str, Any], where: str) -> list[str]:
    if "agent" in raw and "agents" in raw:
        raise BenchmarkError(f"{where}: give agent or agents, not both")
    agents = raw.get("agents", raw.get("agent"))
    if agents is None:
        raise BenchmarkError(f"{where}: missing required key 'agents' (e.g. [thalamus, lstm])")
    if isinstance(agents, str):
        agents = [agents]
    if not isinstance(agents, list) or not agents:
        raise BenchmarkError(f"{where}: agents must be a non-empty list, e.g. [thalamus, lstm]")
    for agent in agents:
        if agent not in AGENT_KINDS:
            raise BenchmarkError(
                f"{where}: agent {agent!r} is not valid; choose from: {', '.join(AGENT_KINDS)}"
            )
    return agents


def _check_env(env_id: Any, where: str) -> None:
    from envs.registry import check_env_id

    if not isinstance(env_id, str):
        raise BenchmarkError(f"{where}: env = {env_id!r} must be an env id string")
    try:
        check_env_id(env_id)
    except ValueError as exc:
        raise BenchmarkError(f"{where}: env {env_id!r}: {exc}") from None


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
    a copy of the run's eval envs (:func:`agents.experiment.training.make_eval_env`), so the
    run's own evaluations see the episodes they would see under ``scripts/train_agent.py``. When the
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


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


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


def run_status(run: RunSpec, out: Path, runs_dir: Path) -> str:
    """``done`` (a record exists), ``partial at step N`` (a checkpoint exists) or ``pending``;
    a shared run's status is followed by ``(suite <name>)``, the suite that holds it."""
    shared = f" (suite {run.shared_with})" if run.shared_with else ""
    if record_path(out, run).is_file():
        return "done" + shared
    checkpoint = latest_checkpoint(RunPaths(run_dir_of(runs_dir, run)).checkpoints)
    if checkpoint is not None:
        return f"partial at step {checkpoint.timesteps:,}{shared}"
    return "pending" + shared


def pending_runs(suite: Suite, out: Path, only: Sequence[str] = ()) -> list[RunSpec]:
    """The suite's runs without a record, filtered by ``only`` (fnmatch patterns on keys)."""
    return [
        run
        for run in suite.runs
        if not record_path(out, run).is_file()
        and (not only or any(fnmatch.fnmatch(run.key, pattern) for pattern in only))
    ]


#: Config keys that change how a run is computed or reported but not the function it
#: trains: the SSD scan computes the same function at any ``chunk_size`` and on either
#: ``backend`` (tests/test_mamba2.py: every chunk length against the float64 reference, the
#: mamba-ssm kernels against the pure path on CUDA), so a record run with another chunk
#: length or backend is the same agent rounded differently, not a stale one.
SCHEDULE_ONLY_KEYS = frozenset(
    {
        "train.total_timesteps",
        "train.runs_dir",
        "train.progress",
        "train.log_every_s",
        "thalamus.chunk_size",
        "thalamus.backend",
    }
)


def _config_differences(
    a: ExperimentConfig | dict[str, Any],
    b: ExperimentConfig | dict[str, Any],
    *,
    defaults: ExperimentConfig | None = None,
) -> list[str]:
    """Dotted keys whose values differ between two configs (:data:`SCHEDULE_ONLY_KEYS`
    ignored, and for two configs of the same agent kind the sections that kind does not
    read: a thalamus default does not make a PPO record stale).

    :param a: a config, or one as a nested dict (a record's ``config``).
    :param defaults: for ``a`` written under an older schema: compare ``b``'s keys only, and
        read a key that ``a`` lacks from ``defaults``. A key is added with a default that
        keeps the old behaviour, so a record that lacks it ran with that default: it is
        stale if ``b`` sets the key to anything else. A key since removed is not compared.
    """

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if dataclasses.is_dataclass(node):
            node = dataclasses.asdict(node)  # type: ignore[arg-type]
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        if isinstance(node, list | tuple) and node and all(
            isinstance(item, dict) or dataclasses.is_dataclass(item) for item in node
        ):  # e.g. thalamus.streams: the count, then each item's keys (thalamus.streams.1.clock)
            out = {prefix[:-1]: len(node)}
            for index, item in enumerate(node):
                out.update(flat(item, f"{prefix}{index}."))
            return out
        return {prefix[:-1]: node}

    def same(x: Any, y: Any) -> bool:  # JSON turns tuples into lists
        if isinstance(x, list | tuple) and isinstance(y, list | tuple):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y, strict=True))
        return x == y

    fa, fb = flat(a), flat(b)
    if defaults is None:
        keys = fa.keys() | fb.keys()
    else:
        fa = {**flat(defaults), **fa}
        keys = fb.keys()
    kind = fa.get("agent.kind")
    unread = sections_ignored_by(kind) if kind == fb.get("agent.kind") else set()
    return sorted(
        k
        for k in keys
        if k not in SCHEDULE_ONLY_KEYS
        and k.split(".", 1)[0] not in unread
        and not same(fa.get(k), fb.get(k))
    )


def execute_run(
    run: RunSpec,
    out: str | os.PathLike[str],
    runs_dir: str | os.PathLike[str],
    threshold: Threshold,
    eval_mode: str = "stochastic",
    commit: str | None = None,
) -> Path:
    """Train ``run`` (or continue it from its latest checkpoint) and write its record.

    A run with a record is skipped. A run directory with a checkpoint is resumed (if its
    config still matches the suite's, ``train.total_timesteps`` aside); one without a
    checkpoint is deleted and started again.

    :param run: the run.
    :param out: the output folder (records go to ``<out>/records/<suite>/``).
    :param runs_dir: where run directories go (``<runs_dir>/<suite>/<key>/``).
    :param threshold: the task's threshold (frames to reach it are recorded).
    :param eval_mode: the mode ``threshold`` is judged in by default (both are recorded).
    :param commit: the code version to record (default: :func:`git_commit`).
    :return: the record's path.
    :raises BenchmarkError: the run directory holds a run with a different config.
    :raises agents.experiment.training.TrainingInterrupted: SIGINT/SIGTERM (a checkpoint was saved).
    """
    from agents.experiment.training import make_eval_env, resume, train

    out_path = record_path(Path(out), run)
    if out_path.is_file():
        return out_path
    config = run.load_config()
    run_dir = run_dir_of(Path(runs_dir), run)
    paths = RunPaths(run_dir)
    progress = run_dir / PROGRESS_FILE
    if paths.checkpoints.is_dir() and any(paths.checkpoints.glob("step_*.zip")):
        from agents.experiment.training import refuse_pickled_run

        try:
            refuse_pickled_run(paths)  # never the rmtree below for a run an old version saved
        except ConfigError as exc:
            raise BenchmarkError(str(exc)) from None
    checkpoint = latest_checkpoint(paths.checkpoints)
    if checkpoint is not None and not paths.config.is_file():
        raise BenchmarkError(
            f"{run_dir} has checkpoints but no {paths.config.name}, so which config they were "
            f"trained with is unknown; put the run's config.yaml back to continue it, or "
            "delete the folder to start the run again"
        )
    if checkpoint is not None:
        saved = load_config(paths.config, defaults_file=None)
        if saved.train.total_timesteps > run.budget:
            raise BenchmarkError(
                f"{run_dir} holds run {run.key} trained for a budget of "
                f"{saved.train.total_timesteps:,} steps, more than the suite's {run.budget:,}: "
                "its curve would run past the budget; delete that folder to run it again with "
                "this budget"
            )
        differences = _config_differences(saved, config)
        if differences:
            raise BenchmarkError(
                f"{run_dir} holds run {run.key} with a different config ({', '.join(differences)}"
                "); delete that folder to start the run again with the suite's config"
            )
    elif run_dir.exists():
        shutil.rmtree(run_dir)  # started but no checkpoint: nothing to continue
        checkpoint = None

    if checkpoint is None or checkpoint.timesteps < run.budget:
        other_env = make_eval_env(config)
        try:
            if checkpoint is None:
                recorder = _recorder(progress, run.budget, None, other_env)
                train(config, run_dir, extra_callbacks=recorder)
            else:
                state = json.loads(progress.read_text()) if progress.is_file() else {}
                state = _state_at_checkpoint(state, checkpoint.timesteps)
                recorder = _recorder(progress, run.budget, state, other_env)
                resume(run_dir, total_timesteps=run.budget, extra_callbacks=recorder)
        finally:
            other_env.close()
    if not progress.is_file():
        raise BenchmarkError(
            f"{run_dir} reached its budget but has no {PROGRESS_FILE}; delete the folder to "
            "run it again"
        )
    state = json.loads(progress.read_text())
    if not state.get("finished"):
        # The process died between its last checkpoint (at the budget) and the final
        # evaluation: evaluate that checkpoint now rather than lose the run.
        final = latest_checkpoint(paths.checkpoints)
        if final is None or final.timesteps < run.budget:
            raise BenchmarkError(
                f"{run_dir} has no checkpoint at its budget of {run.budget:,} steps; run the "
                "same benchmark command again to continue it"
            )
        state = _finish_from_checkpoint(config, state, final)
        atomic_write_text(progress, json.dumps(state, indent=1))
    if "mission_sensitivity" not in state:
        try:
            state["mission_sensitivity"] = _final_mission_sensitivity(config, paths)
        except Exception as exc:  # a trained run keeps its record; the error is in it
            state["mission_sensitivity"] = {"error": f"{type(exc).__name__}: {exc}"}
        atomic_write_text(progress, json.dumps(state, indent=1))
    record = build_record(run, config, state, threshold, eval_mode, commit or git_commit(), run_dir)
    atomic_write_text(out_path, json.dumps(record, indent=1) + "\n")
    return out_path


def _finish_from_checkpoint(
    config: ExperimentConfig, state: dict[str, Any], checkpoint: CheckpointInfo
) -> dict[str, Any]:
    """The recorder state of a run whose final checkpoint was saved but not evaluated.

    The state is cut back to ``checkpoint`` (:func:`_state_at_checkpoint`) and, unless an
    evaluation already happened at that step, one point is added: both action modes, each on
    fresh eval envs (:func:`agents.experiment.training.make_eval_env`), with the clock at the
    checkpoint.
    """
    from agents.experiment.model_files import load_model_file
    from agents.experiment.training import make_eval_env

    state = _state_at_checkpoint(state, checkpoint.timesteps)
    curve = list(state["curve"])
    if not curve or curve[-1]["timesteps"] != checkpoint.timesteps:
        model = load_model_file(checkpoint.model_path, device=config.train.device)
        clock = state["clock"]
        point: dict[str, Any] = {
            "timesteps": checkpoint.timesteps,
            "wall_s": float(clock["wall_s"]),
            "train_wall_s": float(clock["wall_s"]) - float(clock["eval_wall_s"]),
        }
        for deterministic in (False, True):
            env = type(model)._wrap_env(make_eval_env(config), verbose=0, monitor_wrapper=False)
            try:
                point[_mode(deterministic)] = _evaluate(
                    model, env, config.train.eval_episodes, deterministic
                )
            finally:
                env.close()
        curve.append(point)
    clock = {**state["clock"]}
    clock.setdefault("train_wall_s", float(clock["wall_s"]) - float(clock["eval_wall_s"]))
    return {
        **state,
        "curve": curve,
        "clock": clock,
        "timesteps": checkpoint.timesteps,
        "finished": True,
    }


def _final_mission_sensitivity(config: ExperimentConfig, paths: RunPaths) -> dict[str, Any] | None:
    """Success of the run's final model with the true and with shuffled missions
    (:func:`agents.experiment.mission_sensitivity.mission_sensitivity`) on ``train.eval_episodes``
    episodes from the eval seeds, in the run's own eval mode; None on an env whose mission
    is the same in every episode (or that has none)."""
    import envs
    from agents.experiment.mission_sensitivity import mission_sensitivity
    from agents.experiment.model_files import load_model_file
    from agents.experiment.training import EVAL_SEED_OFFSET

    model_path = paths.final_model
    if not model_path.is_file():
        last = latest_checkpoint(paths.checkpoints)
        if last is None:
            return None
        model_path = last.model_path
    model = load_model_file(model_path, device=config.train.device)
    env = envs.make_env(
        config.env.id, trial_episodes=config.env.trial_episodes, **config.env.env_kwargs
    )
    try:
        with global_rng_preserved():
            return mission_sensitivity(
                model,
                env,
                config.train.eval_episodes,
                config.train.seed + EVAL_SEED_OFFSET,
                config.train.eval_deterministic,
            )
    finally:
        env.close()


def _recorder(
    progress: Path, budget: int, state: dict[str, Any] | None, other_env: VecEnv
) -> Callable[[RunCallbacks], list[BaseCallback]]:
    """The ``extra_callbacks`` factory that adds an :class:`EvalRecorder` to a run."""

    def factory(own: RunCallbacks) -> list[BaseCallback]:
        return [EvalRecorder(own, progress, budget, state, other_env)]

    return factory


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


def _interrupted_message(exc: Any) -> str:
    step = f" at step {exc.checkpoint.timesteps:,}" if exc.checkpoint is not None else ""
    return (
        f"interrupted{step}; a checkpoint was saved: run the same benchmark command again to "
        "continue it"
    )


def _run_one(args: tuple[Any, ...], reraise_interrupt: bool = False) -> tuple[str, str | None]:
    """Worker entry point: ``execute_run(*args)`` -> ``(key, error or None)``.

    :param reraise_interrupt: let :class:`agents.experiment.training.TrainingInterrupted`
        through (in process, Ctrl-C must stop the suite, not just the run).
    """
    run = args[0]
    print(f"start {run.key}", flush=True)
    from agents.experiment.training import TrainingInterrupted

    try:
        execute_run(*args)
    except TrainingInterrupted as exc:
        if reraise_interrupt:
            raise
        return run.key, _interrupted_message(exc)
    except Exception as exc:  # reported by the parent; the other runs go on
        return run.key, f"{type(exc).__name__}: {exc}"
    return run.key, None


def run_suite(
    suite: Suite,
    out: str | os.PathLike[str],
    runs_dir: str | os.PathLike[str],
    *,
    parallel: int = 1,
    only: Sequence[str] = (),
    in_process: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, str | None]:
    """Run the suite's pending runs, ``parallel`` at a time, each in a fresh process.

    A fresh process per run keeps peak memory a per-run number and a crash local to its run.

    :param in_process: run one after another in this process (for debugging; the peak
        memory is then this process' peak).
    :return: ``{run key: error message or None}`` for the runs attempted.
    :raises KeyboardInterrupt: SIGINT/SIGTERM stopped a run (its checkpoint was saved); the
        runs after it were not started.
    """
    if parallel < 1:
        raise BenchmarkError(f"parallel = {parallel} must be >= 1")
    todo = pending_runs(suite, Path(out), only)
    commit = git_commit()
    jobs = [
        (run, Path(out), Path(runs_dir), suite.tasks[run.task].threshold, suite.eval_mode, commit)
        for run in todo
    ]
    done = len(suite.runs) - len(pending_runs(suite, Path(out)))
    log(
        f"suite {suite.name}: {len(suite.runs)} runs, {done} done, {len(todo)} to run"
        + (f" (filtered by {', '.join(only)})" if only else "")
        + f", {parallel} at a time; commit {commit}"
    )
    results: dict[str, str | None] = {}

    def report(key: str, error: str | None) -> None:
        results[key] = error
        status = "ok" if error is None else f"FAILED: {error}"
        log(f"[{len(results)}/{len(jobs)}] {key}: {status}")

    if in_process:
        from agents.experiment.training import TrainingInterrupted

        for job in jobs:
            try:
                report(*_run_one(job, reraise_interrupt=True))
            except TrainingInterrupted as exc:  # Ctrl-C/SIGTERM: stop here, as a pool would
                report(job[0].key, _interrupted_message(exc))
                raise KeyboardInterrupt from exc
        return results

    _run_in_processes([(job[0].key, job) for job in jobs], parallel, report)
    return results


def _send_result(target: Callable[[Any], Any], job: Any, sender: Any) -> None:
    """Child process entry point: send ``target(job)`` to the parent."""
    try:
        sender.send(target(job))
    finally:
        sender.close()


def _run_in_processes(
    jobs: Sequence[tuple[str, Any]],
    parallel: int,
    report: Callable[[str, str | None], None],
    target: Callable[[Any], tuple[str, str | None]] = _run_one,
) -> None:
    """Run ``target(job)`` for each ``(key, job)``, each in a fresh spawned process,
    ``parallel`` at a time, and ``report(*result)`` as each ends.

    Not a ``ProcessPoolExecutor``: when one of its workers dies (killed, out of memory) it
    terminates the others and fails every queued job, so one crash would stop every run.
    Here a process that exits without a result is reported as died and the others go on.
    On Ctrl-C (which reaches the children too: they checkpoint and stop) nothing new starts
    and the running children are waited for.
    """
    import multiprocessing
    import multiprocessing.connection

    context = multiprocessing.get_context("spawn")
    queue = list(jobs)
    running: dict[Any, tuple[Any, Any, str]] = {}  # sentinel -> (process, receiver, key)
    received: dict[str, tuple[str, str | None]] = {}
    read_out: set[str] = set()  # keys whose pipe gave a result or EOF: stop watching it
    try:
        while queue or running:
            while queue and len(running) < parallel:
                key, job = queue.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(
                    target=_send_result, args=(target, job, sender), name=key, daemon=False
                )
                process.start()
                sender.close()  # the child holds the only sending end: EOF when it exits
                running[process.sentinel] = (process, receiver, key)
            receivers = {r: k for _, r, k in running.values() if k not in read_out}
            ready_ones = multiprocessing.connection.wait([*running, *receivers])
            # Pipes first: a sentinel's handling closes its pipe.
            for ready in sorted(ready_ones, key=lambda r: r not in receivers):
                if ready in receivers:  # read before the exit: a full pipe would block it
                    read_out.add(receivers[ready])
                    with contextlib.suppress(EOFError):
                        received[receivers[ready]] = ready.recv()
                    continue
                process, receiver, key = running.pop(ready)
                process.join()
                read_out.discard(key)
                if key not in received and receiver.poll():
                    with contextlib.suppress(EOFError):
                        received[key] = receiver.recv()
                receiver.close()
                if key in received:
                    report(*received.pop(key))
                else:
                    report(
                        key,
                        f"worker died (exit code {process.exitcode}; killed, or out of memory?); "
                        "run the same command again to continue it from its last checkpoint",
                    )
    except KeyboardInterrupt:
        for process, receiver, _ in running.values():
            process.join()
            receiver.close()
        raise


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


def _median_range(values: Sequence[float]) -> tuple[float, float, float] | None:
    """``(median, min, max)`` or None for no values."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _day_span(days: Sequence[str]) -> str:
    """``2026-11-23`` or ``2026-11-23 to 2026-12-05``."""
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _metric_at(record: dict[str, Any], metric: str, mode: str, by: int | None) -> float | None:
    """``metric`` at the last evaluation at or before ``by`` env steps (the last one if None)."""
    points = [p for p in record["curve"] if by is None or p["timesteps"] <= by]
    if not points:
        return None
    return (points[-1].get(mode) or {}).get(metric)


@dataclasses.dataclass
class AgentSummary:
    """One row of a task's table; each statistic is ``(median, min, max)`` over seeds or None.

    :ivar reached: seeds that reached the threshold, of ``seeds``.
    :ivar days: the dates (``YYYY-MM-DD``) its runs finished on, sorted.
    """

    label: str
    seeds: list[int]
    final_reward: tuple[float, float, float] | None
    final_success: tuple[float, float, float] | None
    frames_to_threshold: tuple[float, float, float] | None
    seconds_to_threshold: tuple[float, float, float] | None
    reached: int
    fps: tuple[float, float, float] | None
    fps_ratio: float | None
    peak_rss_mb: tuple[float, float, float] | None
    budget: int
    days: tuple[str, ...] = ()


def summarize_task(
    task: TaskSpec, labels: Sequence[str], records: Sequence[dict[str, Any]], mode: str
) -> list[AgentSummary]:
    """One :class:`AgentSummary` per label with records, in ``labels`` order.

    Frames and seconds to the threshold are over the seeds that reached it (``reached``
    says how many); the fps ratio is this row's median fps over that of the task's
    ``fps_baseline`` row (LSTM-PPO unless the suite says otherwise).
    """
    rows: list[AgentSummary] = []
    by_label = {label: [r for r in records if r["agent"] == label] for label in labels}
    for label, recs in by_label.items():
        if not recs:
            continue
        reach = [
            first_reach(r["curve"], task.threshold.metric, task.threshold.value, mode) for r in recs
        ]
        hits = [x for x in reach if x is not None]
        finals_r = [v for r in recs if (v := _metric_at(r, "mean_reward", mode, None)) is not None]
        finals_s = [v for r in recs if (v := _metric_at(r, "success_rate", mode, None)) is not None]
        fps = [r["train_fps"] for r in recs if r["train_fps"] is not None]
        rows.append(
            AgentSummary(
                label=label,
                seeds=sorted(r["seed"] for r in recs),
                final_reward=_median_range(finals_r),
                final_success=_median_range(finals_s),
                frames_to_threshold=_median_range([float(x["timesteps"]) for x in hits]),
                seconds_to_threshold=_median_range([x["train_wall_s"] for x in hits]),
                reached=len(hits),
                fps=_median_range(fps),
                fps_ratio=None,
                peak_rss_mb=_median_range([r["peak_rss_mb"] for r in recs]),
                budget=max(r["budget"] for r in recs),
                days=tuple(sorted({str(r["finished_at"])[:10] for r in recs if r["finished_at"]})),
            )
        )
    baseline = next((r for r in rows if r.label == task.fps_baseline), None)
    if baseline is not None and baseline.fps is not None and baseline.fps[0] > 0:
        for row in rows:
            if row.fps is not None:
                row.fps_ratio = row.fps[0] / baseline.fps[0]
    return rows


CROSS_DAY_GAP_DAYS = 2
"""An fps ratio between rows whose runs all finished at least this many days apart is
flagged: this machine's speed changes from day to day, so the ratio mixes machine and agent."""


def days_apart(row: AgentSummary, baseline: AgentSummary) -> int | None:
    """The fewest days between a run of ``row`` and one of ``baseline`` (None: a date is
    missing or unreadable)."""
    try:
        ours = [_dt.date.fromisoformat(d) for d in row.days]
        theirs = [_dt.date.fromisoformat(d) for d in baseline.days]
    except ValueError:
        return None
    if not ours or not theirs:
        return None
    return min(abs((a - b).days) for a in ours for b in theirs)


@dataclasses.dataclass
class TargetResult:
    """A target checked against the records: ``status`` is ``met``, ``MISSED`` or ``no runs``."""

    target: Target
    status: str
    median: float | None
    per_seed: dict[int, float | None]


def target_result(target: Target, records: Sequence[dict[str, Any]], mode: str) -> TargetResult:
    """Check ``target`` on the records of its agent: the median over seeds of the metric at
    the last evaluation at or before ``target.by`` steps must be >= ``target.value``
    (a seed with no evaluation by then counts as 0)."""
    recs = [r for r in records if r["agent"] == target.agent]
    if not recs:
        return TargetResult(target, "no runs", None, {})
    per_seed = {
        r["seed"]: _metric_at(r, target.metric, mode, target.by)
        for r in sorted(recs, key=lambda r: r["seed"])
    }
    median = statistics.median(v if v is not None else 0.0 for v in per_seed.values())
    return TargetResult(target, "met" if median >= target.value else "MISSED", median, per_seed)


_METRIC_TEXT = {"mean_reward": "mean eval reward", "success_rate": "eval success rate"}


# Three significant figures round 999.5 up to 1000, which ``g`` writes as ``1e+03``: the
# unit changes where the rounded value would reach 1000, not the value itself.
def _number(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 999.5 else f"{x:,.0f}"


def _steps(n: float) -> str:
    """``150000`` -> ``'150k'``, ``2000000`` -> ``'2M'``, ``4096`` -> ``'4.1k'``."""
    if n >= 999_500:
        return f"{n / 1e6:.3g}M"
    if n >= 999.5:
        return f"{n / 1e3:.3g}k"
    return f"{n:.0f}"


def _cell(stat: tuple[float, float, float] | None, fmt: Callable[[float], str]) -> str:
    if stat is None:
        return "–"
    median, low, high = stat
    if low == high:
        return fmt(median)
    return f"{fmt(median)} [{fmt(low)}–{fmt(high)}]"


def _fmt2(x: float) -> str:
    return f"{x:.2f}"


def _fmt0(x: float) -> str:
    return f"{x:.0f}"


def _suite_records(
    suite: Suite, records: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The records a suite's report counts, and the keys of those it leaves out.

    A record of a task, agent or seed the suite does not run is left out (it would move the
    medians and the fps ratios of runs it is not one of). Of two records of one run (a
    suite's own folder can still hold one for a run it now shares with another suite), the
    later one in ``records`` is kept.
    """
    planned = {(r.task, r.label, r.seed) for r in suite.runs}
    kept: dict[tuple[str, str, int], dict[str, Any]] = {}
    left_out = []
    for record in records:
        run = (record["task"], record["agent"], record["seed"])
        if run in planned:
            kept[run] = record
        else:
            left_out.append("__".join(map(str, run)))
    return list(kept.values()), sorted(left_out)


def _stale_records(suite: Suite, records: Sequence[dict[str, Any]]) -> list[str]:
    """Records of the suite's runs that no longer match it: ``key`` or ``key (changed keys)``."""
    specs = {(r.task, r.label, r.seed): r for r in suite.runs}
    stale = []
    for record in records:
        key = f"{record['task']}__{record['agent']}__{record['seed']}"
        spec = specs.get((record["task"], record["agent"], record["seed"]))
        if spec is None:
            continue  # not a run of the suite: _suite_records leaves it out
        if spec.budget != record["budget"] or list(spec.overrides) != list(record["overrides"]):
            stale.append(key)
            continue
        if "config" not in record:  # written before records held the resolved config
            continue
        try:
            changed = _config_differences(
                record["config"], spec.load_config(), defaults=ExperimentConfig()
            )
        except ConfigError as exc:
            changed = [f"the suite's config no longer loads: {exc}"]
        if changed:
            stale.append(f"{key} ({', '.join(changed)})")
    return sorted(stale)


def report_markdown(
    suite: Suite, records: Sequence[dict[str, Any]], plots: dict[str, Path], base: Path
) -> str:
    """The report section of one suite: status, targets, one table per task, the aggregates
    over seeds (:mod:`agents.bench_stats`), the plots.

    :param plots: ``{"steps": png, "wall": png}`` from :func:`plot_curves` (may be empty).
    :param base: the folder the Markdown file is in (image links are relative to it).
    """
    mode = suite.eval_mode
    records, not_in_suite = _suite_records(suite, records)
    lines = [f"## Suite `{suite.name}`", ""]
    if suite.description:
        lines += [suite.description, ""]
    have = {(r["task"], r["agent"], r["seed"]) for r in records}
    missing = [r.key for r in suite.runs if (r.task, r.label, r.seed) not in have]
    commits = sorted({r["commit"] for r in records})
    lines.append(
        f"{len(suite.runs) - len(missing)} of {len(suite.runs)} runs have records"
        + (f" (commit {', '.join(commits)})" if commits else "")
        + f". Suite file: `{_relative(suite.path)}`. Evaluation: {mode} actions (both modes are "
        "in the records)."
    )
    if not_in_suite:
        lines += [
            "",
            "**Records of runs the suite file does not have** (left out of everything below; "
            f"delete them, or add their runs to the suite): {', '.join(not_in_suite)}.",
        ]
    stale = _stale_records(suite, records)
    if stale:
        lines += [
            "",
            "**Records that do not match the suite file** (its budget, overrides or resolved "
            "config changed since they ran; they are counted below until you delete them and "
            f"run again): {', '.join(stale)}.",
        ]
    if missing:
        shown = ", ".join(missing[:12]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 12 else ""
        )
        lines += ["", f"**Not run yet:** {shown}."]
    lines.append("")

    # Targets.
    lines += ["### Targets", "", "| task | target | measured (median over seeds) | status |"]
    lines.append("|---|---|---|---|")
    results = []
    partial = []  # targets judged on fewer seeds than the suite runs
    for task in suite.tasks.values():
        task_records = [r for r in records if r["task"] == task.name]
        for target in task.targets:
            result = target_result(target, task_records, mode)
            results.append((task, result))
            planned = sum(1 for r in suite.runs if (r.task, r.label) == (task.name, target.agent))
            seeds_note = ""
            if result.per_seed and len(result.per_seed) < planned:
                seed_count = f"{len(result.per_seed)} of {planned} seeds"
                seeds_note = f" ({seed_count})"
                partial.append(f"{task.name} ({target.describe()}: {seed_count})")
            if result.median is None:
                measured = "–"
            else:
                seeds = ", ".join(
                    f"seed {s}: {'–' if v is None else f'{v:.2f}'}"
                    for s, v in result.per_seed.items()
                )
                measured = f"{result.median:.2f} ({seeds})"
            status = {"met": "met", "MISSED": "**MISSED**", "no runs": "not run"}[result.status]
            lines.append(
                f"| {task.name} | {target.describe()} | {measured} | {status}{seeds_note} |"
            )
    if not results:
        lines.append("| – | no targets in this suite | – | – |")
    missed = [f"{t.name} ({r.target.describe()})" for t, r in results if r.status == "MISSED"]
    not_run = [f"{t.name} ({r.target.describe()})" for t, r in results if r.status == "no runs"]
    lines.append("")
    if missed:
        lines.append(f"**Targets missed:** {'; '.join(missed)}.")
    if not_run:
        lines.append(f"**Targets not yet measured:** {'; '.join(not_run)}.")
    if partial:
        lines.append(
            f"**Judged on fewer seeds than the suite runs:** {'; '.join(partial)}; the status "
            "may change as the other seeds come in."
        )
    if results and not missed and not not_run:
        lines.append("All targets met." if not partial else "All targets met so far.")
    lines.append("")

    # Tables.
    lines += [
        "### Results",
        "",
        "Median [min–max] over seeds. *Final*: the last evaluation (at the budget). *To "
        "threshold*: env steps and training seconds to the first evaluation at or above the "
        "task's threshold, over the seeds that reached it. *fps*: env steps per second of "
        "training, evaluation time excluded; *vs X*: the median fps over that of row X on the "
        "same task (LSTM-PPO unless the suite names another). *Peak RSS*: the run process' "
        "peak resident memory.",
        "",
    ]
    for task in suite.tasks.values():
        task_records = [r for r in records if r["task"] == task.name]
        title = task.name if task.name == task.env_id else f"{task.name} ({task.env_id})"
        lines += [f"#### {title}", ""]
        extra = [o for o in task.overrides if not o.startswith("train.")]
        lines.append(
            f"Threshold: {task.threshold.describe()}."
            + (f" Task overrides: `{' '.join(extra)}`." if extra else "")
        )
        lines.append("")
        rows = summarize_task(task, suite.labels(task.name), task_records, mode)
        if not rows:
            lines += ["No records yet.", ""]
            continue
        lines.append(
            "| agent | seeds | budget | final reward | final success | to threshold (steps) | "
            f"to threshold (s) | fps | vs {task.fps_baseline} | peak RSS (MB) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        baseline = next((r for r in rows if r.label == task.fps_baseline), None)
        cross_day: list[str] = []
        for row in rows:
            n = len(row.seeds)
            if row.reached == 0:
                steps_cell = seconds_cell = f"not reached (0/{n})"
            else:
                suffix = "" if row.reached == n else f" ({row.reached}/{n} reached)"
                steps_cell = _cell(row.frames_to_threshold, _steps) + suffix
                seconds_cell = _cell(row.seconds_to_threshold, _fmt0) + suffix
            ratio = "–" if row.fps_ratio is None else f"{row.fps_ratio:.2f}x"
            gap = None if baseline is None or row is baseline else days_apart(row, baseline)
            if row.fps_ratio is not None and gap is not None and gap >= CROSS_DAY_GAP_DAYS:
                ratio += " †"
                cross_day.append(f"{row.label} ({_day_span(row.days)})")
            lines.append(
                f"| {row.label} | {', '.join(map(str, row.seeds))} | {_steps(row.budget)} | "
                f"{_cell(row.final_reward, _fmt2)} | {_cell(row.final_success, _fmt2)} | "
                f"{steps_cell} | {seconds_cell} | {_cell(row.fps, _fmt0)} | {ratio} | "
                f"{_cell(row.peak_rss_mb, _fmt0)} |"
            )
        lines.append("")
        if cross_day and baseline is not None:
            lines += [
                f"† Runs finished at least {CROSS_DAY_GAP_DAYS} days from the "
                f"{baseline.label} runs ({_day_span(baseline.days)}): "
                f"{', '.join(cross_day)}. This machine's speed varies between days, so these "
                "ratios compare machines as much as agents.",
                "",
            ]
        lines += _mission_sensitivity_table(task_records)
    # Imported here: pandas and rliable (with arch, seaborn) are for the report only.
    from agents.bench_stats import aggregates_markdown

    lines += aggregates_markdown(suite, records)
    if plots:
        lines += ["### Curves", ""]
        for kind, path in plots.items():
            text = "env steps" if kind == "steps" else "training wall-clock"
            lines.append(f"![{suite.name}: {mode} eval reward vs {text}]({_link(path, base)})")
            lines.append("")
    return "\n".join(lines)


def _mission_sensitivity_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """Report lines: per agent, success of the final models with their own missions and with
    another episode's (median [min–max] over seeds); none when no record measured it."""
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        measured = record.get("mission_sensitivity")
        if measured and "error" not in measured:
            by_agent.setdefault(record["agent"], []).append(record)
    if not by_agent:
        return []
    lines = [
        "Mission sensitivity of the final models (each run's eval mode and episodes): success "
        "with each episode's own mission and with the mission of another episode of the same "
        "env (a seeded derangement), median [min–max] over seeds. An agent that reads its "
        "mission loses success when it is shuffled.",
        "",
        "| agent | seeds | true mission | shuffled mission | drop |",
        "|---|---|---|---|---|",
    ]
    for agent, recs in by_agent.items():
        measured = [r["mission_sensitivity"] for r in recs]
        true = _median_range([m["true"]["success_rate"] for m in measured])
        shuffled = _median_range([m["shuffled"]["success_rate"] for m in measured])
        drop = _median_range([m["drop"] for m in measured])
        seeds = ", ".join(str(r["seed"]) for r in sorted(recs, key=lambda r: r["seed"]))
        lines.append(
            f"| {agent} | {seeds} | {_cell(true, _fmt2)} | {_cell(shuffled, _fmt2)} | "
            f"{_cell(drop, _fmt2)} |"
        )
    return [*lines, ""]


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    return str(path)


def _link(path: Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(base).resolve()).replace(os.sep, "/")


def _aligned(
    records: Sequence[dict[str, Any]], x_key: str, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Seeds' curves aligned by evaluation index: ``(x median, y median, y min, y max)``,
    each ``[n_points]``, over the points every seed has."""
    length = min(len(r["curve"]) for r in records)
    if length == 0:
        return None
    xs = np.array([[p[x_key] for p in r["curve"][:length]] for r in records], dtype=float)
    ys = np.array(
        [
            [(p.get(mode) or {}).get("mean_reward", np.nan) for p in r["curve"][:length]]
            for r in records
        ],
        dtype=float,
    )
    return np.median(xs, 0), np.median(ys, 0), np.min(ys, 0), np.max(ys, 0)


def plot_curves(
    suite: Suite, records: Sequence[dict[str, Any]], folder: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write ``<suite>_reward_vs_steps.png`` and ``<suite>_reward_vs_wall.png``.

    One panel per task with records, one line per agent (the median over seeds, the range
    shaded); the wall-clock plot uses training seconds (evaluation excluded).

    :return: ``{"steps": path, "wall": path}``; empty if there is nothing to plot (and the
        suite's plots from an earlier report, which would show records no longer there,
        are deleted).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    x_axes = (
        ("steps", "timesteps", "env steps"),
        ("wall", "train_wall_s", "training wall-clock (s, evaluation excluded)"),
    )
    tasks = [t for t in suite.tasks.values() if any(r["task"] == t.name for r in records)]
    if not tasks:
        for kind, _, _ in x_axes:
            (folder / f"{suite.name}_reward_vs_{kind}.png").unlink(missing_ok=True)
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    for kind, x_key, xlabel in x_axes:
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, task in zip(axes.flat, tasks, strict=False):
            for label in suite.labels(task.name):
                recs = [r for r in records if r["task"] == task.name and r["agent"] == label]
                if not recs:
                    continue
                aligned = _aligned(recs, x_key, suite.eval_mode)
                if aligned is None:
                    continue
                x, median, low, high = aligned
                (line,) = ax.plot(
                    x, median, label=f"{label} ({len(recs)} seed{'s' if len(recs) > 1 else ''})"
                )
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            if task.threshold.metric == "mean_reward":
                ax.axhline(task.threshold.value, color="grey", linestyle=":", linewidth=1)
            ax.set_title(task.name, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"eval reward ({suite.eval_mode})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(tasks) :]:
            ax.set_visible(False)
        fig.tight_layout()
        path = folder / f"{suite.name}_reward_vs_{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written[kind] = path
    return written


def write_report(suites: Iterable[Suite], out: str | os.PathLike[str]) -> Path:
    """Write ``<out>/README.md`` (a section per suite) and ``<out>/plots/*.png``.

    :param suites: the suites to report; each one's records are read from
        ``<out>/records/<suite>/`` (those of shared runs from the other suite's folder).
    :return: the Markdown file.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for suite in suites:
        records = load_records(out / "records" / suite.name) + [
            load_record(path)
            for run in suite.runs
            if run.shared_with is not None and (path := record_path(out, run)).is_file()
        ]
        # The report names the records it leaves out; of two of one run, the shared one wins.
        plots = plot_curves(suite, _suite_records(suite, records)[0], out / "plots")
        sections.append(report_markdown(suite, records, plots, out))
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            "Written by `scripts/benchmark.py --report` from the records in `records/` (one "
            "JSON per run). Do not edit by hand; run the suites and the report again.",
            "",
            *sections,
        ]
    )
    path = out / "README.md"
    atomic_write_text(path, text.rstrip() + "\n")
    return path
