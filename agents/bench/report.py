"""The benchmark report: one Markdown section per suite, with the targets, one table per
task (pandas), the aggregates over seeds (:mod:`agents.bench.stats`, rliable) and plots of
reward against env steps and against training wall-clock (median over seeds, range shaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agents.bench.records import _metric_at, first_reach, load_record, load_records, record_path
from agents.bench.suite import (
    REPO_ROOT,
    Suite,
    Target,
    TaskSpec,
    _config_differences,
    _steps,
)
from agents.experiment.config import (
    ConfigError,
    ExperimentConfig,
)
from agents.experiment.io import atomic_write_text


def _median_range(values: Sequence[float]) -> tuple[float, float, float] | None:
    """``(median, min, max)`` or None for no values."""
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def _day_span(days: Sequence[str]) -> str:
    """``2026-11-23`` or ``2026-11-23 to 2026-12-05``."""
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


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


# --------------------------------------------------------------------------------------
# The results tables: one registered function per column
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowContext:
    """What a results-table column sees for one row (an agent label of a task).

    :ivar task: the task.
    :ivar row: the row's statistics over seeds (:func:`summarize_task`).
    :ivar records: the row's records, one per seed.
    :ivar baseline: the task's ``fps_baseline`` row (None: it has no records).
    :ivar mode: the evaluation mode the report uses (``stochastic`` or ``deterministic``).
    """

    task: TaskSpec
    row: AgentSummary
    records: list[dict[str, Any]]
    baseline: AgentSummary | None
    mode: str


ResultCell = Callable[[RowContext], str]
"""A column of the results tables: one row's cell text."""


@dataclasses.dataclass(frozen=True)
class ResultColumn:
    """A registered column: ``header`` (``{baseline}`` is replaced by the task's
    ``fps_baseline`` label) and the function that writes its cells."""

    header: str
    cell: ResultCell


RESULT_COLUMNS: list[ResultColumn] = []
"""The results tables' columns, in order (:func:`result_column` appends)."""


def result_column(header: str) -> Callable[[ResultCell], ResultCell]:
    """Register a function as the last column of every task's results table.

    >>> @result_column("sessions")
    ... def sessions(context: RowContext) -> str:
    ...     return _cell(_median_range([r["sessions"] for r in context.records]), _fmt0)
    >>> RESULT_COLUMNS.pop().header
    'sessions'
    """

    def register(cell: ResultCell) -> ResultCell:
        RESULT_COLUMNS.append(ResultColumn(header, cell))
        return cell

    return register


@result_column("agent")
def _agent_cell(context: RowContext) -> str:
    return context.row.label


@result_column("seeds")
def _seeds_cell(context: RowContext) -> str:
    return ", ".join(map(str, context.row.seeds))


@result_column("budget")
def _budget_cell(context: RowContext) -> str:
    return _steps(context.row.budget)


@result_column("final reward")
def _final_reward_cell(context: RowContext) -> str:
    return _cell(context.row.final_reward, _fmt2)


@result_column("final success")
def _final_success_cell(context: RowContext) -> str:
    return _cell(context.row.final_success, _fmt2)


def _to_threshold(row: AgentSummary, stat: Any, fmt: Callable[[float], str]) -> str:
    n = len(row.seeds)
    if row.reached == 0:
        return f"not reached (0/{n})"
    return _cell(stat, fmt) + ("" if row.reached == n else f" ({row.reached}/{n} reached)")


@result_column("to threshold (steps)")
def _steps_to_threshold_cell(context: RowContext) -> str:
    return _to_threshold(context.row, context.row.frames_to_threshold, _steps)


@result_column("to threshold (s)")
def _seconds_to_threshold_cell(context: RowContext) -> str:
    return _to_threshold(context.row, context.row.seconds_to_threshold, _fmt0)


@result_column("fps")
def _fps_cell(context: RowContext) -> str:
    return _cell(context.row.fps, _fmt0)


@result_column("vs {baseline}")
def _fps_ratio_cell(context: RowContext) -> str:
    """The fps ratio, marked † when the runs finished days apart (see the note under the
    table)."""
    row = context.row
    if row.fps_ratio is None:
        return "–"
    return f"{row.fps_ratio:.2f}x" + (" †" if _cross_day(row, context.baseline) else "")


@result_column("peak RSS (MB)")
def _peak_rss_cell(context: RowContext) -> str:
    return _cell(context.row.peak_rss_mb, _fmt0)


def _cross_day(row: AgentSummary, baseline: AgentSummary | None) -> bool:
    """Whether ``row``'s fps ratio compares runs finished at least
    :data:`CROSS_DAY_GAP_DAYS` apart from the baseline's."""
    if baseline is None or row is baseline or row.fps_ratio is None:
        return False
    gap = days_apart(row, baseline)
    return gap is not None and gap >= CROSS_DAY_GAP_DAYS


def results_frame(
    task: TaskSpec, rows: Sequence[AgentSummary], records: Sequence[dict[str, Any]], mode: str
) -> pd.DataFrame:
    """A task's results table: one row per :class:`AgentSummary`, one column per
    :data:`RESULT_COLUMNS` entry."""
    baseline = next((r for r in rows if r.label == task.fps_baseline), None)
    table = []
    for row in rows:
        context = RowContext(
            task, row, [r for r in records if r["agent"] == row.label], baseline, mode
        )
        table.append(
            {
                column.header.format(baseline=task.fps_baseline): column.cell(context)
                for column in RESULT_COLUMNS
            }
        )
    return pd.DataFrame(table)


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table (``DataFrame.to_markdown``: GitHub pipes, every cell
    text, left-aligned, no index)."""
    return frame.astype(str).to_markdown(index=False, stralign="left", disable_numparse=True)


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
    """Records of the suite's runs that no longer match it: ``key`` or ``key (changed keys)``.

    What decides is the budget and what the run trained with: a record that holds its
    resolved ``config`` is stale when that differs from the config the suite now resolves to
    (:func:`agents.bench.suite._config_differences`, which leaves out the keys that do not
    change what a run computes), however the suite spells it: overrides rewritten to the same
    config (e.g. ``exploration.kind=none`` added where a per-env file gained a default the
    run did not have) leave it current. A record written before records held the config is
    stale when the suite's overrides are no longer the ones it ran with.
    """
    specs = {(r.task, r.label, r.seed): r for r in suite.runs}
    stale = []
    for record in records:
        key = f"{record['task']}__{record['agent']}__{record['seed']}"
        spec = specs.get((record["task"], record["agent"], record["seed"]))
        if spec is None:
            continue  # not a run of the suite: _suite_records leaves it out
        if spec.budget != record["budget"]:
            stale.append(key)
            continue
        if "config" not in record:  # written before records held the resolved config
            if list(spec.overrides) != list(record["overrides"]):
                stale.append(key)
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
    over seeds (:mod:`agents.bench.stats`), the plots.

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
            "**Records that do not match the suite file** (its budget or the config it "
            "resolves to changed since they ran, or for records without their config its "
            "overrides; they are counted below until you delete them and run again): "
            f"{', '.join(stale)}.",
        ]
    if missing:
        shown = ", ".join(missing[:12]) + (
            f", ... ({len(missing)} in all)" if len(missing) > 12 else ""
        )
        lines += ["", f"**Not run yet:** {shown}."]
    lines.append("")

    # Targets.
    lines += ["### Targets", ""]
    target_rows: list[dict[str, str]] = []
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
            target_rows.append(
                {
                    "task": task.name,
                    "target": target.describe(),
                    "measured (median over seeds)": measured,
                    "status": status + seeds_note,
                }
            )
    if not results:
        target_rows.append(
            {
                "task": "–",
                "target": "no targets in this suite",
                "measured (median over seeds)": "–",
                "status": "–",
            }
        )
    lines.append(markdown_table(pd.DataFrame(target_rows)))
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
        baseline = next((r for r in rows if r.label == task.fps_baseline), None)
        lines.append(markdown_table(results_frame(task, rows, task_records, mode)))
        cross_day = [
            f"{row.label} ({_day_span(row.days)})" for row in rows if _cross_day(row, baseline)
        ]
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
        lines += _memory_diagnosis_table(task_records)
    # Imported here: pandas and rliable (with arch, seaborn) are for the report only.
    from agents.bench.stats import aggregates_markdown

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
    ]
    table = []
    for agent, recs in by_agent.items():
        measured = [r["mission_sensitivity"] for r in recs]
        true = _median_range([m["true"]["success_rate"] for m in measured])
        shuffled = _median_range([m["shuffled"]["success_rate"] for m in measured])
        drop = _median_range([m["drop"] for m in measured])
        seeds = ", ".join(str(r["seed"]) for r in sorted(recs, key=lambda r: r["seed"]))
        table.append(
            {
                "agent": agent,
                "seeds": seeds,
                "true mission": _cell(true, _fmt2),
                "shuffled mission": _cell(shuffled, _fmt2),
                "drop": _cell(drop, _fmt2),
            }
        )
    lines.append(markdown_table(pd.DataFrame(table)))
    return [*lines, ""]


def _memory_diagnosis_table(records: Sequence[dict[str, Any]]) -> list[str]:
    """Report lines: per run of a MiniGrid-Memory task, how often its final model looked at
    the cue, its success with and without having seen it, and the linear cue probe of its
    features (the record's ``memory_diagnosis``); none when no record measured it."""
    measured = [
        r for r in records if r.get("memory_diagnosis") and "error" not in r["memory_diagnosis"]
    ]
    if not measured:
        return []
    from agents.experiment.memory_diagnosis import MIN_PROBE_EPISODES

    lines = [
        "Memory diagnosis of the final models (stochastic episodes on the eval seeds; "
        "`scripts/diagnose_memory.py` for more): the share of episodes whose cue entered the "
        "agent's view, success when it did and when it did not, and a linear probe's held-out "
        "accuracy at reading the cue from the policy's features at the decision, against the "
        "majority-class rate (in brackets: the episodes that saw the cue and chose, half of "
        f"them held out; – when fewer than {MIN_PROBE_EPISODES}). Success near 0.5 with the "
        "cue rarely seen is an exploration failure; the cue seen but probe accuracy near the "
        "majority rate is a memory failure.",
        "",
    ]

    def rate(value: float | None) -> str:
        return "–" if value is None else _fmt2(value)

    table = []
    for record in sorted(measured, key=lambda r: (r["agent"], r["seed"])):
        m = record["memory_diagnosis"]
        probe = (
            "–"
            if m.get("probe_accuracy") is None
            else f"{_fmt2(m['probe_accuracy'])} vs {_fmt2(m['probe_majority'])}"
        )
        table.append(
            {
                "agent": record["agent"],
                "seed": record["seed"],
                "episodes": m["episodes"],
                "success": rate(m.get("success_rate")),
                "cue seen": rate(m.get("cue_seen_rate")),
                "success if seen": rate(m.get("success_if_seen")),
                "success if unseen": rate(m.get("success_if_unseen")),
                "probe accuracy vs majority (episodes)": f"{probe} ({m['probe_episodes']})",
            }
        )
    lines.append(markdown_table(pd.DataFrame(table)))
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
