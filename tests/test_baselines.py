"""The baselines' observation encoding (agents.baselines.FlatDictExtractor) as build_agent
sets it."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import get_flattened_obs_dim

import envs
from agents.baselines import FlatDictExtractor
from agents.experiment.config import DEFAULT_CONFIG, load_config
from agents.experiment.training import build_agent


def _image_space(channels_first: bool) -> spaces.Box:
    shape = (3, 7, 7) if channels_first else (7, 7, 3)
    return spaces.Box(0, 255, shape, np.uint8)


@pytest.mark.parametrize("channels_first", [True, False], ids=["CHW", "HWC"])
def test_a_symbolic_image_reaches_unit_scale_per_channel(channels_first: bool) -> None:
    space = spaces.Dict({"image": _image_space(channels_first)})
    extractor = FlatDictExtractor(space, image_high=envs.IMAGE_CHANNEL_HIGH)
    image = th.zeros(1, *space["image"].shape)
    channel = (slice(None),) * (1 if channels_first else 3)
    for c, high in enumerate(envs.IMAGE_CHANNEL_HIGH):  # the largest index of each channel
        image[(*channel, c)] = high
    # What the extractor receives: SB3's preprocessing has divided the uint8 image by 255.
    features = extractor({"image": image / 255.0})
    assert th.allclose(features, th.ones_like(features))
    plain = FlatDictExtractor(space)({"image": image / 255.0})  # SB3's scale: under 0.04
    assert plain.max() <= 10 / 255 + 1e-6


def test_image_high_must_match_the_channels() -> None:
    space = spaces.Dict({"image": _image_space(channels_first=True)})
    with pytest.raises(ValueError, match=r"one positive maximum per channel"):
        FlatDictExtractor(space, image_high=(10, 5))
    with pytest.raises(ValueError, match=r"one positive maximum per channel"):
        FlatDictExtractor(space, image_high=(10, 5, 0))


@pytest.mark.parametrize("kind", ["ppo", "lstm"])
def test_build_agent_gives_the_baselines_the_image_at_unit_scale(kind: str) -> None:
    config = load_config(DEFAULT_CONFIG, [f"agent.kind={kind}", "env.n_envs=2", "train.device=cpu"])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    try:
        model = build_agent(config, venv)
        extractor = model.policy.features_extractor
        assert isinstance(extractor, FlatDictExtractor) and "image" in extractor.image_rescale
        observation = model.policy.obs_to_tensor(model.env.reset())[0]
        features = model.policy.extract_features(observation, extractor)  # SB3's /255 first
        sizes = [get_flattened_obs_dim(model.observation_space[key]) for key in extractor.keys]
        start = sum(sizes[: extractor.keys.index("image")])
        image = features[:, start : start + 7 * 7 * 3]
        assert 0.5 < image.max() <= 1.0  # grey walls (colour 5) are 1.0, a wall's object 0.2
    finally:
        venv.close()


# --------------------------------------------------------------------------------------
# baseline.normalize_obs: running per-feature standardisation, part of the policy
# --------------------------------------------------------------------------------------

NORMALIZED_TINY = [
    "env.n_envs=2",
    "ppo.n_steps=16",
    "ppo.batch_size=32",
    "ppo.n_epochs=2",
    "lstm.lstm_hidden_size=16",
    "train.device=cpu",
    "baseline.normalize_obs=true",
]


def _extractor_stats(model: object) -> tuple[float, np.ndarray, np.ndarray]:
    extractor = model.policy.features_extractor
    return (
        float(extractor.obs_count),
        extractor.obs_mean.numpy().copy(),
        extractor.obs_var.numpy().copy(),
    )


def test_running_statistics_equal_numpy_over_every_folded_row() -> None:
    space = spaces.Dict({"x": spaces.Box(-np.inf, np.inf, (3,), np.float32)})
    extractor = FlatDictExtractor(space, normalize_obs=True, obs_clip=5.0)
    rng = np.random.default_rng(0)
    # Far from zero and with a small spread: a float32 or a naive sum-of-squares accumulator
    # loses the variance here.
    batches = [
        (1000.0 + rng.normal(size=(n, 3)) * [0.01, 1.0, 0.0]).astype(np.float32)
        for n in (1, 7, 64, 3)
    ]
    for batch in batches:
        extractor.update_obs_statistics(th.as_tensor(batch))
    rows = np.concatenate(batches).astype(np.float64)
    assert float(extractor.obs_count) == len(rows)
    np.testing.assert_allclose(extractor.obs_mean.numpy(), rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(extractor.obs_var.numpy(), rows.var(axis=0), rtol=1e-9, atol=1e-18)
    # forward reads them (symlog first: the key is unbounded) and clips, never updates them
    x = th.as_tensor(batches[2])
    unit = extractor.unit_features({"x": x}).double()
    std = np.sqrt(extractor.obs_var.numpy() + 1e-8)
    expected = np.clip((unit.numpy() - extractor.obs_mean.numpy()) / std, -5.0, 5.0)
    np.testing.assert_allclose(extractor({"x": x}).numpy(), expected, atol=1e-5)
    assert float(extractor.obs_count) == len(rows)


def test_an_extractor_without_normalize_obs_has_no_statistics() -> None:
    """normalize_obs=false (the default) keeps the policy's state_dict of older model files."""
    config = load_config(DEFAULT_CONFIG, ["agent.kind=ppo", "env.n_envs=2", "train.device=cpu"])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    try:
        state = build_agent(config, venv).policy.state_dict()
    finally:
        venv.close()
    assert not [name for name in state if "obs_" in name]


def _learn_watching_statistics(kind: str, steps: int) -> tuple[object, list[dict]]:
    """A tiny normalizing agent trained ``steps`` with the fold callback; per rollout, its
    statistics at the rollout's start and end and at its update's start and end, and (PPO)
    the log-probs the update's policy gives the rollout's actions against the stored ones."""
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList

    from agents.baselines import FoldObservationStatistics

    config = load_config(DEFAULT_CONFIG, [f"agent.kind={kind}", *NORMALIZED_TINY])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    model = build_agent(config, venv)
    seen: list[dict] = []

    class Watch(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_start(self) -> None:
            seen.append({"rollout_start": _extractor_stats(self.model)})

        def _on_rollout_end(self) -> None:
            seen[-1]["rollout_end"] = _extractor_stats(self.model)

    original_train = model.train

    def train() -> None:
        seen[-1]["update_start"] = _extractor_stats(model)
        if kind == "ppo":
            data = next(model.rollout_buffer.get(batch_size=None))
            with th.no_grad():
                _, log_prob, _ = model.policy.evaluate_actions(
                    data.observations, data.actions.long().flatten()
                )
            seen[-1]["log_prob_gap"] = float((log_prob - data.old_log_prob).abs().max())
        original_train()
        seen[-1]["update_end"] = _extractor_stats(model)

    model.train = train
    try:
        model.learn(steps, callback=CallbackList([FoldObservationStatistics(), Watch()]))
    finally:
        venv.close()
    return model, seen


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


@pytest.mark.parametrize("kind", ["ppo", "lstm"])
def test_statistics_stay_fixed_from_a_rollouts_collection_to_the_end_of_its_update(
    kind: str,
) -> None:
    """The log-probs PPO stores while collecting must be the ones its update recomputes:
    the statistics move only between one update's end and the next rollout."""
    model, seen = _learn_watching_statistics(kind, steps=4 * 32)
    assert len(seen) == 4
    for iteration in seen:
        start = iteration["rollout_start"]
        for phase in ("rollout_end", "update_start", "update_end"):
            assert _same(iteration[phase], start), phase
        if kind == "ppo":
            assert iteration["log_prob_gap"] < 1e-5
    # ...and they do move: each rollout is folded in after its update, the last at the end
    assert [iteration["rollout_start"][0] for iteration in seen] == [0.0, 32.0, 64.0, 96.0]
    assert _extractor_stats(model)[0] == 128.0


def test_the_folded_statistics_are_those_of_the_observations_the_policy_was_given() -> None:
    """What is folded is the rollout buffer's observations, preprocessed as the update sees
    them: the statistics equal numpy's over the unit-scale features of every observation."""
    from agents.baselines import fold_observations

    config = load_config(DEFAULT_CONFIG, ["agent.kind=ppo", *NORMALIZED_TINY])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    try:
        model = build_agent(config, venv)
        model.learn(32)  # one rollout, no fold (no callback)
        observations = dict(model.rollout_buffer.observations)
        assert observations["image"].shape == (32, 3, 7, 7)
        assert fold_observations(model.policy, observations) == 32
        extractor = model.policy.features_extractor
        flat = {k: th.as_tensor(v) for k, v in observations.items()}  # flattened by get()
        features = model.policy.extract_features(flat, extractor)  # standardised: undo it
        std = th.sqrt(extractor.obs_var + 1e-8)
        unit = (features.double() * std + extractor.obs_mean).numpy()
        np.testing.assert_allclose(extractor.obs_mean.numpy(), unit.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(extractor.obs_var.numpy(), unit.var(axis=0), atol=1e-6)
        assert extractor.obs_var.max() > 0.01  # the view varies: something was folded
    finally:
        venv.close()


def test_a_loaded_model_evaluates_exactly_as_the_trained_one(tmp_path) -> None:
    """The statistics travel in the model file and every evaluation path (a policy call,
    model.predict, play_episode) applies them after load_model (what evaluate.py uses)."""
    from stable_baselines3.common.callbacks import CallbackList

    from agents.baselines import FoldObservationStatistics
    from agents.experiment.model_files import save_model
    from agents.experiment.rollout import play_episode
    from agents.experiment.training import load_model

    config = load_config(DEFAULT_CONFIG, ["agent.kind=ppo", *NORMALIZED_TINY])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    try:
        model = build_agent(config, venv)
        model.learn(96, callback=CallbackList([FoldObservationStatistics()]))
        observation = model.policy.obs_to_tensor(venv.reset())[0]
    finally:
        venv.close()
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors", device="cpu").model
    assert _same(_extractor_stats(loaded), _extractor_stats(model))
    assert _extractor_stats(loaded)[0] == 96.0  # three rollouts, the last folded at the end

    def probs(m: object) -> th.Tensor:
        with th.no_grad():
            return m.policy.get_distribution(observation).distribution.probs

    assert th.equal(probs(loaded), probs(model))
    episodes = []
    for m in (model, loaded):
        env = envs.make_env(config.env.id)
        th.manual_seed(3)
        episode = play_episode(m, env, deterministic=False, seed=5)
        episodes.append((episode.episode_return, episode.length, episode.final_obs["image"]))
        env.close()
    assert episodes[0][:2] == episodes[1][:2] and np.array_equal(episodes[0][2], episodes[1][2])
    # the statistics are applied: the policy without them acts differently
    extractor = loaded.policy.features_extractor
    extractor.obs_mean.zero_()
    extractor.obs_var.fill_(1.0)
    assert not th.allclose(probs(loaded), probs(model))


def test_a_resumed_run_continues_with_the_checkpoints_statistics(tmp_path) -> None:
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.experiment.io import latest_checkpoint
    from agents.experiment.model_files import read_model_file
    from agents.experiment.training import RunPaths, load_model, resume, train

    config = load_config(
        DEFAULT_CONFIG,
        [
            "agent.kind=ppo",
            *NORMALIZED_TINY,
            "train.total_timesteps=64",
            "train.checkpoint_freq=32",
            "train.eval_freq=0",
            "train.progress=none",
            f"train.runs_dir={tmp_path}",
        ],
    )
    run_dir = train(config, tmp_path / "run")
    checkpoint = latest_checkpoint(RunPaths(run_dir).checkpoints)
    assert checkpoint is not None and checkpoint.timesteps == 64
    saved = read_model_file(checkpoint.model_path).tensors
    assert float(saved["policy.features_extractor.obs_count"]) == 64.0
    at_start: list[tuple] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_training_start(self) -> None:
            at_start.append(_extractor_stats(self.model))

    resume(run_dir, total_timesteps=128, extra_callbacks=lambda _: [Record()])
    count, mean, var = at_start[0]
    assert count == 64.0
    assert np.array_equal(mean, saved["policy.features_extractor.obs_mean"].numpy())
    assert np.array_equal(var, saved["policy.features_extractor.obs_var"].numpy())
    # the resumed session folds its rollouts as an uninterrupted run does: all 128 steps
    assert _extractor_stats(load_model(run_dir, device="cpu").model)[0] == 128.0


@pytest.mark.parametrize(
    ("section", "key", "default"),
    [("baseline", "normalize_obs", False), ("exploration", "kind", "none")],
)
def test_a_run_from_before_a_later_section_still_resumes(
    tmp_path, section: str, key: str, default: object
) -> None:
    """config.yaml of runs older than baseline.* (or exploration.*) has no such section: they
    trained with its defaults (no normalisation, no bonus), so the run reads and resumes with
    them."""
    import yaml

    from agents.experiment.training import RunPaths, resume, train

    config = load_config(
        DEFAULT_CONFIG,
        [
            "agent.kind=ppo",
            *NORMALIZED_TINY[:-1],
            "train.total_timesteps=32",
            "train.eval_freq=0",
            "train.progress=none",
            f"train.runs_dir={tmp_path}",
        ],
    )
    run_dir = train(config, tmp_path / "run")
    config_path = RunPaths(run_dir).config
    layer = yaml.safe_load(config_path.read_text())
    del layer[section]
    config_path.write_text(yaml.safe_dump(layer))
    resume(run_dir, total_timesteps=64)
    assert yaml.safe_load(config_path.read_text())[section][key] == default
