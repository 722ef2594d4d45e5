"""Rollout buffer for recurrent PPO whose minibatches are whole env columns.

The buffer keeps, for ``n_steps`` steps of ``n_envs`` envs, the observation dicts (as torch
tensors in their natural dtypes, on the training device), actions, rewards, episode starts,
values and log-probabilities, plus the recurrent state of every env at the *start* of the rollout.
Returns and advantages are SB3's GAE (:meth:`RolloutBuffer.compute_returns_and_advantage`,
inherited unchanged). :meth:`ThalamusRolloutBuffer.get` yields minibatches made of a random subset
of env columns, each with its full ``n_steps`` sequence and its stored start state, so the policy
re-runs them with the resets inside the scan (DESIGN rule 6; CleanRL's ``ppo_atari_lstm`` scheme,
no padding).

With the intrinsic value head (``exploration.mixing = value_head``) it also keeps each step's
intrinsic reward and intrinsic value; :func:`agents.intrinsic.add_intrinsic_advantages` fills
in the intrinsic returns and mixes the intrinsic advantages into ``advantages``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer, RolloutBuffer

from agents.constants import check_batch_size
from agents.policy import PolicyState

__all__ = ["ThalamusRolloutBuffer", "ThalamusRolloutBufferSamples", "check_batch_size"]


class ThalamusRolloutBufferSamples(NamedTuple):
    """One minibatch of ``B`` env columns, each a full sequence of ``T = n_steps`` steps.

    :param observations: one tensor per key, ``[B, T, *space.shape]``.
    :param actions: ``[B, T]`` long for ``Discrete`` actions, else ``[B, T, action_dim]``.
    :param old_values: ``[B, T]`` values computed during the rollout.
    :param old_log_prob: ``[B, T]`` log-probabilities of the actions during the rollout.
    :param advantages: ``[B, T]`` GAE advantages.
    :param returns: ``[B, T]`` TD(lambda) returns (``advantages + old_values``).
    :param episode_starts: ``[B, T]`` bool, True where the observation starts an episode.
    :param state: the recurrent state of the ``B`` envs at the start of the rollout (both
        cores' with a separate critic trunk).
    :param old_intrinsic_values: ``[B, T]`` intrinsic values computed during the rollout (zeros
        without the intrinsic head).
    :param intrinsic_returns: ``[B, T]`` non-episodic intrinsic TD(lambda) returns (zeros
        without the intrinsic head).
    """

    observations: dict[str, th.Tensor]
    actions: th.Tensor
    old_values: th.Tensor
    old_log_prob: th.Tensor
    advantages: th.Tensor
    returns: th.Tensor
    episode_starts: th.Tensor
    state: PolicyState
    old_intrinsic_values: th.Tensor | None = None
    intrinsic_returns: th.Tensor | None = None


def _torch_dtype(space: spaces.Space) -> th.dtype:
    if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        return th.long
    return th.from_numpy(np.zeros((), dtype=space.dtype)).dtype


class ThalamusRolloutBuffer(RolloutBuffer):
    """Rollout buffer for :class:`agents.ThalamusPPO`.

    :param buffer_size: ``n_steps``, steps per env per rollout.
    :param observation_space: a ``gymnasium.spaces.Dict`` observation space.
    :param action_space: the action space.
    :param device: where the observations and minibatches live.
    :param gae_lambda: GAE lambda.
    :param gamma: discount factor.
    :param n_envs: number of envs.
    """

    observations: dict[str, th.Tensor]  # type: ignore[assignment]
    initial_state: PolicyState | None

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        gae_lambda: float = 1,
        gamma: float = 0.99,
        n_envs: int = 1,
    ) -> None:
        if not isinstance(observation_space, spaces.Dict):
            raise TypeError(
                f"ThalamusRolloutBuffer needs a Dict observation space, got {observation_space}."
            )
        self.initial_state = None
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device=device,
            gae_lambda=gae_lambda,
            gamma=gamma,
            n_envs=n_envs,
        )

    def reset(self, initial_state: PolicyState | None = None) -> None:
        """Empty the buffer and remember the state the coming rollout starts from.

        :param initial_state: the recurrent state of the ``n_envs`` envs before the first step.
        """
        assert isinstance(self.observation_space, spaces.Dict)
        self.observations = {
            key: th.zeros(
                (self.buffer_size, self.n_envs, *space.shape),
                dtype=_torch_dtype(space),
                device=self.device,
            )
            for key, space in self.observation_space.spaces.items()
        }
        shape = (self.buffer_size, self.n_envs)
        self.actions = np.zeros((*shape, self.action_dim), dtype=np.float32)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)
        self.episode_starts = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.log_probs = np.zeros(shape, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        self.intrinsic_rewards = np.zeros(shape, dtype=np.float32)
        self.intrinsic_values = np.zeros(shape, dtype=np.float32)
        self.intrinsic_returns = np.zeros(shape, dtype=np.float32)
        self.intrinsic_advantages = np.zeros(shape, dtype=np.float32)
        self.initial_state = None if initial_state is None else initial_state.detach()
        self.generator_ready = False
        BaseBuffer.reset(self)

    def add(  # type: ignore[override]
        self,
        obs: dict[str, th.Tensor],
        action: np.ndarray,
        reward: np.ndarray,
        episode_start: np.ndarray,
        value: th.Tensor,
        log_prob: th.Tensor,
        intrinsic_reward: np.ndarray | None = None,
        intrinsic_value: th.Tensor | None = None,
    ) -> None:
        """Store one step of all envs.

        :param obs: one tensor per key, ``[n_envs, *space.shape]`` (what the policy was fed).
        :param action: ``[n_envs]`` or ``[n_envs, action_dim]`` actions taken.
        :param reward: ``[n_envs]`` rewards (truncation bootstrap already added).
        :param episode_start: ``[n_envs]`` True where ``obs`` starts an episode.
        :param value: ``[n_envs]`` or ``[n_envs, 1]`` values of ``obs``.
        :param log_prob: ``[n_envs]`` log-probabilities of ``action``.
        :param intrinsic_reward: ``[n_envs]`` this step's intrinsic rewards (intrinsic head).
        :param intrinsic_value: ``[n_envs]`` intrinsic values of ``obs`` (intrinsic head).
        """
        if self.full:
            raise RuntimeError(
                f"ThalamusRolloutBuffer is full ({self.buffer_size} steps); call reset() first."
            )
        for key, storage in self.observations.items():
            storage[self.pos].copy_(obs[key].reshape(storage.shape[1:]))
        self.actions[self.pos] = np.asarray(action).reshape(self.n_envs, self.action_dim)
        self.rewards[self.pos] = reward
        self.episode_starts[self.pos] = episode_start
        self.values[self.pos] = value.detach().cpu().numpy().reshape(self.n_envs)
        self.log_probs[self.pos] = log_prob.detach().cpu().numpy().reshape(self.n_envs)
        if intrinsic_reward is not None:
            self.intrinsic_rewards[self.pos] = intrinsic_reward
        if intrinsic_value is not None:
            intrinsic = intrinsic_value.detach().cpu().numpy().reshape(self.n_envs)
            self.intrinsic_values[self.pos] = intrinsic
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True

    def _prepare(self) -> None:
        """Lay every array out env-major (``[n_envs, T, ...]``) on the device, once per rollout."""
        self._env_major = {
            key: x.transpose(0, 1).contiguous() for key, x in self.observations.items()
        }
        actions = th.as_tensor(self.actions.swapaxes(0, 1), device=self.device)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.squeeze(-1).long()
        self._env_major_actions = actions.contiguous()
        self._env_major_arrays = {
            name: th.as_tensor(getattr(self, name).swapaxes(0, 1), device=self.device).contiguous()
            for name in (
                "values",
                "log_probs",
                "advantages",
                "returns",
                "episode_starts",
                "intrinsic_values",
                "intrinsic_returns",
            )
        }
        self.generator_ready = True

    def get(  # type: ignore[override]
        self, batch_size: int | None = None
    ) -> Generator[ThalamusRolloutBufferSamples, None, None]:
        """Yield minibatches of whole env columns in a random order, covering every env once.

        :param batch_size: env steps per minibatch, a multiple of ``n_steps`` (``None``: all).
            When ``n_envs`` is not a multiple of ``batch_size // n_steps`` the last minibatch
            is smaller.
        """
        if not self.full:
            raise RuntimeError(
                f"ThalamusRolloutBuffer.get() before the rollout is complete "
                f"({self.pos}/{self.buffer_size} steps)."
            )
        if self.initial_state is None:
            raise RuntimeError(
                "ThalamusRolloutBuffer has no initial_state; pass the state at rollout start "
                "to reset(initial_state)."
            )
        if batch_size is None:
            batch_size = self.buffer_size * self.n_envs
        envs_per_batch = check_batch_size(batch_size, self.buffer_size, self.n_envs)
        if not self.generator_ready:
            self._prepare()
        order = th.randperm(self.n_envs, device=self.device)
        for start in range(0, self.n_envs, envs_per_batch):
            yield self._get_samples(order[start : start + envs_per_batch])

    def _get_samples(  # type: ignore[override]
        self, env_indices: th.Tensor, env: None = None
    ) -> ThalamusRolloutBufferSamples:
        """The minibatch of the env columns ``env_indices`` (``[B]`` long)."""
        arrays = self._env_major_arrays
        assert self.initial_state is not None
        return ThalamusRolloutBufferSamples(
            observations={key: x[env_indices] for key, x in self._env_major.items()},
            actions=self._env_major_actions[env_indices],
            old_values=arrays["values"][env_indices],
            old_log_prob=arrays["log_probs"][env_indices],
            advantages=arrays["advantages"][env_indices],
            returns=arrays["returns"][env_indices],
            episode_starts=arrays["episode_starts"][env_indices].bool(),
            state=self.initial_state.index(env_indices),
            old_intrinsic_values=arrays["intrinsic_values"][env_indices],
            intrinsic_returns=arrays["intrinsic_returns"][env_indices],
        )
