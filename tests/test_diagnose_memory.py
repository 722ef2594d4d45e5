"""agents/experiment/memory_diagnosis.py and scripts/diagnose_memory.py: cue visibility on
MiniGrid-Memory, the linear cue probe, and the benchmark's ``memory_diagnosis``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import envs
from agents.experiment import memory_diagnosis
from tests.helpers import save_untrained_run

REPO = Path(__file__).resolve().parents[1]
MEMORY_ENV = "MiniGrid-MemoryS7-v0"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "diagnose_memory", REPO / "scripts" / "diagnose_memory.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


diagnose_memory = _load_script()


def _small_run(root: Path, agent: str, env_id: str, *extra: str) -> Path:
    """An untrained small agent of kind ``agent`` on ``env_id``, saved as a run directory
    (``extra``: more overrides, after the defaults)."""
    overrides = [
        f"agent.kind={agent}",
        f"env.id={env_id}",
        "env.n_envs=1",
        "ppo.n_steps=16",
        "ppo.batch_size=16",
        "env.env_kwargs.max_steps=12",
        "thalamus.d_model=32",
        "thalamus.d_task=32",
        "thalamus.d_workspace=32",
        "lstm.lstm_hidden_size=16",
        "train.device=cpu",
        *extra,
    ]
    return save_untrained_run(root, overrides)


@pytest.fixture(scope="module")
def memory_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        agent: _small_run(tmp_path_factory.mktemp(agent), agent, MEMORY_ENV)
        for agent in ("thalamus", "lstm", "ppo")
    }


def test_probe_decodes_a_linearly_coded_label_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(600) < 0.5
    noise = rng.normal(size=(600, 32))
    coded = noise.copy()
    coded[:, 3] += np.where(labels, 2.0, -2.0)  # one feature carries the label
    decoded = memory_diagnosis.fit_probe(coded, labels)
    assert decoded["accuracy"] > 0.95
    assert decoded["n_train"] + decoded["n_test"] == 600
    chance = memory_diagnosis.fit_probe(noise, labels)
    assert abs(chance["accuracy"] - 0.5) < 0.12
    assert 0.5 <= chance["majority"] < 0.6


def test_probe_ties_on_inner_accuracy_go_to_the_strongest_l2() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.5
    coded = rng.normal(size=(200, 8))
    coded[:, 0] = np.where(labels, 5.0, -5.0)  # separable: every L2 scores 1.0 on the inner split
    assert memory_diagnosis.fit_probe(coded, labels)["l2"] == max(memory_diagnosis.PROBE_L2_GRID)


@pytest.mark.parametrize("agent", ["thalamus", "lstm", "ppo"])
def test_episodes_record_whether_the_cue_was_in_view(
    memory_runs: dict[str, Path], agent: str
) -> None:
    result = memory_diagnosis.diagnose(
        str(memory_runs[agent]), episodes=24, env_id=None, seed=5, deterministic=False
    )
    episodes = result["per_episode"]
    assert len(episodes) == 24 and result["env_id"] == MEMORY_ENV
    # The agent starts facing east at (start_x, 3), the cue at (1, 2): it is in view at the
    # first step from column 1 (one cell to the agent's left) and behind it from columns 2-4.
    for e in episodes:
        assert e["cue"] in ("key", "ball")
        assert 1 <= e["start_x"] <= 4
        assert e["cue_seen"] == (e["first_seen_step"] is not None)
        assert (e["first_seen_step"] == 0) == (e["start_x"] == 1)
        assert e["outcome"] in ("success", "failure", "timeout")
        assert 1 <= e["length"] <= 12
    assert {e["start_x"] for e in episodes} >= {1, 2}
    seen = [e["outcome"] == "success" for e in episodes if e["cue_seen"]]
    assert result["cue_seen_rate"] == pytest.approx(np.mean([e["cue_seen"] for e in episodes]))
    assert result["success_if_seen"] == (pytest.approx(np.mean(seen)) if seen else None)
    assert result["probe_episodes"] == sum(
        e["cue_seen"] and e["outcome"] != "timeout" for e in episodes
    )


@pytest.mark.parametrize("agent", ["thalamus", "lstm", "ppo"])
def test_features_at_the_last_step_are_what_the_policy_acts_on(
    memory_runs: dict[str, Path], agent: str
) -> None:
    from agents.experiment.training import load_model

    model = load_model(memory_runs[agent], device="cpu").model
    env = envs.make_env(MEMORY_ENV, max_steps=12)
    episode, features = memory_diagnosis.play(model, env, seed=3, deterministic=True)
    env.close()
    expected = {
        "thalamus": model.policy.features_dim,  # the core's output features
        "lstm": 16,  # the actor LSTM's hidden state (lstm.lstm_hidden_size)
        "ppo": model.policy.mlp_extractor.latent_dim_pi,  # the actor's latent
    }[agent]
    assert features.shape == (expected,)
    assert np.isfinite(features).all() and np.abs(features).sum() > 0
    assert 1 <= episode.length <= 12


def test_cli_writes_json_and_rejects_a_non_memory_env(
    memory_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "diagnosis.json"
    run = str(memory_runs["thalamus"])
    assert diagnose_memory.main([run, "--episodes", "3", "--output", str(output)]) == 0
    (result,) = json.loads(output.read_text())
    assert result["episodes"] == 3 and len(result["per_episode"]) == 3
    assert "cue seen" in capsys.readouterr().out

    code = diagnose_memory.main([run, "--episodes", "3", "--env", "MiniGrid-DoorKey-5x5-v0"])
    assert code == diagnose_memory.EXIT_CONFIG_ERROR
    assert "not a MiniGrid-Memory env" in capsys.readouterr().err
    assert diagnose_memory.main([run, "--episodes", "0"]) == diagnose_memory.EXIT_CONFIG_ERROR


def test_benchmark_summary_of_a_memory_run_and_none_elsewhere(
    memory_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents.bench import runner
    from agents.experiment.config import load_config
    from agents.experiment.training import RunPaths

    monkeypatch.setattr(runner, "MEMORY_DIAGNOSIS_EPISODES", 24)  # the real floor is 100
    run = memory_runs["ppo"]
    config = load_config(run / "config.yaml", defaults_file=None)
    summary = runner._final_memory_diagnosis(config, RunPaths(run))
    assert summary is not None and set(summary) == set(memory_diagnosis.SUMMARY_KEYS)
    assert summary["episodes"] == max(config.train.eval_episodes, 24)
    full = memory_diagnosis.diagnose(str(run), summary["episodes"], None, None, False)
    assert summary == memory_diagnosis.summarize(full)  # the eval seeds, sampled actions
    assert "per_episode" not in summary

    other = _small_run(tmp_path, "ppo", "MiniGrid-DoorKey-5x5-v0")
    other_config = load_config(other / "config.yaml", defaults_file=None)
    assert runner._final_memory_diagnosis(other_config, RunPaths(other)) is None


def test_summary_keeps_the_probe_or_none() -> None:
    result = {
        "episodes": 40,
        "success_rate": 0.5,
        "cue_seen_rate": 0.75,
        "success_if_seen": 0.6,
        "success_if_unseen": 0.2,
        "probe_episodes": 30,
        "probe": {"accuracy": 0.9, "majority": 0.55, "n_train": 15, "n_test": 15, "l2": 0.1},
        "per_episode": [],
    }
    summary = memory_diagnosis.summarize(result)
    assert (summary["probe_accuracy"], summary["probe_majority"]) == (0.9, 0.55)
    assert memory_diagnosis.summarize({**result, "probe": None})["probe_accuracy"] is None


def test_report_tables_the_memory_diagnosis_of_each_run_that_has_it(tmp_path: Path) -> None:
    import re
    import shutil

    fixtures = REPO / "tests" / "fixtures" / "benchmarks"
    shutil.copytree(fixtures / "records", tmp_path / "records" / "fixture")
    folder = tmp_path / "records" / "fixture"
    measured = {
        0: {"probe_accuracy": 0.91, "probe_majority": 0.52, "probe_episodes": 60},
        1: {"probe_accuracy": None, "probe_majority": None, "probe_episodes": 7},
    }
    for seed, probe in measured.items():
        path = folder / f"MiniGrid-Empty-5x5-v0__thalamus__{seed}.json"
        record = json.loads(path.read_text())
        record["memory_diagnosis"] = {
            "episodes": 100,
            "success_rate": 0.62,
            "cue_seen_rate": 0.8,
            "success_if_seen": 0.7,
            "success_if_unseen": None if seed else 0.3,
            **probe,
        }
        path.write_text(json.dumps(record))
    path = folder / "MiniGrid-Empty-5x5-v0__thalamus__2.json"
    record = json.loads(path.read_text())
    record["memory_diagnosis"] = {"error": "RuntimeError: no env"}
    path.write_text(json.dumps(record))
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark as benchmark_script

    args = [str(fixtures / "suite.yaml"), "--report", "--out", str(tmp_path)]
    assert benchmark_script.main(args) == 0
    text = re.sub(r" {2,}", " ", (tmp_path / "README.md").read_text())  # table padding
    table = text.split("Memory diagnosis")[1].split("####")[0]  # Empty-5x5's section
    assert "| thalamus | 0 | 100 | 0.62 | 0.80 | 0.70 | 0.30 | 0.91 vs 0.52 (60) |" in table
    assert "| thalamus | 1 | 100 | 0.62 | 0.80 | 0.70 | – | – (7) |" in table
    assert "| thalamus | 2 |" not in table  # the error, like records without it, has no row
    assert "| ppo |" not in table


THREE_STREAMS = (
    "thalamus.streams=[{name: visual}, {name: semantic, dt_min: 0.005, dt_max: 0.05, "
    "A_init_min: 0.5, A_init_max: 1.0, clock: 4}, {name: episodic, kind: episodic, "
    "capacity: 8, headdim: 16}]"
)


def test_steps_since_seen_restarts_at_each_sighting_and_bins_hold_their_bounds() -> None:
    in_view = np.array([False, False, True, False, False, True, True, False])
    assert memory_diagnosis.steps_since_seen(in_view).tolist() == [-1, -1, 0, 1, 2, 0, 0, 1]
    assert memory_diagnosis.steps_since_seen(np.zeros(3, bool)).tolist() == [-1, -1, -1]
    lags = np.array([-1, 0, 1, 2, 3, 5, 6, 10, 11, 20, 21, 500])
    assert memory_diagnosis.lag_bins(lags).tolist() == [-1, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    labels = [memory_diagnosis.lag_bin_label(*b) for b in memory_diagnosis.LAG_BINS]
    assert labels == ["0", "1-2", "3-5", "6-10", "11-20", ">20"]


def _decaying_memory(
    n_episodes: int, length: int, half_life: float, seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Steps of episodes that see their cue at step 0: one feature holds ``±2 * 2^(-lag /
    half_life)`` of it, in unit noise."""
    rng = np.random.default_rng(seed)
    cues = rng.random(n_episodes) < 0.5
    lags = np.tile(np.arange(length), n_episodes)
    episodes = np.repeat(np.arange(n_episodes), length)
    labels = cues[episodes]
    features = rng.normal(size=(len(lags), 8))
    features[:, 0] += np.where(labels, 2.0, -2.0) * 0.5 ** (lags / half_life)
    return features, labels, lags, episodes


def test_probe_by_lag_reads_a_memory_that_decays_and_one_that_does_not() -> None:
    features, labels, lags, episodes = _decaying_memory(120, 30, half_life=2.0)
    rows = memory_diagnosis.probe_by_lag(features, labels, lags, episodes, seed=0)
    assert [r["bin"] for r in rows] == ["0", "1-2", "3-5", "6-10", "11-20", ">20"]
    acc = [r["accuracy"] for r in rows]
    assert acc[0] > 0.85 and acc[1] > 0.75  # P(correct) = Φ(2 · 2^-lag): 0.98 at 0, ~0.9 at 1-2
    assert all(abs(a - 0.5) < 0.1 for a in acc[3:])  # 2^-3 of the signal and less: chance
    assert acc[0] > acc[2] > acc[4] - 0.05
    for r in rows:  # every step in exactly one half; the halves split the episodes
        assert r["train_episodes"] + r["test_episodes"] == 120
        assert 0.5 <= r["majority"] < 0.62
    assert sum(r["n_train"] + r["n_test"] for r in rows) == len(lags)

    kept = memory_diagnosis.probe_by_lag(
        *_decaying_memory(120, 30, half_life=1e9)[:1], labels, lags, episodes, seed=0
    )
    assert all(r["accuracy"] > 0.85 for r in kept)


def test_probe_by_lag_never_tests_on_steps_of_a_training_episode() -> None:
    # Each episode has its own random code, constant over its steps, and a random label: a
    # probe split by steps would recognise the episodes (60 codes in 64 dims are separable).
    rng = np.random.default_rng(3)
    codes, cues = rng.normal(size=(60, 64)), rng.random(60) < 0.5
    episodes = np.repeat(np.arange(60), 12)
    lags = np.tile(np.arange(12) % 3, 60)  # every episode in the bins 0, 1-2
    features = codes[episodes] + 0.01 * rng.normal(size=(len(episodes), 64))
    rows = memory_diagnosis.probe_by_lag(features, cues[episodes], lags, episodes, seed=1)
    assert rows[0]["accuracy"] is not None and rows[0]["accuracy"] < 0.75
    assert rows[1]["accuracy"] < 0.75
    assert rows[2]["accuracy"] is None and rows[2]["n_train"] == 0  # nobody at lags 3-5


def test_split_episodes_halves_each_cue() -> None:
    import torch as th

    ids, cues = np.arange(100, 131), np.arange(31) < 9  # 9 keys, 22 balls
    train, test, inner = memory_diagnosis.split_episodes(ids, cues, th.Generator().manual_seed(0))
    assert sorted([*train, *test]) == ids.tolist() and set(inner) <= set(train)
    keys = set(ids[cues])
    assert {len(keys & set(train)), len(keys & set(test))} == {4, 5}
    assert {len(set(train) - keys), len(set(test) - keys)} == {11}
    assert len(inner) == 3 + 8  # 3/4 of each cue's training share


def test_probe_by_lag_weighs_each_episode_once_per_bin() -> None:
    # 60 episodes, cues balanced, one step each at lag 0; one key episode has 400 steps
    # there. Counted by steps, "key" would be the majority of the bin, ~0.9 of it.
    rng = np.random.default_rng(5)
    cues = np.arange(60) % 2 == 0
    episodes = np.concatenate([np.arange(60), np.zeros(399, int)])
    labels = cues[episodes]
    features = rng.normal(size=(len(episodes), 4))
    features[:, 0] += np.where(labels, 1.0, -1.0)  # P(correct) = Φ(1) = 0.84 per step
    (row, *_) = memory_diagnosis.probe_by_lag(
        features, labels, np.zeros(len(episodes), int), episodes, seed=2
    )
    assert row["majority"] == pytest.approx(0.5, abs=0.04)
    assert 0.7 < row["accuracy"] < 0.95


def test_probe_by_lag_skips_bins_with_too_few_episodes() -> None:
    features, labels, lags, episodes = _decaying_memory(40, 8, half_life=4.0)
    few = memory_diagnosis.MIN_LAG_PROBE_EPISODES * 2 - 1
    keep = episodes < few  # fewer than the minimum on one side of the split
    rows = memory_diagnosis.probe_by_lag(
        features[keep], labels[keep], lags[keep], episodes[keep], seed=0
    )
    assert rows[0]["train_episodes"] + rows[0]["test_episodes"] == few
    assert all(r["accuracy"] is None and r["majority"] is None for r in rows)


@pytest.mark.parametrize("agent", ["thalamus", "lstm", "ppo"])
def test_diagnosis_probes_by_lag_per_stream_with_half_lives(
    tmp_path: Path, agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end on a fresh 3-stream thalamus (a clocked and an episodic stream among them),
    and on the baselines: which sets are probed on which steps, and the half-lives."""
    monkeypatch.setattr(memory_diagnosis, "MIN_LAG_PROBE_EPISODES", 2)  # a few episodes fit
    streams = [THREE_STREAMS, "thalamus.n_iterations=2"] if agent == "thalamus" else []
    run = _small_run(tmp_path, agent, MEMORY_ENV, "env.env_kwargs.max_steps=20", *streams)
    result = memory_diagnosis.diagnose(str(run), 12, None, 7, deterministic=False)
    report = result["lag_probe"]
    assert report is not None and report["bins"] == ["0", "1-2", "3-5", "6-10", "11-20", ">20"]
    assert report["episodes"] == sum(e["cue_seen"] for e in result["per_episode"])
    assert report["decision_lag"]["max"] >= report["decision_lag"]["median"] >= 0
    for rows in report["sets"].values():  # all sets: the same steps, the same split
        assert [(r["n_train"], r["n_test"]) for r in rows] == [
            (r["n_train"], r["n_test"]) for r in report["sets"]["features"]
        ]
        assert sum(r["n_train"] + r["n_test"] for r in rows) == report["steps"]
    assert report["sets"]["features"][0]["accuracy"] is not None  # lag 0: every seen episode
    if agent != "thalamus":
        assert set(report["sets"]) == {"features"}
        assert result["half_lives"] is None and result["stream_weights_by_lag"] is None
        assert "no thalamus streams" in result["streams_note"]
        return
    names = ("visual", "semantic", "episodic")
    parts = ("readout", "out 1", "out 2")
    assert set(report["sets"]) == {"features"} | {f"{n} {p}" for n in names for p in parts}
    assert list(result["stream_weights_by_lag"]) == list(names)
    lives = result["half_lives"]
    assert lives["episodic"] == {"kind": "episodic", "capacity": 8}
    assert lives["semantic"]["clock"] == 4 and lives["visual"]["clock"] == 1
    for name in ("visual", "semantic"):
        assert lives[name]["p10"] <= lives[name]["median"] <= lives[name]["p90"]
        assert lives[name]["p90"] <= lives[name]["max"]
    # The clocked semantic stream starts 10-100x slower than visual: its half-lives too.
    assert lives["semantic"]["median"] > 10 * lives["visual"]["median"]


def test_recorded_streams_are_the_ones_the_policy_acts_on(tmp_path: Path) -> None:
    from agents.experiment.training import load_model

    run = _small_run(tmp_path, "thalamus", MEMORY_ENV, "thalamus.n_iterations=2")
    model = load_model(run, device="cpu").model
    core = model.policy.core
    env = envs.make_env(MEMORY_ENV, max_steps=12)
    with memory_diagnosis.StreamRecorder(core.streams) as recorder:
        _, trace = memory_diagnosis.play_traced(model, env, 3, True, recorder)
    _, bare = memory_diagnosis.play_traced(model, env, 3, True)
    env.close()
    np.testing.assert_array_equal(trace.features, bare.features)
    assert set(trace.streams) == set(recorder.names)
    assert set(trace.decay_rates) == {"visual 1", "visual 2", "semantic 1", "semantic 2"}
    heads = core.streams.streams[0].blocks[0].nheads
    assert trace.decay_rates["visual 1"].shape == (len(trace.features), heads)
    assert trace.streams["visual out 2"].shape == (len(trace.features), 32)
    assert not np.allclose(trace.streams["visual out 2"], trace.streams["semantic out 2"])
    # The last iteration's outputs, through the competition, give the policy's features.
    import torch as th

    out = th.as_tensor(
        np.stack([trace.streams["visual out 2"], trace.streams["semantic out 2"]], axis=1)
    ).to(th.float32)
    with th.no_grad():
        votes = th.einsum(
            "tmd,mwd->tmw", out, th.stack([v.weight for v in core.streams.vote])
        ) + th.stack([v.bias for v in core.streams.vote])
        alpha = th.as_tensor(trace.stream_weights, dtype=th.float32)
        workspace = core.streams.norm((alpha[..., None] * votes).sum(-2))
    np.testing.assert_allclose(workspace.numpy(), trace.features, atol=1e-5)


def test_half_lives_in_play_are_the_parametric_ones_when_the_input_leaves_dt_alone(
    tmp_path: Path,
) -> None:
    import torch as th

    from agents.experiment.config import load_config
    from agents.experiment.training import load_model

    run = _small_run(tmp_path, "thalamus", MEMORY_ENV, THREE_STREAMS, "thalamus.n_iterations=2")
    model = load_model(run, device="cpu").model
    config = load_config(run / "config.yaml", defaults_file=None)
    streams = model.policy.core.streams
    result = memory_diagnosis.diagnose((model, config), 12, None, 7, deterministic=False)
    lives = result["half_lives"]
    assert set(lives["visual"]["in_play"]) == {"1", "2"} and "in_play" not in lives["episodic"]
    with th.no_grad():  # dt = softplus(dt_bias): the input no longer moves it
        for stream in streams.streams[:2]:
            block = stream.blocks[0]
            block.in_proj.weight[-block.nheads :] = 0.0
    still = memory_diagnosis.diagnose((model, config), 12, None, 7, deterministic=False)
    for name in ("visual", "semantic"):  # clock 4 for semantic: both count env steps
        parametric = still["half_lives"][name]
        for spread in parametric["in_play"].values():
            for key in ("median", "p10", "p90", "max"):
                assert spread[key] == pytest.approx(parametric[key], rel=1e-5)
    assert lives["visual"]["in_play"] != still["half_lives"]["visual"]["in_play"]
