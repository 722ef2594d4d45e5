"""Playing a trained agent one step at a time on a single (unvectorised) env.

A :class:`Stepper` holds the agent's recurrent state between steps (zeros at the first step
of an episode, which the caller flags) and returns, with each action, what a video or a
diagnosis can show of that step: the thalamus' output where the agent has one, and the
policy's features on request. The registry (:mod:`agents.registry`) names the stepper of each
agent kind; :func:`agents.experiment.rollout.play_episode` is the one loop that drives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm

from thalamus_rl import ThalamusOutput

__all__ = [
    "AgentStep",
    "FeedForwardStepper",
    "PredictStepper",
    "RecurrentStepper",
    "Stepper",
    "ThalamusStepper",
]


@dataclass
class AgentStep:
    """One step of an agent.

    :ivar action: the action for ``env.step``, shaped like ``env.action_space``.
    :ivar thalamus: the thalamus core's output for this step (batch of one), or None for
        agents without one.
    :ivar features: ``[F]`` the policy's features at this step (float64), when asked for.
    """

    action: np.ndarray
    thalamus: ThalamusOutput | None = None
    features: np.ndarray | None = None


class Stepper(Protocol):
    """Plays one model step by step; one stepper per env (it keeps the recurrent state)."""

    def act(
        self,
        obs: dict[str, np.ndarray],
        episode_start: bool,
        deterministic: bool,
        *,
        with_features: bool = False,
        advance: bool = True,
    ) -> AgentStep:
        """The action for ``obs``.

        :param obs: one observation of a single env (no batch dimension).
        :param episode_start: ``obs`` is the first of an episode (the state starts at zero).
        :param deterministic: take the most likely action.
        :param with_features: also return the policy's features.
        :param advance: keep the state this step produced (False: look without moving on,
            e.g. at the final observation of an episode).
        """
        ...


def _action(action: Any, env_shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(action).reshape(env_shape)


class ThalamusStepper:
    """Steps a :class:`agents.policy.ThalamusPolicy` through ``policy.act``, so each step
    carries the gate's selection and the stream weights."""

    def __init__(self, model: BaseAlgorithm) -> None:
        self.model = model
        self.policy = model.policy
        self.policy.set_training_mode(False)
        self.state: Any = None

    def act(
        self,
        obs: dict[str, np.ndarray],
        episode_start: bool,
        deterministic: bool,
        *,
        with_features: bool = False,
        advance: bool = True,
    ) -> AgentStep:
        obs_tensor, _ = self.policy.obs_to_tensor(obs)
        starts = th.as_tensor(np.array([episode_start]), device=self.policy.device)
        with th.no_grad():
            step = self.policy.act(obs_tensor, self.state, starts, deterministic, with_stats=False)
        if advance:
            self.state = step.state
        features = step.thalamus.features[0].cpu().numpy() if with_features else None
        action = _action(step.actions[0].cpu().numpy(), self.model.action_space.shape or ())
        return AgentStep(action, step.thalamus, features)


class PredictStepper:
    """Steps any SB3 algorithm through ``model.predict`` (with its recurrent state, if any)."""

    def __init__(self, model: BaseAlgorithm) -> None:
        self.model = model
        self.policy = model.policy
        self.policy.set_training_mode(False)
        self.state: Any = None

    def act(
        self,
        obs: dict[str, np.ndarray],
        episode_start: bool,
        deterministic: bool,
        *,
        with_features: bool = False,
        advance: bool = True,
    ) -> AgentStep:
        action, state = self.model.predict(
            obs,
            state=self.state,
            episode_start=np.array([episode_start]),
            deterministic=deterministic,
        )
        if advance:
            self.state = state
        features = self.features(obs, state) if with_features else None
        return AgentStep(_action(action, self.model.action_space.shape or ()), None, features)

    def features(self, obs: dict[str, np.ndarray], state: Any) -> np.ndarray:
        """``[F]`` the policy's features at ``obs`` (``state``: the state after the step)."""
        raise NotImplementedError(f"{type(self).__name__} has no features to show")


class FeedForwardStepper(PredictStepper):
    """SB3's memoryless ``PPO``: features are the actor's latent (its MLP's output)."""

    def features(self, obs: dict[str, np.ndarray], state: Any) -> np.ndarray:
        obs_tensor, _ = self.policy.obs_to_tensor(obs)
        with th.no_grad():
            latent = self.policy.extract_features(obs_tensor, self.policy.pi_features_extractor)
            return self.policy.mlp_extractor.forward_actor(latent)[0].cpu().numpy()


class RecurrentStepper(PredictStepper):
    """sb3-contrib's ``RecurrentPPO``: features are the actor LSTM's hidden state ``h``."""

    def features(self, obs: dict[str, np.ndarray], state: Any) -> np.ndarray:
        return np.asarray(state[0])[:, 0].reshape(-1)
