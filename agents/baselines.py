"""The baseline agent kinds: SB3's ``PPO`` (memoryless) and sb3-contrib's ``RecurrentPPO``
(LSTM), reading a Dict observation through :class:`FlatDictExtractor`.

SB3's default ``CombinedExtractor`` would put a NatureCNN on MiniGrid's 7x7 view, which is too
small for it; :class:`FlatDictExtractor` flattens every entry after SB3's preprocessing
(images scaled to ``[0, 1]``, ``Discrete`` one-hot) instead, and with ``baseline.normalize_obs``
standardises them with running statistics kept in the policy (SB3's ``VecNormalize``, inside
the model: :class:`FoldObservationStatistics` updates them between rollouts). Their registry
entries are in :mod:`agents.registry`.
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
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import (
    get_flattened_obs_dim,
    get_obs_shape,
    is_image_space,
    is_image_space_channels_first,
    preprocess_obs,
)
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import GymEnv, TensorDict
from torch import nn

import envs
from agents.registry import spec
from agents.tokenizer import symlog

__all__ = [
    "EXTRACTOR_SECTIONS",
    "OBS_NORM_EPSILON",
    "THALAMUS_POLICY_KWARGS",
    "FlatDictExtractor",
    "FoldObservationStatistics",
    "build_lstm",
    "checked_policy_kwargs",
    "build_ppo",
    "fold_observations",
    "normalizing_extractors",
    "policy_kwargs",
]

#: ``policy_kwargs`` keys that only the thalamus policy understands.
THALAMUS_POLICY_KWARGS: tuple[str, ...] = ("thalamus", "tokenizer", "core_lr_scale")

#: Config sections whose fields are :class:`FlatDictExtractor` arguments.
EXTRACTOR_SECTIONS: tuple[str, ...] = ("baseline",)

#: Added to the running variance under the square root of the standardisation (as SB3's
#: ``VecNormalize``): a feature constant so far maps to 0 instead of dividing by zero.
OBS_NORM_EPSILON = 1e-8


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

    With ``normalize_obs`` the unit-scale features are then standardised per feature with
    running statistics, as SB3's ``VecNormalize`` does to observations: ``clip((x - mean) /
    sqrt(var + eps), -obs_clip, obs_clip)``. The statistics (``obs_count``, ``obs_mean``,
    ``obs_var``, float64) are registered buffers: they are part of the policy's
    ``state_dict``, so a model file carries them and every path that runs the policy applies
    them. ``forward`` never changes them (the log-probs of a rollout must equal those its
    update recomputes); :class:`FoldObservationStatistics` folds each rollout's observations
    in after its update, through :meth:`update_obs_statistics`. Before the first fold (count
    0, mean 0, variance 1) the standardisation is the identity up to the clip.

    :param observation_space: a ``gymnasium.spaces.Dict`` without nested spaces.
    :param image_high: the largest value of each image channel (e.g.
        ``envs.IMAGE_CHANNEL_HIGH``); ``None`` keeps SB3's division by 255.
    :param normalize_obs: standardise the features with running statistics.
    :param obs_clip: with ``normalize_obs``, the standardised features are clipped to
        ``[-obs_clip, obs_clip]``.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        image_high: Sequence[float] | None = None,
        normalize_obs: bool = False,
        obs_clip: float = 10.0,
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
        if obs_clip <= 0:
            raise ValueError(f"obs_clip = {obs_clip} must be > 0")
        self.normalize_obs = bool(normalize_obs)
        self.obs_clip = float(obs_clip)
        if self.normalize_obs:
            # Count 0, mean 0, variance 1: the identity until the first fold. float64, so that
            # millions of folded steps do not lose the mean to rounding.
            self.register_buffer("obs_count", th.zeros((), dtype=th.float64))
            self.register_buffer("obs_mean", th.zeros(features_dim, dtype=th.float64))
            self.register_buffer("obs_var", th.ones(features_dim, dtype=th.float64))

    def forward(self, observations: TensorDict) -> th.Tensor:
        """``[B, features_dim]`` from a dict of preprocessed ``[B, ...]`` tensors: the unit-scale
        features, standardised if ``normalize_obs`` (statistics read, never changed)."""
        x = self.unit_features(observations)
        if not self.normalize_obs:
            return x
        mean = self.obs_mean.to(x.dtype)
        std = th.sqrt(self.obs_var + OBS_NORM_EPSILON).to(x.dtype)
        return ((x - mean) / std).clamp(-self.obs_clip, self.obs_clip)

    @th.no_grad()
    def update_obs_statistics(self, features: th.Tensor) -> None:
        """Fold a batch of unit-scale features (``[N, features_dim]``, :meth:`unit_features`)
        into the running count, mean and (population) variance: the parallel merge of Chan et
        al., in float64, so the result equals the mean and variance over every row folded so
        far, whatever the batches were.

        :raises RuntimeError: the extractor was built without ``normalize_obs``.
        """
        if not self.normalize_obs:
            raise RuntimeError("update_obs_statistics needs FlatDictExtractor(normalize_obs=True)")
        x = features.detach().to(device=self.obs_mean.device, dtype=th.float64)
        x = x.reshape(-1, self.features_dim)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        batch_var = x.var(dim=0, unbiased=False)
        count = self.obs_count
        total = count + n
        delta = batch_mean - self.obs_mean
        m2 = self.obs_var * count + batch_var * n + delta.square() * count * n / total
        self.obs_mean.add_(delta * n / total)
        self.obs_var.copy_(m2 / total)
        self.obs_count.copy_(total)

    def unit_features(self, observations: TensorDict) -> th.Tensor:
        """``[B, features_dim]``: every entry flattened and at unit scale, not standardised."""
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


def normalizing_extractors(policy: nn.Module) -> list[FlatDictExtractor]:
    """The distinct :class:`FlatDictExtractor` modules of ``policy`` built with
    ``normalize_obs`` (one when actor and critic share their extractor, SB3's default)."""
    return [m for m in policy.modules() if isinstance(m, FlatDictExtractor) and m.normalize_obs]


@th.no_grad()
def fold_observations(policy: BasePolicy, observations: dict[str, np.ndarray]) -> int:
    """Fold a rollout buffer's observations into every normalizing extractor of ``policy``.

    :param observations: ``{key: [..., *obs_shape]}`` as SB3's ``DictRolloutBuffer`` holds them
        (``[n_steps, n_envs, ...]`` while collecting, ``[n_steps * n_envs, ...]`` once its
        ``get`` ran; before SB3's preprocessing, which this applies as the update does).
    :return: the number of observations folded in.
    """
    extractors = normalizing_extractors(policy)
    if not extractors:
        return 0
    space = policy.observation_space
    tensors = {
        key: th.as_tensor(
            np.asarray(value).reshape(-1, *get_obs_shape(space[key])), device=policy.device
        )
        for key, value in observations.items()
    }
    preprocessed = preprocess_obs(
        tensors, policy.observation_space, normalize_images=policy.normalize_images
    )
    for extractor in extractors:
        extractor.update_obs_statistics(extractor.unit_features(preprocessed))
    return next(iter(tensors.values())).shape[0]


class FoldObservationStatistics(BaseCallback):
    """Fold each rollout's observations into the policy's running observation statistics
    (:class:`FlatDictExtractor` with ``normalize_obs``) after the rollout's update.

    SB3 calls ``on_rollout_end`` after collecting and before the update, and ``on_rollout_start``
    after the update (at the next rollout). The rollout's observations are kept at
    ``on_rollout_end`` (the buffer's arrays: its reset allocates new ones) and folded at the
    next ``on_rollout_start``, so the statistics stay fixed from the start of a rollout to the
    end of its update, and the log-probs PPO stored while collecting are the ones its update
    recomputes. The statistics therefore lag by one rollout (``VecNormalize`` folds each step
    in before the policy sees it).

    The last rollout of a ``learn`` call is folded when training ends (after its update), so
    a final model or end checkpoint holds what the next rollout would have used, like any
    periodic checkpoint, and a run resumed from it folds exactly the observations an
    uninterrupted run would have. A rollout a stop interrupts is discarded unfolded (SB3 does
    not train on it). Put this callback before
    :class:`agents.experiment.callbacks.PeriodicCheckpoint`: both act at a rollout start and
    at the training end, and the checkpoint must hold the folded statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, np.ndarray] | None = None
        self.folded = 0  # observations folded in by this callback (for tests and logs)

    def _on_training_start(self) -> None:
        self._pending = None

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self._pending = dict(self.model.rollout_buffer.observations)

    def _on_training_end(self) -> None:
        self._on_rollout_start()

    def _on_rollout_start(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.folded += fold_observations(self.model.policy, pending)
            extractors = normalizing_extractors(self.model.policy)
            if extractors:
                self.logger.record("obs_norm/count", float(extractors[0].obs_count))


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
    scale (:class:`FlatDictExtractor`) and standardised as ``baseline.*`` says, and the fields
    of the kind's other config sections (``lstm.*`` for the LSTM)."""
    extractor = {"image_high": envs.IMAGE_CHANNEL_HIGH}
    kwargs: dict[str, Any] = {"features_extractor_kwargs": extractor}
    for section in spec(config.agent.kind).config_sections:
        fields = dataclasses.asdict(getattr(config, section))
        (extractor if section in EXTRACTOR_SECTIONS else kwargs).update(fields)
    return kwargs
