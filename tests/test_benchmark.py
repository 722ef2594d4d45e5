"""The benchmark harness: suite validation, records, skip/resume, the report (no real runs
beyond two tiny PPO runs on MiniGrid-Empty-5x5-v0)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import agents.experiment.training
from agents.bench import records as bench_records
from agents.bench import report, runner
from agents.bench import suite as bench_suite
from agents.experiment.config import CONFIG_DIR, ExplorationConfig, find_config_for_env
from tests.helpers import TASKS_WITH_A_BONUS

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
BENCH_RECORDS = REPO / "docs" / "benchmarks" / "records"
sys.path.insert(0, str(REPO / "scripts"))
import benchmark as benchmark_script  # noqa: E402

# A tiny valid suite; each invalid case below edits one part of it.
VALID = """\
name: tiny
output: {out}
overrides:
  - train.torch_threads=1
  - train.progress=none
  - train.device=cpu
  - env.n_envs=2
  - ppo.n_steps=64
  - ppo.batch_size=64
  - ppo.n_epochs=1
  - train.eval_freq=256
  - train.eval_episodes=2
  - train.eval_n_envs=1
  - train.checkpoint_freq=512
  - env.env_kwargs.max_steps=20
tasks:
  MiniGrid-Empty-5x5-v0:
    threshold: {{metric: mean_reward, value: 0.5}}
    targets: [{{agent: ppo, metric: mean_reward, value: 0.5}}]
runs:
  - {{task: MiniGrid-Empty-5x5-v0, agents: [ppo], seeds: [0], budget: {budget}}}
"""


def write_suite(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def squeezed(markdown: str) -> str:
    """A report with the tables' column padding (``DataFrame.to_markdown``) squeezed out."""
    return re.sub(r" {2,}", " ", markdown)


def valid_text(out: Path | str = "unused", budget: int = 512) -> str:
    return VALID.format(out=out, budget=budget)


# --------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------


def test_repository_suites_load_and_match_the_issue() -> None:
    quick = bench_suite.load_suite("quick")
    assert {r.agent for r in quick.runs} == {"thalamus", "ppo", "lstm"}
    assert Path(quick.output).parts[0] != "docs"  # quick output is not committed

    full = bench_suite.load_suite("full")
    budgets = {
        "MiniGrid-DoorKey-5x5-v0": 150_000,
        "MiniGrid-MemoryS7-v0": 1_000_000,
        "MiniGrid-MemoryS11-v0": 2_000_000,
        "MiniGrid-RedBlueDoors-6x6-v0": 1_000_000,
        "MiniGrid-KeyCorridorS3R1-v0": 500_000,
        "BabyAI-GoToLocal-v0": 2_000_000,
    }
    assert {r.task: r.budget for r in full.runs} == budgets
    assert len(full.runs) == 6 * 3 * 3
    for task in full.tasks.values():
        assert [t.agent for t in task.targets] == ["thalamus"]
        assert {(r.agent, r.seed) for r in full.runs if r.task == task.name} == {
            (a, s) for a in ("thalamus", "ppo", "lstm") for s in (0, 1, 2)
        }
    doorkey = full.tasks["MiniGrid-DoorKey-5x5-v0"].targets[0]
    assert (doorkey.metric, doorkey.value, doorkey.by) == ("mean_reward", 0.9, 100_000)

    ablations = bench_suite.load_suite("ablations")
    labels = {(r.task, r.label) for r in ablations.runs}
    assert ("MiniGrid-MemoryS7-v0", "one-stream") in labels
    assert ("MemoryS7-trial2", "no-feedback") in labels
    one_stream = next(r for r in ablations.runs if r.label == "one-stream")
    assert len(one_stream.load_config().thalamus.streams) == 1
    trial = next(r for r in ablations.runs if r.task == "MemoryS7-trial2")
    # The full agent's row is the full suite's MemoryS7 runs, not a second copy of them.
    # (the 3-stream comparison of issue 38 shares DoorKey-5x5 and MemoryS11 with it too).
    compared = ("MiniGrid-DoorKey-5x5-v0", "MiniGrid-MemoryS7-v0", "MiniGrid-MemoryS11-v0")
    assert {r.key: r.shared_with for r in ablations.runs if r.label == "thalamus"} == {
        f"{task}__thalamus__{s}": "full" for task in compared for s in (0, 1, 2)
    }
    assert trial.load_config().env.trial_episodes == 2
    three_streams = [r for r in ablations.runs if r.label == "three-stream"]
    expected = {(t, s) for t in compared for s in (0, 1, 2)}
    assert {(r.task, r.seed) for r in three_streams} == expected
    streams = three_streams[0].load_config().thalamus.streams
    assert [(s.name, s.kind, s.clock) for s in streams] == [
        ("visual", "mamba", 1),
        ("semantic", "mamba", 4),
        ("episodic", "episodic", 1),
    ]


@pytest.mark.parametrize("task", TASKS_WITH_A_BONUS)
def test_recorded_runs_of_tasks_with_a_bonus_still_resolve_to_what_they_ran(task: str) -> None:
    """configs/keycorridor_s3r1.yaml and redbluedoors_6x6.yaml gained an exploration bonus
    (issue 36) after the full suite's runs and the baselines' recipes ran without one: both
    still resolve to the schema's ``exploration`` (no bonus), the exploration suite to its
    bonus, and the full suite's committed records of the task are not stale."""
    full = bench_suite.load_suite("full")
    for suite in (full, bench_suite.load_suite("baselines")):
        runs = [r for r in suite.runs if r.task == task]
        assert runs and all(r.load_config().exploration == ExplorationConfig() for r in runs)
    # Every exploration-suite run of the task has the bonus; some probes change how it is
    # mixed (exploration.mixing), not which bonus it is.
    bonuses = {
        dataclasses.astuple(r.load_config().exploration)[:2]
        for r in bench_suite.load_suite("exploration").runs
        if r.task == task
    }
    assert bonuses == {("episodic_first_visit", 0.01)}
    records = [r for r in bench_records.load_records(BENCH_RECORDS / "full") if r["task"] == task]
    assert all("config" in r for r in records)
    assert report._stale_records(full, records) == []


def test_speed_suite_measures_issue_4s_setting_side_by_side() -> None:
    """DoorKey-5x5 at the shared PPO settings, thalamus and LSTM-PPO paired seed by seed
    (so --cpus 2 puts them side by side), one and two torch threads as separate tasks."""
    speed = bench_suite.load_suite("speed")
    assert [(r.task, r.agent) for r in speed.runs[:2]] == [
        ("DoorKey-1thread", "thalamus"),
        ("DoorKey-1thread", "lstm"),
    ]
    threads = {"DoorKey-1thread": 1, "DoorKey-2threads": 2}
    for run in speed.runs:
        config = run.load_config()
        assert config.env.id == "MiniGrid-DoorKey-5x5-v0"
        assert (config.env.n_envs, config.ppo.n_steps) == (8, 128)
        assert (config.ppo.batch_size, config.ppo.n_epochs) == (256, 10)
        assert config.train.torch_threads == threads[run.task]
        assert run.budget == 51_200


def test_suite_folder_does_not_disturb_per_env_configs() -> None:
    """find_config_for_env and train_agent.py's --config only look at configs/*.yaml."""
    for suite in ("quick", "full", "ablations", "speed"):
        assert (bench_suite.SUITE_DIR / f"{suite}.yaml").is_file()
    assert bench_suite.SUITE_DIR.parent == CONFIG_DIR
    assert all(p.parent == CONFIG_DIR for p in CONFIG_DIR.glob("*.yaml"))
    for task in bench_suite.load_suite("full", check_configs=False).tasks.values():
        found = find_config_for_env(task.env_id)
        assert found is not None and found.parent == CONFIG_DIR


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("MiniGrid-Empty-5x5-v0:\n", "MiniGrid-Nope-v0:\n", "tasks.MiniGrid-Nope-v0: env"),
        ("agents: [ppo]", "agents: [dqn]", "agent 'dqn' is not valid; choose from: thalamus"),
        ("seeds: [0], ", "", "missing required key 'runs[0].seeds'"),
        (", budget: 512", "", "no budget; give budget"),
        (
            "    threshold: {metric: mean_reward, value: 0.5}\n",
            "",
            "missing required key 'tasks.MiniGrid-Empty-5x5-v0.threshold'",
        ),
        ("{metric: mean_reward, value: 0.5}", "{metric: reward, value: 0.5}", "metric = 'reward'"),
        ("task: MiniGrid-Empty-5x5-v0,", "task: Other,", "task = 'Other' is not defined"),
        ("agents: [ppo]", "agents: [ppo], colour: red", "unknown key 'colour'"),
        ("targets: [{agent: ppo,", "targets: [{agent: lstm,", "target for agent 'lstm'"),
        ("  - train.device=cpu\n", "  - train.seed=3\n", "sets train.seed, which the run"),
        ("  - train.device=cpu\n", "  - ppo.n_step=3\n", "unknown key 'ppo.n_step'"),
        ("  - train.eval_freq=256\n", "  - train.eval_freq=0\n", "train.eval_freq = 0 gives"),
        ("agents: [ppo]", "agents: [ppo, lstm], label: x", "label names one agent"),
        ("name: tiny", "name: a/b", "name = 'a/b' must be"),
        ("tasks:\n", "fps_baseline: thalamus\ntasks:\n", "compares fps with 'thalamus'"),
        ("tasks:\n", "fps_baseline: 3\ntasks:\n", "compares fps with '3'"),
        ("tasks:\n", "fps_baseline: a/b\ntasks:\n", "fps_baseline = 'a/b' must be a row label"),
        ("seeds: [0]", "seeds: []", "seeds must be a non-empty list"),
        ("seeds: [0]", "seeds: [zero]", "Value 'zero' of type 'str' could not be converted"),
        ("budget: 512}", "budget: 0}", "budget = 0 must be >= 1 env steps"),
    ],
)
def test_invalid_suites_say_what_is_wrong(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = valid_text()
    assert old in text
    path = write_suite(tmp_path, text.replace(old, new, 1))
    with pytest.raises(
        bench_suite.BenchmarkError, match=message.replace("[", r"\[").replace("(", r"\(")
    ):
        bench_suite.load_suite(path)


def test_duplicate_runs_and_unknown_suites_are_rejected(tmp_path: Path) -> None:
    text = (
        valid_text() + "  - {task: MiniGrid-Empty-5x5-v0, agents: [ppo], seeds: [0], budget: 9}\n"
    )
    with pytest.raises(
        bench_suite.BenchmarkError, match="listed twice; give one of them a different"
    ):
        bench_suite.load_suite(write_suite(tmp_path, text))
    twice = valid_text().replace("seeds: [0]", "seeds: [0, 0]")
    assert twice != valid_text()
    with pytest.raises(bench_suite.BenchmarkError, match="listed twice; list each seed once"):
        bench_suite.load_suite(write_suite(tmp_path, twice, "twice.yaml"))
    with pytest.raises(bench_suite.BenchmarkError, match="one of the names in .*quick"):
        bench_suite.load_suite("no-such-suite")
    assert benchmark_script.main(["no-such-suite"]) == benchmark_script.EXIT_INVALID


def test_overrides_are_layered_suite_task_entry_then_harness(tmp_path: Path) -> None:
    text = (
        valid_text()
        .replace("    targets:", "    overrides: [ppo.n_epochs=2]\n    targets:")
        .replace("budget: 512}", "budget: 512, overrides: [ppo.n_epochs=3]}")
    )
    suite = bench_suite.load_suite(write_suite(tmp_path, text))
    (run,) = suite.runs
    assert run.overrides[-2:] == ("ppo.n_epochs=2", "ppo.n_epochs=3")
    config = run.load_config()
    assert config.ppo.n_epochs == 3
    assert (config.agent.kind, config.train.seed, config.train.total_timesteps) == ("ppo", 0, 512)
    assert run.key == "MiniGrid-Empty-5x5-v0__ppo__0"


def test_a_run_entry_starts_from_its_recipe_file(tmp_path: Path) -> None:
    """``config:`` names the per-env file a run starts from (a tuned recipe); the entry's
    overrides still apply after it, and a recipe of another env or agent is refused."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "env: {id: MiniGrid-Empty-5x5-v0}\nagent: {kind: ppo}\nppo: {learning_rate: 2.5e-4}\n"
    )
    text = valid_text().replace("budget: 512}", f"budget: 512, config: {recipe}}}")
    (run,) = bench_suite.load_suite(write_suite(tmp_path, text)).runs
    config = run.load_config()
    assert config.ppo.learning_rate == 2.5e-4
    assert config.ppo.n_epochs == 1  # the suite's overrides win over the recipe
    plain = bench_suite.load_suite(write_suite(tmp_path, valid_text(), "plain.yaml")).runs[0]
    assert plain.load_config().ppo.learning_rate != 2.5e-4

    other_env = tmp_path / "other_env.yaml"
    other_env.write_text("env: {id: MiniGrid-DoorKey-5x5-v0}\n")
    text = valid_text().replace("budget: 512}", f"budget: 512, config: {other_env}}}")
    with pytest.raises(bench_suite.BenchmarkError, match="config for MiniGrid-DoorKey-5x5-v0"):
        bench_suite.load_suite(write_suite(tmp_path, text))
    text = valid_text().replace("agents: [ppo]", "agents: [lstm]")
    text = text.replace("budget: 512}", f"budget: 512, config: {recipe}}}")
    text = text.replace("{agent: ppo,", "{agent: lstm,")
    with pytest.raises(bench_suite.BenchmarkError, match="recipe for agent 'ppo'"):
        bench_suite.load_suite(write_suite(tmp_path, text))
    text = valid_text().replace("budget: 512}", "budget: 512, config: no_such_recipe}")
    with pytest.raises(bench_suite.BenchmarkError, match="no_such_recipe.*not found"):
        bench_suite.load_suite(write_suite(tmp_path, text))


# --------------------------------------------------------------------------------------
# Records and the report (fixtures)
# --------------------------------------------------------------------------------------


def fixture_records() -> list[dict]:
    return bench_records.load_records(FIXTURES / "records")


def test_fixture_records_match_the_schema() -> None:
    records = fixture_records()
    assert len(records) == 9
    for record in records:
        assert set(bench_records.RECORD_KEYS) <= set(record)
        for point in record["curve"]:
            assert set(bench_records.POINT_KEYS) <= set(point)


def test_validate_record_names_what_is_missing(tmp_path: Path) -> None:
    record = fixture_records()[0]
    broken = {k: v for k, v in record.items() if k != "train_fps"}
    with pytest.raises(bench_suite.BenchmarkError, match="missing keys train_fps"):
        bench_records.validate_record(broken, "x.json")
    broken = {**record, "curve": [{"timesteps": 1}]}
    with pytest.raises(bench_suite.BenchmarkError, match=r"curve\[0\] lacks wall_s"):
        bench_records.validate_record(broken, "x.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(bench_suite.BenchmarkError, match="bad.json is not valid JSON"):
        bench_records.load_records(tmp_path)


def test_summary_medians_ranges_and_fps_ratios() -> None:
    suite = bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)
    task = suite.tasks["MiniGrid-Empty-5x5-v0"]
    rows = {
        r.label: r
        for r in report.summarize_task(
            task, suite.labels(task.name), fixture_records(), "stochastic"
        )
    }
    assert list(rows) == ["thalamus", "ppo", "lstm"]
    thalamus, ppo, lstm = rows["thalamus"], rows["ppo"], rows["lstm"]
    assert thalamus.final_reward == (0.91, 0.5, 0.95)
    assert thalamus.final_success == (1.0, 0.6, 1.0)
    assert thalamus.reached == 2 and thalamus.frames_to_threshold == (2500.0, 2000.0, 3000.0)
    assert thalamus.seconds_to_threshold == pytest.approx((7.879, 6.667, 9.091), abs=1e-3)
    assert thalamus.fps == (300.0, 270.0, 330.0)
    assert thalamus.fps_ratio == pytest.approx(1.5)
    assert ppo.fps_ratio == pytest.approx(5.0) and lstm.fps_ratio == pytest.approx(1.0)
    assert ppo.reached == 1 and ppo.frames_to_threshold == (3000.0, 3000.0, 3000.0)
    assert lstm.reached == 0 and lstm.frames_to_threshold is None
    # The deterministic evaluations of the fixtures are all 0: the mode matters.
    det = report.summarize_task(task, ["thalamus"], fixture_records(), "deterministic")[0]
    assert det.final_reward == (0.0, 0.0, 0.0) and det.reached == 0
    # Another fps baseline (fps_baseline: thalamus in a suite file, as the ablations have).
    against = report.summarize_task(
        dataclasses.replace(task, fps_baseline="thalamus"),
        suite.labels(task.name),
        fixture_records(),
        "stochastic",
    )
    assert [r.fps_ratio for r in against] == pytest.approx([1.0, 1000 / 300, 200 / 300])


def test_fps_baseline_defaults_to_lstm_and_may_be_set_per_suite_or_task(tmp_path: Path) -> None:
    text = valid_text().replace("agents: [ppo]", "agents: [ppo, lstm]")
    (task,) = bench_suite.load_suite(write_suite(tmp_path, text)).tasks.values()
    assert task.fps_baseline == "lstm"
    suite_level = text.replace("tasks:\n", "fps_baseline: ppo\ntasks:\n")
    (task,) = bench_suite.load_suite(write_suite(tmp_path, suite_level)).tasks.values()
    assert task.fps_baseline == "ppo"
    task_level = suite_level.replace("    targets:", "    fps_baseline: lstm\n    targets:")
    (task,) = bench_suite.load_suite(write_suite(tmp_path, task_level)).tasks.values()
    assert task.fps_baseline == "lstm"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (150_000, "150k"),
        (2_000_000, "2M"),
        (4096, "4.1k"),
        (999_499, "999k"),
        (999_500, "1M"),
        (999_999, "1M"),
        (999.7, "1k"),
        (999, "999"),
        (0, "0"),
    ],
)
def test_step_counts_never_print_in_exponent_form(n: float, text: str) -> None:
    assert bench_suite._steps(n) == text
    assert "e+" not in bench_suite._number(n)


def test_targets_met_missed_and_not_run() -> None:
    suite = bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)
    records = fixture_records()
    by_2000, ppo_success = suite.tasks["MiniGrid-Empty-5x5-v0"].targets
    result = report.target_result(by_2000, records, "stochastic")
    assert result.status == "MISSED" and result.median == pytest.approx(0.6)
    assert result.per_seed == {0: 0.92, 1: 0.6, 2: 0.4}
    assert report.target_result(ppo_success, records, "stochastic").status == "met"
    doorkey = suite.tasks["MiniGrid-DoorKey-5x5-v0"].targets[0]
    assert report.target_result(doorkey, [], "stochastic").status == "no runs"


def test_report_from_fixture_records(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES / "records", tmp_path / "records" / "fixture")
    code = benchmark_script.main([str(FIXTURES / "suite.yaml"), "--report", "--out", str(tmp_path)])
    assert code == 0
    text = squeezed((tmp_path / "README.md").read_text())
    assert "9 of 10 runs have records (commit 0123abc)" in text
    assert "**Not run yet:** MiniGrid-DoorKey-5x5-v0__thalamus__0." in text
    assert (
        "| MiniGrid-Empty-5x5-v0 | thalamus: mean eval reward >= 0.9 by 2k steps | 0.60 "
        "(seed 0: 0.92, seed 1: 0.60, seed 2: 0.40) | **MISSED** |"
    ) in text
    assert "| ppo: eval success rate >= 0.9 at the end | 1.00" in text
    assert (
        "**Targets missed:** MiniGrid-Empty-5x5-v0 (thalamus: mean eval reward >= 0.9 by 2k" in text
    )
    assert "**Targets not yet measured:** MiniGrid-DoorKey-5x5-v0" in text
    assert (
        "| thalamus | 0, 1, 2 | 3k | 0.91 [0.50–0.95] | 1.00 [0.60–1.00] | "
        "2.5k [2k–3k] (2/3 reached) | 8 [7–9] (2/3 reached) | 300 [270–330] | 1.50x | "
        "410 [400–420] |"
    ) in text
    assert "| ppo | 0, 1, 2 | 3k | 0.85 [0.80–0.90] |" in text
    assert "| 1000 [800–1200] | 5.00x |" in text
    assert (
        "| lstm | 0, 1, 2 | 3k | 0.60 [0.40–0.70] | 0.70 [0.50–0.80] | not reached (0/3) |" in text
    )
    assert "do not match" not in text
    # The aggregates over seeds (tests/test_bench_stats.py) come after the results tables.
    assert text.index("### Aggregates over seeds (rliable)") > text.index("### Results")
    assert "#### MiniGrid-Empty-5x5-v0: mean eval reward, at 2k steps" in text
    for kind in ("steps", "wall"):
        png = tmp_path / "plots" / f"fixture_reward_vs_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/fixture_reward_vs_{kind}.png)" in text
    # Its records gone (archived), the suite's plots go too rather than show them.
    shutil.rmtree(tmp_path / "records" / "fixture")
    (tmp_path / "records" / "fixture").mkdir()
    benchmark_script.main([str(FIXTURES / "suite.yaml"), "--report", "--out", str(tmp_path)])
    assert not list((tmp_path / "plots").glob("fixture_*.png"))
    assert "0 of 10 runs have records" in squeezed((tmp_path / "README.md").read_text())


def test_reporting_one_suite_keeps_the_other_suites_sections(tmp_path: Path) -> None:
    # One README per output folder: naming one suite used to rewrite it with that suite alone.
    shutil.copytree(FIXTURES / "records", tmp_path / "records" / "fixture")
    shutil.copytree(BENCH_RECORDS / "baselines", tmp_path / "records" / "baselines")
    benchmark_script.main([str(FIXTURES / "suite.yaml"), "--report", "--out", str(tmp_path)])
    text = (tmp_path / "README.md").read_text()
    assert "## Suite `baselines`" in text and "## Suite `fixture`" in text
    assert text.index("## Suite `baselines`") < text.index("## Suite `fixture`")


def test_report_says_when_a_target_is_judged_on_fewer_seeds_than_planned(tmp_path: Path) -> None:
    folder = tmp_path / "records" / "fixture"
    shutil.copytree(FIXTURES / "records", folder)
    suite = bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)
    text = squeezed(report.write_report([suite], tmp_path).read_text())
    assert "fewer seeds" not in text and " of 3 seeds)" not in text
    (folder / "MiniGrid-Empty-5x5-v0__ppo__2.json").unlink()
    text = squeezed(report.write_report([suite], tmp_path).read_text())
    assert (
        "| ppo: eval success rate >= 0.9 at the end | 1.00 (seed 0: 1.00, seed 1: 1.00) | "
        "met (2 of 3 seeds) |" in text
    )
    assert (
        "**Judged on fewer seeds than the suite runs:** MiniGrid-Empty-5x5-v0 (ppo: eval success "
        "rate >= 0.9 at the end: 2 of 3 seeds); the status may change" in text
    )


def test_report_flags_records_that_no_longer_match_the_suite(tmp_path: Path) -> None:
    folder = tmp_path / "records" / "fixture"
    shutil.copytree(FIXTURES / "records", folder)
    path = folder / "MiniGrid-Empty-5x5-v0__ppo__1.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "budget": 100}))
    suite = bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)
    text = squeezed(report.write_report([suite], tmp_path).read_text())
    assert "do not match the suite file" in text and "MiniGrid-Empty-5x5-v0__ppo__1" in text


def test_records_of_runs_the_suite_does_not_have_are_left_out_of_the_numbers(
    tmp_path: Path,
) -> None:
    suite = bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)
    folder = tmp_path / "records" / "fixture"
    shutil.copytree(FIXTURES / "records", folder)
    before = squeezed(report.write_report([suite], tmp_path).read_text())
    record = json.loads((folder / "MiniGrid-Empty-5x5-v0__ppo__1.json").read_text())
    for seed in (7, 8):  # seeds the suite does not run, that would drag the medians down
        curve = [
            {
                **p,
                **{
                    m: {**p[m], "mean_reward": 0.0, "success_rate": 0.0}
                    for m in bench_suite.EVAL_MODES
                },
            }
            for p in record["curve"]
        ]
        extra = {**record, "seed": seed, "curve": curve, "train_fps": 1.0}
        (folder / f"MiniGrid-Empty-5x5-v0__ppo__{seed}.json").write_text(json.dumps(extra))
    after = squeezed(report.write_report([suite], tmp_path).read_text())
    warning = next(line for line in after.splitlines() if "does not have" in line)
    assert "MiniGrid-Empty-5x5-v0__ppo__7, MiniGrid-Empty-5x5-v0__ppo__8" in warning
    assert "do not match" not in after  # they are not stale runs of the suite
    assert after.replace("\n\n" + warning, "") == before  # targets, tables: unchanged


def test_stale_records_compare_the_resolved_config_and_defaults_for_newer_keys(
    tmp_path: Path,
) -> None:
    suite = bench_suite.load_suite(write_suite(tmp_path, valid_text()))
    (spec,) = suite.runs
    config = dataclasses.asdict(spec.load_config())
    record = {
        "task": spec.task,
        "agent": spec.label,
        "seed": spec.seed,
        "budget": spec.budget,
        "overrides": list(spec.overrides),
        "config": config,
    }

    def stale(**section_edits: dict) -> list[str]:
        edited = copy.deepcopy(config)
        for section, edit in section_edits.items():
            for key, value in edit.items():
                if value is None:
                    del edited[section][key]
                else:
                    edited[section][key] = value
        return report._stale_records(suite, [{**record, "config": edited}])

    assert stale() == []
    assert stale(ppo={"gamma": 0.9}) == [f"{spec.key} (ppo.gamma)"]
    # A record written before a key existed ran with the key's default: stale only if the
    # suite now sets it to something else (the tiny suite sets ppo.n_epochs=1, default 10).
    assert stale(ppo={"gamma": None}) == []
    assert stale(ppo={"n_epochs": None}) == [f"{spec.key} (ppo.n_epochs)"]
    # A key since removed from the schema is not compared.
    assert stale(ppo={"retired_knob": 3}) == []


def test_stale_records_with_a_config_are_judged_on_it_not_on_the_overrides(
    tmp_path: Path,
) -> None:
    """Overrides spelled differently but resolving to the same config (``exploration.kind=none``
    added where a per-env file gained a bonus the run did not have) leave a record current; a
    resolved difference is named; a record without its config still goes by the overrides."""
    suite = bench_suite.load_suite(write_suite(tmp_path, valid_text()))
    (spec,) = suite.runs
    record = {
        "task": spec.task,
        "agent": spec.label,
        "seed": spec.seed,
        "budget": spec.budget,
        # The suite's config, reached without its last override (as if the suite had since
        # added one that restates what the run had).
        "overrides": list(spec.overrides[:-1]),
        "config": dataclasses.asdict(spec.load_config()),
    }
    assert report._stale_records(suite, [record]) == []
    assert report._stale_records(suite, [{**record, "overrides": []}]) == []
    changed = copy.deepcopy(record["config"])
    changed["ppo"]["n_epochs"] = 10  # what the dropped ppo.n_epochs=1 override leaves
    assert report._stale_records(suite, [{**record, "config": changed}]) == [
        f"{spec.key} (ppo.n_epochs)"
    ]
    assert report._stale_records(suite, [{**record, "budget": 256}]) == [spec.key]
    without_config = {k: v for k, v in record.items() if k != "config"}
    assert report._stale_records(suite, [without_config]) == [spec.key]
    assert report._stale_records(suite, [{**without_config, "overrides": spec.overrides}]) == []


def test_config_differences_ignore_the_sections_an_agent_does_not_read() -> None:
    def config(kind: str, **sections: dict) -> dict:
        base = {"agent": {"kind": kind}, "ppo": {"n_epochs": 10}, "thalamus": {"top_k": 16}}
        base["lstm"] = {"lstm_hidden_size": 64}
        return {**base, **sections}

    thalamus_changed = {"thalamus": {"top_k": 8}}
    assert bench_suite._config_differences(config("ppo"), config("ppo", **thalamus_changed)) == []
    assert bench_suite._config_differences(config("lstm"), config("lstm", **thalamus_changed)) == []
    assert bench_suite._config_differences(
        config("thalamus"), config("thalamus", **thalamus_changed)
    ) == ["thalamus.top_k"]
    lstm_changed = {"lstm": {"lstm_hidden_size": 128}}
    assert bench_suite._config_differences(config("lstm"), config("lstm", **lstm_changed)) == [
        "lstm.lstm_hidden_size"
    ]
    assert (
        bench_suite._config_differences(config("thalamus"), config("thalamus", **lstm_changed))
        == []
    )
    # The SSD chunk length and backend pick how the scan is computed, not what it computes.
    schedule_changed = {"thalamus": {"top_k": 16, "chunk_size": 32, "backend": "pure"}}
    assert (
        bench_suite._config_differences(config("thalamus"), config("thalamus", **schedule_changed))
        == []
    )
    shared_changed = {"ppo": {"n_epochs": 4}}
    assert bench_suite._config_differences(config("ppo"), config("ppo", **shared_changed)) == [
        "ppo.n_epochs"
    ]
    # Different kinds: every section counts.
    assert bench_suite._config_differences(config("ppo"), config("lstm", **thalamus_changed)) == [
        "agent.kind",
        "thalamus.top_k",
    ]


def test_a_stream_key_added_since_a_record_ran_reads_as_its_default() -> None:
    """A record's ``thalamus.streams`` items lack keys added later (``clock``, ``kind``): it ran
    with their defaults, so it is not stale; a stream's count or an item's value still is."""
    from agents.experiment.config import DEFAULT_CONFIG, load_config

    suite_config = load_config(DEFAULT_CONFIG)
    record = dataclasses.asdict(suite_config)
    for stream in record["thalamus"]["streams"]:
        del stream["clock"], stream["kind"]
    differences = bench_suite._config_differences
    assert differences(record, suite_config, defaults=suite_config) == []
    record["thalamus"]["streams"][1]["d_state"] = 32
    assert differences(record, suite_config, defaults=suite_config) == [
        "thalamus.streams.1.d_state"
    ]
    record["thalamus"]["streams"] = record["thalamus"]["streams"][:1]
    assert differences(record, suite_config, defaults=suite_config) == ["thalamus.streams"]


SHARING = """\
name: abl
overrides: [train.eval_freq=1000]
tasks:
  MiniGrid-Empty-5x5-v0:
    threshold: {metric: mean_reward, value: 0.9}
runs:
  - {task: MiniGrid-Empty-5x5-v0, agents: [thalamus], seeds: [0, 1, 2], budget: 3000,
     shared_with: fixture}
  - {task: MiniGrid-Empty-5x5-v0, agents: [thalamus], label: no-gate, seeds: [0], budget: 3000,
     overrides: [thalamus.gate_enabled=false]}
"""


def test_shared_runs_use_the_other_suites_records_and_run_folders(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "suite.yaml", tmp_path / "fixture.yaml")
    suite = bench_suite.load_suite(write_suite(tmp_path, SHARING, "abl.yaml"))
    shared = [r for r in suite.runs if r.label == "thalamus"]
    fixture = bench_suite.load_suite(tmp_path / "fixture.yaml", check_configs=False)
    assert [r.shared_with for r in shared] == ["fixture"] * 3
    assert shared[0].overrides == fixture.runs[0].overrides
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    assert (
        bench_records.record_path(out, shared[0])
        == out / "records/fixture/MiniGrid-Empty-5x5-v0__thalamus__0.json"
    )
    assert (
        bench_records.run_dir_of(runs_dir, shared[0])
        == runs_dir / "fixture/MiniGrid-Empty-5x5-v0__thalamus__0"
    )
    assert runner.run_status(shared[0], out, runs_dir) == "pending (suite fixture)"

    shutil.copytree(FIXTURES / "records", out / "records" / "fixture")
    assert runner.run_status(shared[0], out, runs_dir) == "done (suite fixture)"
    assert [r.label for r in runner.pending_runs(suite, out)] == ["no-gate"]
    text = squeezed(report.write_report([suite], out).read_text())
    assert "3 of 4 runs have records" in text
    assert "| thalamus | 0, 1, 2 | 3k | 0.91 [0.50–0.95] |" in text
    assert "do not match" not in text


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "budget: 3000,\n",
            "budget: 3000, overrides: [ppo.n_epochs=3],\n",
            "differs there in ppo.n_epochs",
        ),
        (
            "seeds: [0, 1, 2], budget: 3000,\n",
            "seeds: [0, 7], budget: 3000,\n",
            "has no run MiniGrid-Empty-5x5-v0__thalamus__7",
        ),
        ("shared_with: fixture", "shared_with: abl", "names this suite"),
        (
            "shared_with: fixture",
            "shared_with: nope",
            "shared_with = 'nope': suite 'nope' not found",
        ),
    ],
)
def test_invalid_shared_runs_say_what_is_wrong(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    shutil.copy(FIXTURES / "suite.yaml", tmp_path / "fixture.yaml")
    assert old in SHARING
    path = write_suite(tmp_path, SHARING.replace(old, new, 1), "abl.yaml")
    with pytest.raises(bench_suite.BenchmarkError, match=message):
        bench_suite.load_suite(path)


def test_state_at_checkpoint_drops_later_points_and_restores_the_clock() -> None:
    point = lambda t, w, tw: {"timesteps": t, "wall_s": w, "train_wall_s": tw}  # noqa: E731
    state = {
        "curve": [point(256, 1.0, 0.8), point(512, 2.0, 1.5), point(768, 3.0, 2.2)],
        "marks": {"512": {"wall_s": 2.5, "eval_wall_s": 0.6, "train_wall_s": 1.9}},
        "clock": {"wall_s": 3.5, "eval_wall_s": 0.9},
        "sessions": 1,
    }
    kept = bench_records._state_at_checkpoint(state, 512)
    assert [p["timesteps"] for p in kept["curve"]] == [256, 512]
    assert kept["clock"]["wall_s"] == 2.5
    unmarked = bench_records._state_at_checkpoint({**state, "marks": {}}, 600)
    assert unmarked["clock"] == {"wall_s": 2.0, "eval_wall_s": pytest.approx(0.5)}


def test_a_stop_mid_rollout_marks_the_clock_of_the_rollout_start(
    tmp_path: Path, monkeypatch
) -> None:
    """SB3 discards a partial rollout and the checkpoint callback winds the model back to the
    rollout start: the recorder marks that checkpoint with the clock it had then, so a resume
    neither loses the training time before it nor counts the discarded steps' time."""
    from types import SimpleNamespace

    from agents.experiment.training import RunCallbacks

    now = [0.0]
    monkeypatch.setattr(bench_records.time, "monotonic", lambda: now[0])
    evaluation = SimpleNamespace(n_evaluations=0, deterministic=False, last_eval_seconds=0.0)
    checkpoint = SimpleNamespace(last_saved=None)
    budget = 600  # the stop's step is past it, the rollout start is not
    recorder = bench_records.EvalRecorder(
        RunCallbacks(evaluation, checkpoint), tmp_path / "progress.json", budget, None, None
    )
    model = SimpleNamespace(num_timesteps=0)
    recorder.model = model  # what init_callback would set; _on_training_start wraps envs
    recorder._t0 = now[0]

    def rollout(steps: int, seconds: float) -> None:
        recorder.on_rollout_start()
        for _ in range(steps // 64):
            model.num_timesteps += 64
            now[0] += seconds * 64 / steps
            assert recorder.on_step()

    rollout(512, 10.0)
    recorder.on_rollout_end()
    now[0] += 2.0  # the update
    rollout(128, 3.0)  # stopped at step 640, mid-rollout
    model.num_timesteps = 512  # PeriodicCheckpoint._on_training_end, which runs first
    checkpoint.last_saved = SimpleNamespace(timesteps=512)
    recorder.on_training_end()

    assert recorder.marks == {"512": {"wall_s": 12.0, "eval_wall_s": 0.0, "train_wall_s": 12.0}}
    assert not recorder.finished and recorder.curve == []  # 512 < budget: no final evaluation
    state = json.loads((tmp_path / "progress.json").read_text())
    assert state["timesteps"] == 512 and not state["finished"]
    assert bench_records._state_at_checkpoint(state, 512)["clock"]["wall_s"] == 12.0


# --------------------------------------------------------------------------------------
# Running: skip, resume, a tiny real run
# --------------------------------------------------------------------------------------


def test_finished_runs_are_skipped_without_training(tmp_path: Path, monkeypatch) -> None:
    suite = bench_suite.load_suite(write_suite(tmp_path, valid_text(tmp_path / "out")))
    (run,) = suite.runs
    out = tmp_path / "out"
    assert runner.pending_runs(suite, out) == [run]
    assert runner.run_status(run, out, tmp_path / "runs") == "pending"
    path = bench_records.record_path(out, run)
    path.parent.mkdir(parents=True)
    path.write_text("{}")

    def no_training(*args, **kwargs):
        raise AssertionError("a run with a record must not train")

    monkeypatch.setattr(agents.experiment.training, "train", no_training)
    monkeypatch.setattr(agents.experiment.training, "resume", no_training)
    assert runner.pending_runs(suite, out) == []
    assert runner.run_status(run, out, tmp_path / "runs") == "done"
    threshold = suite.tasks[run.task].threshold
    assert runner.execute_run(run, out, tmp_path / "runs", threshold) == path
    assert (
        runner.run_suite(suite, out, tmp_path / "runs", in_process=True, log=lambda s: None) == {}
    )


def test_tiny_run_records_then_resumes_to_a_larger_budget(tmp_path: Path) -> None:
    """Two real PPO runs of a few hundred steps: the record, and a resume from a checkpoint."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    suite = bench_suite.load_suite(write_suite(tmp_path, valid_text(out, budget=512)))
    results = runner.run_suite(suite, out, runs, in_process=True, log=lambda s: None)
    assert results == {"MiniGrid-Empty-5x5-v0__ppo__0": None}
    (run,) = suite.runs
    record = json.loads(bench_records.record_path(out, run).read_text())
    bench_records.validate_record(record)
    assert (record["env"], record["agent"], record["seed"], record["budget"]) == (
        "MiniGrid-Empty-5x5-v0",
        "ppo",
        0,
        512,
    )
    assert [p["timesteps"] for p in record["curve"]] == [256, 512]
    for point in record["curve"]:
        for mode in bench_suite.EVAL_MODES:
            assert point[mode]["episodes"] == 2
            assert 0.0 <= point[mode]["success_rate"] <= 1.0
    assert record["train_fps"] > 0 and record["peak_rss_mb"] > 0
    assert 0 < record["train_wall_s"] < record["wall_s"]
    assert record["eval_wall_s"] == pytest.approx(record["wall_s"] - record["train_wall_s"])
    assert record["commit"] and record["sessions"] == 1
    assert record["threshold"]["mode"] == "stochastic"
    assert record["mission_sensitivity"] is None  # Empty-5x5 has one mission: nothing to shuffle
    assert record["memory_diagnosis"] is None  # not a MiniGrid-Memory env
    # The resolved config: a later change of a default shows up in the report.
    assert record["config"]["agent"]["kind"] == "ppo"
    assert record["config"]["ppo"]["n_epochs"] == run.load_config().ppo.n_epochs == 1
    text = squeezed(report.write_report([suite], out).read_text())
    assert "do not match" not in text
    changed = {**record, "config": {**record["config"], "ppo": {**record["config"]["ppo"]}}}
    changed["config"]["ppo"]["n_epochs"] = 10  # as if the default had been 10 when it ran
    changed["config"]["ppo"].pop("gamma")  # a key the record predates: not a difference
    bench_records.record_path(out, run).write_text(json.dumps(changed))
    text = squeezed(report.write_report([suite], out).read_text())
    assert "MiniGrid-Empty-5x5-v0__ppo__0 (ppo.n_epochs)" in text
    bench_records.record_path(out, run).write_text(json.dumps(record))

    # A larger budget and no record: the run continues from its checkpoint at 512.
    bench_records.record_path(out, run).unlink()
    bigger = bench_suite.load_suite(
        write_suite(tmp_path, valid_text(out, budget=1024), "bigger.yaml")
    )
    assert runner.run_status(bigger.runs[0], out, runs) == "partial at step 512"
    assert runner.run_suite(bigger, out, runs, in_process=True, log=lambda s: None) == {
        "MiniGrid-Empty-5x5-v0__ppo__0": None
    }
    resumed = json.loads(bench_records.record_path(out, run).read_text())
    assert [p["timesteps"] for p in resumed["curve"]] == [256, 512, 768, 1024]
    assert resumed["curve"][:2] == record["curve"]
    walls = [p["wall_s"] for p in resumed["curve"]]
    assert walls == sorted(walls) and resumed["sessions"] == 2 and resumed["timesteps"] == 1024

    # --list shows it as done.
    assert benchmark_script.main([str(tmp_path / "bigger.yaml"), "--list", "--out", str(out)]) == 0

    # Killed after the final checkpoint, before the final evaluation: the next call evaluates
    # that checkpoint instead of recording a curve that stops short of the budget.
    progress = bench_records.run_dir_of(runs, run) / bench_records.PROGRESS_FILE
    state = json.loads(progress.read_text())
    state["curve"] = state["curve"][:-1]
    state["finished"] = False
    progress.write_text(json.dumps(state))
    bench_records.record_path(out, run).unlink()
    assert runner.run_suite(bigger, out, runs, in_process=True, log=lambda s: None) == {
        "MiniGrid-Empty-5x5-v0__ppo__0": None
    }
    finished = json.loads(bench_records.record_path(out, run).read_text())
    bench_records.validate_record(finished)
    assert [p["timesteps"] for p in finished["curve"]] == [256, 512, 768, 1024]
    assert finished["curve"][:3] == resumed["curve"][:3]
    assert all(finished["final"][mode]["episodes"] == 2 for mode in bench_suite.EVAL_MODES)
    assert finished["sessions"] == 2 and json.loads(progress.read_text())["finished"]

    # A run that already has its final measurements keeps them when its record is rebuilt.
    state = json.loads(progress.read_text())
    assert "memory_diagnosis" in state and "mission_sensitivity" in state
    state["memory_diagnosis"] = {"error": "kept, not measured again"}
    progress.write_text(json.dumps(state))
    bench_records.record_path(out, run).unlink()
    assert runner.run_suite(bigger, out, runs, in_process=True, log=lambda s: None) == {
        "MiniGrid-Empty-5x5-v0__ppo__0": None
    }
    rebuilt = json.loads(bench_records.record_path(out, run).read_text())
    assert rebuilt["memory_diagnosis"] == {"error": "kept, not measured again"}

    # Refused, and nothing deleted: a budget below the one the folder's run trained for (its
    # curve would run past it), and checkpoints whose config.yaml is gone.
    bench_records.record_path(out, run).unlink()
    threshold = suite.tasks[run.task].threshold
    with pytest.raises(bench_suite.BenchmarkError, match="1,024 steps, more than the suite's 512"):
        runner.execute_run(suite.runs[0], out, runs, threshold)
    config_file = bench_records.run_dir_of(runs, run) / "config.yaml"
    config_file.rename(config_file.with_name("moved.yaml"))
    with pytest.raises(bench_suite.BenchmarkError, match="has checkpoints but no config.yaml"):
        runner.execute_run(bigger.runs[0], out, runs, threshold)
    assert list((bench_records.run_dir_of(runs, run) / "checkpoints").glob("*.safetensors"))


def test_an_interrupted_run_is_reported_as_resumable(tmp_path: Path, monkeypatch) -> None:
    from agents.experiment.io import CheckpointInfo

    text = valid_text(tmp_path / "out").replace("seeds: [0]", "seeds: [0, 1]")
    suite = bench_suite.load_suite(write_suite(tmp_path, text))
    first, second = suite.runs
    started = []

    def interrupted(config, *args, **kwargs):
        started.append(config.train.seed)
        checkpoint = CheckpointInfo(256, tmp_path / "a.safetensors", tmp_path / "a.json")
        raise agents.experiment.training.TrainingInterrupted(tmp_path, 2, checkpoint)

    monkeypatch.setattr(agents.experiment.training, "train", interrupted)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        runner.run_suite(
            suite, tmp_path / "out", tmp_path / "runs", in_process=True, log=lines.append
        )
    assert started == [0]  # the second run was not started
    assert lines[-1] == (
        f"[1/2] {first.key}: FAILED: interrupted at step 256; a checkpoint was saved: run the "
        "same benchmark command again to continue it"
    )
    assert runner._run_one(
        (second, tmp_path / "out", tmp_path / "runs", None, "stochastic", "c")
    ) == (
        second.key,
        "interrupted at step 256; a checkpoint was saved: run the same benchmark command again "
        "to continue it",
    )


def test_recording_the_other_evaluation_mode_leaves_the_training_rng_alone() -> None:
    import envs
    from agents import make_agent

    venv = envs.make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=2, seed=0)
    try:
        model = make_agent("ppo", venv, seed=0, device="cpu", n_steps=16, batch_size=32)
        before = torch.get_rng_state()
        result = bench_records._evaluate(model, venv, n_episodes=2, deterministic=False)
        assert result["episodes"] == 2
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        venv.close()


def test_a_benchmark_run_trains_and_evaluates_as_train_agent_does(tmp_path: Path) -> None:
    """The recorder's second evaluation mode plays on its own copy of the eval envs and
    samples from a copy of the RNGs: the run's weights and its own-mode curve are those of
    ``agents.experiment.training.train`` on the same config (random layouts, so shared envs would
    show)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.experiment.model_files import load_model_file

    text = (
        valid_text(tmp_path / "out", budget=768)
        .replace("MiniGrid-Empty-5x5-v0", "MiniGrid-Empty-Random-5x5-v0")
        .replace("max_steps=20", "max_steps=100")  # a random walk finds the goal at times
        .replace("eval_episodes=2", "eval_episodes=4")
    )
    suite = bench_suite.load_suite(write_suite(tmp_path, text))
    (run,) = suite.runs
    results = runner.run_suite(
        suite, tmp_path / "out", tmp_path / "runs", in_process=True, log=print
    )
    assert results == {run.key: None}
    record = json.loads(bench_records.record_path(tmp_path / "out", run).read_text())

    alone = agents.experiment.training.train(run.load_config(), tmp_path / "alone")
    events = EventAccumulator(str(alone / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("eval/mean_reward")]
    assert curve == [
        (p["timesteps"], pytest.approx(p["stochastic"]["mean_reward"])) for p in record["curve"]
    ]
    benchmarked = load_model_file(
        bench_records.run_dir_of(tmp_path / "runs", run) / "final_model.safetensors", device="cpu"
    )
    trained = load_model_file(alone / "final_model.safetensors", device="cpu")
    for (name, a), b in zip(
        benchmarked.policy.state_dict().items(), trained.policy.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_report_flags_fps_ratios_between_runs_of_different_days(tmp_path: Path) -> None:
    folder = tmp_path / "records" / "fixture"
    shutil.copytree(FIXTURES / "records", folder)
    suite = bench_suite.load_suite(FIXTURES / "suite.yaml", check_configs=False)
    assert "†" not in squeezed(report.write_report([suite], tmp_path).read_text())  # all on one day
    for seed, day in ((0, "2026-01-02"), (1, "2026-01-03"), (2, "2026-01-05")):
        path = folder / f"MiniGrid-Empty-5x5-v0__thalamus__{seed}.json"
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "finished_at": f"{day}T09:00:00"}))
    text = squeezed(report.write_report([suite], tmp_path).read_text())
    assert "| 1.50x |" in text  # one day apart (seed 0) is the same machine's run of runs
    path = folder / "MiniGrid-Empty-5x5-v0__thalamus__0.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "finished_at": "2026-01-04"}))
    text = squeezed(report.write_report([suite], tmp_path).read_text())
    assert "| 1.50x † |" in text and "| 5.00x |" in text and "| 1.00x |" in text
    assert (
        "† Runs finished at least 2 days from the lstm runs (2026-01-01): thalamus (2026-01-03 "
        "to 2026-01-05)." in text
    )
