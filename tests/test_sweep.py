"""Hyperparameter sweeps with Ray Tune (agents/bench/sweep.py, scripts/sweep.py): the sweep
file's errors, the repository's sweeps, and a tiny sweep with ASHA on a local Ray with 2 CPUs
(one Ray per module) that writes its tables and a best config that the config loader reads,
then continues from its folder."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from agents.bench import runner
from agents.bench import sweep as bench_sweep
from agents.experiment.config import ExplorationConfig, load_config
from agents.experiment.schema import SchemaError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import sweep as sweep_script  # noqa: E402

TINY = """\
name: tiny
base:
  env: MiniGrid-Empty-5x5-v0
  agent: ppo
  overrides: [ppo.gamma=0.95]
  run_overrides:
    - train.torch_threads=1
    - train.progress=none
    - train.device=cpu
    - env.n_envs=2
    - train.eval_freq=128
    - train.eval_episodes=2
    - train.eval_n_envs=1
    - train.checkpoint_freq=256
    - env.env_kwargs.max_steps=20
budget: {budget}
num_samples: 3
metric: mean_reward
scheduler: {{kind: asha, grace_period: 128, reduction_factor: 2}}
searcher: {{kind: random, seed: 0}}
space:
  ppo.learning_rate: {{loguniform: [1.0e-4, 3.0e-3]}}
  ppo.n_steps: {{choice: [64, 128]}}
  ppo.batch_size: 64
  ppo.n_epochs: {{randint: [1, 3]}}
points_to_evaluate:
  - {{ppo.learning_rate: 1.0e-3, ppo.n_steps: 64, ppo.n_epochs: 1}}
storage: {storage}
"""


def write_sweep(tmp_path: Path, text: str | None = None, budget: int = 512) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text or TINY.format(budget=budget, storage=tmp_path / "storage"))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("num_samples: 3", "num_sample: 3", "unknown key 'num_sample'; valid keys: name, base,"),
        (
            "grace_period: 128,",
            "grace: 128,",
            "scheduler.grace: unknown key 'grace'; valid keys: kind, g",
        ),
        ("budget: 512", "budget: lots", "budget: Value 'lots' of type 'str' could not be"),
        ("num_samples: 3\n", "", "missing required key 'num_samples'"),
        ("metric: mean_reward", "metric: reward", "metric = 'reward' is not valid; choose one"),
        ("kind: random", "kind: grid", "searcher.kind = 'grid' is not valid; choose one of"),
        ("grace_period: 128", "grace_period: 1024", "grace_period = 1024 is more than the"),
        ("{loguniform: [1.0e-4, 3.0e-3]}", "{logunif: [1, 2]}", "give one of loguniform, unif"),
        ("[1.0e-4, 3.0e-3]", "[3.0e-3, 1.0e-4]", "must be [low, high] with low < high"),
        ("ppo.n_epochs: {randint", "ppo.n_epoch: {randint", "ppo.n_epoch"),
        ("ppo.n_steps: 64,", "ppo.nsteps: 64,", "points_to_evaluate[0]: ppo.nsteps not in space"),
        ("ppo.gamma=0.95", "train.seed=3", "sets train.seed; use the sweep's seed"),
        ("ppo.batch_size: 64", "ppo.batch_size: 4096", "ppo.batch_size = 4096 is larger than"),
        ("eval_freq=128", "eval_freq=100", "train.eval_freq = 100 does not divide the budget"),
    ],
)
def test_sweep_file_errors_name_the_key_and_the_fix(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = TINY.format(budget=512, storage=tmp_path / "storage")
    assert old in text
    path = write_sweep(tmp_path, text.replace(old, new, 1))
    with pytest.raises(SchemaError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        bench_sweep.load_sweep(path)
    assert str(path) in str(err.value)
    assert sweep_script.main([str(path), "--check"]) == sweep_script.EXIT_INVALID


def test_the_keycorridor_sweeps_share_one_space_and_budget() -> None:
    """Issue 35: every agent tuned with the same budget over the same space (only the name
    and the agent differ), with the rl-zoo3-derived recipe among the first trials."""
    sweeps = {
        agent: bench_sweep.load_sweep(f"{agent}_keycorridor_s3r1", check_configs=False)
        for agent in ("ppo", "thalamus", "lstm")
    }
    files = {}
    for agent, sweep in sweeps.items():
        assert sweep.file.base.agent == agent and sweep.config_file is not None
        assert sweep.config_file.name == "keycorridor_s3r1.yaml"
        fields = dict(vars(sweep.file))
        fields.pop("name"), fields.pop("description")
        fields["base"] = {**vars(fields["base"]), "agent": None}
        files[agent] = fields
    assert files["ppo"] == files["thalamus"] == files["lstm"]
    space = sweeps["ppo"].file.space
    assert {"ppo.learning_rate", "ppo.n_steps", "ppo.batch_size", "ppo.n_epochs"} <= set(space)
    assert {"ppo.ent_coef", "ppo.gae_lambda", "ppo.clip_range"} <= set(space)
    zoo = sweeps["ppo"].file.points_to_evaluate[1]
    assert (zoo["ppo.learning_rate"], zoo["ppo.n_epochs"], zoo["ppo.ent_coef"]) == (2.5e-4, 10, 0)
    assert sweeps["ppo"].file.scheduler.kind == "asha" and sweeps["ppo"].file.searcher.kind == (
        "optuna"
    )


def test_the_keycorridor_sweeps_trials_still_train_without_a_bonus(tmp_path: Path) -> None:
    """Their trials ran before configs/keycorridor_s3r1.yaml made the first-visit bonus the
    task's default (issue 36): ``base.overrides`` keep the schema's ``exploration``, so a trial
    and the best.yaml of a re-run resolve to what the recorded trials ran."""
    for agent in ("ppo", "thalamus", "lstm"):
        sweep = bench_sweep.load_sweep(f"{agent}_keycorridor_s3r1", check_configs=False)
        params = sweep.file.points_to_evaluate[0]
        assert sweep.load_trial_config(params).exploration == ExplorationConfig()
        best = tmp_path / f"{agent}.yaml"
        best.write_text(bench_sweep.best_config_yaml(sweep, params, "best"))
        assert load_config(best).exploration == ExplorationConfig()


@pytest.mark.slow
def test_the_keycorridor_sweeps_give_valid_configs_at_every_choice() -> None:
    for agent in ("ppo", "thalamus", "lstm"):
        bench_sweep.load_sweep(f"{agent}_keycorridor_s3r1")


def test_the_reporter_sends_each_evaluation_once() -> None:
    class Evaluation:
        n_evaluations = 0
        last_mean_reward = 0.5
        last_success_rate = None

    evaluation, sent = Evaluation(), []
    reporter = bench_sweep.TuneReporter(evaluation, sent.append)
    reporter._on_training_start()
    reporter.num_timesteps = 128
    assert reporter._on_step() and sent == []
    evaluation.n_evaluations = 1
    reporter._on_step(), reporter._on_step()
    assert sent == [{"timesteps": 128, "mean_reward": 0.5, "success_rate": 0.0}]


def test_best_config_is_a_per_env_file_with_the_recipe_only(tmp_path: Path) -> None:
    sweep = bench_sweep.load_sweep(write_sweep(tmp_path))
    params = {"ppo.learning_rate": 2e-4, "ppo.n_steps": 128, "ppo.batch_size": 64}
    text = bench_sweep.best_config_yaml(sweep, {**params, "ppo.n_epochs": 2}, "a\nb")
    assert text.startswith("# a\n# b\n")
    path = tmp_path / "best.yaml"
    path.write_text(text)
    config = load_config(path)
    assert config.env.id == "MiniGrid-Empty-5x5-v0" and config.agent.kind == "ppo"
    assert (config.ppo.learning_rate, config.ppo.n_steps, config.ppo.n_epochs) == (2e-4, 128, 2)
    assert config.ppo.gamma == 0.95  # base.overrides are the recipe
    assert config.env.n_envs == load_config().env.n_envs  # run_overrides are not


def test_ties_at_the_budget_go_to_the_trial_that_learned_sooner(tmp_path: Path) -> None:
    """Trials that all solve the task by the budget tie on the last evaluation; the mean over
    their evaluations (the area under the curve) ranks the faster learner first."""
    import types

    sweep = bench_sweep.load_sweep(write_sweep(tmp_path), check_configs=False)

    def result(trial: str, rewards: list[float], reached: int = 512) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            metrics={"trial_id": trial, "timesteps": reached, "mean_reward": rewards[-1]},
            metrics_dataframe=pd.DataFrame({"mean_reward": rewards}),
            config={"ppo.learning_rate": 1e-3, "ppo.n_steps": 64, "ppo.n_epochs": 1},
            error=None,
            path=str(tmp_path / trial),
        )

    results = [
        result("late", [0.0, 0.0, 0.0, 1.0]),
        result("soon", [0.0, 1.0, 1.0, 1.0]),
        result("stopped", [1.0, 1.0], reached=256),  # ASHA stopped it: not a candidate
        result("worse", [0.9, 0.9, 0.9, 0.9]),
    ]
    frame = bench_sweep.trials_frame(sweep, results)
    assert list(frame["trial"]) == ["soon", "late", "worse", "stopped"]
    assert frame["mean mean_reward"].tolist()[:2] == [0.75, 0.25]
    assert bench_sweep.best_trial(sweep, frame)["trial"] == "soon"


def test_a_trial_gets_torch_threads_for_its_cpus_and_no_progress_bar(tmp_path: Path) -> None:
    text = (
        TINY.format(budget=512, storage=tmp_path / "storage")
        .replace("    - train.torch_threads=1\n", "")
        .replace("    - train.progress=none\n", "")
        .replace("storage:", "cpus_per_trial: 2\nstorage:")
    )
    sweep = bench_sweep.load_sweep(write_sweep(tmp_path, text))
    config = sweep.load_trial_config({"ppo.n_steps": 64, "ppo.batch_size": 64})
    assert (config.train.torch_threads, config.train.progress) == (2, "none")
    assert config.train.total_timesteps == 512 and config.agent.kind == "ppo"


# --------------------------------------------------------------------------------------
# On Ray
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    with runner.ray_session(cpus=2):
        yield


def test_a_tiny_sweep_writes_its_trials_and_a_loadable_best_config_then_continues(
    tmp_path: Path, local_ray: None
) -> None:
    sweep = bench_sweep.load_sweep(write_sweep(tmp_path))
    results = bench_sweep.run_sweep(sweep, log=lambda s: None)
    assert len(results) == 3 and not results.errors
    assert bench_sweep.unfinished_trials(sweep) == 0
    written = bench_sweep.write_results(sweep, results, "abc")
    table = pd.read_csv(written["csv"])
    assert len(table) == 3
    assert {"trial", "ppo.learning_rate", "ppo.n_steps", "mean_reward", "timesteps"} <= set(
        table.columns
    )
    assert {"stopped early", "error"} <= set(table.columns)
    assert 1.0e-3 in table["ppo.learning_rate"].tolist()  # the point to evaluate ran
    finished = table[table["timesteps"] >= 512]
    assert not finished.empty
    # A trial ASHA stops has fewer steps; each row says so.
    assert (table["stopped early"] == (table["timesteps"] < 512)).all()
    markdown = written["markdown"].read_text()
    assert re.search(r"^\| trial +\| +ppo.learning_rate", markdown, re.M)
    assert "Best trial:" in markdown
    best = load_config(written["best"])  # what train_agent.py --config does
    top = finished.sort_values("mean_reward", ascending=False).iloc[0]
    assert best.ppo.learning_rate == pytest.approx(top["ppo.learning_rate"])
    assert best.ppo.n_steps == top["ppo.n_steps"] and best.agent.kind == "ppo"
    assert best.train.total_timesteps != 512  # the tuning budget is not the recipe's

    # Each trial is a run directory of the project; a second call continues the sweep in the
    # folder (Tuner.restore) and trains nothing again.
    runs = sorted((sweep.folder / "runs").iterdir())
    assert len(runs) == 3 and all((r / "config.yaml").is_file() for r in runs)
    before = {r.name: (r / "history.jsonl").stat().st_mtime_ns for r in runs}
    logged: list[str] = []
    again = bench_sweep.run_sweep(sweep, log=logged.append)
    assert "continuing" in logged[0]
    assert sorted(r.metrics["trial_id"] for r in again) == sorted(table["trial"].astype(str))
    assert {r.name: (r / "history.jsonl").stat().st_mtime_ns for r in runs} == before

    # A changed sweep file is refused for that folder: its trials searched another space.
    changed = sweep.path.read_text().replace("num_samples: 3", "num_samples: 4")
    sweep.path.write_text(changed)
    with pytest.raises(SchemaError, match="started from a different"):
        bench_sweep.run_sweep(bench_sweep.load_sweep(sweep.path), log=lambda s: None)


@pytest.mark.slow
def test_an_interrupted_sweep_continues_its_trials_from_their_checkpoints(tmp_path: Path) -> None:
    """Ctrl-C stops ``scripts/sweep.py`` (exit 130, no best.yaml); the same command continues
    the sweep: each trial resumes from its own latest checkpoint and trains to the budget."""
    import os
    import signal
    import subprocess
    import time

    text = (
        TINY.format(budget=20_000, storage=tmp_path / "storage")
        .replace("num_samples: 3", "num_samples: 2")
        .replace("grace_period: 128", "grace_period: 10000")
        .replace("train.checkpoint_freq=256", "train.checkpoint_freq=2048")
        .replace("train.eval_freq=128", "train.eval_freq=2000")
    )
    path = write_sweep(tmp_path, text)
    folder = tmp_path / "storage" / "tiny"
    command = [sys.executable, str(REPO / "scripts" / "sweep.py"), str(path), "--cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # a guard against a hung sweep, not a measurement
    while len(list(folder.glob("runs/*/checkpoints/*.safetensors"))) < 2:
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 130, stderr.decode()[-2000:]
    assert "run the same command again" in stderr.decode()
    assert not (folder / "best.yaml").exists()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "continuing the interrupted sweep" in second.stdout
    table = pd.read_csv(folder / "trials.csv")
    assert len(table) == 2 and (table["timesteps"] == 20_000).all()
    for run in (folder / "runs").iterdir():
        events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events][:2] == ["start", "resume"]
        assert events[1]["from_step"] >= 2048
    load_config(folder / "best.yaml")
