"""The thalamus agent kind: :class:`agents.ppo.ThalamusPPO` with
:class:`agents.policy.ThalamusPolicy`. Its registry entry is in :mod:`agents.registry`."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.type_aliases import GymEnv

from agents.ppo import ThalamusPPO

__all__ = ["build", "policy_kwargs"]


def build(
    env: GymEnv,
    *,
    seed: int | None,
    device: th.device | str,
    policy_kwargs: dict[str, Any] | None,
    **hyperparams: Any,
) -> BaseAlgorithm:
    """An untrained ThalamusPPO on ``env``."""
    return ThalamusPPO(
        "ThalamusPolicy", env, seed=seed, device=device, policy_kwargs=policy_kwargs, **hyperparams
    )


def policy_kwargs(config: Any) -> dict[str, Any]:
    """``ThalamusPolicy`` arguments from ``config``: the ``thalamus`` (core) and ``tokenizer``
    sections as dicts, and the ``policy`` section's fields."""
    return {
        "thalamus": dataclasses.asdict(config.thalamus),
        "tokenizer": dataclasses.asdict(config.tokenizer),
        **dataclasses.asdict(config.policy),
    }
