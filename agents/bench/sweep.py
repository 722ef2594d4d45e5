"""Hyperparameter sweeps with Ray Tune: search space in YAML, each trial a project run.

A *sweep* is a YAML file in ``configs/sweeps/`` (schema: :class:`SweepFile`)::

    name: ppo_keycorridor_s3r1        # the experiment folder under storage
    description: one line
    base:
      config: keycorridor_s3r1        # a per-env file in configs/ (default: the env's file)
      env: null                       # or an env id (then its file in configs/, if any)
      agent: ppo                      # agent.kind
      overrides: [exploration.kind=count]   # part of the recipe: also in the best config
      run_overrides: [train.eval_freq=10000]   # how trials run: not in the best config
    budget: 150000                    # env steps per trial (train.total_timesteps)
    seed: 0                           # train.seed of every trial
    num_samples: 24                   # trials (points_to_evaluate count among them)
    metric: success_rate              # or mean_reward: of the run's periodic evaluations
    mode: max
    scheduler: {kind: asha, grace_period: 30000, reduction_factor: 3}   # or {kind: none}
    searcher: {kind: optuna, seed: 0} # or random
    space:                            # dotted config keys -> a Tune domain or a fixed value
      ppo.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}
      ppo.n_steps: {choice: [64, 128, 256]}
      ppo.ent_coef: {uniform: [0.0, 0.02]}
      ppo.n_epochs: {randint: [3, 11]}   # Tune's randint: the upper bound is excluded
    points_to_evaluate:               # trials to run first (e.g. a published recipe)
      - {ppo.learning_rate: 2.5e-4, ppo.n_steps: 128, ppo.ent_coef: 0.01, ppo.n_epochs: 4}
    cpus_per_trial: 1                 # Ray CPUs per trial; also its train.torch_threads
    max_concurrent: null              # default: as many as the CPUs allow
    storage: runs/sweeps              # relative to the repo root, or a path every node reaches

Every trial is an ordinary training run (:func:`agents.experiment.training.train`, or
:func:`agents.experiment.training.resume` when its run directory has a checkpoint), in
``<storage>/<name>/runs/<trial id>/``, with one extra callback, :class:`TuneReporter`, that
reports each periodic evaluation to Tune (``timesteps``, ``mean_reward``, ``success_rate``);
ASHA compares trials on ``metric`` at equal env steps. An interrupted sweep continues with
``Tuner.restore`` (the trials' own checkpoints carry their training on).

:func:`write_results` writes ``trials.md`` and ``trials.csv`` (one row per trial: its
values, the metric at its last evaluation, the env steps it reached, whether ASHA stopped
it) and ``best.yaml``: the per-env config of the best trial that trained the whole budget,
a file that ``scripts/train_agent.py --config`` accepts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from stable_baselines3.common.callbacks import BaseCallback

from agents.bench.suite import _NAME, METRICS, REPO_ROOT
from agents.experiment.schema import (
    SchemaError,
    at_least,
    choice,
    load_structured,
    read_yaml,
)

SWEEP_DIR = REPO_ROOT / "configs" / "sweeps"
"""Where sweeps live; a bare sweep name is looked up here."""
DOMAINS = ("loguniform", "uniform", "randint", "choice")
"""Search-space domains, each ``{domain: [arguments]}`` (Tune's functions of those names)."""
SCHEDULERS = ("asha", "none")
MAX_CHECKED_COMBINATIONS = 512
"""Up to this many combinations of the space's ``choice`` values are each checked as a
config when the sweep loads (a pair that does not fit together fails there, not mid-sweep)."""
SEARCHERS = ("random", "optuna")
SPEC_FILE = "sweep.yaml"
"""The sweep file as it was when the sweep started, kept in its folder (a resumed sweep must
search the same space)."""
_FIXED_BY_SWEEP = {
    "agent.kind": "base.agent",
    "train.total_timesteps": "budget",
    "train.seed": "seed",
    "train.runs_dir": "storage",
}


@dataclasses.dataclass
class BaseSection:
    """What every trial starts from.

    :ivar config: a per-env config file (path or name in ``configs/``); default: the one of
        ``env`` (:func:`agents.experiment.config.find_config_for_env`).
    :ivar env: an env id; needed when ``config`` is not given.
    :ivar agent: ``agent.kind``.
    :ivar overrides: dotted ``key=value``, part of the recipe (they go into ``best.yaml``).
    :ivar run_overrides: how trials run (evaluation, threads, logging); not in ``best.yaml``.
    """

    agent: str = MISSING
    config: str | None = None
    env: str | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    run_overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SchedulerSection:
    """``asha``: stop trials whose metric is in the bottom of their rung (at ``grace_period``,
    ``grace_period * reduction_factor``, ... env steps); ``none``: every trial runs its budget."""

    kind: str = "asha"
    grace_period: int | None = None
    reduction_factor: float = 3.0


@dataclasses.dataclass
class SearcherSection:
    """``random``: Tune's random/grid search; ``optuna``: Optuna's TPE sampler."""

    kind: str = "random"
    seed: int = 0


@dataclasses.dataclass
class SweepFile:
    """A sweep file (see the module docstring)."""

    name: str = MISSING
    base: BaseSection = MISSING
    budget: int = MISSING
    num_samples: int = MISSING
    space: dict[str, Any] = MISSING
    description: str = ""
    seed: int = 0
    metric: str = "success_rate"
    mode: str = "max"
    scheduler: SchedulerSection = dataclasses.field(default_factory=SchedulerSection)
    searcher: SearcherSection = dataclasses.field(default_factory=SearcherSection)
    points_to_evaluate: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    cpus_per_trial: int = 1
    max_concurrent: int | None = None
    storage: str = "runs/sweeps"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A checked sweep file.

    :ivar file: the parsed file.
    :ivar path: where it was read from.
    :ivar config_file: the per-env config file every trial starts from (None: defaults only).
    :ivar storage: the absolute storage folder; the sweep's folder is ``storage / name``.
    """

    file: SweepFile
    path: Path
    config_file: Path | None
    storage: Path

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def folder(self) -> Path:
        """``<storage>/<name>``: Tune's experiment folder, the trials' runs, the results."""
        return self.storage / self.file.name

    def trial_overrides(self, params: dict[str, Any], run_dir_root: Path) -> list[str]:
        """The overrides of a trial with sampled ``params`` (``{dotted key: value}``): torch
        threads as many as the trial's CPUs and no progress bar unless the file says
        otherwise, then the file's overrides, the sampled values and what the sweep fixes."""
        return [
            f"train.torch_threads={self.file.cpus_per_trial}",
            "train.progress=none",
            *self.file.base.overrides,
            *self.file.base.run_overrides,
            *(f"{key}={_override_value(value)}" for key, value in params.items()),
            f"agent.kind={self.file.base.agent}",
            f"train.seed={self.file.seed}",
            f"train.total_timesteps={self.file.budget}",
            f"train.runs_dir={run_dir_root}",
        ]

    def load_trial_config(self, params: dict[str, Any]) -> Any:
        """The :class:`agents.experiment.config.ExperimentConfig` of a trial with ``params``."""
        from agents.experiment.config import load_config

        return load_config(self.config_file, self.trial_overrides(params, self.folder / "runs"))


def resolve_sweep_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A sweep file from a path or a bare name in ``configs/sweeps/``.

    >>> resolve_sweep_path("ppo_keycorridor_s3r1").name
    'ppo_keycorridor_s3r1.yaml'
    """
    from agents.experiment.config import resolve_yaml_file

    return resolve_yaml_file(name_or_path, SWEEP_DIR, "sweep", SchemaError)


def load_sweep(name_or_path: str | os.PathLike[str], *, check_configs: bool = True) -> Sweep:
    """Parse and check a sweep file.

    :param check_configs: also build a trial config at each end of every domain and at
        every point to evaluate (catches a misspelt key or an out-of-range bound now, not in
        the middle of the sweep).
    :raises SchemaError: what is wrong, which key, and what to do.
    """
    from agents.experiment.config import ConfigError, find_config_for_env, resolve_config_path

    path = resolve_sweep_path(name_or_path)
    where = f"sweep {path}"
    data = load_structured(read_yaml(path, "sweep"), SweepFile, where)
    if not _NAME.match(data.name):
        raise SchemaError(f"{where}: name = {data.name!r} must be letters, digits, '.', '_', '-'")
    from agents.registry import AGENT_KINDS

    choice(data.base.agent, tuple(AGENT_KINDS), where, "base.agent")
    choice(data.metric, METRICS, where, "metric")
    choice(data.mode, ("max", "min"), where, "mode")
    choice(data.scheduler.kind, SCHEDULERS, where, "scheduler.kind")
    choice(data.searcher.kind, SEARCHERS, where, "searcher.kind")
    at_least(data.budget, 1, where, "budget", "env steps")
    at_least(data.num_samples, 1, where, "num_samples")
    at_least(data.cpus_per_trial, 1, where, "cpus_per_trial")
    at_least(data.max_concurrent, 1, where, "max_concurrent")
    at_least(data.scheduler.reduction_factor, 1.01, where, "scheduler.reduction_factor")
    if data.scheduler.kind == "asha":
        if data.scheduler.grace_period is None:
            raise SchemaError(
                f"{where}: scheduler.grace_period is required for asha: the env steps every "
                "trial trains before it can be stopped, e.g. a fifth of the budget"
            )
        at_least(data.scheduler.grace_period, 1, where, "scheduler.grace_period", "env steps")
        if data.scheduler.grace_period > data.budget:
            raise SchemaError(
                f"{where}: scheduler.grace_period = {data.scheduler.grace_period} is more than "
                f"the budget of {data.budget}; make it a fraction of the budget"
            )
    if not data.space:
        raise SchemaError(f"{where}: space is empty; give at least one key to search")
    for key, value in data.space.items():
        _domain(key, value, where)  # raises on a malformed domain
        if key in _FIXED_BY_SWEEP:
            raise SchemaError(
                f"{where}: space.{key}: set by the sweep's {_FIXED_BY_SWEEP[key]}; use that"
            )
    for item in (*data.base.overrides, *data.base.run_overrides):
        key = item.partition("=")[0].strip()
        if key in _FIXED_BY_SWEEP:
            raise SchemaError(
                f"{where}: base overrides: '{item}' sets {key}; use the sweep's "
                f"{_FIXED_BY_SWEEP[key]}"
            )
    for i, point in enumerate(data.points_to_evaluate):
        unknown = sorted(set(point) - set(data.space))
        if unknown:
            raise SchemaError(
                f"{where}: points_to_evaluate[{i}]: {', '.join(unknown)} not in space; a point "
                "gives values for keys of space only"
            )
    if data.base.config is not None:
        try:
            config_file: Path | None = resolve_config_path(data.base.config)
        except ConfigError as exc:
            raise SchemaError(f"{where}: base.config: {exc}") from None
    elif data.base.env is not None:
        config_file = find_config_for_env(data.base.env)
    else:
        raise SchemaError(f"{where}: base: give config (a file in configs/) or env (an env id)")
    storage = Path(data.storage)
    storage = storage if storage.is_absolute() else REPO_ROOT / storage
    sweep = Sweep(data, path, config_file, storage)
    if data.base.env is not None:  # part of the recipe: best.yaml names the env
        data.base.overrides.insert(0, f"env.id={data.base.env}")
    if check_configs:
        for label, params in _corner_points(data):
            try:
                config = sweep.load_trial_config(params)
            except ConfigError as exc:
                raise SchemaError(f"{where}: {label}: {exc}") from None
            if config.train.eval_freq < 1 or data.budget % config.train.eval_freq:
                raise SchemaError(
                    f"{where}: train.eval_freq = {config.train.eval_freq} does not divide the "
                    f"budget of {data.budget}: the last evaluation, the one trials are ranked "
                    "by, must be at the budget; set train.eval_freq in base.run_overrides"
                )
    return sweep


def _override_value(value: Any) -> str:
    """A sampled value as the text of a ``key=value`` override (YAML-parsed back)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str | int | bool) or value is None:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return yaml.safe_dump(value, default_flow_style=True).strip()


def _domain(key: str, value: Any, where: str) -> tuple[str, list[Any]] | None:
    """``(domain, arguments)`` of a space entry; None for a fixed value.

    :raises SchemaError: a mapping that is not exactly one known domain with valid arguments.
    """
    if not isinstance(value, dict):
        return None
    if len(value) != 1 or next(iter(value)) not in DOMAINS:
        raise SchemaError(
            f"{where}: space.{key} = {value!r}: give one of {', '.join(DOMAINS)}, e.g. "
            "{loguniform: [1.0e-4, 3.0e-3]} or {choice: [64, 128]}"
        )
    domain, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise SchemaError(f"{where}: space.{key}.{domain} must be a list, e.g. [low, high]")
    if domain != "choice":
        numeric = all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
        if len(args) != 2 or not numeric or not args[0] < args[1]:
            raise SchemaError(
                f"{where}: space.{key}.{domain} = {args!r} must be [low, high] with low < high"
            )
        if domain == "loguniform" and args[0] <= 0:
            raise SchemaError(f"{where}: space.{key}.loguniform needs low > 0, not {args[0]}")
        if domain == "randint" and not all(isinstance(a, int) for a in args):
            raise SchemaError(f"{where}: space.{key}.randint = {args!r} must be integers")
    return domain, list(args)


def _corner_points(data: SweepFile) -> list[tuple[str, dict[str, Any]]]:
    """Trial params to check before the sweep starts: each domain's ends (or each choice)
    with the other keys at their first value, and every point to evaluate."""

    def values(key: str) -> list[Any]:
        parsed = _domain(key, data.space[key], "")
        if parsed is None:
            return [data.space[key]]
        domain, args = parsed
        return args if domain == "choice" else [args[0], args[1] - (domain == "randint")]

    first = {key: values(key)[0] for key in data.space}
    points = [
        (f"space.{key} = {value!r}", {**first, key: value})
        for key in data.space
        for value in values(key)
    ]
    # Every combination of the choices (e.g. ppo.n_steps x ppo.batch_size, which must fit
    # together), while there are few enough to check in a moment.
    chosen = [k for k in data.space if (_domain(k, data.space[k], "") or ("",))[0] == "choice"]
    combos = math.prod(len(values(k)) for k in chosen)
    if len(chosen) > 1 and combos <= MAX_CHECKED_COMBINATIONS:
        for combo in itertools.product(*(values(k) for k in chosen)):
            label = ", ".join(f"{k} = {v!r}" for k, v in zip(chosen, combo, strict=True))
            points.append(
                (f"the combination {label}", {**first, **dict(zip(chosen, combo, strict=True))})
            )
    points += [
        (f"points_to_evaluate[{i}]", {**first, **point})
        for i, point in enumerate(data.points_to_evaluate)
    ]
    return points


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The sweep's space as Tune domains (``{dotted key: domain or fixed value}``)."""
    from ray import tune

    functions: dict[str, Callable[..., Any]] = {
        "loguniform": tune.loguniform,
        "uniform": tune.uniform,
        "randint": tune.randint,
        "choice": lambda *options: tune.choice(list(options)),
    }
    space: dict[str, Any] = {}
    for key, value in sweep.file.space.items():
        parsed = _domain(key, value, str(sweep.path))
        space[key] = value if parsed is None else functions[parsed[0]](*parsed[1])
    return space


# --------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------


class TuneReporter(BaseCallback):
    """Report each periodic evaluation of the run to Tune.

    After every :class:`agents.experiment.callbacks.PeriodicEval` evaluation it calls
    ``ray.tune.report({"timesteps", "mean_reward", "success_rate"})`` (success as 0.0 when
    the env reports none, so ASHA always has a number). When Tune stops the trial (ASHA),
    ``report`` does not return; nothing of the run needs saving then.

    :param evaluation: the run's periodic evaluation.
    :param report: the report function (``ray.tune.report``; a list's append in tests).
    """

    def __init__(self, evaluation: Any, report: Callable[[dict[str, Any]], Any]) -> None:
        super().__init__()
        self.evaluation = evaluation
        self.report = report
        self._seen = 0

    def _on_training_start(self) -> None:
        self._seen = self.evaluation.n_evaluations

    def _on_step(self) -> bool:
        if self.evaluation.n_evaluations == self._seen:
            return True
        self._seen = self.evaluation.n_evaluations
        success = self.evaluation.last_success_rate
        self.report(
            {
                "timesteps": int(self.num_timesteps),
                "mean_reward": float(self.evaluation.last_mean_reward),
                "success_rate": 0.0 if success is None else float(success),
            }
        )
        return True


def run_trial(params: dict[str, Any], sweep: Sweep) -> None:
    """Tune's function trainable: train (or continue) the trial with ``params``.

    The run directory is ``<sweep folder>/runs/<trial id>``: a trial Tune restarts after an
    interruption continues from its latest checkpoint there (a folder without one is
    started again).
    """
    from ray import tune

    from agents.experiment.io import latest_checkpoint
    from agents.experiment.training import RunPaths, resume, train

    trial_id = tune.get_context().get_trial_id()
    run_dir = sweep.folder / "runs" / str(trial_id)
    config = sweep.load_trial_config(params)

    def reporter(own: Any) -> list[BaseCallback]:
        return [TuneReporter(own.evaluation, tune.report)]

    paths = RunPaths(run_dir)
    if latest_checkpoint(paths.checkpoints) is not None:
        resume(run_dir, total_timesteps=sweep.file.budget, extra_callbacks=reporter)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)  # started but no checkpoint: nothing to continue
    train(config, run_dir, extra_callbacks=reporter)


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def _tuner(sweep: Sweep) -> Any:
    """A new ``ray.tune.Tuner`` for the sweep."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    data = sweep.file
    if data.scheduler.kind == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="timesteps",
            max_t=data.budget,
            grace_period=data.scheduler.grace_period,
            reduction_factor=data.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    points = [dict(p) for p in data.points_to_evaluate]
    if data.searcher.kind == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(
            sampler=TPESampler(seed=data.searcher.seed),
            points_to_evaluate=points or None,
        )
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search_alg = BasicVariantGenerator(
            points_to_evaluate=points or None, random_state=data.searcher.seed
        )
    return tune.Tuner(
        _trainable(sweep),
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=data.metric,
            mode=data.mode,
            num_samples=data.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            max_concurrent_trials=data.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=data.name,
            storage_path=str(sweep.storage),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


def _trainable(sweep: Sweep) -> Any:
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep), {"cpu": sweep.file.cpus_per_trial}
    )


def run_sweep(sweep: Sweep, *, log: Callable[[str], None] = print) -> Any:
    """Run the sweep, or continue it if its folder holds an interrupted one; Ray must be
    initialised (:func:`agents.bench.runner.ray_session`).

    :return: Tune's ``ResultGrid``.
    :raises SchemaError: the folder holds a sweep started from a different file.
    """
    from ray import tune

    folder = sweep.folder
    spec_text = sweep.path.read_text()
    saved = folder / SPEC_FILE
    if tune.Tuner.can_restore(str(folder)):
        if saved.is_file() and _spec_of(saved.read_text()) != _spec_of(spec_text):
            raise SchemaError(
                f"{folder} holds sweep {sweep.name} started from a different {sweep.path.name} "
                f"(saved as {saved}); restore that file to continue it, or delete {folder} "
                "to start again"
            )
        log(f"sweep {sweep.name}: continuing the interrupted sweep in {folder}")
        tuner = tune.Tuner.restore(
            str(folder), trainable=_trainable(sweep), resume_unfinished=True, restart_errored=True
        )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        saved.write_text(spec_text)
        log(f"sweep {sweep.name}: {sweep.file.num_samples} trials in {folder}")
        tuner = _tuner(sweep)
    return tuner.fit()


def unfinished_trials(sweep: Sweep) -> int:
    """Trials the sweep's saved state still has to run (pending or running): more than 0
    after ``Tuner.fit`` returns means Tune was interrupted (it catches Ctrl-C, saves its
    state and returns) rather than done."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sweep.folder))
    return sum(trial.status not in ("TERMINATED", "ERROR") for trial in analysis.trials)


def restore_results(sweep: Sweep) -> Any:
    """The ``ResultGrid`` of the sweep in its folder, without running anything."""
    from ray import tune

    return tune.Tuner.restore(str(sweep.folder), trainable=_trainable(sweep)).get_results()


def _spec_of(text: str) -> Any:
    """A sweep file's content without its description and comments (for comparison)."""
    data = yaml.safe_load(text) or {}
    data.pop("description", None)
    return data


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def trials_frame(sweep: Sweep, results: Any) -> Any:
    """One row per trial (``pandas.DataFrame``): ``trial``, one column per space key, the
    metric at the last evaluation, its best value, its mean over the trial's evaluations
    (the area under its learning curve), ``timesteps`` reached, ``stopped early`` (ASHA
    stopped it before the budget), ``error``; sorted best first: trials that trained the
    whole budget, by the metric at the last evaluation, ties by the mean (a task that many
    trials solve by the budget ranks the one that learned it sooner first)."""
    import pandas as pd

    data = sweep.file
    rows = []
    for result in results:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        reached = int(metrics.get("timesteps", 0) or 0)
        config = result.config or {}
        best = mean = None
        if history is not None and data.metric in history:
            series = history[data.metric].dropna()
            if len(series):
                best = float(series.max() if data.mode == "max" else series.min())
                mean = float(series.mean())
        rows.append(
            {
                "trial": metrics.get("trial_id", Path(result.path).name),
                **{key: config.get(key) for key in data.space},
                data.metric: metrics.get(data.metric),
                f"best {data.metric}": best,
                f"mean {data.metric}": mean,
                "timesteps": reached,
                "stopped early": result.error is None and reached < data.budget,
                "error": None if result.error is None else _error_text(result.error),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    finished = frame["timesteps"] >= data.budget
    frame = frame.assign(_finished=finished).sort_values(
        ["_finished", data.metric, f"mean {data.metric}", "timesteps"],
        ascending=[False, data.mode == "min", data.mode == "min", False],
        na_position="last",
    )
    return frame.drop(columns="_finished").reset_index(drop=True)


def _error_text(error: Any) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def best_trial(sweep: Sweep, frame: Any) -> dict[str, Any] | None:
    """The row of the best trial that trained the whole budget without error: the best
    metric at the last evaluation, ties broken by the mean over its evaluations (then the
    first in the table), or None when no trial did."""
    data = sweep.file
    done = frame[(frame["timesteps"] >= data.budget) & frame["error"].isna()]
    done = done[done[data.metric].notna()]
    if done.empty:
        return None
    ranked = done.sort_values(
        [data.metric, f"mean {data.metric}"],
        ascending=data.mode == "min",
        kind="stable",
        na_position="last",
    )
    return ranked.iloc[0].to_dict()


def best_config_yaml(sweep: Sweep, params: dict[str, Any], summary: str) -> str:
    """The per-env config of a trial: the base file, then ``base.overrides``, the trial's
    values and ``agent.kind``, as YAML that :func:`agents.experiment.config.load_config` reads (the
    sweep's budget, seed and ``run_overrides`` are left out: they are how it was tuned)."""
    from agents.experiment.config import parse_overrides

    layer = OmegaConf.create({})
    if sweep.config_file is not None:
        layer = OmegaConf.merge(layer, OmegaConf.create(read_yaml(sweep.config_file, "config")))
    overrides = [
        *sweep.file.base.overrides,
        *(f"{key}={_override_value(_plain(value))}" for key, value in params.items()),
        f"agent.kind={sweep.file.base.agent}",
    ]
    for key, value in parse_overrides(overrides):
        OmegaConf.update(layer, key, value, merge=True)
    body = yaml.safe_dump(OmegaConf.to_container(layer), sort_keys=False)
    header = "\n".join(f"# {line}" if line else "#" for line in summary.splitlines())
    return f"{header}\n\n{body}"


def _plain(value: Any) -> Any:
    """numpy scalars (from pandas) as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return value  # kept as float: the schema converts where the key is an int
    return value


def write_results(sweep: Sweep, results: Any, commit: str) -> dict[str, Path]:
    """Write ``trials.md``, ``trials.csv`` and (when a trial finished) ``best.yaml`` into
    the sweep's folder, and check that ``best.yaml`` loads with the project's config loader.

    :return: ``{"markdown", "csv", "best"}`` paths (``best`` absent when no trial finished).
    :raises agents.experiment.config.ConfigError: ``best.yaml`` does not load (a bug: it is
    reported).
    """
    from agents.experiment.config import load_config

    data = sweep.file
    frame = trials_frame(sweep, results)
    folder = sweep.folder
    folder.mkdir(parents=True, exist_ok=True)
    written = {"csv": folder / "trials.csv", "markdown": folder / "trials.md"}
    frame.to_csv(written["csv"], index=False)
    stopped = int(frame["stopped early"].sum()) if not frame.empty else 0
    failed = int(frame["error"].notna().sum()) if not frame.empty else 0
    # Trial ids such as 87476_00000 read as numbers to tabulate: keep that column text.
    table = (
        frame.to_markdown(index=False, floatfmt=".4g", disable_numparse=[0])
        if not frame.empty
        else "No trials."
    )
    lines = [
        f"# Sweep `{data.name}`",
        "",
        *([data.description, ""] if data.description else []),
        f"{len(frame)} trials of {data.base.agent} on "
        f"{sweep.config_file.name if sweep.config_file else 'the defaults'}, a budget of "
        f"{data.budget:,} env steps each; metric: {data.metric} ({data.mode}) at the last "
        f"evaluation; scheduler: {data.scheduler.kind}; searcher: {data.searcher.kind}. "
        f"{stopped} stopped early, {failed} failed. Sweep file: `{_relative(sweep.path)}`; "
        f"commit {commit}.",
        "",
        table,
        "",
    ]
    best = best_trial(sweep, frame) if not frame.empty else None
    if best is not None:
        params = {key: best[key] for key in data.space}
        summary = (
            f"Written by scripts/sweep.py {_relative(sweep.path)} on "
            f"{_dt.date.today().isoformat()} at commit {commit}:\n"
            f"the best of {len(frame)} trials ({best['trial']}) on {data.metric} "
            f"({data.mode}): {best[data.metric]:.4g} after {data.budget:,} env steps, seed "
            f"{data.seed}.\nTuned: {', '.join(data.space)}."
        )
        written["best"] = folder / "best.yaml"
        written["best"].write_text(best_config_yaml(sweep, params, summary))
        load_config(written["best"])  # the file train_agent.py --config gets must load
        lines += [f"Best trial: {best['trial']}; its config: `best.yaml`.", ""]
    else:
        lines += ["No trial trained the whole budget: no best config written.", ""]
    written["markdown"].write_text("\n".join(lines))
    return written


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
