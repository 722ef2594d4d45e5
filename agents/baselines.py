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
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.buffers import (
    RecurrentDictRolloutBuffer,
    RecurrentRolloutBuffer,
)
from sb3_contrib.common.recurrent.policies import (
    RecurrentActorCriticPolicy,
    RecurrentMultiInputActorCriticPolicy,
)
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import (
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.preprocessing import (
    get_flattened_obs_dim,
    get_obs_shape,
    is_image_space,
    is_image_space_channels_first,
    preprocess_obs,
)
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import GymEnv, TensorDict
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn

import envs
from agents.constants import INTRINSIC_DEFAULTS
from agents.intrinsic import (
    add_intrinsic_advantages,
    check_intrinsic_settings,
    clipped_value_loss,
    intrinsic_rewards_of,
    log_ppo_update,
)
from agents.registry import spec
from agents.tokenizer import symlog

__all__ = [
    "EXTRACTOR_SECTIONS",
    "OBS_NORM_EPSILON",
    "THALAMUS_POLICY_KWARGS",
    "FlatDictExtractor",
    "FoldObservationStatistics",
    "IntrinsicPPO",
    "IntrinsicRecurrentPPO",
    "IntrinsicValueHeadPolicy",
    "build_lstm",
    "checked_policy_kwargs",
    "build_ppo",
    "fold_observations",
    "normalizing_extractors",
    "policy_kwargs",
]

#: ``policy_kwargs`` keys that only the thalamus policy understands.
THALAMUS_POLICY_KWARGS: tuple[str, ...] = (
    "thalamus",
    "tokenizer",
    "core_lr_scale",
    "critic_trunk",
)

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
    policies: tuple[str | type[BasePolicy], str | type[BasePolicy]],
    kind: str,
    env: GymEnv,
    seed: int | None,
    device: th.device | str,
    policy_kwargs: dict[str, Any] | None,
    hyperparams: dict[str, Any],
) -> BaseAlgorithm:
    """``algorithm`` on ``env`` with ``policies[0]`` for a Dict space, else ``policies[1]``.

    :raises ValueError: ``intrinsic_*`` settings without ``intrinsic_value_head=True``.
    """
    space = env.observation_space
    if not hyperparams.pop("intrinsic_value_head", False):
        stray = sorted(key for key in hyperparams if key.startswith("intrinsic_"))
        if stray:
            raise ValueError(
                f"{', '.join(stray)} only apply with intrinsic_value_head=True "
                "(exploration.mixing = value_head); pass it, or drop them"
            )
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
    """SB3's memoryless ``PPO`` on ``env`` (``MultiInputPolicy`` for a Dict space);
    :class:`IntrinsicPPO` with ``intrinsic_value_head=True`` (``exploration.mixing =
    value_head``), whose ``intrinsic_*`` arguments only it takes."""
    if hyperparams.get("intrinsic_value_head"):
        policies: tuple[Any, Any] = (IntrinsicMultiInputPolicy, IntrinsicMlpPolicy)
        algorithm: type[BaseAlgorithm] = IntrinsicPPO
    else:
        policies, algorithm = ("MultiInputPolicy", "MlpPolicy"), PPO
    return _build(algorithm, policies, "ppo", env, seed, device, policy_kwargs, hyperparams)


def build_lstm(
    env: GymEnv,
    *,
    seed: int | None,
    device: th.device | str,
    policy_kwargs: dict[str, Any] | None,
    **hyperparams: Any,
) -> BaseAlgorithm:
    """sb3-contrib's ``RecurrentPPO`` on ``env`` (``MultiInputLstmPolicy`` for a Dict space);
    :class:`IntrinsicRecurrentPPO` with ``intrinsic_value_head=True`` (``exploration.mixing =
    value_head``), whose ``intrinsic_*`` arguments only it takes."""
    if hyperparams.get("intrinsic_value_head"):
        policies: tuple[Any, Any] = (IntrinsicMultiInputLstmPolicy, IntrinsicMlpLstmPolicy)
        algorithm: type[BaseAlgorithm] = IntrinsicRecurrentPPO
    else:
        policies, algorithm = ("MultiInputLstmPolicy", "MlpLstmPolicy"), RecurrentPPO
    return _build(algorithm, policies, "lstm", env, seed, device, policy_kwargs, hyperparams)


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


# --------------------------------------------------------------------------------------
# The intrinsic value head of the baselines (exploration.mixing = value_head)
# --------------------------------------------------------------------------------------


class IntrinsicValueHeadPolicy:
    """Mixin for SB3's and sb3-contrib's actor-critic policies: a second linear value head,
    ``intrinsic_value_net``, on the critic's latent beside ``value_net`` (:mod:`agents.intrinsic`).

    The head reads the very latent ``value_net`` reads in the policy's own forward passes (a
    forward hook on ``value_net`` records it), so every policy class (feed-forward, LSTM with a
    critic LSTM, shared or none) gets it without its passes being written again. The head is
    built, and initialised, on a forked random stream: every other parameter, and every
    action the agent then samples, draws what the policy without it would have drawn.
    """

    mlp_extractor: Any
    value_net: nn.Module
    ortho_init: bool
    intrinsic_value_net: nn.Linear

    def _build_mlp_extractor(self) -> None:
        super()._build_mlp_extractor()  # type: ignore[misc]
        with th.random.fork_rng(devices=[]):
            # Before the optimizer is built (it takes self.parameters() at the end of _build).
            self.intrinsic_value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
            if self.ortho_init:
                ActorCriticPolicy.init_weights(self.intrinsic_value_net, gain=1.0)

    def _with_critic_latent(self, run: Any) -> tuple[Any, th.Tensor]:
        """``run()``'s result and the intrinsic values ``[M]`` of the critic latent it fed
        to ``value_net``."""
        latents: list[th.Tensor] = []
        handle = self.value_net.register_forward_hook(
            lambda _module, inputs, _output: latents.append(inputs[0])
        )
        try:
            result = run()
        finally:
            handle.remove()
        return result, self.intrinsic_value_net(latents[-1]).flatten()

    def evaluate_actions_and_intrinsic(
        self, *args: Any
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor]:
        """``evaluate_actions(*args)`` (values, log-probs, entropy) and the intrinsic values
        ``[M]`` of the same observations."""
        (values, log_prob, entropy), intrinsic = self._with_critic_latent(
            lambda: self.evaluate_actions(*args)  # type: ignore[attr-defined]
        )
        return values, log_prob, entropy, intrinsic

    def predict_intrinsic_values(self, *args: Any) -> th.Tensor:
        """The intrinsic values ``[M]`` of ``predict_values(*args)``'s observations."""
        return self._with_critic_latent(lambda: self.predict_values(*args))[1]  # type: ignore[attr-defined]


class IntrinsicMlpPolicy(IntrinsicValueHeadPolicy, ActorCriticPolicy):
    """SB3's ``MlpPolicy`` with the intrinsic value head."""


class IntrinsicMultiInputPolicy(IntrinsicValueHeadPolicy, MultiInputActorCriticPolicy):
    """SB3's ``MultiInputPolicy`` with the intrinsic value head."""


class IntrinsicMlpLstmPolicy(IntrinsicValueHeadPolicy, RecurrentActorCriticPolicy):
    """sb3-contrib's ``MlpLstmPolicy`` with the intrinsic value head."""


class IntrinsicMultiInputLstmPolicy(IntrinsicValueHeadPolicy, RecurrentMultiInputActorCriticPolicy):
    """sb3-contrib's ``MultiInputLstmPolicy`` with the intrinsic value head."""


class IntrinsicSamples(NamedTuple):
    """A baseline buffer's minibatch and its intrinsic part, flat ``[M]`` as the minibatch's
    values are (padded like them for LSTM-PPO).

    :param samples: what the buffer's class yields without the head.
    :param old_intrinsic_values: the intrinsic values of the rollout.
    :param intrinsic_returns: the non-episodic intrinsic returns.
    """

    samples: Any
    old_intrinsic_values: th.Tensor
    intrinsic_returns: th.Tensor


class IntrinsicBufferMixin:
    """Mixin for SB3's ``DictRolloutBuffer`` / ``RolloutBuffer`` and sb3-contrib's recurrent
    ones: ``[n_steps, n_envs]`` arrays ``intrinsic_rewards``, ``intrinsic_values``,
    ``intrinsic_returns`` and ``intrinsic_advantages`` beside the buffer's own, and minibatches
    that carry their intrinsic part (:class:`IntrinsicSamples`)."""

    buffer_size: int
    n_envs: int
    generator_ready: bool
    intrinsic_rewards: np.ndarray
    intrinsic_values: np.ndarray
    intrinsic_returns: np.ndarray
    intrinsic_advantages: np.ndarray

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        shape = (self.buffer_size, self.n_envs)
        for name in INTRINSIC_ARRAYS:
            setattr(self, name, np.zeros(shape, dtype=np.float32))
        self._flat_intrinsic: dict[str, np.ndarray] = {}

    def get(self, batch_size: int | None = None) -> Generator[IntrinsicSamples, None, None]:
        if not self.generator_ready:  # laid out as the parent lays out its own arrays
            self._flat_intrinsic = {
                name: self.swap_and_flatten(getattr(self, name))  # type: ignore[attr-defined]
                for name in ("intrinsic_values", "intrinsic_returns")
            }
        yield from super().get(batch_size)  # type: ignore[misc]

    def _get_samples(self, batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> IntrinsicSamples:
        samples = super()._get_samples(batch_inds, *args, **kwargs)  # type: ignore[misc]
        recurrent = isinstance(self, RecurrentDictRolloutBuffer | RecurrentRolloutBuffer)

        def pick(array: np.ndarray) -> th.Tensor:
            if recurrent:  # padded as the parent's _get_samples just padded this minibatch
                return self.pad_and_flatten(array)  # type: ignore[attr-defined]
            return self.to_torch(array.flatten())  # type: ignore[attr-defined]

        flat = self._flat_intrinsic
        return IntrinsicSamples(
            samples,
            pick(flat["intrinsic_values"][batch_inds]),
            pick(flat["intrinsic_returns"][batch_inds]),
        )


#: The intrinsic arrays of :class:`IntrinsicBufferMixin` (and of ``ThalamusRolloutBuffer``).
INTRINSIC_ARRAYS = (
    "intrinsic_rewards",
    "intrinsic_values",
    "intrinsic_returns",
    "intrinsic_advantages",
)


class IntrinsicDictRolloutBuffer(IntrinsicBufferMixin, DictRolloutBuffer):
    """SB3's ``DictRolloutBuffer`` with the intrinsic arrays."""


class IntrinsicRolloutBuffer(IntrinsicBufferMixin, RolloutBuffer):
    """SB3's ``RolloutBuffer`` with the intrinsic arrays."""


class IntrinsicRecurrentDictRolloutBuffer(IntrinsicBufferMixin, RecurrentDictRolloutBuffer):
    """sb3-contrib's ``RecurrentDictRolloutBuffer`` with the intrinsic arrays."""


class IntrinsicRecurrentRolloutBuffer(IntrinsicBufferMixin, RecurrentRolloutBuffer):
    """sb3-contrib's ``RecurrentRolloutBuffer`` with the intrinsic arrays."""


class IntrinsicValueAlgorithm:
    """Mixin for SB3's ``PPO`` and sb3-contrib's ``RecurrentPPO``: the exploration bonus learnt
    by the policy's intrinsic value head (:class:`IntrinsicValueHeadPolicy`) with non-episodic
    returns, its advantage mixed into the extrinsic one (:mod:`agents.intrinsic`).

    The rollout is SB3's, unchanged: each step's bonus is read from the infos SB3 hands to
    ``_update_info_buffer`` (once per step, just before the step is added to the buffer), and
    the intrinsic values are computed for the whole rollout when its update starts, from the
    observations (and, for the LSTM, the critic states) the buffer stored, with the parameters
    that acted, so they are the values the rollout would have computed. The update is SB3's
    PPO loss with the intrinsic value loss added under ``vf_coef`` (:meth:`train`).
    """

    policy: Any
    rollout_buffer: Any
    intrinsic_gamma: float
    intrinsic_adv_coef: float

    def __init__(
        self,
        *args: Any,
        intrinsic_gamma: float = INTRINSIC_DEFAULTS["intrinsic_gamma"],
        intrinsic_adv_coef: float = INTRINSIC_DEFAULTS["intrinsic_adv_coef"],
        **kwargs: Any,
    ) -> None:
        check_intrinsic_settings(intrinsic_gamma, intrinsic_adv_coef)
        self.intrinsic_gamma = float(intrinsic_gamma)
        self.intrinsic_adv_coef = float(intrinsic_adv_coef)
        super().__init__(*args, **kwargs)

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: Any = None) -> None:
        super()._update_info_buffer(infos, dones)  # type: ignore[misc]
        buffer = self.rollout_buffer
        buffer.intrinsic_rewards[buffer.pos] = intrinsic_rewards_of(infos)

    def rollout_critic_inputs(self) -> tuple[Any, ...]:
        """The arguments of the policy's ``predict_values`` that give the values of every
        step of the rollout in the buffer (``[n_steps * n_envs]``, step-major): what the
        rollout fed its critic, before the buffer's ``get`` reorders it."""
        raise NotImplementedError

    def next_critic_inputs(self) -> tuple[Any, ...]:
        """The arguments of the policy's ``predict_values`` for the observations after the
        rollout (``[n_envs]``)."""
        raise NotImplementedError

    def _rollout_intrinsic_values(self) -> tuple[np.ndarray, np.ndarray]:
        """``([n_steps, n_envs], [n_envs])``: the intrinsic values of the rollout's
        observations and of the observations after it."""
        buffer = self.rollout_buffer
        with th.no_grad():
            values = self.policy.predict_intrinsic_values(*self.rollout_critic_inputs())
            last = self.policy.predict_intrinsic_values(*self.next_critic_inputs())
        shape = (buffer.buffer_size, buffer.n_envs)
        return values.cpu().numpy().reshape(shape), last.cpu().numpy()

    def train(self) -> None:
        """Mix the intrinsic advantages in, then one PPO update with both value losses."""
        values, last_values = self._rollout_intrinsic_values()
        buffer = self.rollout_buffer
        buffer.intrinsic_values = values.astype(np.float32)
        add_intrinsic_advantages(
            buffer, last_values, self.intrinsic_gamma, self.gae_lambda, self.intrinsic_adv_coef
        )
        self._train_with_intrinsic_head()

    def _evaluate(self, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        """``(values, log_prob, entropy, intrinsic_values)`` of a minibatch."""
        raise NotImplementedError

    def _train_with_intrinsic_head(self) -> None:
        """SB3's ``PPO.train`` (and ``RecurrentPPO.train``, whose padded minibatches carry a
        ``mask``) with the intrinsic value loss added to the extrinsic one."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        progress = self._current_progress_remaining
        clip_range = self.clip_range(progress)
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(progress)
        entropy_losses: list[float] = []
        pg_losses: list[float] = []
        value_losses: list[float] = []
        intrinsic_value_losses: list[float] = []
        clip_fractions: list[float] = []
        approx_kl_divs: list[float] = []
        loss = th.zeros(())
        continue_training = True
        for _ in range(self.n_epochs):
            approx_kl_divs = []
            for batch in self.rollout_buffer.get(self.batch_size):
                data = batch.samples
                actions = data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = data.actions.long().flatten()
                mask = getattr(data, "mask", None)
                bool_mask = None if mask is None else mask > 1e-8
                keep = (lambda x: x) if bool_mask is None else (lambda x, m=bool_mask: x[m])
                values, log_prob, entropy, intrinsic = self._evaluate(data, actions)
                advantages = data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    kept = keep(advantages)
                    advantages = (advantages - kept.mean()) / (kept.std() + 1e-8)
                ratio = th.exp(log_prob - data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -keep(th.min(policy_loss_1, policy_loss_2)).mean()
                pg_losses.append(policy_loss.item())
                clip_fractions.append(keep((th.abs(ratio - 1) > clip_range).float()).mean().item())
                value_loss = clipped_value_loss(
                    values.flatten(), data.old_values, data.returns, clip_range_vf, bool_mask
                )
                value_losses.append(value_loss.item())
                intrinsic_value_loss = clipped_value_loss(
                    intrinsic,
                    batch.old_intrinsic_values,
                    batch.intrinsic_returns,
                    clip_range_vf,
                    bool_mask,
                )
                intrinsic_value_losses.append(intrinsic_value_loss.item())
                if entropy is None:
                    entropy_loss = -th.mean(-keep(log_prob))
                else:
                    entropy_loss = -th.mean(keep(entropy))
                entropy_losses.append(entropy_loss.item())
                loss = (
                    policy_loss
                    + self.ent_coef * entropy_loss
                    + self.vf_coef * (value_loss + intrinsic_value_loss)
                )
                with th.no_grad():
                    log_ratio = log_prob - data.old_log_prob
                    approx_kl_div = keep((th.exp(log_ratio) - 1) - log_ratio).mean().item()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break

        log_ppo_update(
            self,
            entropy_losses=entropy_losses,
            pg_losses=pg_losses,
            value_losses=value_losses,
            approx_kl_divs=approx_kl_divs,
            clip_fractions=clip_fractions,
            loss=loss,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            intrinsic_value_losses=intrinsic_value_losses,
        )


class IntrinsicPPO(IntrinsicValueAlgorithm, PPO):
    """SB3's ``PPO`` with the intrinsic value head (:class:`IntrinsicValueAlgorithm`): the
    ``ppo`` kind under ``exploration.mixing = value_head``.

    :param intrinsic_gamma: the discount of the intrinsic return.
    :param intrinsic_adv_coef: the policy trains on ``A_ext + intrinsic_adv_coef * A_int``.
    :param kwargs: ``PPO``'s arguments; ``policy`` an :class:`IntrinsicValueHeadPolicy`.
    """

    def _setup_model(self) -> None:
        if self.rollout_buffer_class is None:
            dict_space = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = (
                IntrinsicDictRolloutBuffer if dict_space else IntrinsicRolloutBuffer
            )
        super()._setup_model()
        if not isinstance(self.policy, IntrinsicValueHeadPolicy):
            raise TypeError(
                f"IntrinsicPPO needs a policy with the intrinsic value head, got "
                f"{type(self.policy).__name__}; use IntrinsicMultiInputPolicy"
            )

    def rollout_critic_inputs(self) -> tuple[Any, ...]:
        buffer = self.rollout_buffer
        observations = _flat_observations(buffer.observations, buffer.buffer_size * buffer.n_envs)
        return (obs_as_tensor(observations, self.device),)

    def next_critic_inputs(self) -> tuple[Any, ...]:
        return (obs_as_tensor(self._last_obs, self.device),)  # type: ignore[arg-type]

    def _evaluate(self, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        return self.policy.evaluate_actions_and_intrinsic(samples.observations, actions)


class IntrinsicRecurrentPPO(IntrinsicValueAlgorithm, RecurrentPPO):
    """sb3-contrib's ``RecurrentPPO`` with the intrinsic value head
    (:class:`IntrinsicValueAlgorithm`): the ``lstm`` kind under ``exploration.mixing =
    value_head``. The rollout's intrinsic values are computed one step per stored critic
    state, with its episode-start flag, as the rollout computed its values.

    :param intrinsic_gamma: the discount of the intrinsic return.
    :param intrinsic_adv_coef: the policy trains on ``A_ext + intrinsic_adv_coef * A_int``.
    :param kwargs: ``RecurrentPPO``'s arguments; ``policy`` an :class:`IntrinsicValueHeadPolicy`.
    """

    def _setup_model(self) -> None:
        super()._setup_model()
        if not isinstance(self.policy, IntrinsicValueHeadPolicy):
            raise TypeError(
                f"IntrinsicRecurrentPPO needs a policy with the intrinsic value head, got "
                f"{type(self.policy).__name__}; use IntrinsicMultiInputLstmPolicy"
            )
        old = self.rollout_buffer
        dict_space = isinstance(self.observation_space, spaces.Dict)
        buffer_class = (
            IntrinsicRecurrentDictRolloutBuffer if dict_space else IntrinsicRecurrentRolloutBuffer
        )
        self.rollout_buffer = buffer_class(
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]
            self.action_space,
            old.hidden_state_shape,
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
        )

    def rollout_critic_inputs(self) -> tuple[Any, ...]:
        """Every step as a sequence of one, from the critic state stored before it."""
        buffer = self.rollout_buffer
        n = buffer.buffer_size * buffer.n_envs
        device = self.device

        def states(array: np.ndarray) -> th.Tensor:  # [T, L, N, H] -> [L, T * N, H]
            flat = array.transpose(1, 0, 2, 3).reshape(array.shape[1], n, -1)
            return th.as_tensor(flat, device=device)

        return (
            obs_as_tensor(_flat_observations(buffer.observations, n), device),
            (states(buffer.hidden_states_vf), states(buffer.cell_states_vf)),
            th.as_tensor(buffer.episode_starts.reshape(-1), device=device).float(),
        )

    def next_critic_inputs(self) -> tuple[Any, ...]:
        starts = np.asarray(self._last_episode_starts)
        return (
            obs_as_tensor(self._last_obs, self.device),  # type: ignore[arg-type]
            self._last_lstm_states.vf,
            th.as_tensor(starts, device=self.device).float(),
        )

    def _evaluate(self, samples: Any, actions: th.Tensor) -> tuple[th.Tensor, ...]:
        return self.policy.evaluate_actions_and_intrinsic(
            samples.observations, actions, samples.lstm_states, samples.episode_starts
        )


def _flat_observations(observations: Any, n: int) -> Any:
    """A buffer's ``[T, N, ...]`` observations (a dict of them, or one array) as ``[T * N, ...]``,
    step-major."""
    if isinstance(observations, dict):
        return {key: value.reshape(n, *value.shape[2:]) for key, value in observations.items()}
    return observations.reshape(n, *observations.shape[2:])
