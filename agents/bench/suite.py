"""Benchmark suites: env x agent x seed x budget (the file format and its validation).

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
      - task: MiniGrid-DoorKey-5x5-v0
        agents: [ppo]
        seeds: [0, 1, 2]
        config: recipes/ppo_doorkey  # optional: the per-env file the runs start from (a tuned
                                     # recipe; a path or a name under configs/); default: the
                                     # env's own file
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

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from agents.experiment.config import (
    ConfigError,
    ExperimentConfig,
    find_config_for_env,
    load_config,
    resolve_config_path,
    resolve_yaml_file,
    sections_ignored_by,
)
from agents.experiment.schema import SchemaError, at_least, choice, load_structured, read_yaml
from agents.registry import AGENT_KINDS

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE_DIR = REPO_ROOT / "configs" / "benchmarks"
"""Where suites live; a bare suite name is looked up here."""

METRICS = ("mean_reward", "success_rate")
"""Evaluation metrics a threshold or target may name."""
EVAL_MODES = ("stochastic", "deterministic")
"""Both are recorded at every evaluation: sampled actions and the most likely action."""
BASELINE_AGENT = "lstm"
"""The default ``fps_baseline``: the row whose training fps the others are compared with
(sb3-contrib RecurrentPPO)."""

_FORBIDDEN_OVERRIDES = {
    "agent.kind": "agents",
    "train.seed": "seeds",
    "train.total_timesteps": "budget",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BenchmarkError(SchemaError):
    """A suite or a record is invalid; the message names the file, the key and the fix."""


# --------------------------------------------------------------------------------------
# The suite file's schema (OmegaConf structured configs; see agents/experiment/schema.py)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class ThresholdSection:
    """``threshold:`` of a task: ``metric >= value`` (frames to reach it are reported)."""

    metric: str = MISSING
    value: float = MISSING


@dataclasses.dataclass
class TargetSection:
    """One item of a task's ``targets:``."""

    agent: str = MISSING
    metric: str = MISSING
    value: float = MISSING
    by: int | None = None


@dataclasses.dataclass
class TaskSection:
    """One entry of ``tasks:`` (its key is the task's name)."""

    threshold: ThresholdSection = MISSING
    env: str | None = None
    budget: int | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    targets: list[TargetSection] = dataclasses.field(default_factory=list)
    fps_baseline: str | None = None


@dataclasses.dataclass
class RunEntry:
    """One item of ``runs:``; ``agents`` (a list) or ``agent`` (one kind)."""

    task: str = MISSING
    seeds: list[int] = MISSING
    agents: list[str] | None = None
    agent: str | None = None
    budget: int | None = None
    label: str | None = None
    config: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    shared_with: str | None = None


@dataclasses.dataclass
class SuiteFile:
    """A suite file as written (the module docstring shows every key)."""

    name: str = MISSING
    tasks: dict[str, TaskSection] = MISSING
    runs: list[RunEntry] = MISSING
    description: str = ""
    output: str | None = None
    eval_mode: str = "stochastic"
    fps_baseline: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)


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
    :ivar config: the per-env config file the run starts from (a path, or a name in
        ``configs/``, e.g. a tuned recipe ``recipes/ppo_keycorridor_s3r1``); None: the env's
        own file, as ``train_agent.py --env`` picks it.
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
    config: str | None = None

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
        """The run's config: its ``config`` file, else the ``configs/`` file for the env (if
        any), then the overrides.

        :raises ConfigError: a file or an override is invalid.
        """
        if self.config is None:
            return load_config(find_config_for_env(self.env_id), self.config_overrides())
        return load_config(resolve_config_path(self.config), self.config_overrides())


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
    where = f"suite {path}"
    data = load_structured(
        read_yaml(path, "suite", BenchmarkError), SuiteFile, where, BenchmarkError
    )
    name = data.name
    _check_name(name, where, "name")
    choice(data.eval_mode, EVAL_MODES, where, "eval_mode", BenchmarkError)
    output = Path(data.output if data.output is not None else f"runs/benchmark_reports/{name}")
    suite_overrides = _overrides(data.overrides, f"{where}: overrides")
    suite_baseline = _label(
        data.fps_baseline if data.fps_baseline is not None else BASELINE_AGENT,
        f"{where}: fps_baseline",
    )

    tasks: dict[str, TaskSpec] = {}
    budgets: dict[str, int | None] = {}
    for task_name, raw in data.tasks.items():
        task_where = f"{where}: tasks.{task_name}"
        if not _NAME.match(task_name):
            raise BenchmarkError(
                f"{task_where}: a task name must be letters, digits, '.', '_', '-'"
            )
        env_id = raw.env if raw.env is not None else task_name
        _check_env(env_id, task_where)
        choice(raw.threshold.metric, METRICS, f"{task_where}.threshold", "metric", BenchmarkError)
        for i, target in enumerate(raw.targets):
            target_where = f"{task_where}.targets[{i}]"
            choice(target.metric, METRICS, target_where, "metric", BenchmarkError)
            at_least(target.by, 1, target_where, "by", "env steps", BenchmarkError)
        at_least(raw.budget, 1, task_where, "budget", "env steps", BenchmarkError)
        tasks[task_name] = TaskSpec(
            name=task_name,
            env_id=env_id,
            threshold=Threshold(raw.threshold.metric, raw.threshold.value),
            targets=tuple(Target(t.agent, t.metric, t.value, t.by) for t in raw.targets),
            overrides=_overrides(raw.overrides, f"{task_where}.overrides"),
            fps_baseline=_label(
                raw.fps_baseline if raw.fps_baseline is not None else suite_baseline,
                f"{task_where}.fps_baseline",
            ),
        )
        budgets[task_name] = raw.budget

    runs: list[RunSpec] = []
    if not data.runs:
        raise BenchmarkError(f"{where}: runs is empty; list at least one run entry")
    for i, raw in enumerate(data.runs):
        run_where = f"{where}: runs[{i}]"
        task_name = raw.task
        if task_name not in tasks:
            raise BenchmarkError(
                f"{run_where}: task = {task_name!r} is not defined under tasks; defined: "
                + ", ".join(tasks)
            )
        task = tasks[task_name]
        agents = _agents(raw, run_where)
        if not raw.seeds:
            raise BenchmarkError(f"{run_where}: seeds must be a non-empty list, e.g. [0, 1, 2]")
        if any(s < 0 for s in raw.seeds):
            raise BenchmarkError(f"{run_where}: seeds = {raw.seeds!r} must be integers >= 0")
        at_least(raw.budget, 1, run_where, "budget", "env steps", BenchmarkError)
        budget = raw.budget or budgets[task_name]
        if budget is None:
            raise BenchmarkError(
                f"{run_where}: no budget; give budget (env steps) here or under tasks.{task_name}"
            )
        label = raw.label
        if label is not None:
            if len(agents) != 1:
                raise BenchmarkError(
                    f"{run_where}: label names one agent but agents = {agents}; give one "
                    "entry per agent"
                )
            _label(label, f"{run_where}: label")
        overrides = _overrides(raw.overrides, f"{run_where}.overrides")
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
                config=_recipe(raw.config, task.env_id, agent, f"{run_where}.config"),
            )
            for agent in agents
            for seed in raw.seeds
        ]
        if raw.shared_with is not None:
            if not resolve_shared:
                continue
            entry_runs = _shared_runs(
                entry_runs, raw.shared_with, path, name, run_where, check_configs
            )
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
        explicit = data.tasks[task.name].fps_baseline or data.fps_baseline
        if explicit is not None and task.fps_baseline not in labels:
            raise BenchmarkError(
                f"{where}: tasks.{task.name} compares fps with {task.fps_baseline!r} "
                f"(fps_baseline), but no run of that task has that label; labels: "
                f"{', '.join(sorted(labels))}"
            )
    suite = Suite(name, data.description, path, output, data.eval_mode, tasks, tuple(runs))
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
        shared.append(
            dataclasses.replace(
                run, overrides=match.overrides, config=match.config, shared_with=other_name
            )
        )
    return shared


def _check_name(value: str, where: str, key: str) -> None:
    if not _NAME.match(value):
        raise BenchmarkError(f"{where}: {key} = {value!r} must be letters, digits, '.', '_', '-'")


def _label(value: str, where: str) -> str:
    if not _NAME.match(value):
        raise BenchmarkError(
            f"{where} = {value!r} must be a row label (letters, digits, '.', '_', '-')"
        )
    return value


def _overrides(value: list[str], where: str) -> tuple[str, ...]:
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


def _recipe(config: str | None, env_id: str, agent: str, where: str) -> str | None:
    """``config`` (a run entry's recipe file) checked against the run it is for.

    :raises BenchmarkError: the file is missing or unreadable, or it names another env or
        another agent kind than the run.
    """
    if config is None:
        return None
    try:
        path = resolve_config_path(config)
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (ConfigError, OSError, ValueError) as exc:
        raise BenchmarkError(f"{where}: {exc}") from None
    data = data if isinstance(data, dict) else {}
    file_env = (data.get("env") or {}).get("id")
    if file_env is not None and file_env != env_id:
        raise BenchmarkError(
            f"{where}: {config} is a config for {file_env}, but the task's env is {env_id}; "
            "give a recipe of this env"
        )
    file_agent = (data.get("agent") or {}).get("kind")
    if file_agent is not None and file_agent != agent:
        raise BenchmarkError(
            f"{where}: {config} is a recipe for agent {file_agent!r}, but the entry runs "
            f"{agent!r}; give each agent its own entry with its own recipe"
        )
    return config


def _agents(raw: RunEntry, where: str) -> list[str]:
    if raw.agent is not None and raw.agents is not None:
        raise BenchmarkError(f"{where}: give agent or agents, not both")
    agents = raw.agents if raw.agents is not None else raw.agent
    if agents is None:
        raise BenchmarkError(f"{where}: missing required key 'agents' (e.g. [thalamus, lstm])")
    if isinstance(agents, str):
        agents = [agents]
    if not agents:
        raise BenchmarkError(f"{where}: agents must be a non-empty list, e.g. [thalamus, lstm]")
    for agent in agents:
        if agent not in AGENT_KINDS:
            raise BenchmarkError(
                f"{where}: agent {agent!r} is not valid; choose from: {', '.join(AGENT_KINDS)}"
            )
    return list(agents)


def _check_env(env_id: str, where: str) -> None:
    from envs.registry import check_env_id

    try:
        check_env_id(env_id)
    except ValueError as exc:
        raise BenchmarkError(f"{where}: env {env_id!r}: {exc}") from None


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
        if (
            isinstance(node, list | tuple)
            and node
            and all(isinstance(item, dict) or dataclasses.is_dataclass(item) for item in node)
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
