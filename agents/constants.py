"""Names, defaults and the minibatch rule that configs and command lines need, without
torch or SB3.

``agents/experiment/config.py`` and the scripts' argument parsers read these; the modules that
use them (``agents.factory``, ``agents.policy``, ``agents.ppo``, ``agents.buffer``) re-export
them, and
``tests/test_config.py`` checks they agree with what those modules build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agents.registry import AGENT_KINDS as _registered_kinds

__all__ = [
    "ADVANTAGE_NORMALIZATIONS",
    "CRITIC_TRUNKS",
    "AGENT_KINDS",
    "DEFAULT_CORE_LR_SCALE",
    "EXPLORATION_KINDS",
    "EXPLORATION_MIXINGS",
    "INTRINSIC_DEFAULTS",
    "MODEL_SUFFIX",
    "PPO_DEFAULTS",
    "PPO_SCHEDULE_DEFAULTS",
    "THALAMUS_PPO_DEFAULTS",
    "check_batch_size",
    "check_lags",
]

#: The agent kinds ``agents.make_agent`` builds (the kinds of :mod:`agents.registry`).
AGENT_KINDS: tuple[str, ...] = _registered_kinds

#: The defaults of the PPO hyperparameters every agent shares: the one source of the ``ppo``
#: config section's defaults (``agents/experiment/config.py``) and of
#: :class:`agents.ppo.ThalamusPPO`'s constructor; ``configs/defaults.yaml`` does not repeat
#: them (``tests/test_config.py`` holds the three together). Why lr 1e-3 and 10 epochs:
#: ``docs/benchmarks/baselines.md``.
PPO_DEFAULTS: dict[str, Any] = {
    "n_steps": 128,
    "batch_size": 256,
    "n_epochs": 10,
    "learning_rate": 1e-3,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_range": 0.2,
    "ent_coef": 0.01,
    "vf_coef": 0.5,
    "max_grad_norm": 0.5,
    "normalize_advantage": True,
    "target_kl": None,
}

#: The ``ppo`` config section's keys that the training loop applies, not the algorithms'
#: constructors (``agents.experiment.training`` keeps them out of the agent's arguments):
#: ``ent_decay_steps`` lowers ``ent_coef`` linearly to 0 over that many env steps
#: (:class:`agents.schedules.EntropySchedule`; 0: constant, as every run before it).
PPO_SCHEDULE_DEFAULTS: dict[str, Any] = {
    "ent_decay_steps": 0,
}

#: The defaults of ThalamusPPO's own update settings (the ``thalamus_ppo`` config section).
THALAMUS_PPO_DEFAULTS: dict[str, Any] = {
    "advantage_normalization": "rollout",
    "advantage_std_floor": 0.1,
    "adaptive_lr_kl": 0.02,
    "aux_past_view_coef": 0.0,
    "aux_past_view_lags": [1, 2, 4, 8],
}

#: Default ``core_lr_scale`` of ``ThalamusPolicy`` (and of ``policy.core_lr_scale``).
DEFAULT_CORE_LR_SCALE = 0.25

#: The extension of every model and checkpoint file (``agents.experiment.model_files``).
MODEL_SUFFIX = ".safetensors"

#: Where ThalamusPolicy's critic reads its features (``policy.critic_trunk``): ``shared``, the
#: actor's core (the value loss trains it too); ``separate``, a tokenizer and core of its own
#: (same config), so the value loss never reaches the actor's core; ``detached``, the actor's
#: core with the gradient stopped (the value loss trains only the critic's heads).
CRITIC_TRUNKS: tuple[str, ...] = ("shared", "separate", "detached")

#: Scopes of the advantage normalisation (``ThalamusPPO(advantage_normalization=...)``).
ADVANTAGE_NORMALIZATIONS: tuple[str, ...] = ("rollout", "minibatch")

#: Intrinsic rewards ``agents.exploration.wrap_exploration`` adds (``exploration.kind``).
EXPLORATION_KINDS: tuple[str, ...] = ("none", "episodic_count", "episodic_first_visit")

#: How the intrinsic reward reaches the policy (``exploration.mixing``): ``reward`` adds it to
#: the extrinsic reward (one return, one value head); ``value_head`` keeps it apart, learns it
#: with a second value head and non-episodic returns, and adds its advantage
#: (:mod:`agents.intrinsic`).
EXPLORATION_MIXINGS: tuple[str, ...] = ("reward", "value_head")

#: Defaults of the intrinsic value head's settings (``exploration.intrinsic_gamma`` and
#: ``exploration.intrinsic_adv_coef``; the algorithms' constructor arguments of the same names).
INTRINSIC_DEFAULTS: dict[str, float] = {"intrinsic_gamma": 0.99, "intrinsic_adv_coef": 1.0}


def check_batch_size(batch_size: int, n_steps: int, n_envs: int) -> int:
    """Validate a minibatch size for env-column minibatches and return envs per minibatch.

    :param batch_size: env steps per minibatch (as in SB3's PPO).
    :param n_steps: steps per env per rollout.
    :param n_envs: number of envs.
    :return: ``batch_size // n_steps``, the number of env columns per minibatch.
    """
    if batch_size <= 0 or batch_size % n_steps != 0:
        half = max(1, n_envs // 2)
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of n_steps={n_steps}: a "
            "minibatch is a set of whole env columns of n_steps steps each. Use e.g. "
            f"batch_size={n_steps * half} ({half} envs per minibatch)."
        )
    envs_per_batch = batch_size // n_steps
    if envs_per_batch > n_envs:
        raise ValueError(
            f"batch_size={batch_size} is larger than one rollout (n_steps * n_envs = "
            f"{n_steps} * {n_envs} = {n_steps * n_envs}). Use at most {n_steps * n_envs}."
        )
    return envs_per_batch


def check_lags(lags: Sequence[int], n_steps: int | None = None) -> tuple[int, ...]:
    """``lags`` as a tuple, or a ``ValueError`` saying what is wrong.

    :param lags: the lags ``k >= 1`` of the views to predict.
    :param n_steps: the sequence length (``ppo.n_steps``): a lag must be shorter, else it never
        has a target.
    """
    lags = tuple(lags)
    if not lags:
        raise ValueError(
            "aux_past_view_lags is empty; give at least one lag (e.g. [1, 2, 4, 8]) or set "
            "aux_past_view_coef = 0 to turn the past-view loss off."
        )
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in lags):
        raise ValueError(
            f"aux_past_view_lags = {list(lags)}: every lag must be an integer >= 1 (steps back)."
        )
    if len(set(lags)) != len(lags):
        raise ValueError(f"aux_past_view_lags = {list(lags)} repeats a lag; list each once.")
    if n_steps is not None and max(lags) >= n_steps:
        raise ValueError(
            f"aux_past_view_lags = {list(lags)} has a lag >= n_steps = {n_steps}: a minibatch "
            f"sequence is n_steps long, so that lag never has a target. Use lags < {n_steps}."
        )
    return lags
