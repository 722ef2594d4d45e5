"""Intrinsic exploration rewards, for every agent kind: VecEnv wrappers and their logger.

Two episodic bonuses on the view counts of the current episode, ``n`` being how many times
the new observation's key (the egocentric ``image`` and the ``direction``) has been seen in
the *current episode*, counting this time. After every step the algorithm sees

    episodic_count (EpisodicCountBonus):            reward = extrinsic + coef / sqrt(n)
    episodic_first_visit (EpisodicFirstVisitBonus): reward = extrinsic + coef * [n == 1]

The first is the episodic count of NGU and of E3B's MiniGrid comparisons. It pays on every
step (the sum over revisits diverges), so a ``coef`` large enough to matter also pays the
agent for staying alive (``docs/exploration.md``). The second is NovelD's episodic
restriction on its own (the lifelong novelty factor held at 1): a view pays ``coef`` once per
episode, revisits pay 0, so an episode's intrinsic return is ``coef`` times the number of
distinct views it reached (the first view of the episode is given, not found: it never pays),
bounded whatever the episode's length.

The counts are cleared whenever an episode starts: at ``reset()`` and at SB3's auto-reset,
whose first observation opens a fresh count. Turning around to see a view not yet seen in
this episode pays ``coef``.

The bonus is added outside the per-env ``Monitor`` (:func:`envs.make_vec_env`), so
``rollout/ep_rew_mean``, ``rollout/success_rate``, the reward-feedback observations
(``prev_reward``, ``episode_return``) and every evaluation stay extrinsic; only the reward
the algorithm trains on changes. Wrapping the training VecEnv (never the eval env) is what
makes it agent-agnostic: PPO, LSTM-PPO and ThalamusPPO all read rewards from their env.

With ``add_to_reward=False`` (``exploration.mixing = value_head``) the rewards pass through
unchanged and the bonus reaches the algorithm only through the infos: the algorithm learns it
with a value head of its own (:mod:`agents.intrinsic`).

Each step's bonus is in ``info["exploration_bonus"]`` (already times ``coef``); at the end
of an episode ``info["exploration_episode"]`` holds its intrinsic return ``r`` and length
``l``. :class:`ExplorationLogger` logs them as ``exploration/*``.

Resume: the counts are per-episode state and are not checkpointed. A resumed run builds new
envs and SB3 resets them before the first step, so every env starts a fresh episode with a
fresh count: nothing of an episode's count is lost mid-episode.

>>> import envs
>>> venv = EpisodicCountBonus(envs.make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=1), coef=0.1)
>>> _ = venv.reset()
>>> _, reward, _, info = venv.step(np.array([0]))  # turn left: a new view
>>> round(float(reward[0]), 6), round(info[0]["exploration_bonus"], 6)
(0.1, 0.1)
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from agents.constants import EXPLORATION_KINDS
from agents.schedules import decayed_coef  # defined here first: kept importable from here

__all__ = [
    "EXPLORATION_KINDS",
    "EpisodicCountBonus",
    "EpisodicFirstVisitBonus",
    "ExplorationLogger",
    "decayed_coef",
    "observation_key",
    "wrap_exploration",
]


BONUS_INFO_KEY = "exploration_bonus"
EPISODE_INFO_KEY = "exploration_episode"


def observation_key(obs: dict[str, Any]) -> bytes:
    """The count key of one env's observation: a digest of its ``image`` and ``direction``.

    :param obs: one env's Dict observation (``image`` [7, 7, 3] uint8, ``direction`` int).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(obs["image"]).tobytes())
    digest.update(np.asarray(obs["direction"], dtype=np.int64).tobytes())
    return digest.digest()


class EpisodicCountBonus(VecEnvWrapper):
    """Add ``coef / sqrt(n_episode(key(next_obs)))`` to each step's reward (module docstring).

    Subclasses change only :meth:`bonus_of_count`; the counting, the resets and the infos
    are shared.

    :param venv: the training VecEnv, Dict observations with ``image`` and ``direction``.
    :param coef: the bonus for a view seen for the first time in the episode, in reward units.
    :param add_to_reward: add the bonus to the reward (``exploration.mixing = reward``); False
        leaves the reward extrinsic and the bonus only in the infos (``value_head``).
    :raises ValueError: ``coef`` is negative or not finite, or the observations lack
        ``image`` / ``direction``.
    """

    def __init__(self, venv: VecEnv, coef: float, add_to_reward: bool = True) -> None:
        super().__init__(venv)
        if not (np.isfinite(coef) and coef >= 0):
            raise ValueError(
                f"coef = {coef!r} must be a finite number >= 0 (set exploration.coef, e.g. "
                "0.005; exploration.kind=none turns the bonus off)"
            )
        keys = getattr(venv.observation_space, "spaces", {})
        if "image" not in keys or "direction" not in keys:
            raise ValueError(
                f"{type(self).__name__} counts views: it needs Dict observations with 'image' "
                f"and 'direction' (envs.make_vec_env builds them), got {venv.observation_space}"
            )
        self.coef = float(coef)
        self.add_to_reward = bool(add_to_reward)
        self.counts: list[dict[bytes, int]] = [{} for _ in range(self.num_envs)]
        self.episode_bonus = np.zeros(self.num_envs, dtype=np.float64)
        self.episode_length = np.zeros(self.num_envs, dtype=np.int64)

    def _start_episode(self, env: int, first_obs: dict[str, Any]) -> None:
        self.counts[env] = {observation_key(first_obs): 1}
        self.episode_bonus[env] = 0.0
        self.episode_length[env] = 0

    def bonus_of_count(self, n: int) -> float:
        """The bonus (times ``coef``) of a view seen for the ``n``-th time in the episode."""
        return self.coef / float(np.sqrt(n))

    def _visit(self, env: int, obs: dict[str, Any]) -> float:
        """Count ``obs`` in env ``env``'s episode; its bonus (times ``coef``)."""
        key = observation_key(obs)
        n = self.counts[env].get(key, 0) + 1
        self.counts[env][key] = n
        return self.bonus_of_count(n)

    def reset(self) -> VecEnvObs:
        obs = self.venv.reset()
        for env in range(self.num_envs):
            self._start_episode(env, _env_obs(obs, env))
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, infos = self.venv.step_wait()
        bonus = np.zeros(self.num_envs, dtype=np.float32)
        for env in range(self.num_envs):
            # At an auto-reset ``obs`` is the next episode's first observation; the step
            # itself ended on ``terminal_observation``, counted in the episode it ends.
            reached = infos[env].get("terminal_observation") if dones[env] else None
            bonus[env] = self._visit(env, reached if reached is not None else _env_obs(obs, env))
            infos[env][BONUS_INFO_KEY] = float(bonus[env])
            self.episode_bonus[env] += bonus[env]
            self.episode_length[env] += 1
            if dones[env]:
                infos[env][EPISODE_INFO_KEY] = {
                    "r": float(self.episode_bonus[env]),
                    "l": int(self.episode_length[env]),
                }
                self._start_episode(env, _env_obs(obs, env))
        return obs, rewards + bonus if self.add_to_reward else rewards, dones, infos


class EpisodicFirstVisitBonus(EpisodicCountBonus):
    """Add ``coef`` to a step's reward when its new view is the first of its kind in the
    episode, 0 on a revisit (module docstring): an episode's intrinsic return is ``coef``
    times its distinct views less the first one, whatever its length.

    >>> import envs
    >>> venv = envs.make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=1)
    >>> venv = EpisodicFirstVisitBonus(venv, coef=0.1)
    >>> _ = venv.reset()
    >>> # Turn left 5 times: 3 new views, then the first view again, then the second.
    >>> [round(float(venv.step(np.array([0]))[1][0]), 6) for _ in range(5)]
    [0.1, 0.1, 0.1, 0.0, 0.0]
    """

    def bonus_of_count(self, n: int) -> float:
        return self.coef if n == 1 else 0.0


def _env_obs(obs: VecEnvObs, env: int) -> dict[str, Any]:
    """Env ``env``'s part of a batched Dict observation."""
    assert isinstance(obs, dict), "EpisodicCountBonus needs Dict observations"
    return {"image": obs["image"][env], "direction": obs["direction"][env]}


def wrap_exploration(venv: VecEnv, kind: str, coef: float, add_to_reward: bool = True) -> VecEnv:
    """``venv`` with the intrinsic reward ``kind`` (``none``: ``venv`` itself), added to the
    reward or, with ``add_to_reward=False``, only written to the infos.

    :raises ValueError: an unknown ``kind`` (the message lists :data:`EXPLORATION_KINDS`).
    """
    if kind == "none":
        return venv
    if kind == "episodic_count":
        return EpisodicCountBonus(venv, coef=coef, add_to_reward=add_to_reward)
    if kind == "episodic_first_visit":
        return EpisodicFirstVisitBonus(venv, coef=coef, add_to_reward=add_to_reward)
    raise ValueError(
        f"exploration kind {kind!r} is unknown; choose one of {', '.join(EXPLORATION_KINDS)}"
    )


class ExplorationLogger(BaseCallback):
    """Log the intrinsic reward apart from the extrinsic one, once per rollout, and set the
    bonus' coefficient for each rollout from the run's step count.

    ``exploration/intrinsic_mean``: the mean bonus per env step of the rollout (times
    ``coef``: what was added to the reward, or what the intrinsic value head learns);
    ``exploration/intrinsic_ep_return_mean``: the mean intrinsic return of the last 100
    finished episodes (``rollout/ep_rew_mean`` stays the extrinsic one); ``exploration/coef``.
    Reads the infos :class:`EpisodicCountBonus` and its subclasses write; logs nothing for an
    env without them.

    :param coef: the coefficient at step 0 (``None``: leave the wrapper's as it is).
    :param decay_steps: see :func:`agents.schedules.decayed_coef`. The coefficient follows
        ``model.num_timesteps``, which a resume restores, so a resumed run continues the decay.
    """

    def __init__(self, coef: float | None = None, decay_steps: int = 0) -> None:
        super().__init__()
        self.coef = coef
        self.decay_steps = decay_steps
        self.current_coef: float | None = None
        self.rollout_sum = 0.0
        self.rollout_steps = 0
        self.episode_returns: deque[float] = deque(maxlen=100)

    def _on_rollout_start(self) -> None:
        self.rollout_sum = 0.0
        self.rollout_steps = 0
        if self.coef is None:
            return
        coef = decayed_coef(self.coef, self.decay_steps, self.num_timesteps)
        venv: Any = self.training_env
        while isinstance(venv, VecEnvWrapper):
            if isinstance(venv, EpisodicCountBonus):
                venv.coef = coef
            venv = venv.venv
        self.current_coef = coef

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            if BONUS_INFO_KEY in info:
                self.rollout_sum += info[BONUS_INFO_KEY]
                self.rollout_steps += 1
            if EPISODE_INFO_KEY in info:
                self.episode_returns.append(info[EPISODE_INFO_KEY]["r"])
        return True

    def _on_rollout_end(self) -> None:
        # Recorded here, not at rollout start: an evaluation inside the rollout dumps the log.
        if self.current_coef is not None:
            self.logger.record("exploration/coef", self.current_coef)
        if self.rollout_steps:
            self.logger.record("exploration/intrinsic_mean", self.rollout_sum / self.rollout_steps)
        if self.episode_returns:
            self.logger.record(
                "exploration/intrinsic_ep_return_mean", float(np.mean(self.episode_returns))
            )
