"""One way to build every agent we compare, on the same wrapped envs.

``make_agent(kind, env, seed=..., device=..., **hyperparams)`` builds the agent of any kind in
:mod:`agents.registry` (``"thalamus"``: :class:`agents.ThalamusPPO`; ``"ppo"``: SB3's ``PPO``,
memoryless; ``"lstm"``: sb3-contrib's ``RecurrentPPO``) from one set of shared PPO
hyperparameters (:data:`SHARED_HYPERPARAMETERS`), so a comparison differs only in the agent.
"""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv

# Model zips saved before the baselines had their own module pickle their extractor as
# agents.factory.FlatDictExtractor (``--trust-pickle``): it must stay importable here.
from agents.baselines import THALAMUS_POLICY_KWARGS, FlatDictExtractor
from agents.registry import AGENT_KINDS, spec

__all__ = [
    "AGENT_KINDS",
    "SHARED_HYPERPARAMETERS",
    "THALAMUS_POLICY_KWARGS",
    "FlatDictExtractor",
    "make_agent",
]

#: PPO hyperparameters every agent accepts with the same meaning.
SHARED_HYPERPARAMETERS: tuple[str, ...] = (
    "learning_rate",
    "n_steps",
    "batch_size",
    "n_epochs",
    "gamma",
    "gae_lambda",
    "clip_range",
    "ent_coef",
    "vf_coef",
    "max_grad_norm",
)


def make_agent(
    kind: str,
    env: GymEnv,
    seed: int | None = None,
    device: th.device | str = "auto",
    policy_kwargs: dict[str, Any] | None = None,
    torch_threads: int | None = None,
    **hyperparams: Any,
) -> BaseAlgorithm:
    """Build an agent of ``kind`` on ``env`` with shared PPO hyperparameters.

    :param kind: a kind of :mod:`agents.registry`: ``"thalamus"`` (:class:`agents.ThalamusPPO`),
        ``"ppo"`` (SB3 ``PPO``, memoryless) or ``"lstm"`` (sb3-contrib ``RecurrentPPO``).
    :param env: the (vectorised) env, e.g. ``envs.make_vec_env(...)``.
    :param seed: random seed.
    :param device: torch device.
    :param policy_kwargs: policy arguments; ``thalamus=dict(...)`` (``ThalamusConfig`` fields)
        and ``tokenizer=dict(...)`` are for ``kind="thalamus"`` only.
    :param torch_threads: if given, ``torch.set_num_threads(torch_threads)`` (process-wide,
        so every agent of a comparison runs under the same setting). On a busy 2-core machine
        1 thread is fastest for these small models: more threads oversubscribe the cores.
    :param hyperparams: algorithm arguments: :data:`SHARED_HYPERPARAMETERS` mean the same for
        every kind; anything else (``verbose``, ``tensorboard_log``, ``clip_range_vf``,
        ``target_kl``, ...) is passed through to the algorithm's constructor.
    :return: the untrained algorithm.

    >>> import gymnasium as gym
    >>> agent = make_agent("ppo", gym.make("CartPole-v1"), seed=0, device="cpu", n_steps=64,
    ...                    batch_size=64)
    >>> type(agent).__name__, agent.n_steps
    ('PPO', 64)
    """
    _check_env(env)
    agent_spec = spec(kind)
    if torch_threads is not None:
        if torch_threads < 1:
            raise ValueError(f"torch_threads={torch_threads} must be >= 1 (or None to keep).")
        th.set_num_threads(torch_threads)
    return agent_spec.build_function()(
        env, seed=seed, device=device, policy_kwargs=policy_kwargs, **hyperparams
    )


def _check_env(env: GymEnv) -> spaces.Space:
    if isinstance(env, str):
        raise TypeError(
            "make_agent needs an env object (e.g. envs.make_vec_env(...)), not an id string, "
            "so that every agent runs on the same wrapped envs."
        )
    return env.observation_space
