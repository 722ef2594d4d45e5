"""Steps per second of a raw MiniGrid env and of the fully wrapped :func:`envs.make_env` env.

Both run the same pre-drawn random actions in a single process, resetting at episode ends;
the two are measured in alternation, ``repeats`` times, and the median of each is reported
with their ratio (timings on a shared machine are noisy: compare ratios, not absolute rates)::

    .venv/bin/python -m envs.benchmark MiniGrid-DoorKey-5x5-v0 MiniGrid-MemoryS7-v0
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np

from envs.factory import make_env

__all__ = ["steps_per_second", "compare"]


def steps_per_second(env: gym.Env, actions: np.ndarray, seed: int = 0) -> float:
    """Time ``len(actions)`` steps of ``env`` (resetting at episode ends).

    :param env: the env to step.
    :param actions: ``[n_steps]`` actions to take.
    :param seed: seed of the first reset.
    :return: steps per second.
    """
    env.reset(seed=seed)
    step, reset = env.step, env.reset
    start = time.perf_counter()
    for action in actions:
        _, _, terminated, truncated, _ = step(action)
        if terminated or truncated:
            reset()
    return len(actions) / (time.perf_counter() - start)


def compare(env_id: str, n_steps: int = 20_000, repeats: int = 5) -> dict[str, float]:
    """Median steps/s of ``gym.make(env_id)`` and ``make_env(env_id)``, and wrapped / raw.

    :param env_id: a MiniGrid/BabyAI env id.
    :param n_steps: steps per measurement.
    :param repeats: measurements of each env, interleaved.
    """
    factories: dict[str, Callable[[], gym.Env]] = {
        "raw": lambda: gym.make(env_id),
        "wrapped": lambda: make_env(env_id),
    }
    envs = {name: factory() for name, factory in factories.items()}
    try:
        actions = np.random.default_rng(0).integers(envs["raw"].action_space.n, size=n_steps)
        rates: dict[str, list[float]] = {name: [] for name in envs}
        for env in envs.values():  # warm-up: first-step checks, caches
            steps_per_second(env, actions[:500])
        for _ in range(repeats):
            for name, env in envs.items():
                rates[name].append(steps_per_second(env, actions))
    finally:
        for env in envs.values():
            env.close()
    result = {name: statistics.median(values) for name, values in rates.items()}
    result["ratio"] = result["wrapped"] / result["raw"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "env_ids", nargs="*", default=["MiniGrid-DoorKey-5x5-v0", "MiniGrid-MemoryS7-v0"]
    )
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for env_id in args.env_ids:
        r = compare(env_id, args.steps, args.repeats)
        print(
            f"{env_id:32s} raw {r['raw']:8.0f} steps/s   wrapped {r['wrapped']:8.0f} steps/s   "
            f"wrapped/raw {r['ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
