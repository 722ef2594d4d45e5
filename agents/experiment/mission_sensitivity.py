"""Mission sensitivity: success with each episode's own mission vs a mission from another episode.

An agent that reads its instruction loses success when shown another episode's mission (the
env still judges success by its own); one that ignores it keeps it. BabyAI's GoTo tasks
reward a sweep that faces object after object, so success alone cannot tell the two apart.

The shuffled missions are a seeded derangement of the episodes' own missions: every episode
is shown the mission of another episode, so the missions shown have the same distribution
as the true ones, and where it can the derangement also avoids showing an episode a mission
with the same text as its own (:func:`derange_missions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from agents.experiment.rollout import play_episode

__all__ = [
    "derange_missions",
    "find_mission_wrapper",
    "mission_sensitivity",
    "shuffled_mission_episodes",
]


def find_mission_wrapper(env: gym.Env) -> Any | None:
    """The env's :class:`envs.wrappers.MissionObservationWrapper` (None if it has none)."""
    from envs.wrappers import MissionObservationWrapper

    current: Any = env
    while current is not None:
        if isinstance(current, MissionObservationWrapper):
            return current
        current = getattr(current, "env", None)
    return None


def derange_missions(missions: Sequence[str], seed: int) -> tuple[list[int], int]:
    """A seeded permutation ``source`` of the episodes with no fixed point, such that episode
    ``i`` is shown ``missions[source[i]]``, which differs in text from ``missions[i]`` where
    the multiset of missions allows.

    A random cyclic permutation (Sattolo's algorithm: no episode keeps its own) is repaired
    by swaps: while episode ``i`` is shown its own text, its source is swapped with that of
    an episode ``j`` for which both then see another text.

    :param missions: each episode's own mission text.
    :param seed: seed of the permutation.
    :return: ``source`` and the number of episodes still shown their own text (non-zero only
        when one text fills more than half the episodes; all of them when there is one text).
    """
    n = len(missions)
    if n < 2:
        return list(range(n)), n
    rng = np.random.default_rng(seed)
    source = list(range(n))
    for i in range(n - 1, 0, -1):  # Sattolo: a uniformly random n-cycle
        j = int(rng.integers(0, i))
        source[i], source[j] = source[j], source[i]
    for i in range(n):
        if missions[source[i]] != missions[i]:
            continue
        for j in rng.permutation(n):
            j = int(j)
            if j == i:
                continue
            if (
                missions[source[j]] != missions[i]
                and missions[source[i]] != missions[j]
                and source[j] != i
                and source[i] != j
            ):
                source[i], source[j] = source[j], source[i]
                break
    same = sum(missions[source[i]] == missions[i] for i in range(n))
    return source, same


def shuffled_mission_episodes(
    model: Any,
    env: gym.Env,
    seeds: Sequence[int],
    missions: Sequence[str],
    deterministic: bool,
    shuffle_seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Replay the episodes reset with ``seeds``, each showing another episode's mission.

    :param model: a trained agent (any kind :func:`agents.experiment.rollout.play_episode` plays).
    :param env: a single env from ``envs.make_env`` whose own missions are shown (no
        ``mission=`` override); it is left as it was.
    :param seeds: the reset seed of each episode.
    :param missions: the mission each episode had (``env.unwrapped.mission`` after reset).
    :param deterministic: take the most likely action.
    :param shuffle_seed: seed of :func:`derange_missions`.
    :return: one ``{seed, mission, shown, reward, length, success}`` per episode, and a
        summary ``{episodes, success_rate, mean_reward, mean_length, distinct_missions,
        same_text}``.
    """
    wrapper = find_mission_wrapper(env)
    if wrapper is None:
        raise ValueError("the env has no MissionObservationWrapper: it shows no mission to shuffle")
    if wrapper.mission_override is not None:
        raise ValueError(
            f"the env already shows the fixed mission {wrapper.mission_override!r}; shuffle "
            "the episodes' own missions on an env made without mission="
        )
    if len(seeds) != len(missions):
        raise ValueError(f"{len(seeds)} seeds for {len(missions)} missions")
    source, same = derange_missions(missions, shuffle_seed)
    episodes = []
    try:
        for i, seed in enumerate(seeds):
            wrapper.mission_override = missions[source[i]]
            result = play_episode(model, env, deterministic=deterministic, seed=int(seed))
            own = env.unwrapped.mission  # type: ignore[attr-defined]
            if own != missions[i]:
                raise RuntimeError(
                    f"episode {i} (seed {seed}) reset to mission {own!r}, not the "
                    f"{missions[i]!r} it had before: the env's resets are not reproducible"
                )
            episodes.append(
                {
                    "seed": int(seed),
                    "mission": missions[i],
                    "shown": missions[source[i]],
                    "reward": result.episode_return,
                    "length": result.length,
                    "success": result.success,
                }
            )
    finally:
        wrapper.mission_override = None
    summary = {
        "episodes": len(episodes),
        "success_rate": float(np.mean([e["success"] for e in episodes])) if episodes else None,
        "mean_reward": float(np.mean([e["reward"] for e in episodes])) if episodes else None,
        "mean_length": float(np.mean([e["length"] for e in episodes])) if episodes else None,
        "distinct_missions": len(set(missions)),
        "same_text": same,
    }
    return episodes, summary


def mission_sensitivity(
    model: Any,
    env: gym.Env,
    n_episodes: int,
    seed: int,
    deterministic: bool,
    shuffle_seed: int | None = None,
) -> dict[str, Any] | None:
    """Success with the true missions and with shuffled ones, on the same episodes.

    Plays ``n_episodes`` (episode ``i`` reset with ``seed + i``) with their own missions,
    then again each showing another episode's (:func:`shuffled_mission_episodes`); torch's
    global RNG is seeded with ``seed`` before each play, so sampled actions repeat.

    :param model: a trained agent.
    :param env: a single env from ``envs.make_env`` (no ``mission=`` override).
    :param n_episodes: episodes per play.
    :param seed: episode seeds start here.
    :param deterministic: take the most likely action.
    :param shuffle_seed: seed of the derangement (default: ``seed``).
    :return: ``{"true": {success_rate, mean_reward, mean_length}, "shuffled": {...}, "episodes",
        "distinct_missions", "same_text", "drop"}`` (``drop`` = true minus shuffled success),
        or None when the env has no mission or the same mission in every episode (nothing
        to shuffle).
    """
    import torch as th

    if find_mission_wrapper(env) is None:
        return None
    seeds = [seed + i for i in range(n_episodes)]
    th.manual_seed(seed)
    true_runs = []
    missions = []
    for s in seeds:
        true_runs.append(play_episode(model, env, deterministic=deterministic, seed=s))
        missions.append(env.unwrapped.mission)  # type: ignore[attr-defined]
    if len(set(missions)) < 2:
        return None
    th.manual_seed(seed)
    _, shuffled = shuffled_mission_episodes(
        model, env, seeds, missions, deterministic, seed if shuffle_seed is None else shuffle_seed
    )
    true_success = float(np.mean([r.success for r in true_runs]))
    return {
        "episodes": n_episodes,
        "true": {
            "success_rate": true_success,
            "mean_reward": float(np.mean([r.episode_return for r in true_runs])),
            "mean_length": float(np.mean([r.length for r in true_runs])),
        },
        "shuffled": {
            "success_rate": shuffled["success_rate"],
            "mean_reward": shuffled["mean_reward"],
            "mean_length": shuffled["mean_length"],
        },
        "distinct_missions": shuffled["distinct_missions"],
        "same_text": shuffled["same_text"],
        "drop": true_success - shuffled["success_rate"],
    }
