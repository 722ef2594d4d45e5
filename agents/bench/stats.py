"""Aggregates over seeds for the benchmark report, computed with rliable.

Per task and score (a metric at the final evaluation, or at the last evaluation at or before
a target's ``by`` budget), each agent's row holds:

- the median and range over seeds (as in the report's results tables);
- the interquartile mean (IQM) with a 95% stratified bootstrap confidence interval
  (``rliable.metrics.aggregate_iqm`` through ``rliable.library.get_interval_estimates``; with
  one task the strata are the task and the bootstrap resamples its seeds);
- the probability that the reference agent (ThalamusPPO) beats this row's agent,
  ``P(X > Y)`` from the Mann-Whitney U statistic (``rliable.metrics.probability_of_improvement``)
  with its independent stratified bootstrap CI.

These are the statistics of Agarwal et al., "Deep Reinforcement Learning at the Edge of the
Statistical Precipice", NeurIPS 2021 (https://github.com/google-research/rliable).

Tables are pandas DataFrames (:func:`aggregate_frame`, one row per task, score, agent and
metric) rendered to Markdown with ``DataFrame.to_markdown``.

Adding a metric to the report is one function registered with :func:`aggregate_metric`:

>>> @aggregate_metric("best seed", render=lambda e: f"{e.value:.2f}")
... def best_seed(scores: TaskScores, label: str, seed: int) -> Estimate | None:
...     values = scores.by_label[label]
...     return Estimate(float(values.max()), float(values.max()), float(values.max()))
>>> AGGREGATE_METRICS.pop().column
'best seed'
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from rliable import library as rly
from rliable import metrics as rly_metrics

from agents.bench.records import _metric_at
from agents.bench.suite import Suite, TaskSpec, _steps

REFERENCE_AGENT = "thalamus"
"""The row every other row is compared with (probability of improvement). A task without a
``thalamus`` row (an ablation task) uses its ``fps_baseline`` row, which the ablation suite
sets to the full agent."""

BOOTSTRAP_REPS = 1000
"""Bootstrap resamples per interval. rliable's default is 50,000; with 3-5 seeds per cell
there are only tens to hundreds of distinct resamples, and 1,000 (the usual minimum for a
percentile interval) keeps the report to seconds: each probability-of-improvement resample
runs a scipy Mann-Whitney U test."""

BOOTSTRAP_SEED = 0
"""Seed of the bootstrap: the same records give the same report."""

CONFIDENCE = 0.95

_METRIC_WORDS = {"mean_reward": "mean eval reward", "success_rate": "eval success rate"}


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """Which number of a run is its score: ``metric`` at the last evaluation at or before
    ``by`` env steps (the run's last evaluation when ``by`` is None)."""

    metric: str
    by: int | None = None

    def describe(self) -> str:
        when = "final" if self.by is None else f"at {_steps(self.by)} steps"
        return f"{_METRIC_WORDS.get(self.metric, self.metric)}, {when}"


@dataclasses.dataclass
class TaskScores:
    """The scores of one task, one array per agent label.

    :ivar by_label: ``{label: scores [n_seeds]}`` in seed order, the reference first, then
        the suite's order; labels without records are absent.
    :ivar seeds: ``{label: seeds}``, the seeds of ``by_label[label]``, in the same order.
    :ivar reference: the label every row is compared with (None: no such row has scores).
    :ivar notes: what the tables cannot show (an agent without records, a seed without an
        evaluation by the budget point).
    """

    task: str
    spec: ScoreSpec
    by_label: dict[str, np.ndarray]
    seeds: dict[str, list[int]]
    reference: str | None
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate and an interval around it (for median/range: median, min, max)."""

    value: float
    low: float
    high: float


MetricFunction = Callable[[TaskScores, str, int], "Estimate | None"]
"""``(scores, label, seed) -> Estimate`` for one row; None: not defined for this row."""


@dataclasses.dataclass(frozen=True)
class AggregateMetric:
    """A column of the aggregates tables.

    :ivar column: the header; ``{reference}`` is replaced by the reference label.
    :ivar compute: the row's estimate (``seed`` seeds any bootstrap).
    :ivar render: the estimate as table text.
    """

    column: str
    compute: MetricFunction
    render: Callable[[Estimate], str]


AGGREGATE_METRICS: list[AggregateMetric] = []
"""The columns of the aggregates tables, in order; :func:`aggregate_metric` appends."""


def aggregate_metric(
    column: str, render: Callable[[Estimate], str]
) -> Callable[[MetricFunction], MetricFunction]:
    """Register a metric function as a column of the aggregates tables."""

    def register(compute: MetricFunction) -> MetricFunction:
        AGGREGATE_METRICS.append(AggregateMetric(column, compute, render))
        return compute

    return register


@contextlib.contextmanager
def seeded_numpy_global_rng(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG for the block, then restore the caller's state.

    rliable 1.2's bootstraps draw their indices with ``np.random.choice`` (the global RNG):
    the ``random_state`` argument of ``get_interval_estimates`` reaches arch but is not used
    for the indices, so it alone does not make an interval reproducible.
    """
    state = np.random.get_state()  # noqa: NPY002 (rliable draws from the global RNG)
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _interval(
    data: np.ndarray | tuple[np.ndarray, np.ndarray],
    func: Callable[..., np.ndarray],
    seed: int,
) -> Estimate:
    """rliable's point estimate and percentile bootstrap interval of ``func`` on ``data``
    (an array ``[n_runs, n_tasks]``, or a pair of them for a two-sample statistic)."""
    with seeded_numpy_global_rng(seed):
        points, intervals = rly.get_interval_estimates(
            {"x": data}, func, reps=BOOTSTRAP_REPS, confidence_interval_size=CONFIDENCE
        )
    low, high = np.asarray(intervals["x"]).reshape(2)
    return Estimate(float(np.asarray(points["x"]).reshape(())), float(low), float(high))


def _column(values: np.ndarray) -> np.ndarray:
    """``[n_seeds]`` -> ``[n_seeds, 1]``: rliable's ``[n_runs, n_tasks]`` for one task."""
    return np.asarray(values, dtype=float).reshape(-1, 1)


def iqm(scores: np.ndarray) -> float:
    """The interquartile mean of ``scores`` (any shape): rliable's 25% trimmed mean."""
    return float(rly_metrics.aggregate_iqm(np.asarray(scores, dtype=float)))


def iqm_interval(scores: np.ndarray, seed: int = BOOTSTRAP_SEED) -> Estimate:
    """IQM of ``scores [n_seeds]`` with its 95% stratified bootstrap CI over seeds."""
    return _interval(_column(scores), lambda x: np.array([rly_metrics.aggregate_iqm(x)]), seed)


def probability_of_improvement(
    x: np.ndarray, y: np.ndarray, seed: int = BOOTSTRAP_SEED
) -> Estimate:
    """P(X > Y) of ``x [n_x]`` over ``y [n_y]`` (ties count half) with its 95% CI, each
    sample resampled on its own."""
    return _interval(
        (_column(x), _column(y)),
        lambda a, b: np.array([rly_metrics.probability_of_improvement(a, b)]),
        seed,
    )


def _fmt_interval(e: Estimate) -> str:
    if np.isnan(e.low):
        return f"{e.value:.2f} (1 seed: no CI)"
    return f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]"


def _point_only(value: float) -> Estimate:
    """An estimate without an interval: a bootstrap of one seed has one resample."""
    return Estimate(value, float("nan"), float("nan"))


def _fmt_range(e: Estimate) -> str:
    return f"{e.value:.2f}" if e.low == e.high else f"{e.value:.2f} [{e.low:.2f}–{e.high:.2f}]"


@aggregate_metric("median [min–max]", render=_fmt_range)
def median_range(scores: TaskScores, label: str, seed: int) -> Estimate | None:
    """Median, min and max over seeds."""
    values = scores.by_label[label]
    return Estimate(float(np.median(values)), float(values.min()), float(values.max()))


@aggregate_metric("IQM [95% CI]", render=_fmt_interval)
def iqm_with_ci(scores: TaskScores, label: str, seed: int) -> Estimate | None:
    """Interquartile mean over seeds, stratified bootstrap CI (none for one seed)."""
    values = scores.by_label[label]
    return iqm_interval(values, seed) if len(values) > 1 else _point_only(iqm(values))


@aggregate_metric("P({reference} > row) [95% CI]", render=_fmt_interval)
def improvement_over_row(scores: TaskScores, label: str, seed: int) -> Estimate | None:
    """Probability that the reference agent beats this row's agent (None on its own row)."""
    if scores.reference is None or label == scores.reference:
        return None
    ours, theirs = scores.by_label[scores.reference], scores.by_label[label]
    estimate = probability_of_improvement(ours, theirs, seed)
    return estimate if min(len(ours), len(theirs)) > 1 else _point_only(estimate.value)


def score_specs(task: TaskSpec) -> list[ScoreSpec]:
    """The scores a task is aggregated on: the final value of each target's metric, and its
    value at the target's ``by`` budget where the target has one; the threshold's metric at
    the end when the task has no targets."""
    specs: list[ScoreSpec] = []
    for target in task.targets:
        specs.append(ScoreSpec(target.metric))
        if target.by is not None:
            specs.append(ScoreSpec(target.metric, target.by))
    return list(dict.fromkeys(specs)) or [ScoreSpec(task.threshold.metric)]


def reference_label(task: TaskSpec, labels: Sequence[str]) -> str:
    """:data:`REFERENCE_AGENT` if the task has that row, else the task's ``fps_baseline``."""
    return REFERENCE_AGENT if REFERENCE_AGENT in labels else task.fps_baseline


def task_scores(
    task: TaskSpec,
    labels: Sequence[str],
    records: Sequence[dict[str, Any]],
    spec: ScoreSpec,
    mode: str,
) -> TaskScores:
    """Collect ``spec``'s score of every record of ``task`` by label (``labels`` order).

    A seed without an evaluation by ``spec.by`` (or without the metric) is left out and
    named in ``notes``; so is a label with no records.
    """
    by_label: dict[str, np.ndarray] = {}
    seeds: dict[str, list[int]] = {}
    notes: list[str] = []
    for label in labels:
        recs = sorted(
            (r for r in records if r["task"] == task.name and r["agent"] == label),
            key=lambda r: r["seed"],
        )
        if not recs:
            notes.append(f"no records of `{label}` on this task: its row is left out")
            continue
        values, kept, lacking = [], [], []
        for record in recs:
            value = _metric_at(record, spec.metric, mode, spec.by)
            if value is None:
                lacking.append(str(record["seed"]))
            else:
                values.append(float(value))
                kept.append(record["seed"])
        if lacking:
            notes.append(
                f"`{label}` seed {', '.join(lacking)} has no evaluation of this score: left out"
            )
        if values:
            by_label[label] = np.asarray(values)
            seeds[label] = kept
    reference = reference_label(task, labels)
    if reference not in by_label:
        if any(label != reference for label in by_label):
            notes.append(f"no scores of the reference `{reference}`: no probability of improvement")
        reference = None
    else:  # the reference row first: every other row is read against it
        by_label = {reference: by_label.pop(reference), **by_label}
    return TaskScores(task.name, spec, by_label, seeds, reference, notes)


def aggregate_frame(scores: TaskScores, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """One row per agent and metric of :data:`AGGREGATE_METRICS`: columns ``task``,
    ``score``, ``agent``, ``seeds``, ``metric``, ``value``, ``low``, ``high`` (a metric not
    defined for a row, e.g. P(reference > itself), is absent)."""
    rows = []
    for label, values in scores.by_label.items():
        for metric in AGGREGATE_METRICS:
            estimate = metric.compute(scores, label, seed)
            if estimate is None:
                continue
            rows.append(
                {
                    "task": scores.task,
                    "score": scores.spec.describe(),
                    "agent": label,
                    "seeds": len(values),
                    "metric": metric.column.format(reference=scores.reference),
                    "value": estimate.value,
                    "low": estimate.low,
                    "high": estimate.high,
                }
            )
    columns = ["task", "score", "agent", "seeds", "metric", "value", "low", "high"]
    return pd.DataFrame(rows, columns=columns)


def aggregate_table(scores: TaskScores, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """The table shown in the report: one row per agent, a text column per metric ("–"
    where a metric does not apply)."""
    table = []
    for label in scores.by_label:
        row = {"agent": label, "seeds": ", ".join(map(str, scores.seeds[label]))}
        for metric in AGGREGATE_METRICS:
            estimate = metric.compute(scores, label, seed)
            header = metric.column.format(reference=scores.reference or REFERENCE_AGENT)
            row[header] = "–" if estimate is None else metric.render(estimate)
        table.append(row)
    return pd.DataFrame(table)


def to_markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table, every column as text."""
    return table.to_markdown(index=False, stralign="left", disable_numparse=True)


def aggregates_markdown(
    suite: Suite, records: Sequence[dict[str, Any]], seed: int = BOOTSTRAP_SEED
) -> list[str]:
    """The report lines of a suite's "Aggregates over seeds (rliable)" section."""
    tasks = [t for t in suite.tasks.values() if any(r["task"] == t.name for r in records)]
    if not tasks:
        return []
    counts = sorted(
        {
            sum(1 for r in records if (r["task"], r["agent"]) == (t.name, label))
            for t in tasks
            for label in suite.labels(t.name)
        }
        - {0}
    )
    n_seeds = " to ".join(map(str, dict.fromkeys([counts[0], counts[-1]])))
    plural = "" if n_seeds == "1" else "s"
    references = list(dict.fromkeys(reference_label(t, suite.labels(t.name)) for t in tasks))
    lines = [
        "### Aggregates over seeds (rliable)",
        "",
        f"Per task, over {n_seeds} seed{plural} per agent ({suite.eval_mode} evaluation): median "
        "[min–max]; the interquartile mean (IQM, the mean of the middle 50% of seeds) with a "
        f"{CONFIDENCE:.0%} stratified bootstrap CI over seeds; and the probability that "
        f"{' or '.join(references)} (each table's first row) beats the row's agent, P(X > Y) "
        f"with ties counting half, with its {CONFIDENCE:.0%} bootstrap CI (0.5: no "
        "difference). rliable (Agarwal et al., NeurIPS 2021), "
        f"{BOOTSTRAP_REPS:,} percentile-bootstrap resamples, seed {BOOTSTRAP_SEED}."
        + (
            f" **With {n_seeds} seed{plural} these intervals are wide**: they say how "
            f"little {n_seeds} seed{plural} pin down, not where the agent's true score lies. "
            "A probability of 1.00 [1.00, 1.00] says every seed beat every seed of the other "
            "agent, not that it always will: the bootstrap can only resample the seeds there "
            "are."
            if counts[0] < 10
            else ""
        )
        + (
            f" The IQM of fewer than 4 values is their mean (a 25% trim of {counts[0]} "
            "values removes none)."
            if counts[0] < 4
            else ""
        ),
        "",
    ]
    for task in tasks:
        title = task.name if task.name == task.env_id else f"{task.name} ({task.env_id})"
        for spec in score_specs(task):
            scores = task_scores(task, suite.labels(task.name), records, spec, suite.eval_mode)
            lines += [f"#### {title}: {spec.describe()}", ""]
            if not scores.by_label:
                lines += ["No scores yet.", ""]
                continue
            lines += [to_markdown(aggregate_table(scores, seed)), ""]
            if scores.notes:
                lines += [f"Note: {'; '.join(scores.notes)}.", ""]
    return lines
