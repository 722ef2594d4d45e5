"""Mission sensitivity: the same episodes with their own and with another episode's mission."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import envs
from agents.bench import records as bench_records
from agents.bench import report, runner
from agents.bench import suite as bench_suite
from agents.experiment.config import load_config
from agents.experiment.mission_sensitivity import (
    derange_missions,
    find_mission_wrapper,
    mission_sensitivity,
    shuffled_mission_episodes,
)
from agents.experiment.training import (
    RunPaths,
    load_model,
)
from tests.helpers import save_untrained_run

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "scripts" / "evaluate.py"
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
SMALL_GOTO = [
    "env.id=BabyAI-GoToLocal-v0",
    "env.n_envs=1",
    "ppo.n_steps=16",
    "ppo.batch_size=16",
    "env.env_kwargs.max_steps=8",
    "thalamus.d_model=32",
    "thalamus.d_task=32",
    "thalamus.d_workspace=32",
    "train.device=cpu",
    "train.eval_episodes=4",
]


@pytest.fixture(scope="module")
def goto_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small thalamus agent on GoToLocal (short episodes) and its config."""
    return save_untrained_run(tmp_path_factory.mktemp("goto"), SMALL_GOTO)


@pytest.mark.parametrize(
    "missions",
    [
        ["a", "b", "c", "d", "e"],
        ["a", "a", "b", "b", "c", "c"],
        ["a", "a", "a", "b", "b", "c", "d"],
        ["a", "b"],
    ],
)
def test_derangement_shows_every_episode_another_episode_s_mission(missions: list[str]) -> None:
    source, same = derange_missions(missions, seed=3)
    assert sorted(source) == list(range(len(missions)))  # a permutation: same missions shown
    assert all(source[i] != i for i in range(len(missions)))  # never its own episode
    assert same == 0 and all(missions[source[i]] != missions[i] for i in range(len(missions)))
    assert derange_missions(missions, seed=3) == (source, same)  # seeded
    assert Counter(missions[j] for j in source) == Counter(missions)


def test_derangement_counts_what_it_cannot_avoid() -> None:
    assert derange_missions(["a", "a", "a"], seed=0)[1] == 3  # one text: nothing to shuffle
    source, same = derange_missions(["a", "a", "a", "b"], seed=0)
    assert same == 2 and all(source[i] != i for i in range(4))
    assert derange_missions(["a"], seed=0) == ([0], 1)


def test_shuffled_replay_shows_the_derangement_and_keeps_the_env_s_own(goto_run: Path) -> None:
    model = load_model(goto_run, device="cpu").model
    env = envs.make_env("BabyAI-GoToLocal-v0", max_steps=8)
    seeds = [11, 12, 13, 14]
    missions = []
    for seed in seeds:
        env.reset(seed=seed)
        missions.append(env.unwrapped.mission)
    replays, summary = shuffled_mission_episodes(model, env, seeds, missions, False, 0)
    source, _ = derange_missions(missions, 0)
    assert [r["shown"] for r in replays] == [missions[j] for j in source]
    assert [r["mission"] for r in replays] == missions
    assert summary["distinct_missions"] == len(set(missions)) and summary["episodes"] == 4
    wrapper = find_mission_wrapper(env)
    assert wrapper is not None and wrapper.mission_override is None  # left as it was
    with pytest.raises(ValueError, match="3 missions"):
        shuffled_mission_episodes(model, env, seeds, missions[:3], False, 0)
    fixed = envs.make_env("BabyAI-GoToLocal-v0", mission="go to the red ball")
    with pytest.raises(ValueError, match="fixed mission"):
        shuffled_mission_episodes(model, fixed, seeds, missions, False, 0)


def test_mission_sensitivity_measures_both_or_says_there_is_nothing_to_shuffle(
    goto_run: Path,
) -> None:
    model = load_model(goto_run, device="cpu").model
    env = envs.make_env("BabyAI-GoToLocal-v0", max_steps=8)
    result = mission_sensitivity(model, env, n_episodes=4, seed=5, deterministic=False)
    assert result is not None and result["episodes"] == 4
    assert result["drop"] == pytest.approx(
        result["true"]["success_rate"] - result["shuffled"]["success_rate"]
    )
    assert mission_sensitivity(model, env, 4, 5, False) == result  # seeded
    doorkey = envs.make_env("MiniGrid-DoorKey-5x5-v0")  # one mission in every episode
    assert mission_sensitivity(model, doorkey, 2, 0, False) is None


def _evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_script", EVALUATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_evaluate_reports_success_with_shuffled_missions(
    goto_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "eval.json"
    base = [str(goto_run), "--episodes=4", "--seed=5", f"--output={output}", "--device=cpu"]
    assert _evaluate_main()([*base, "--report-slots", "--selection-test"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(output.read_text())
    missions = [e["mission"] for e in summary["per_episode"]]
    shuffled = summary["shuffled_mission"]
    assert [e["mission"] for e in shuffled["per_episode"]] == missions
    assert [e["seed"] for e in shuffled["per_episode"]] == [5, 6, 7, 8]
    assert all(e["shown"] != e["mission"] for e in shuffled["per_episode"])
    assert shuffled["success_rate"] == pytest.approx(
        np.mean([e["success"] for e in shuffled["per_episode"]])
    )
    assert "shuffled" in printed and "slots" in printed and "masking" in printed
    assert summary["slots"]["episodes"] == 4 and set(summary["selection"]["success"]) == {
        "none",
        "kept",
        "random",
    }
    # A given mission, or the flag, skips it.
    assert _evaluate_main()([*base, "--no-shuffled-mission"]) == 0
    assert "shuffled_mission" not in json.loads(output.read_text())
    assert _evaluate_main()([*base, "--mission", "go to the red ball"]) == 0
    assert "shuffled_mission" not in json.loads(output.read_text())


def test_benchmark_records_and_reports_mission_sensitivity(goto_run: Path, tmp_path: Path) -> None:
    config = load_config(goto_run / "config.yaml", defaults_file=None)
    measured = runner._final_mission_sensitivity(config, RunPaths(goto_run))
    assert measured is not None and measured["episodes"] == config.train.eval_episodes
    assert (
        set(measured["true"])
        == set(measured["shuffled"])
        == {
            "success_rate",
            "mean_reward",
            "mean_length",
        }
    )

    shutil.copytree(FIXTURES / "records", tmp_path / "records" / "fixture")
    for seed, (true, shuffled) in enumerate([(0.9, 0.3), (0.8, 0.5), (0.7, 0.7)]):
        path = tmp_path / "records" / "fixture" / f"MiniGrid-Empty-5x5-v0__thalamus__{seed}.json"
        record = json.loads(path.read_text())
        record["mission_sensitivity"] = {
            "true": {"success_rate": true, "mean_reward": 0.0},
            "shuffled": {"success_rate": shuffled, "mean_reward": 0.0},
            "drop": true - shuffled,
        }
        path.write_text(json.dumps(record))
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark as benchmark_script

    assert (
        benchmark_script.main([str(FIXTURES / "suite.yaml"), "--report", "--out", str(tmp_path)])
        == 0
    )
    text = re.sub(r" {2,}", " ", (tmp_path / "README.md").read_text())  # table padding
    assert "| thalamus | 0, 1, 2 | 0.80 [0.70–0.90] | 0.50 [0.30–0.70] | 0.30 [0.00–0.60] |" in (
        text
    )
    assert "| ppo | 0, 1, 2 | 0.80" not in text.split("Mission sensitivity")[1]


def test_a_failing_extra_evaluation_keeps_the_main_results(
    goto_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agents.experiment.mission_sensitivity as ms

    def broken(*args, **kwargs):
        raise RuntimeError("env resets are not reproducible")

    monkeypatch.setattr(ms, "shuffled_mission_episodes", broken)
    output = tmp_path / "eval.json"
    args = [str(goto_run), "--episodes=2", "--seed=5", f"--output={output}", "--device=cpu"]
    assert _evaluate_main()(args) == 0
    summary = json.loads(output.read_text())
    assert summary["episodes"] == 2 and len(summary["per_episode"]) == 2
    assert summary["shuffled_mission"] == {"error": "RuntimeError: env resets are not reproducible"}


@pytest.mark.slow
def test_a_failing_mission_measurement_keeps_the_benchmark_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tiny real PPO run (a few seconds): the error goes into the record, not a crash."""
    from tests.test_benchmark import valid_text, write_suite

    def broken(*args, **kwargs):
        raise RuntimeError("no env")

    monkeypatch.setattr(runner, "_final_mission_sensitivity", broken)
    out, runs = tmp_path / "out", tmp_path / "runs"
    suite = bench_suite.load_suite(write_suite(tmp_path, valid_text(out, budget=256)))
    assert runner.run_suite(suite, out, runs, in_process=True, log=lambda s: None) == {
        "MiniGrid-Empty-5x5-v0__ppo__0": None
    }
    record = json.loads(bench_records.record_path(out, suite.runs[0]).read_text())
    assert record["mission_sensitivity"] == {"error": "RuntimeError: no env"}
    assert "Mission sensitivity" not in report.write_report([suite], out).read_text()
