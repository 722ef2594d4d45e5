"""The intrinsic value head (``exploration.mixing = value_head``): the pieces every algorithm
shares.

With reward mixing the exploration bonus is added to the reward, so its return stops where the
episode stops, and ending an episode forfeits every bonus a longer one would have paid: a
``coef`` large enough to matter is a living reward (``docs/exploration.md``). RND's practice
(Burda et al., 2018, "Exploration by Random Network Distillation") keeps the two apart:

* the bonus stays out of the reward (:mod:`agents.exploration` writes it to
  ``info["exploration_bonus"]`` and, in this mode, adds nothing);
* a second value head on the critic's latent learns the intrinsic return, whose GAE ignores
  the episode ends (:func:`nonepisodic_gae`): the next episode's first steps continue it, so
  ending an episode costs no intrinsic value, and a truncation or termination needs no
  bootstrap of its own;
* the policy trains on ``A = A_ext + intrinsic_adv_coef * A_int``
  (:func:`add_intrinsic_advantages`), mixed before any advantage normalisation;
* the value loss is the extrinsic one plus the intrinsic one, under the same ``vf_coef`` (and
  the same ``clip_range_vf``).

ThalamusPPO (:mod:`agents.ppo`), PPO and LSTM-PPO (:mod:`agents.baselines`) all use the
functions here, so the three stay comparable. The intrinsic reward is not normalised: with
``intrinsic_adv_coef = 1`` and ``intrinsic_gamma = gamma`` the intrinsic advantage has the
scale reward mixing would give the same ``coef``, so a ``coef`` means the same in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.utils import explained_variance

from agents.constants import INTRINSIC_DEFAULTS

__all__ = [
    "INTRINSIC_DEFAULTS",
    "add_intrinsic_advantages",
    "check_intrinsic_settings",
    "clipped_value_loss",
    "intrinsic_rewards_of",
    "log_intrinsic",
    "log_ppo_update",
    "nonepisodic_gae",
]

#: The info key :class:`agents.exploration.EpisodicCountBonus` writes each step's bonus to.
BONUS_INFO_KEY = "exploration_bonus"


def check_intrinsic_settings(intrinsic_gamma: float, intrinsic_adv_coef: float) -> None:
    """Refuse settings of the intrinsic value head outside their ranges.

    :raises ValueError: naming the argument and its valid range.
    """
    if not 0.0 <= intrinsic_gamma <= 1.0:
        raise ValueError(
            f"intrinsic_gamma = {intrinsic_gamma} must be in [0, 1] "
            "(exploration.intrinsic_gamma; default 0.99)"
        )
    if not (np.isfinite(intrinsic_adv_coef) and intrinsic_adv_coef >= 0):
        raise ValueError(
            f"intrinsic_adv_coef = {intrinsic_adv_coef} must be a finite number >= 0 "
            "(exploration.intrinsic_adv_coef; default 1)"
        )


def intrinsic_rewards_of(infos: Sequence[dict[str, Any]]) -> np.ndarray:
    """``[n_envs]`` float32: each env's bonus of this step, from its info.

    :raises RuntimeError: an info has no bonus: the training env is not wrapped by
        :func:`agents.exploration.wrap_exploration`.
    """
    try:
        return np.array([info[BONUS_INFO_KEY] for info in infos], dtype=np.float32)
    except KeyError:
        raise RuntimeError(
            "the intrinsic value head needs each step's bonus in info['exploration_bonus'], and "
            "this env gives none: wrap the training env with agents.exploration."
            "wrap_exploration (exploration.kind other than none), or build the agent without "
            "intrinsic_value_head (exploration.mixing = reward)"
        ) from None


def nonepisodic_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    last_values: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE of a reward stream that never ends: episode ends are ignored, so step ``t``
    bootstraps from step ``t + 1`` of the same env even when ``t + 1`` starts a new episode.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lambda * A_{t+1}``,
    with ``V_T = last_values`` and no ``(1 - done)`` factor anywhere.

    :param rewards: ``[T, N]`` intrinsic rewards (``rewards[t]``: the bonus of step ``t``).
    :param values: ``[T, N]`` intrinsic values of the observations each step acted on.
    :param last_values: ``[N]`` intrinsic values of the observations after the last step.
    :param gamma: the intrinsic discount.
    :param gae_lambda: GAE lambda.
    :return: ``(advantages, returns)``, both ``[T, N]`` float32, ``returns = advantages +
        values``.

    >>> adv, ret = nonepisodic_gae(np.ones((2, 1)), np.zeros((2, 1)), np.zeros(1), 0.5, 1.0)
    >>> adv[:, 0].tolist(), ret[:, 0].tolist()
    ([1.5, 1.0], [1.5, 1.0])
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    next_values = np.concatenate([values[1:], np.asarray(last_values, np.float64)[None]], axis=0)
    deltas = rewards + gamma * next_values - values
    advantages = np.zeros_like(deltas)
    running = np.zeros(deltas.shape[1:], dtype=np.float64)
    for t in reversed(range(deltas.shape[0])):
        running = deltas[t] + gamma * gae_lambda * running
        advantages[t] = running
    return advantages.astype(np.float32), (advantages + values).astype(np.float32)


def add_intrinsic_advantages(
    buffer: Any,
    last_values: np.ndarray,
    gamma: float,
    gae_lambda: float,
    adv_coef: float,
) -> None:
    """Compute the intrinsic advantages and returns of a filled rollout buffer and mix them
    into its (extrinsic) advantages, in place; its ``returns`` stay the extrinsic ones.

    :param buffer: a rollout buffer, before its ``get`` flattened it, holding ``[T, N]``
        arrays ``advantages`` (extrinsic GAE, already computed), ``intrinsic_rewards`` and
        ``intrinsic_values``; this sets ``intrinsic_advantages``, ``intrinsic_returns`` and
        ``extrinsic_advantages`` (the advantages before the mix).
    :param last_values: ``[N]`` intrinsic values of the observations after the rollout.
    :param gamma: the intrinsic discount.
    :param gae_lambda: GAE lambda (the extrinsic one's).
    :param adv_coef: the weight of the intrinsic advantage.
    """
    advantages, returns = nonepisodic_gae(
        buffer.intrinsic_rewards, buffer.intrinsic_values, last_values, gamma, gae_lambda
    )
    buffer.intrinsic_advantages = advantages
    buffer.intrinsic_returns = returns
    buffer.extrinsic_advantages = buffer.advantages
    buffer.advantages = (buffer.advantages + adv_coef * advantages).astype(np.float32)


def log_intrinsic(logger: Logger, buffer: Any, value_losses: Sequence[float]) -> None:
    """Record the intrinsic head's signals of one update under ``exploration/*``.

    ``intrinsic_value_mean`` (the head's values over the rollout), ``intrinsic_return_mean``,
    ``intrinsic_adv_std`` and ``extrinsic_adv_std`` (before mixing and normalisation: how much
    each stream weighs in the mix), ``intrinsic_explained_variance`` and
    ``intrinsic_value_loss`` (the mean over minibatches).

    :param buffer: the rollout buffer :func:`add_intrinsic_advantages` filled (any layout).
    :param value_losses: the intrinsic value loss of each minibatch.
    """
    values = np.asarray(buffer.intrinsic_values).reshape(-1)
    returns = np.asarray(buffer.intrinsic_returns).reshape(-1)
    logger.record("exploration/intrinsic_value_mean", float(values.mean()))
    logger.record("exploration/intrinsic_return_mean", float(returns.mean()))
    logger.record("exploration/intrinsic_adv_std", float(np.std(buffer.intrinsic_advantages)))
    logger.record("exploration/extrinsic_adv_std", float(np.std(buffer.extrinsic_advantages)))
    logger.record("exploration/intrinsic_explained_variance", explained_variance(values, returns))
    if len(value_losses):
        logger.record("exploration/intrinsic_value_loss", float(np.mean(value_losses)))


def log_ppo_update(
    algorithm: Any,
    *,
    entropy_losses: Sequence[float],
    pg_losses: Sequence[float],
    value_losses: Sequence[float],
    approx_kl_divs: Sequence[float],
    clip_fractions: Sequence[float],
    loss: th.Tensor,
    clip_range: float,
    clip_range_vf: float | None,
    intrinsic_value_losses: Sequence[float] | None,
) -> None:
    """Record one PPO update's ``train/*`` signals (SB3 PPO's set, plus ``advantage_std`` of
    the rollout), and the intrinsic head's ``exploration/*`` ones (:func:`log_intrinsic`)
    unless ``intrinsic_value_losses`` is None: the tail of every algorithm's ``train``.

    :param algorithm: the algorithm after its update (its ``logger``, ``rollout_buffer``,
        ``policy`` and ``_n_updates``).
    :param entropy_losses: the entropy loss of each minibatch; ``pg_losses``,
        ``value_losses``, ``clip_fractions`` likewise, ``approx_kl_divs`` those of the last
        epoch.
    :param loss: the last minibatch's total loss.
    :param clip_range: this update's clip range; ``clip_range_vf`` the value one (None: off).
    :param intrinsic_value_losses: the intrinsic value loss of each minibatch; None without
        the intrinsic head.
    """
    logger, buffer = algorithm.logger, algorithm.rollout_buffer
    explained_var = explained_variance(buffer.values.flatten(), buffer.returns.flatten())
    logger.record("train/entropy_loss", np.mean(entropy_losses))
    logger.record("train/policy_gradient_loss", np.mean(pg_losses))
    logger.record("train/value_loss", np.mean(value_losses))
    logger.record("train/approx_kl", np.mean(approx_kl_divs))
    logger.record("train/clip_fraction", np.mean(clip_fractions))
    logger.record("train/loss", loss.item())
    logger.record("train/explained_variance", explained_var)
    logger.record("train/advantage_std", float(np.std(buffer.advantages)))
    if hasattr(algorithm.policy, "log_std"):
        logger.record("train/std", th.exp(algorithm.policy.log_std).mean().item())
    logger.record("train/n_updates", algorithm._n_updates, exclude="tensorboard")
    logger.record("train/clip_range", clip_range)
    if clip_range_vf is not None:
        logger.record("train/clip_range_vf", clip_range_vf)
    if intrinsic_value_losses is not None:
        log_intrinsic(logger, buffer, intrinsic_value_losses)


def clipped_value_loss(
    values: th.Tensor,
    old_values: th.Tensor,
    returns: th.Tensor,
    clip_range_vf: float | None,
    mask: th.Tensor | None = None,
) -> th.Tensor:
    """The mean squared error of ``values`` ``[M]`` against ``returns`` ``[M]``, the values
    first clipped to within ``clip_range_vf`` of ``old_values`` (``None``: not clipped), as
    SB3's PPO computes its value loss; the same for the extrinsic and the intrinsic head.

    :param mask: ``[M]`` bool, the entries that count (LSTM-PPO's padded sequences); ``None``:
        all of them.
    """
    if clip_range_vf is not None:
        values = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)
    squared = (returns - values) ** 2
    return th.mean(squared if mask is None else squared[mask])
