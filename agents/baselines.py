"""The baseline agent kinds: SB3's ``PPO`` (memoryless) and sb3-contrib's ``RecurrentPPO``
(LSTM), reading a Dict observation through :class:`FlatDictExtractor`.

SB3's default ``CombinedExtractor`` would put a NatureCNN on MiniGrid's 7x7 view, which is too
small for it; :class:`FlatDictExtractor` flattens every entry after SB3's preprocessing
(images scaled to ``[0, 1]``, ``Discrete`` one-hot) instead. Their registry entries are in
:mod:`agents.registry`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.preprocessing import (
    get_flattened_obs_dim,
    is_image_space,
    is_image_space_channels_first,
)
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import GymEnv, TensorDict
from torch import nn

import envs
from agents.registry import spec
from agents.tokenizer import symlog

__all__ = [
    "THALAMUS_POLICY_KWARGS",
    "FlatDictExtractor",
    "build_lstm",
    "checked_policy_kwargs",
    "build_ppo",
    "policy_kwargs",
]

#: ``policy_kwargs`` keys that only the thalamus policy understands.
THALAMUS_POLICY_KWARGS: tuple[str, ...] = ("thalamus", "tokenizer", "core_lr_scale")


class FlatDictExtractor(BaseFeaturesExtractor):
    """Concatenate every entry of a Dict observation, flattened and brought to unit scale.

    SB3's preprocessing runs first (images divided by 255, ``Discrete`` one-hot); then a
    non-image ``Box`` with finite bounds is mapped to ``[0, 1]`` and an unbounded one through
    ``symlog``, so that e.g. raw word ids (up to the vocabulary size) or returns do not
    saturate the first layer. An image whose channels hold small indices rather than pixel
    intensities (MiniGrid's symbolic view: 0-10, 0-5, 0-2, declared as 0-255) is scaled by
    ``image_high`` instead, to ``[0, 1]`` per channel: divided by 255 its values stay under 0.04,
    and PPO with that input learned KeyCorridorS3R1 on none of the seeds where the same network
    on unit-scale input did (``docs/benchmarks/baselines.md``).

    :param observation_space: a ``gymnasium.spaces.Dict`` without nested spaces.
    :param image_high: the largest value of each image channel (e.g.
        ``envs.IMAGE_CHANNEL_HIGH``); ``None`` keeps SB3's division by 255.
    """

    def __init__(
        self, observation_space: spaces.Dict, image_high: Sequence[float] | None = None
    ) -> None:
        if not isinstance(observation_space, spaces.Dict):
            raise TypeError(
                f"FlatDictExtractor needs a Dict observation space, got {observation_space}."
            )
        features_dim = sum(get_flattened_obs_dim(s) for s in observation_space.spaces.values())
        super().__init__(observation_space, features_dim=features_dim)
        self.keys = tuple(observation_space.spaces)
        self.flatten = nn.Flatten()
        self.bounded: dict[str, tuple[th.Tensor, th.Tensor]] = {}
        self.unbounded: set[str] = set()
        # Per image key, the factor that takes SB3's x / 255 to x / high, per channel.
        self.image_rescale: dict[str, th.Tensor] = {}
        for key, space in observation_space.spaces.items():
            if isinstance(space, spaces.Box) and is_image_space(space) and image_high is not None:
                self.image_rescale[key] = _image_rescale(space, image_high)
            if not isinstance(space, spaces.Box) or is_image_space(space):
                continue
            low = np.asarray(space.low, dtype=np.float64).reshape(-1)
            high = np.asarray(space.high, dtype=np.float64).reshape(-1)
            if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
                scale = np.where(high > low, high - low, 1.0)
                self.bounded[key] = (
                    th.as_tensor(low, dtype=th.float32),
                    th.as_tensor(1.0 / scale, dtype=th.float32),
                )
            else:
                self.unbounded.add(key)

    def forward(self, observations: TensorDict) -> th.Tensor:
        """``[B, features_dim]`` from a dict of preprocessed ``[B, ...]`` tensors."""
        parts = []
        for key in self.keys:
            x = observations[key].float()
            if key in self.image_rescale:
                x = x * self.image_rescale[key].to(x.device)
            x = self.flatten(x)
            if key in self.bounded:
                low, inv_scale = self.bounded[key]
                x = (x - low.to(x.device)) * inv_scale.to(x.device)
            elif key in self.unbounded:
                x = symlog(x)
            parts.append(x)
        return th.cat(parts, dim=1)


def _image_rescale(space: spaces.Box, image_high: Sequence[float]) -> th.Tensor:
    """``255 / high`` shaped to broadcast over ``space``'s channel axis (SB3 may have moved the
    channels first, ``VecTransposeImage``)."""
    channels_first = is_image_space_channels_first(space)
    n_channels = space.shape[0 if channels_first else -1]
    if len(image_high) != n_channels or min(image_high) <= 0:
        raise ValueError(
            f"image_high={tuple(image_high)} must give one positive maximum per channel of the "
            f"image {space} ({n_channels} channels)."
        )
    factor = th.tensor([255.0 / h for h in image_high], dtype=th.float32)
    return factor.view(-1, 1, 1) if channels_first else factor


def checked_policy_kwargs(
    kind: str, env_space: spaces.Space, policy_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    """``policy_kwargs`` with :class:`FlatDictExtractor` for a Dict space.

    :raises ValueError: a thalamus-only key is among them.
    """
    kwargs = dict(policy_kwargs or {})
    wrong = sorted(set(kwargs) & set(THALAMUS_POLICY_KWARGS))
    if wrong:
        raise ValueError(
            f"policy_kwargs {wrong} only apply to kind='thalamus', not kind={kind!r}. Drop them "
            "from the baseline's policy_kwargs."
        )
    if isinstance(env_space, spaces.Dict):
        kwargs.setdefault("features_extractor_class", FlatDictExtractor)
    return kwargs


def _build(
    algorithm: type[BaseAlgorithm],
    policies: tuple[str, str],
    kind: str,
    env: GymEnv,
    seed: int | None,
    device: th.device | str,
    policy_kwargs: dict[str, Any] | None,
    hyperparams: dict[str, Any],
) -> BaseAlgorithm:
    """``algorithm`` on ``env`` with ``policies[0]`` for a Dict space, else ``policies[1]``."""
    space = env.observation_space
    return algorithm(
        policies[0] if isinstance(space, spaces.Dict) else policies[1],
        env,
        seed=seed,
        device=device,
        policy_kwargs=checked_policy_kwargs(kind, space, policy_kwargs),
        **hyperparams,
    )


def build_ppo(
    env: GymEnv,
    *,
    seed: int | None,
    device: th.device | str,
    policy_kwargs: dict[str, Any] | None,
    **hyperparams: Any,
) -> BaseAlgorithm:
    """SB3's memoryless ``PPO`` on ``env`` (``MultiInputPolicy`` for a Dict space)."""
    policies = ("MultiInputPolicy", "MlpPolicy")
    return _build(PPO, policies, "ppo", env, seed, device, policy_kwargs, hyperparams)


def build_lstm(
    env: GymEnv,
    *,
    seed: int | None,
    device: th.device | str,
    policy_kwargs: dict[str, Any] | None,
    **hyperparams: Any,
) -> BaseAlgorithm:
    """sb3-contrib's ``RecurrentPPO`` on ``env`` (``MultiInputLstmPolicy`` for a Dict space)."""
    policies = ("MultiInputLstmPolicy", "MlpLstmPolicy")
    return _build(RecurrentPPO, policies, "lstm", env, seed, device, policy_kwargs, hyperparams)


def policy_kwargs(config: Any) -> dict[str, Any]:
    """A baseline's ``policy_kwargs`` for ``config``: MiniGrid's symbolic view read at unit
    scale (:class:`FlatDictExtractor`), and the fields of the kind's own config sections
    (``lstm.*`` for the LSTM)."""
    kwargs: dict[str, Any] = {"features_extractor_kwargs": {"image_high": envs.IMAGE_CHANNEL_HIGH}}
    for section in spec(config.agent.kind).config_sections:
        kwargs.update(dataclasses.asdict(getattr(config, section)))
    return kwargs
