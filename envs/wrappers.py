"""Gymnasium wrappers that turn a MiniGrid/BabyAI env into the thalamus' observation.

Stacked by :func:`envs.make_env`, innermost first::

    MiniGrid env --> [QuietLevelSamplingWrapper] --> MissionObservationWrapper
        --> RewardFeedbackWrapper --> TrialWrapper

(the first only on BabyAI levels, whose layout generation prints to stdout).

The feedback wrapper sits *inside* the trial wrapper, so it sees every inner episode of a trial
as an episode of its own (its keys reset at each attempt), while the trial wrapper carries what
must survive an attempt (``last_episode_return``, ``trial_episode``).
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.vocab import MissionVocabulary, default_vocabulary, tokenize

__all__ = [
    "IMAGE_CHANNEL_HIGH",
    "declare_feedback_keys",
    "feedback_keys",
    "MissionObservationWrapper",
    "QuietLevelSamplingWrapper",
    "RewardFeedbackWrapper",
    "TrialWrapper",
]

ObsDict = dict[str, Any]

_REQUIRED_MINIGRID_KEYS = ("image", "direction", "mission")

IMAGE_CHANNEL_HIGH: tuple[int, int, int] = (10, 5, 2)
"""Largest value of each channel of MiniGrid's symbolic ``image`` (object index, colour index,
door state; ``minigrid.core.constants``). The space declares 0-255 (uint8), which is what
stable-baselines3 divides by; a feature extractor that wants unit scale divides by these."""


_FEEDBACK_KEYS: dict[str, str] = {}  # key -> the wrapper that declared it


def declare_feedback_keys(wrapper: str, *keys: str) -> None:
    """Declare observation keys as reward-feedback signals: float Boxes the tokenizer
    concatenates into the FeedbackLayer's input
    (:func:`agents.tokenizer.classify_observation_space`).

    A wrapper that adds such a key declares it once, at import, beside its class; any other
    float Box in an observation is refused by the tokenizer instead of silently widening the
    feedback vector.

    :param wrapper: the declaring wrapper's name (named in errors).
    :param keys: the observation keys.
    :raises ValueError: a key is already declared by another wrapper.
    """
    for key in keys:
        owner = _FEEDBACK_KEYS.setdefault(key, wrapper)
        if owner != wrapper:
            raise ValueError(
                f"feedback key {key!r} is already declared by {owner}; {wrapper} must use "
                "another name"
            )


def feedback_keys() -> frozenset[str]:
    """Every declared reward-feedback observation key (:func:`declare_feedback_keys`).

    >>> sorted(feedback_keys())
    ['episode_return', 'last_episode_return', 'prev_reward']
    """
    return frozenset(_FEEDBACK_KEYS)


def _scalar_box() -> spaces.Box:
    return spaces.Box(low=-np.inf, high=np.inf, shape=(1,), dtype=np.float32)


def _dict_space(env: gym.Env, wrapper: str) -> spaces.Dict:
    space = env.observation_space
    if not isinstance(space, spaces.Dict):
        raise TypeError(
            f"{wrapper} needs a gymnasium.spaces.Dict observation space, got {space!r}; "
            f"wrap the env in MissionObservationWrapper first"
        )
    return space


def _add_keys(space: spaces.Dict, new: dict[str, spaces.Space], wrapper: str) -> spaces.Dict:
    clash = sorted(set(new) & set(space.spaces))
    if clash:
        raise ValueError(
            f"{wrapper} adds the observation keys {clash}, but the wrapped env already has them; "
            f"apply {wrapper} only once"
        )
    return spaces.Dict({**space.spaces, **new})


#: The lines BabyAI's ``RoomGridLevel._gen_grid`` prints for each layout it rejects and retries.
LEVEL_SAMPLING_MESSAGES = ("Sampling rejected:", "Timeout during mission generation:")


class QuietLevelSamplingWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Keeps BabyAI's layout-retry messages off stdout and counts them instead.

    BabyAI levels draw their layout and mission by rejection sampling and ``print`` one line per
    rejected draw (``Sampling rejected: unreachable object at (1, 6)``): thousands of lines
    over a training run (``docs/measurements.md``), which bury the training progress lines.
    ``reset()`` captures stdout, drops those lines, adds them up in ``rejected_samples``, and
    writes any other output through unchanged. Observations, rewards and seeding are untouched.

    :param env: any env; only its ``reset()`` output is filtered.

    >>> import gymnasium as gym
    >>> env = QuietLevelSamplingWrapper(gym.make("BabyAI-GoToLocal-v0"))
    >>> _ = [env.reset(seed=seed) for seed in range(50)]  # prints nothing
    >>> env.rejected_samples > 0
    True
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        #: Layout draws rejected (and retried) by the level since this wrapper was made.
        self.rejected_samples = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsDict, dict[str, Any]]:
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                return self.env.reset(seed=seed, options=options)
        finally:
            # In ``finally`` so that what the env printed before an exception is not lost.
            kept = []
            for line in captured.getvalue().splitlines(keepends=True):
                if line.startswith(LEVEL_SAMPLING_MESSAGES):
                    self.rejected_samples += 1
                else:
                    kept.append(line)
            if kept:
                sys.stdout.write("".join(kept))


class MissionObservationWrapper(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """MiniGrid's observation with the mission string replaced by fixed-length word ids.

    Observation space (a ``gymnasium.spaces.Dict``):

    * ``image``: ``Box(0, 255, [7, 7, 3], uint8)``, MiniGrid's symbolic egocentric view
      (object index, colour index, state), unchanged;
    * ``direction``: ``Discrete(4)``, the agent's heading, unchanged;
    * ``mission``: ``Box(0, vocab_size - 1, [max_len], int64)``, word ids from the versioned
      vocabulary (0 = padding, 1 = unknown word).

    The encoded mission is cached and only re-encoded when the mission text changes; every
    observation gets its own copy (Gymnasium requires returned data not to be shared).

    :param env: a MiniGrid or BabyAI env (observation with ``image``, ``direction``, ``mission``).
    :param vocabulary: the mission vocabulary; defaults to the one shipped in ``envs/vocab.json``.
    :param mission: show this text as the mission instead of the env's own (the env still
        judges success by its own): an evaluation of whether an agent follows its instruction.
    :raises ValueError: ``mission`` has a word outside the vocabulary.

    >>> import gymnasium as gym
    >>> env = MissionObservationWrapper(gym.make("MiniGrid-GoToDoor-5x5-v0"))
    >>> obs, _ = env.reset(seed=1)
    >>> sorted(obs)
    ['direction', 'image', 'mission']
    >>> obs["image"].shape, obs["mission"].dtype
    ((7, 7, 3), dtype('int64'))
    >>> env.unwrapped.mission, env.vocabulary.decode(obs["mission"])
    ('go to the purple door', 'go to the purple door')
    """

    def __init__(
        self,
        env: gym.Env,
        vocabulary: MissionVocabulary | None = None,
        mission: str | None = None,
    ) -> None:
        # Recorded so that ``env.spec`` can rebuild the stack; the vocabulary is shared, not copied.
        gym.utils.RecordConstructorArgs.__init__(
            self, vocabulary=vocabulary, mission=mission, _disable_deepcopy=True
        )
        gym.ObservationWrapper.__init__(self, env)
        space = _dict_space(env, "MissionObservationWrapper")
        missing = [key for key in _REQUIRED_MINIGRID_KEYS if key not in space.spaces]
        if missing:
            raise ValueError(
                f"MissionObservationWrapper needs MiniGrid's observation keys "
                f"{list(_REQUIRED_MINIGRID_KEYS)}; the env lacks {missing} (its keys: "
                f"{list(space.spaces)}). Is {env.spec.id if env.spec else env!r} a MiniGrid env?"
            )
        self.vocabulary = vocabulary if vocabulary is not None else default_vocabulary()
        self.observation_space = spaces.Dict(
            {
                "image": space["image"],
                "direction": space["direction"],
                "mission": spaces.Box(
                    low=0,
                    high=len(self.vocabulary) - 1,
                    shape=(self.vocabulary.max_len,),
                    dtype=np.int64,
                ),
            }
        )
        self._mission_text: str | None = None
        self._mission_ids = np.zeros(self.vocabulary.max_len, dtype=np.int64)
        self.mission_override = mission
        if mission is not None:
            unknown = [w for w in tokenize(mission) if w not in self.vocabulary.word_to_id]
            if unknown:
                raise ValueError(
                    f"mission {mission!r} has words outside the vocabulary: {unknown}; use the "
                    "words of this env's missions (envs/vocab.json)"
                )

    def observation(self, observation: ObsDict) -> ObsDict:
        """:param observation: MiniGrid's ``{"image", "direction", "mission": str}``."""
        mission = observation["mission"] if self.mission_override is None else self.mission_override
        if mission != self._mission_text:  # an identity check per step; encodes once per episode
            self._mission_ids = self.vocabulary.encode(mission)
            self._mission_text = mission
        return {
            "image": observation["image"],
            "direction": observation["direction"],
            "mission": self._mission_ids.copy(),
        }


class RewardFeedbackWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Adds what happened on the previous step of the current episode to the observation.

    New keys, all reset by ``reset()``:

    * ``prev_action``: ``Discrete(n_actions + 1)``, the previous action; ``n_actions`` ("none")
      at the first observation of an episode;
    * ``prev_reward``: ``Box(-inf, inf, [1], float32)``, the reward received for it (0 at start);
    * ``episode_return``: ``Box(-inf, inf, [1], float32)``, the sum of rewards so far this episode.

    :param env: an env with a ``Dict`` observation space and a ``Discrete`` action space.

    >>> import gymnasium as gym
    >>> env = RewardFeedbackWrapper(MissionObservationWrapper(gym.make("MiniGrid-Empty-5x5-v0")))
    >>> obs, _ = env.reset(seed=0)
    >>> int(obs["prev_action"]), float(obs["prev_reward"][0]), float(obs["episode_return"][0])
    (7, 0.0, 0.0)
    >>> obs, reward, *_ = env.step(2)  # forward
    >>> int(obs["prev_action"]), float(obs["prev_reward"][0])
    (2, 0.0)
    """

    def __init__(self, env: gym.Env) -> None:
        gym.utils.RecordConstructorArgs.__init__(self)
        gym.Wrapper.__init__(self, env)
        if not isinstance(env.action_space, spaces.Discrete) or env.action_space.start != 0:
            raise TypeError(
                f"RewardFeedbackWrapper needs a Discrete(n) action space starting at 0 (to encode "
                f"'no previous action' as n), got {env.action_space!r}"
            )
        self.n_actions = int(env.action_space.n)
        self.observation_space = _add_keys(
            _dict_space(env, "RewardFeedbackWrapper"),
            {
                "prev_action": spaces.Discrete(self.n_actions + 1),
                "prev_reward": _scalar_box(),
                "episode_return": _scalar_box(),
            },
            "RewardFeedbackWrapper",
        )
        self._episode_return = 0.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsDict, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode_return = 0.0
        return {
            **obs,
            "prev_action": self.n_actions,
            "prev_reward": np.zeros(1, dtype=np.float32),
            "episode_return": np.zeros(1, dtype=np.float32),
        }, info

    def step(self, action: Any) -> tuple[ObsDict, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        reward = float(reward)
        self._episode_return += reward
        return (
            {
                **obs,
                "prev_action": int(action),
                "prev_reward": np.array([reward], dtype=np.float32),
                "episode_return": np.array([self._episode_return], dtype=np.float32),
            },
            reward,
            terminated,
            truncated,
            info,
        )


declare_feedback_keys("RewardFeedbackWrapper", "prev_reward", "episode_return")


class TrialWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """One Gymnasium episode = a *trial* of ``trial_episodes`` attempts at the same task.

    Every attempt (inner episode) resets the wrapped env with the same seed, so layout and
    mission repeat and a policy with memory can improve from one attempt to the next. When an
    attempt ends before the last one, ``step`` returns the first observation of the next attempt
    (with the final reward of the finished one) and the trial goes on; the trial terminates
    (or is truncated) when the last attempt does. The trial's return is the sum of the attempts'.
    ``trial_episodes=1`` is a plain episode, and ``reset`` then passes its seed straight through.

    New observation keys:

    * ``last_episode_return``: ``Box(-inf, inf, [1], float32)``, the return of the previous
      attempt of this trial, 0 during the first;
    * ``trial_episode``: ``Discrete(trial_episodes)``, the index of the current attempt.

    ``info["is_success"]`` is set on the last step of the trial: True when it ended with a
    positive reward (what SB3's ``Monitor(info_keywords=("is_success",))`` and
    ``evaluate_policy`` read). When an attempt ends inside a trial, ``info["inner_episode"]``
    holds its ``return``, ``length``, ``is_success`` and ``terminated``.

    Seeding: ``reset(seed=s)`` runs the first trial on seed ``s`` and seeds the generator that
    draws the seeds of later trials (``reset()`` without a seed); without any seed, trial seeds
    come from fresh OS entropy.

    :param env: the env to repeat; for meta-RL with reward feedback, a
        :class:`RewardFeedbackWrapper` (so its keys reset at every attempt).
    :param trial_episodes: number of attempts per trial, >= 1.
    :param seed: seed used by the first ``reset()`` that is called without one (so that an env
        built with a seed is reproducible even when its user, e.g. an SB3 VecEnv, never seeds it).

    >>> import gymnasium as gym
    >>> inner = RewardFeedbackWrapper(MissionObservationWrapper(gym.make("MiniGrid-Empty-5x5-v0")))
    >>> env = TrialWrapper(inner, trial_episodes=2)
    >>> obs, _ = env.reset(seed=0)
    >>> int(obs["trial_episode"]), float(obs["last_episode_return"][0])
    (0, 0.0)
    >>> for action in [2, 2, 1, 2, 2]:  # forward, forward, turn right, forward, forward: goal
    ...     obs, reward, terminated, truncated, info = env.step(action)
    >>> int(obs["trial_episode"]), round(float(obs["last_episode_return"][0]), 3), terminated
    (1, 0.955, False)
    >>> int(obs["prev_action"]), info["inner_episode"]["is_success"]
    (7, True)
    """

    def __init__(self, env: gym.Env, trial_episodes: int = 1, seed: int | None = None) -> None:
        gym.utils.RecordConstructorArgs.__init__(self, trial_episodes=trial_episodes, seed=seed)
        gym.Wrapper.__init__(self, env)
        if not isinstance(trial_episodes, int | np.integer) or trial_episodes < 1:
            raise ValueError(f"trial_episodes must be an int >= 1, got {trial_episodes!r}")
        self.trial_episodes = int(trial_episodes)
        self.observation_space = _add_keys(
            _dict_space(env, "TrialWrapper"),
            {
                "last_episode_return": _scalar_box(),
                "trial_episode": spaces.Discrete(self.trial_episodes),
            },
            "TrialWrapper",
        )
        self._initial_seed = seed
        self._seed_rng: np.random.Generator | None = None
        self._layout_seed: int | None = None
        self._options: dict[str, Any] | None = None
        self._attempt = 0
        self._attempt_return = 0.0
        self._attempt_length = 0
        self._last_return = 0.0

    def _add_trial_keys(self, obs: ObsDict) -> ObsDict:
        return {
            **obs,
            "last_episode_return": np.array([self._last_return], dtype=np.float32),
            "trial_episode": self._attempt,
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsDict, dict[str, Any]]:
        if seed is None and self._initial_seed is not None:
            seed = self._initial_seed
        self._initial_seed = None
        if self.trial_episodes > 1:
            if seed is not None:
                self._seed_rng = np.random.default_rng(seed)
                self._layout_seed = int(seed)
            else:
                if self._seed_rng is None:
                    self._seed_rng = np.random.default_rng()
                self._layout_seed = int(self._seed_rng.integers(np.iinfo(np.int32).max))
            seed = self._layout_seed
        self._options = options
        self._attempt = 0
        self._attempt_return = 0.0
        self._attempt_length = 0
        self._last_return = 0.0
        obs, info = self.env.reset(seed=seed, options=options)
        return self._add_trial_keys(obs), info

    def step(self, action: Any) -> tuple[ObsDict, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._attempt_return += float(reward)
        self._attempt_length += 1
        if terminated or truncated:
            success = float(reward) > 0.0
            if self._attempt + 1 < self.trial_episodes:
                info = {
                    **info,
                    "inner_episode": {
                        "return": self._attempt_return,
                        "length": self._attempt_length,
                        "is_success": success,
                        "terminated": bool(terminated),
                    },
                }
                self._last_return = self._attempt_return
                self._attempt += 1
                self._attempt_return = 0.0
                self._attempt_length = 0
                obs, _ = self.env.reset(seed=self._layout_seed, options=self._options)
                terminated = truncated = False
            else:
                info = {**info, "is_success": success}
        return self._add_trial_keys(obs), reward, terminated, truncated, info


declare_feedback_keys("TrialWrapper", "last_episode_return")
