"""Aggregates over seeds for the benchmark report (agents/bench/stats.py): rliable's IQM,
stratified bootstrap CIs and probability of improvement, checked against closed forms."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from agents.bench import stats as bs
from agents.bench import suite as bench_suite

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"


@pytest.fixture(autouse=True)
def _few_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    # Enough for the properties checked here; keeps each interval a fraction of a second.
    monkeypatch.setattr(bs, "BOOTSTRAP_REPS", 200)


def fixture_suite() -> bench_suite.Suite:
    return bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)


def fixture_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((FIXTURES / "records").glob("*.json"))]


def test_iqm_is_the_mean_of_the_middle_half() -> None:
    scores = np.array([9.0, 0.0, 4.0, 1.0, 7.0, 3.0, 100.0, 2.0])  # n = 8: drop 2 each end
    middle = np.sort(scores)[2:6]
    assert bs.iqm(scores) == pytest.approx(middle.mean())
    assert bs.iqm(scores) == pytest.approx(4.0)  # (2 + 3 + 4 + 7) / 4
    estimate = bs.iqm_interval(scores)
    assert estimate.value == pytest.approx(4.0)
    assert estimate.low <= estimate.value <= estimate.high


def test_probability_of_improvement_closed_forms() -> None:
    high, low = np.array([0.8, 0.9, 1.0]), np.array([0.1, 0.2, 0.3])
    dominates = bs.probability_of_improvement(high, low)
    assert (dominates.value, dominates.low, dominates.high) == (1.0, 1.0, 1.0)
    assert bs.probability_of_improvement(low, high).value == 0.0
    same = bs.probability_of_improvement(high, high.copy())
    assert same.value == 0.5
    assert same.low <= 0.5 <= same.high
    # Mann-Whitney U / (n_x n_y): x = [1, 3] vs y = [2]: one win, one loss.
    assert bs.probability_of_improvement(np.array([1.0, 3.0]), np.array([2.0])).value == 0.5


def test_bootstrap_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    scores = np.random.default_rng(1).random(12)
    other = np.random.default_rng(2).random(12)
    # The global RNG is the one rliable draws from (see seeded_numpy_global_rng).
    np.random.seed(123)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    first = bs.iqm_interval(scores, seed=5)
    assert bs.iqm_interval(scores, seed=5) == first
    assert bs.probability_of_improvement(scores, other, seed=5) == (
        bs.probability_of_improvement(scores, other, seed=5)
    )
    # The seed is what fixes it: another seed gives another interval for these 12 values.
    assert bs.iqm_interval(scores, seed=6) != first
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # noqa: NPY002


def test_score_specs_follow_the_targets() -> None:
    suite = fixture_suite()
    empty = suite.tasks["MiniGrid-Empty-5x5-v0"]
    assert bs.score_specs(empty) == [
        bs.ScoreSpec("mean_reward"),
        bs.ScoreSpec("mean_reward", 2000),
        bs.ScoreSpec("success_rate"),
    ]
    no_targets = bench_suite.TaskSpec("t", "t", bench_suite.Threshold("success_rate", 0.5))
    assert bs.score_specs(no_targets) == [bs.ScoreSpec("success_rate")]


def test_aggregate_table_rows_and_columns() -> None:
    suite = fixture_suite()
    task = suite.tasks["MiniGrid-Empty-5x5-v0"]
    scores = bs.task_scores(
        task, suite.labels(task.name), fixture_records(), bs.ScoreSpec("mean_reward"), "stochastic"
    )
    assert scores.reference == "thalamus"
    assert scores.notes == []
    table = bs.aggregate_table(scores)
    assert list(table["agent"]) == ["thalamus", "ppo", "lstm"]
    assert list(table.columns) == [
        "agent",
        "seeds",
        "median [min–max]",
        "IQM [95% CI]",
        "P(thalamus > row) [95% CI]",
    ]
    assert table.loc[0, "median [min–max]"] == "0.91 [0.50–0.95]"  # the results table's cell
    assert table.loc[0, "P(thalamus > row) [95% CI]"] == "–"
    text = bs.to_markdown(table)
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| thalamus | 0, 1, 2 ")
    # Long form: one row per agent and metric, none for P(thalamus > thalamus).
    frame = bs.aggregate_frame(scores)
    assert len(frame) == 3 * 3 - 1
    iqm = frame[(frame.agent == "lstm") & (frame.metric == "IQM [95% CI]")].iloc[0]
    assert iqm.value == pytest.approx(bs.iqm(scores.by_label["lstm"]))


def test_an_agent_without_records_is_named_not_dropped_silently() -> None:
    suite = fixture_suite()
    task = suite.tasks["MiniGrid-Empty-5x5-v0"]
    spec = bs.ScoreSpec("mean_reward")
    without_ppo = [r for r in fixture_records() if r["agent"] != "ppo"]
    scores = bs.task_scores(task, suite.labels(task.name), without_ppo, spec, "stochastic")
    assert list(scores.by_label) == ["thalamus", "lstm"]
    assert scores.notes == ["no records of `ppo` on this task: its row is left out"]
    # Without the reference there is nothing to compare with: said, and the column is "–".
    without_ref = [r for r in fixture_records() if r["agent"] != "thalamus"]
    scores = bs.task_scores(task, suite.labels(task.name), without_ref, spec, "stochastic")
    assert scores.reference is None
    assert "no scores of the reference `thalamus`: no probability of improvement" in scores.notes
    assert set(bs.aggregate_table(scores)["P(thalamus > row) [95% CI]"]) == {"–"}


def test_a_seed_without_an_evaluation_by_the_budget_point_is_left_out_and_named() -> None:
    suite = fixture_suite()
    task = suite.tasks["MiniGrid-Empty-5x5-v0"]
    records = copy.deepcopy(fixture_records())
    late = next(r for r in records if (r["agent"], r["seed"]) == ("lstm", 1))
    late["curve"] = [p for p in late["curve"] if p["timesteps"] > 2000]
    scores = bs.task_scores(
        task, suite.labels(task.name), records, bs.ScoreSpec("mean_reward", 2000), "stochastic"
    )
    assert scores.seeds["lstm"] == [0, 2]
    assert "`lstm` seed 1 has no evaluation of this score: left out" in scores.notes


def test_a_metric_is_one_registered_function() -> None:
    @bs.aggregate_metric("best seed", render=lambda e: f"{e.value:.2f}")
    def best_seed(scores: bs.TaskScores, label: str, seed: int) -> bs.Estimate:
        top = float(scores.by_label[label].max())
        return bs.Estimate(top, top, top)

    try:
        suite = fixture_suite()
        task = suite.tasks["MiniGrid-Empty-5x5-v0"]
        scores = bs.task_scores(
            task, ["thalamus"], fixture_records(), bs.ScoreSpec("mean_reward"), "stochastic"
        )
        assert bs.aggregate_table(scores).loc[0, "best seed"] == "0.95"
    finally:
        bs.AGGREGATE_METRICS.remove(next(m for m in bs.AGGREGATE_METRICS if m.compute is best_seed))


def test_report_section(tmp_path: Path) -> None:
    suite = fixture_suite()
    lines = bs.aggregates_markdown(suite, fixture_records())
    text = "\n".join(lines)
    assert lines[0] == "### Aggregates over seeds (rliable)"
    assert "over 3 seeds per agent" in text
    assert "**With 3 seeds these intervals are wide**" in text
    for heading in (
        "#### MiniGrid-Empty-5x5-v0: mean eval reward, final",
        "#### MiniGrid-Empty-5x5-v0: mean eval reward, at 2k steps",
        "#### MiniGrid-Empty-5x5-v0: eval success rate, final",
    ):
        assert heading in lines
    # No DoorKey records: no DoorKey tables.
    assert "DoorKey" not in text
    # Deterministic: the same records give the same section.
    assert bs.aggregates_markdown(suite, fixture_records()) == lines


def test_one_seed_gets_a_point_estimate_and_no_interval() -> None:
    suite = fixture_suite()
    task = suite.tasks["MiniGrid-Empty-5x5-v0"]
    seed_0 = [r for r in fixture_records() if r["seed"] == 0]
    scores = bs.task_scores(
        task, suite.labels(task.name), seed_0, bs.ScoreSpec("mean_reward"), "stochastic"
    )
    table = bs.aggregate_table(scores)
    assert table.loc[0, "IQM [95% CI]"] == "0.95 (1 seed: no CI)"
    assert table.loc[1, "P(thalamus > row) [95% CI]"] == "1.00 (1 seed: no CI)"
    assert "over 1 seed per agent" in "\n".join(bs.aggregates_markdown(suite, seed_0))
