"""The one episode loop: play a trained agent for one episode on a single env.

Evaluation (``scripts/evaluate.py``), the videos (:mod:`agents.experiment.video`), the mission
sensitivity test and the memory diagnosis (``scripts/diagnose_memory.py``) all play episodes
through :func:`play_episode`; what they see of each step they read through hooks. The agent
kind's specifics (how it steps, what it can show) come from its stepper
(:mod:`agents.stepping`, named by :mod:`agents.registry`), not from this loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.registry import spec_of_model
from agents.stepping import AgentStep, Stepper

__all__ = ["Episode", "StepHook", "play_episode"]


@dataclass
class Episode:
    """One played episode.

    :ivar episode_return: summed reward.
    :ivar length: steps taken.
    :ivar success: ``info["is_success"]`` at the end (False when the env does not say).
    :ivar terminated: the episode ended by termination (not by truncation or ``max_steps``).
    :ivar attempts: on a trial env (``trial_episodes`` >= 2, :class:`envs.TrialWrapper`),
        each attempt played, in order, as ``{"return", "length", "success"}``; empty for a
        plain episode.
    :ivar final_obs: the observation after the last step.
    :ivar last_step: the agent's last step (its features, if they were asked for).
    """

    episode_return: float = 0.0
    length: int = 0
    success: bool = False
    terminated: bool = False
    attempts: list[dict[str, Any]] = field(default_factory=list)
    final_obs: Any = None
    last_step: AgentStep | None = None


StepHook = Callable[[Episode, dict[str, np.ndarray], AgentStep], None]
"""Called at each step with the episode so far, the observation the agent acted on, and its
step, before the env steps (so the env still shows that observation: ``env.render()``)."""


def play_episode(
    model: BaseAlgorithm,
    env: gym.Env,
    *,
    deterministic: bool = True,
    seed: int | None = None,
    max_steps: int | None = None,
    with_features: bool = False,
    on_step: StepHook | None = None,
    stepper: Stepper | None = None,
) -> Episode:
    """Play one episode of ``model`` on a single (unvectorised) env.

    Actions come from the agent kind's stepper (:meth:`agents.registry.AgentSpec.make_stepper`);
    sampled actions (``deterministic=False``) draw from torch's global RNG, so seeding it
    repeats them.

    :param model: a trained agent of any registered kind.
    :param env: an env from ``envs.make_env``.
    :param deterministic: take the most likely action.
    :param seed: seed of the reset (``None``: continue the env's RNG).
    :param max_steps: stop after this many steps even if the episode has not ended.
    :param with_features: ask the stepper for the policy's features at each step.
    :param on_step: called before each ``env.step`` (:data:`StepHook`).
    :param stepper: the stepper to use (default: a fresh one of the model's kind).
    :return: the episode's return, length, success, attempts and final observation.
    """
    stepper = stepper if stepper is not None else spec_of_model(model).make_stepper(model)
    obs, info = env.reset(seed=seed)
    trial_space = getattr(env.observation_space, "spaces", {}).get("trial_episode")
    is_trial = trial_space is not None and int(trial_space.n) > 1
    episode = Episode()
    while True:
        step = stepper.act(obs, episode.length == 0, deterministic, with_features=with_features)
        episode.last_step = step
        if on_step is not None:
            on_step(episode, obs, step)
        obs, reward, terminated, truncated, info = env.step(step.action)
        episode.episode_return += float(reward)
        episode.length += 1
        if "inner_episode" in info:  # an attempt of a trial ended; the trial goes on
            inner = info["inner_episode"]
            episode.attempts.append(
                {
                    "return": float(inner["return"]),
                    "length": int(inner["length"]),
                    "success": bool(inner["is_success"]),
                }
            )
        if terminated or truncated or (max_steps is not None and episode.length >= max_steps):
            episode.terminated = bool(terminated)
            break
    episode.final_obs = obs
    episode.success = bool(info.get("is_success", False))
    if is_trial:  # the last attempt: what the earlier ones leave of the trial's totals
        episode.attempts.append(
            {
                "return": episode.episode_return - sum(a["return"] for a in episode.attempts),
                "length": episode.length - sum(a["length"] for a in episode.attempts),
                "success": episode.success,
            }
        )
    return episode
