"""Which Gymnasium env ids are MiniGrid / BabyAI envs, and a helpful error for unknown ids."""

from __future__ import annotations

import difflib

import gymnasium as gym
import minigrid  # noqa: F401  (importing minigrid registers its env ids with Gymnasium)

__all__ = ["is_minigrid_env_id", "minigrid_env_ids", "check_env_id"]

_MINIGRID_PACKAGE = "minigrid"


def is_minigrid_env_id(env_id: str) -> bool:
    """True when ``env_id`` is registered and its entry point lives in the ``minigrid`` package.

    :param env_id: a Gymnasium env id, e.g. ``"MiniGrid-DoorKey-5x5-v0"`` or
        ``"BabyAI-BossLevel-v0"``.
    """
    spec = gym.registry.get(env_id)
    if spec is None:
        return False
    entry_point = spec.entry_point
    if isinstance(entry_point, str):
        module = entry_point.split(":", 1)[0]
    else:
        module = getattr(entry_point, "__module__", "")
    return module == _MINIGRID_PACKAGE or module.startswith(_MINIGRID_PACKAGE + ".")


def minigrid_env_ids() -> list[str]:
    """Every registered MiniGrid and BabyAI env id, in registration order.

    Some of them may still fail to construct (the WFC envs need pattern images that not every
    minigrid install ships); callers that construct them should expect that.
    """
    return [env_id for env_id in gym.registry if is_minigrid_env_id(env_id)]


def check_env_id(env_id: str) -> None:
    """Raise a ``ValueError`` naming close matches unless ``env_id`` is a MiniGrid/BabyAI env id.

    :param env_id: the id to check.
    :raises ValueError: when ``env_id`` is not registered, or is registered by another package
        (the wrappers of this package need MiniGrid's ``image``/``direction``/``mission``
        observation).
    """
    if is_minigrid_env_id(env_id):
        return
    known = minigrid_env_ids()
    if env_id in gym.registry:
        raise ValueError(
            f"env id {env_id!r} is registered, but not by minigrid: envs.make_env only wraps "
            f"MiniGrid and BabyAI envs (their observation has image, direction and mission). "
            f"Choose one of the {len(known)} ids from envs.minigrid_env_ids()."
        )
    # Case-insensitive matching: 'minigrid-doorkey-5x5-v0' should still find the right id.
    by_lower = {name.lower(): name for name in known}
    close = difflib.get_close_matches(env_id.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = (
        "Did you mean " + ", ".join(repr(by_lower[c]) for c in close) + "?"
        if close
        else f"See envs.minigrid_env_ids() for the {len(known)} valid ids."
    )
    raise ValueError(f"unknown MiniGrid/BabyAI env id {env_id!r}. {hint}")
