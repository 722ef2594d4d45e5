"""Running a suite: one run (:func:`execute_run`), its status, and the suite on Ray.

Every run is an ordinary training run: its config is built by
:func:`agents.experiment.config.load_config` from the env's file in ``configs/`` plus the suite's
overrides, and it is trained by :func:`agents.experiment.training.train` (or continued by
:func:`agents.experiment.training.resume`) with :class:`agents.bench.records.EvalRecorder` as an
extra callback. A run with a record is done; a run without one restarts from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv

from agents.bench.records import (
    PROGRESS_FILE,
    EvalRecorder,
    _evaluate,
    _mode,
    _state_at_checkpoint,
    build_record,
    git_commit,
    record_path,
    run_dir_of,
)
from agents.bench.suite import (
    REPO_ROOT,
    BenchmarkError,
    RunSpec,
    Suite,
    Threshold,
    _config_differences,
)
from agents.experiment.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
)
from agents.experiment.io import (
    CheckpointInfo,
    atomic_write_text,
    global_rng_preserved,
    latest_checkpoint,
)
from agents.experiment.training import RunCallbacks, RunPaths

MEMORY_DIAGNOSIS_EPISODES = 100
"""At least this many episodes for a Memory run's ``memory_diagnosis``: the cue probe is fit
on the episodes that saw the cue and chose, half of them held out."""


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
    final_measurements = {
        "mission_sensitivity": _final_mission_sensitivity,
        "memory_diagnosis": _final_memory_diagnosis,
    }
    for key, measure in final_measurements.items():
        if key in state:  # measured before an interruption: kept, not measured again
            continue
        try:
            state[key] = measure(config, paths)
        except Exception as exc:  # a trained run keeps its record; the error is in it
            state[key] = {"error": f"{type(exc).__name__}: {exc}"}
        atomic_write_text(progress, json.dumps(state, indent=1))
    record = build_record(run, config, state, threshold, eval_mode, commit or git_commit(), run_dir)
    atomic_write_text(out_path, json.dumps(record, indent=1) + "\n")
    return out_path


def _finish_from_checkpoint(
    config: ExperimentConfig, state: dict[str, Any], checkpoint: CheckpointInfo
) -> dict[str, Any]:
    """The recorder state of a run whose final checkpoint was saved but not evaluated.

    The state is cut back to ``checkpoint`` (:func:`_state_at_checkpoint`) and, unless an
    evaluation already happened at that step, one point is added: both action modes, each
    on fresh eval envs (:func:`agents.experiment.training.make_eval_env`), with the clock at the
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


def _final_model(config: ExperimentConfig, paths: RunPaths) -> BaseAlgorithm | None:
    """The run's final model, or its latest checkpoint's if it has none (a run stopped at its
    budget's last checkpoint); None if it has neither."""
    from agents.experiment.model_files import load_model_file

    model_path = paths.final_model
    if not model_path.is_file():
        last = latest_checkpoint(paths.checkpoints)
        if last is None:
            return None
        model_path = last.model_path
    return load_model_file(model_path, device=config.train.device)


def _final_mission_sensitivity(config: ExperimentConfig, paths: RunPaths) -> dict[str, Any] | None:
    """Success of the run's final model with the true and with shuffled missions
    (:func:`agents.experiment.mission_sensitivity.mission_sensitivity`) on ``train.eval_episodes``
    episodes from the eval seeds, in the run's own eval mode; None on an env whose mission
    is the same in every episode (or that has none)."""
    import envs
    from agents.experiment.mission_sensitivity import mission_sensitivity
    from agents.experiment.training import EVAL_SEED_OFFSET

    model = _final_model(config, paths)
    if model is None:
        return None
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


def _final_memory_diagnosis(config: ExperimentConfig, paths: RunPaths) -> dict[str, Any] | None:
    """How often the run's final model looks at the cue of a MiniGrid-Memory env, its success
    with and without having seen it, and the linear cue probe of its features
    (:func:`agents.experiment.memory_diagnosis.summarize`), on
    ``max(train.eval_episodes, MEMORY_DIAGNOSIS_EPISODES)`` stochastic episodes from the eval
    seeds; None on an env that is not a Memory env, a run on trials (the diagnosis reads
    plain episodes) or a run with no model."""
    import envs
    from agents.experiment.memory_diagnosis import diagnose, is_memory_env, summarize

    env = envs.make_env(
        config.env.id, trial_episodes=config.env.trial_episodes, **config.env.env_kwargs
    )
    try:
        memory = is_memory_env(env)
    finally:
        env.close()
    if not memory or config.env.trial_episodes != 1:
        return None
    model = _final_model(config, paths)
    if model is None:
        return None
    episodes = max(config.train.eval_episodes, MEMORY_DIAGNOSIS_EPISODES)
    with global_rng_preserved():
        # The record keeps the summary only, which does not hold the probes by lag.
        result = diagnose((model, config), episodes, None, None, deterministic=False, by_lag=False)
    return summarize(result)


def _recorder(
    progress: Path, budget: int, state: dict[str, Any] | None, other_env: VecEnv
) -> Callable[[RunCallbacks], list[BaseCallback]]:
    """The ``extra_callbacks`` factory that adds an :class:`EvalRecorder` to a run."""

    def factory(own: RunCallbacks) -> list[BaseCallback]:
        return [EvalRecorder(own, progress, budget, state, other_env)]

    return factory


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
    cpus: int | None = None,
    address: str | None = None,
    only: Sequence[str] = (),
    in_process: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, str | None]:
    """Run the suite's pending runs on Ray, one run per CPU, each in a fresh worker process.

    A fresh process per run (``max_calls=1``) keeps peak memory a per-run number and a crash
    local to its run: a worker that dies (killed, out of memory) fails its own run and the
    others go on. Ctrl-C asks every running run to checkpoint and stop (Ray's cancel raises
    SIGINT's handler in the worker, the same clean stop as Ctrl-C in ``train_agent.py``),
    waits for them, and raises :class:`KeyboardInterrupt`; the next call continues them.

    :param cpus: CPUs of the local Ray this starts (default: all); ignored when Ray is
        already initialised in this process or ``address`` is given.
    :param address: an existing Ray cluster (``ray://host:10001`` or ``host:6379``); ``out``
        and ``runs_dir`` must then be paths every node reaches.
    :param in_process: run one after another in this process, without Ray (debugging; the
        peak memory is then this process' peak).
    :return: ``{run key: error message or None}`` for the runs attempted.
    :raises KeyboardInterrupt: SIGINT/SIGTERM stopped a run (its checkpoint was saved); the
        runs after it were not started.
    """
    if cpus is not None and cpus < 1:
        raise BenchmarkError(f"cpus = {cpus} must be >= 1")
    out, runs_dir = Path(out).resolve(), Path(runs_dir).resolve()  # workers may run elsewhere
    todo = pending_runs(suite, out, only)
    commit = git_commit()
    jobs = [
        (run, out, runs_dir, suite.tasks[run.task].threshold, suite.eval_mode, commit)
        for run in todo
    ]
    done = len(suite.runs) - len(pending_runs(suite, out))
    where = "in this process" if in_process else (f"on Ray at {address}" if address else "on Ray")
    log(
        f"suite {suite.name}: {len(suite.runs)} runs, {done} done, {len(todo)} to run"
        + (f" (filtered by {', '.join(only)})" if only else "")
        + f", {where}; commit {commit}"
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
            except TrainingInterrupted as exc:  # Ctrl-C/SIGTERM: stop here, as Ray would
                report(job[0].key, _interrupted_message(exc))
                raise KeyboardInterrupt from exc
        return results
    if jobs:
        with ray_session(cpus=cpus, address=address):
            run_on_ray([(job[0].key, job) for job in jobs], report, log=log)
    return results


def local_ray_env() -> dict[str, str]:
    """The environment a local Ray's workers need: this checkout first on ``PYTHONPATH``
    (an installed copy of the package elsewhere must not win), one thread per library."""
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def cluster_runtime_env() -> dict[str, Any]:
    """Ray's ``runtime_env`` for a cluster: this checkout's code and configs shipped to every
    node as the working directory (run directories, git data and docs left behind); the
    nodes need the dependencies installed (``pip install -e .`` of the same commit)."""
    return {
        "working_dir": str(REPO_ROOT),
        "excludes": ["runs/", ".git/", ".venv/", "docs/", "*.mp4", "__pycache__/"],
    }


@contextlib.contextmanager
def ray_session(cpus: int | None = None, address: str | None = None) -> Iterator[None]:
    """Ray for a suite or a sweep, shut down on exit if this started it.

    Uses the Ray already initialised in this process if there is one (a test module's
    fixture, a notebook); else connects to ``address``; else starts a local Ray with
    ``cpus`` CPUs (default: all), no dashboard.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if address is not None:
        ray.init(address=address, runtime_env=cluster_runtime_env())
    else:
        saved = os.environ.get("PYTHONPATH")
        os.environ.update(local_ray_env())  # the local Ray's processes inherit it
        try:
            ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False)
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH")
            else:
                os.environ["PYTHONPATH"] = saved
    try:
        yield
    finally:
        ray.shutdown()


def run_on_ray(
    jobs: Sequence[tuple[str, Any]],
    report: Callable[[str, str | None], None],
    target: Callable[[Any], tuple[str, str | None]] = _run_one,
    log: Callable[[str], None] = print,
) -> None:
    """Run ``target(job)`` for each ``(key, job)`` as a Ray task (1 CPU, a fresh worker
    process, no retry), and ``report(*result)`` as each ends; Ray must be initialised.

    A task whose worker dies is reported as died and the others go on. On Ctrl-C every
    task is cancelled: a running one gets SIGINT's handler (training checkpoints and stops)
    and is waited for; a queued one does not start. Then :class:`KeyboardInterrupt` is raised.
    """
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(target)
    pending = {remote.remote(job): key for key, job in jobs}
    with _sigterm_as_interrupt():
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    report(*_ray_result(ref, pending.pop(ref)))
        except KeyboardInterrupt:
            log("interrupted: the running runs save a checkpoint and stop; waiting for them")
            for ref in pending:
                ray.cancel(ref)
            for ref, key in pending.items():
                report(*_ray_result(ref, key))
            raise


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's or ``kill``'s stop) raises KeyboardInterrupt, as Ctrl-C does, so
    the runs on Ray checkpoint instead of dying with the driver (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ray_result(ref: Any, key: str) -> tuple[str, str | None]:
    """``(key, error or None)`` of a finished task (waits for it)."""
    import ray
    from ray.exceptions import RayError, TaskCancelledError, WorkerCrashedError

    try:
        return ray.get(ref)
    except TaskCancelledError:
        return key, "interrupted before it trained; run the same command again to run it"
    except WorkerCrashedError:
        return key, (
            "worker died (killed, or out of memory?); run the same command again to continue "
            "it from its last checkpoint"
        )
    except RayError as exc:
        return key, f"{type(exc).__name__}: {exc}"
