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
