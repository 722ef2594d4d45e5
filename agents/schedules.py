"""Coefficients that change over a run, set from its env-step count, for every agent kind.

:func:`decayed_coef` lowers a coefficient linearly to 0; :class:`EntropySchedule` applies it
to the entropy bonus (``ppo.ent_coef`` over ``ppo.ent_decay_steps``), and
:class:`agents.exploration.ExplorationLogger` to the intrinsic reward (``exploration.coef``
over ``exploration.decay_steps``).

Both follow ``model.num_timesteps``, which a resume restores from the checkpoint, and set the
coefficient at every rollout start, the first rollout of a fresh or resumed session included:
a resumed run has at each step the coefficient an uninterrupted run has there. The coefficient
itself is not in a checkpoint (:mod:`agents.experiment.model_files` saves counters, not the
algorithm's constructor arguments), and it would not matter if it were: the schedule
overwrites it before the update that reads it.
"""

from __future__ import annotations

from stable_baselines3.common.callbacks import BaseCallback

__all__ = ["EntropySchedule", "decayed_coef"]


def decayed_coef(coef: float, decay_steps: int, timesteps: int) -> float:
    """``coef`` lowered linearly to 0 over ``decay_steps`` env steps (0: constant).

    :param coef: the coefficient at step 0.
    :param decay_steps: env steps (over all envs) at which it reaches 0; 0 or less: constant.
    :param timesteps: the run's env-step count.

    >>> decayed_coef(0.01, 1000, 250), decayed_coef(0.01, 1000, 5000), decayed_coef(0.01, 0, 9)
    (0.0075, 0.0, 0.01)
    """
    if decay_steps <= 0:
        return coef
    return coef * max(0.0, 1.0 - timesteps / decay_steps)


class EntropySchedule(BaseCallback):
    """Set the algorithm's entropy coefficient (``model.ent_coef``, which ThalamusPPO, PPO and
    RecurrentPPO read in their update) for each rollout from the run's step count, and log it
    as ``train/ent_coef``.

    The coefficient is set at the rollout start and read by the update after the rollout, so
    each update trains with ``decayed_coef(ent_coef, decay_steps, step at the rollout's
    start)``. It is recorded at the rollout end, not the start: an evaluation inside the
    rollout dumps the log, which would write the value at the evaluation's step and leave the
    iteration's own dump without it.

    :param ent_coef: the coefficient at step 0 (``ppo.ent_coef``).
    :param decay_steps: env steps over which it falls to 0 (``ppo.ent_decay_steps``), > 0: the
        training loop adds no schedule for a constant coefficient.
    :raises ValueError: ``ent_coef`` negative or ``decay_steps`` not positive.
    """

    def __init__(self, ent_coef: float, decay_steps: int) -> None:
        super().__init__()
        if not ent_coef >= 0.0:
            raise ValueError(f"ent_coef = {ent_coef!r} must be >= 0 (ppo.ent_coef)")
        if decay_steps <= 0:
            raise ValueError(
                f"decay_steps = {decay_steps!r} must be > 0 (ppo.ent_decay_steps; 0 keeps "
                "ppo.ent_coef constant and needs no schedule)"
            )
        self.ent_coef = float(ent_coef)
        self.decay_steps = int(decay_steps)
        self.current_coef: float | None = None

    def _on_rollout_start(self) -> None:
        self.current_coef = decayed_coef(self.ent_coef, self.decay_steps, self.model.num_timesteps)
        self.model.ent_coef = self.current_coef

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if self.current_coef is not None:
            self.logger.record("train/ent_coef", self.current_coef)
