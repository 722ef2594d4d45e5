"""Does the thalamus gate select what the task needs? The slot report and the selection test.

* :func:`slot_report`: plays episodes and summarises, per token kind, the fraction of the K
  kept slots holding it (``scripts/evaluate.py --report-slots``).
* :func:`selection_test`: from the same state, the policy's action distribution with every
  token vs with the K kept tokens masked out vs with as many random valid tokens masked out.
  If the gate keeps what the policy uses, masking the kept tokens moves the distribution
  (KL) more, and an agent that plays with them masked at every step succeeds less, than
  one with random tokens masked (``scripts/evaluate.py --selection-test``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.distributions import Distribution

from agents.experiment.rollout import play_episode
from agents.selection import (
    MASK_MODES,
    TOKEN_KINDS,
    kept_slots,
    mask_tokens,
    slot_kind_fractions,
)
from agents.stepping import AgentStep
from thalamus_rl import ThalamusOutput, ThalamusState

__all__ = ["masked_policy_step", "selection_test", "slot_report"]


def masked_policy_step(
    policy: Any,
    obs: Mapping[str, th.Tensor],
    state: ThalamusState | None,
    episode_starts: th.Tensor,
    token_mask: th.Tensor | None = None,
) -> tuple[Distribution, ThalamusOutput, ThalamusState, th.Tensor]:
    """One step of a :class:`~agents.policy.ThalamusPolicy` with a chosen token mask.

    The same function as :meth:`ThalamusPolicy.act` when ``token_mask`` is None.

    :param policy: the thalamus policy.
    :param obs: one tensor per key, ``[B, ...]``.
    :param state: the state before this step (None: zeros).
    :param episode_starts: ``[B]`` bool.
    :param token_mask: ``[B, N]`` bool replacing the tokenizer's mask (False = hidden).
    :return: the action distribution, the core's output, the next state, and the
        tokenizer's own ``[B, N]`` mask.
    """
    t = policy.tokenizer(obs)
    out, new_state = policy.core.step(
        t.tokens,
        t.token_mask if token_mask is None else token_mask,
        t.task,
        t.feedback,
        positions=t.positions,
        state=state,
        episode_starts=episode_starts,
        with_stats=False,
    )
    distribution = policy._action_distribution(out.features)
    # SB3 reuses one Distribution object per policy and overwrites its torch distribution at
    # every call: a shallow copy keeps this step's.
    return copy.copy(distribution), out, new_state, t.token_mask


def _require_thalamus(model: Any) -> Any:
    """``model``'s policy, if it is the thalamus policy these diagnoses read (its tokenizer,
    gate and heads)."""
    from agents.policy import ThalamusPolicy

    policy = model.policy
    if not isinstance(policy, ThalamusPolicy):
        raise ValueError(
            f"the gate's selection exists only in the thalamus agent; this model's policy is "
            f"{type(policy).__name__}"
        )
    policy.set_training_mode(False)
    return policy


def _kl(p: Distribution, q: Distribution) -> float:
    return float(th.distributions.kl_divergence(p.distribution, q.distribution).sum())


class _MaskingStepper:
    """Steps a thalamus policy with the token mask ``drive`` says (``"none"``, ``"kept"``,
    ``"random"``); at each step (``compare``) also the kept- and random-masked action
    distributions from the same state, and their KL from the unmasked one.

    :ivar kl_kept: per step, KL of the kept-masked distribution from the unmasked one.
    :ivar kl_random: the same for random tokens.
    :ivar skipped: steps with too few valid tokens to mask K.
    """

    def __init__(
        self,
        policy: Any,
        drive: str,
        generator: th.Generator,
        slot_fractions: list[np.ndarray] | None = None,
        compare: bool = True,
    ) -> None:
        self.policy = policy
        self.drive = drive
        self.generator = generator
        self.slot_fractions = slot_fractions
        self.compare = compare
        self.layout = policy.tokenizer.token_layout
        self.gate_enabled = policy.core.config.gate_enabled
        self.state: ThalamusState | None = None
        self.kl_kept: list[float] = []
        self.kl_random: list[float] = []
        self.skipped = 0

    @th.no_grad()
    def act(
        self,
        obs: dict[str, np.ndarray],
        episode_start: bool,
        deterministic: bool,
        *,
        with_features: bool = False,
        advance: bool = True,
    ) -> AgentStep:
        policy = self.policy
        obs_tensor, _ = policy.obs_to_tensor(obs)
        starts = th.tensor([episode_start], device=policy.device)
        state = self.state
        full, out, full_state, token_mask = masked_policy_step(policy, obs_tensor, state, starts)
        kept = kept_slots(out.indices, token_mask, self.gate_enabled)
        if self.slot_fractions is not None:
            fractions = slot_kind_fractions(out.indices, token_mask, self.layout, self.gate_enabled)
            self.slot_fractions.append(fractions[0].cpu().numpy())
        dists = {"none": (full, full_state)}
        for mode in ("kept", "random") if self.compare else ():
            mask = mask_tokens(token_mask, out.indices, kept, mode, self.generator)
            if mask is None:
                continue
            dist, _, next_state, _ = masked_policy_step(policy, obs_tensor, state, starts, mask)
            dists[mode] = (dist, next_state)
        if not self.compare:
            pass
        elif len(dists) == 3:
            self.kl_kept.append(_kl(full, dists["kept"][0]))
            self.kl_random.append(_kl(full, dists["random"][0]))
        else:
            self.skipped += 1
        distribution, next_state = dists.get(self.drive, dists["none"])
        if advance:
            self.state = next_state
        action = distribution.get_actions(deterministic=deterministic).cpu().numpy()
        features = out.features[0].cpu().numpy() if with_features else None
        return AgentStep(action.reshape(policy.action_space.shape or ()), out, features)


def _play(
    model: Any,
    policy: Any,
    env: gym.Env,
    seed: int,
    deterministic: bool,
    drive: str,
    generator: th.Generator,
    slot_fractions: list[np.ndarray] | None = None,
    compare: bool = True,
) -> tuple[bool, list[float], list[float], int]:
    """One episode (:func:`agents.experiment.rollout.play_episode`) driven by the ``drive``
    mask mode; per step (``compare``), the KL of the kept- and the random-masked distributions
    from the unmasked one, all from the episode's state; ``slot_fractions`` collects each
    step's :func:`slot_kind_fractions`.

    :return: success, KLs (kept), KLs (random), steps skipped (too few tokens to mask).
    """
    stepper = _MaskingStepper(policy, drive, generator, slot_fractions, compare)
    episode = play_episode(model, env, deterministic=deterministic, seed=seed, stepper=stepper)
    return episode.success, stepper.kl_kept, stepper.kl_random, stepper.skipped


def selection_test(
    model: Any,
    env: gym.Env,
    n_episodes: int,
    seed: int,
    deterministic: bool = False,
    mask_seed: int = 0,
) -> dict[str, Any]:
    """Does the gate keep what the policy uses? Masking kept vs random tokens.

    Plays ``n_episodes`` (episode ``i`` reset with ``seed + i``) three times: unmasked, with
    the gate's K kept tokens masked out at every step, and with as many random valid tokens
    masked out at every step. At every step of the unmasked play, the policy's action
    distribution is also computed from the same state with the kept and with random tokens
    masked, and its KL divergence from the unmasked one recorded.

    :param model: a trained ThalamusPPO.
    :param env: a single env from ``envs.make_env``.
    :param n_episodes: episodes per play.
    :param seed: episode ``i`` resets with ``seed + i``; torch is seeded with ``seed`` before
        each play (sampled actions repeat).
    :param deterministic: take the most likely action.
    :param mask_seed: seed of the random tokens' choice.
    :return: ``{"kl_kept", "kl_random"}`` (mean per step), ``"kept_hurts_more"`` (fraction of
        steps with the kept masking's KL above the random one's), ``"steps"``, ``"skipped"``
        (steps with too few valid tokens to mask K), and ``"success"``: ``{mode: rate}`` for
        each play (``none``, ``kept``, ``random``).
    """
    policy = _require_thalamus(model)
    success: dict[str, float] = {}
    kl_kept: list[float] = []
    kl_random: list[float] = []
    skipped = 0
    for drive in MASK_MODES:
        th.manual_seed(seed)
        generator = th.Generator().manual_seed(mask_seed)
        wins = []
        for i in range(n_episodes):
            won, kk, kr, sk = _play(model, policy, env, seed + i, deterministic, drive, generator)
            wins.append(won)
            if drive == "none":
                kl_kept += kk
                kl_random += kr
                skipped += sk
        success[drive] = float(np.mean(wins))
    kept_arr, random_arr = np.asarray(kl_kept), np.asarray(kl_random)
    return {
        "episodes": n_episodes,
        "steps": len(kl_kept),
        "skipped": skipped,
        "kl_kept": float(kept_arr.mean()) if len(kept_arr) else None,
        "kl_random": float(random_arr.mean()) if len(random_arr) else None,
        "kept_hurts_more": float((kept_arr > random_arr).mean()) if len(kept_arr) else None,
        "success": success,
    }


def slot_report(
    model: Any, env: gym.Env, n_episodes: int, seed: int, deterministic: bool = False
) -> dict[str, Any]:
    """Slots by token kind over ``n_episodes`` unmasked episodes (seeded as
    :func:`selection_test`): per kind, the mean, 10th and 90th percentile over steps of the
    fraction of the kept slots holding that kind, and the number of steps.
    """
    policy = _require_thalamus(model)
    th.manual_seed(seed)
    generator = th.Generator().manual_seed(0)
    fractions: list[np.ndarray] = []
    for i in range(n_episodes):
        _play(
            model, policy, env, seed + i, deterministic, "none", generator, fractions, compare=False
        )
    table = np.stack(fractions)  # [steps, kinds]
    return {
        "episodes": n_episodes,
        "steps": len(table),
        "top_k": policy.core.config.top_k,
        **{
            kind: {
                "mean": float(table[:, i].mean()),
                "p10": float(np.percentile(table[:, i], 10)),
                "p90": float(np.percentile(table[:, i], 90)),
            }
            for i, kind in enumerate(TOKEN_KINDS)
        },
    }
