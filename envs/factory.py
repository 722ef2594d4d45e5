"""The one place that builds MiniGrid/BabyAI envs for the agent: single envs and SB3 VecEnvs.

stable-baselines3 (and with it torch) is imported only inside :func:`make_vec_env`, so
``import envs`` stays light for code that needs single envs only.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Literal

import gymnasium as gym
from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel

from envs.registry import check_env_id
from envs.vocab import MissionVocabulary
from envs.wrappers import (
    MissionObservationWrapper,
    QuietLevelSamplingWrapper,
    RewardFeedbackWrapper,
    TrialWrapper,
)

if TYPE_CHECKING:
    from stable_baselines3.common.vec_env import VecEnv

__all__ = ["make_env", "make_vec_env", "VEC_ENV_KINDS"]

VEC_ENV_KINDS = ("dummy", "subproc")


def make_env(
    env_id: str,
    seed: int | None = None,
    render_mode: str | None = None,
    trial_episodes: int = 1,
    vocabulary: MissionVocabulary | None = None,
    mission: str | None = None,
    **env_kwargs: Any,
) -> gym.Env:
    """Build a fully wrapped MiniGrid/BabyAI env with the thalamus' observation.

    The observation is a ``gymnasium.spaces.Dict`` with the same keys for every env id and
    every ``trial_episodes``: ``image`` [7, 7, 3] uint8, ``direction``, ``mission`` [max_len]
    int64 word ids, ``prev_action``, ``prev_reward`` [1], ``episode_return`` [1],
    ``last_episode_return`` [1], ``trial_episode`` (see :mod:`envs.wrappers`).

    :param env_id: a registered MiniGrid or BabyAI env id, e.g. ``"MiniGrid-DoorKey-5x5-v0"``.
    :param seed: seed of the first ``reset()`` called without one, and of the action space;
        ``None`` for OS entropy.
    :param render_mode: passed to the env; ``"rgb_array"`` makes ``env.render()`` return the
        full grid [H, W, 3] uint8 with the agent's view highlighted.
    :param trial_episodes: attempts per Gymnasium episode on the same layout and mission
        (meta-RL trials); 1 for plain episodes.
    :param vocabulary: mission vocabulary; defaults to the shipped ``envs/vocab.json``.
    :param mission: show the agent this mission text instead of the env's own (see
        :class:`envs.wrappers.MissionObservationWrapper`); ``None``: the env's.
    :param env_kwargs: passed to ``gym.make`` (e.g. ``max_steps=100``).
    :raises ValueError: for an unknown env id (the message lists close matches), or a
        ``mission`` with words outside the vocabulary.

    >>> env = make_env("MiniGrid-DoorKey-5x5-v0", seed=0, trial_episodes=2)
    >>> obs, _ = env.reset()
    >>> sorted(obs)  # doctest: +NORMALIZE_WHITESPACE
    ['direction', 'episode_return', 'image', 'last_episode_return', 'mission', 'prev_action',
     'prev_reward', 'trial_episode']
    """
    check_env_id(env_id)
    try:
        env = gym.make(env_id, render_mode=render_mode, **env_kwargs)
    except TypeError as error:
        if not env_kwargs:  # the constructor's own error, not a rejected keyword
            raise
        raise TypeError(
            f"{env_id!r} rejected env_kwargs {sorted(env_kwargs)}: {error}. Pass only keyword "
            f"arguments of its constructor ({gym.registry[env_id].entry_point})."
        ) from error
    if isinstance(env.unwrapped, RoomGridLevel):
        env = QuietLevelSamplingWrapper(env)
    env = MissionObservationWrapper(env, vocabulary, mission=mission)
    env = RewardFeedbackWrapper(env)
    env = TrialWrapper(env, trial_episodes=trial_episodes, seed=seed)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def _make_monitored_env(
    env_id: str,
    rank: int,
    seed: int | None,
    monitor_dir: str | None,
    env_options: dict[str, Any],
) -> gym.Env:
    from stable_baselines3.common.monitor import Monitor

    env = make_env(env_id, seed=None if seed is None else seed + rank, **env_options)
    filename = None if monitor_dir is None else os.path.join(monitor_dir, str(rank))
    return Monitor(env, filename=filename, info_keywords=("is_success",))


def make_vec_env(
    env_id: str,
    n_envs: int = 1,
    seed: int | None = 0,
    vec_env: Literal["dummy", "subproc"] = "dummy",
    trial_episodes: int = 1,
    render_mode: str | None = None,
    monitor_dir: str | None = None,
    **env_kwargs: Any,
) -> VecEnv:
    """Build ``n_envs`` copies of :func:`make_env`, each in SB3's ``Monitor``, as an SB3 VecEnv.

    The Monitor records each episode's (each trial's) return, length and success; success
    (``info["is_success"]``, logged by SB3 as ``rollout/success_rate``) means the episode ended
    with a positive reward.

    :param env_id: a registered MiniGrid or BabyAI env id.
    :param n_envs: number of envs, >= 1.
    :param seed: env ``i`` is seeded with ``seed + i``; ``None`` for OS entropy.
    :param vec_env: ``"dummy"`` (all envs in this process) or ``"subproc"`` (one process each).
    :param trial_episodes: attempts per episode, see :class:`envs.wrappers.TrialWrapper`.
    :param render_mode: passed to every env.
    :param monitor_dir: if given, Monitor writes ``<monitor_dir>/<i>.monitor.csv``.
    :param env_kwargs: passed to ``gym.make`` of every env.

    >>> venv = make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=2, seed=0)
    >>> obs = venv.reset()
    >>> obs["mission"].shape[0], obs["image"].shape
    (2, (2, 7, 7, 3))
    >>> venv.close()
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    check_env_id(env_id)
    if vec_env not in VEC_ENV_KINDS:
        raise ValueError(f"vec_env must be one of {VEC_ENV_KINDS}, got {vec_env!r}")
    if not isinstance(n_envs, int) or n_envs < 1:
        raise ValueError(f"n_envs must be an int >= 1, got {n_envs!r}")
    if monitor_dir is not None:
        os.makedirs(monitor_dir, exist_ok=True)
    env_options = {"render_mode": render_mode, "trial_episodes": trial_episodes, **env_kwargs}
    env_fns = [
        functools.partial(_make_monitored_env, env_id, rank, seed, monitor_dir, env_options)
        for rank in range(n_envs)
    ]
    if vec_env == "subproc":
        return SubprocVecEnv(env_fns)
    return DummyVecEnv(env_fns)
