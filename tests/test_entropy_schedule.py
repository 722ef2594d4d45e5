"""The entropy schedule (``ppo.ent_decay_steps``): its closed form, that every agent's update
trains with it and logs it, that the default leaves a run as it was, and that a resume
continues it exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from stable_baselines3.common.callbacks import BaseCallback

import agents.exploration
from agents.constants import PPO_DEFAULTS
from agents.experiment.config import DEFAULT_CONFIG, ConfigError, inert_settings, load_config
from agents.experiment.training import RunCallbacks, _hyperparameters, resume, train
from agents.schedules import EntropySchedule, decayed_coef
from tests.helpers import CaptureWriter, tiny_run_overrides

ENT_COEF = 0.02
ROLLOUT = 32  # env steps per rollout: 2 envs x 16 steps


def test_decayed_coef_falls_linearly_to_zero_and_stays() -> None:
    steps = (0, 16, 32, 48, 64, 96, 10**9)
    assert [decayed_coef(ENT_COEF, 64, t) for t in steps] == pytest.approx(
        [0.02, 0.015, 0.01, 0.005, 0.0, 0.0, 0.0]
    )
    assert [decayed_coef(ENT_COEF, 0, t) for t in steps] == [ENT_COEF] * len(steps)
    assert agents.exploration.decayed_coef is decayed_coef  # the old import still works


def test_the_schedule_refuses_what_it_cannot_decay() -> None:
    with pytest.raises(ValueError, match=r"decay_steps = 0 must be > 0 \(ppo.ent_decay_steps"):
        EntropySchedule(ENT_COEF, 0)
    with pytest.raises(ValueError, match=r"ent_coef = -0.1 must be >= 0"):
        EntropySchedule(-0.1, 100)
    with pytest.raises(ConfigError, match=r"ppo.ent_decay_steps = -1 is out of range: must be >="):
        load_config(DEFAULT_CONFIG, ["ppo.ent_decay_steps=-1"])


def test_a_decay_of_a_zero_coefficient_is_allowed_and_warned_of() -> None:
    config = load_config(DEFAULT_CONFIG, ["ppo.ent_coef=0", "ppo.ent_decay_steps=1000"])
    warnings = [w for w in inert_settings(config) if "ent_decay_steps" in w]
    assert len(warnings) == 1 and "ppo.ent_coef" in warnings[0]
    config = load_config(DEFAULT_CONFIG, ["ppo.ent_decay_steps=1000"])
    assert not [w for w in inert_settings(config) if "ent_decay_steps" in w]


class Record(BaseCallback):
    """Records the entropy coefficient each update trains with and every dumped log line."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[float] = []
        self.writer = CaptureWriter()

    def _on_training_start(self) -> None:
        self.model.logger.output_formats.append(self.writer)
        model, update = self.model, self.model.train

        def train_and_record() -> None:
            self.used.append(model.ent_coef)
            update()

        model.train = train_and_record  # type: ignore[method-assign]

    def _on_step(self) -> bool:
        return True

    def logged(self) -> list[float | None]:
        """``train/ent_coef`` in each iteration's dump (None: not in it), not the evaluations'."""
        return [r.get("train/ent_coef") for r in self.writer.records if "time/iterations" in r]


RECORDED: list[Record] = []


def record(callbacks: RunCallbacks) -> list[BaseCallback]:
    """An ``extra_callbacks`` factory that keeps each session's :class:`Record`."""
    RECORDED.append(Record())
    return [RECORDED[-1]]


def tiny_run(tmp_path: Path, agent: str, total: int = 4 * ROLLOUT) -> list[str]:
    """Overrides of a run of ``total`` env steps in rollouts of 32, with an evaluation inside
    the third rollout (it dumps the log mid-rollout)."""
    return [*tiny_run_overrides(tmp_path, agent, total, eval_freq=80), f"ppo.ent_coef={ENT_COEF}"]


@pytest.mark.parametrize("agent", ["thalamus", "ppo", "lstm"])
def test_every_agent_s_update_trains_with_the_decayed_coefficient_and_logs_it(
    tmp_path: Path, agent: str
) -> None:
    """Rollouts start at steps 0, 32, 64, 96; over 64 steps 0.02 falls to 0.01, then 0."""
    config = load_config(DEFAULT_CONFIG, [*tiny_run(tmp_path, agent), "ppo.ent_decay_steps=64"])
    assert "ent_decay_steps" not in _hyperparameters(config)  # not an agent's argument
    train(config, extra_callbacks=record)
    seen = RECORDED[-1]
    assert seen.used == pytest.approx([0.02, 0.01, 0.0, 0.0])
    # In every iteration's dump, the one after the rollout with an evaluation included.
    assert seen.logged() == pytest.approx(seen.used)
    assert any("eval/mean_reward" in r for r in seen.writer.records)


def test_the_default_keeps_the_coefficient_and_the_agent_s_arguments(tmp_path: Path) -> None:
    overrides = tiny_run(tmp_path, "ppo")
    config = load_config(DEFAULT_CONFIG, [*overrides, "ppo.ent_decay_steps=0"])
    assert config == load_config(DEFAULT_CONFIG, overrides)  # 0 is the default
    # The agent is built from exactly the arguments it had before the schedule existed.
    assert set(_hyperparameters(config)) == set(PPO_DEFAULTS)
    train(config, extra_callbacks=record)
    seen = RECORDED[-1]
    assert seen.used == [ENT_COEF] * 4
    assert seen.logged() == [None] * 4  # no schedule in the run


def test_a_resumed_run_continues_the_schedule_exactly(tmp_path: Path) -> None:
    """0.02 over 128 steps: an uninterrupted run trains with 0.02, 0.015, 0.01, 0.005; a run
    stopped at step 64 and resumed from its checkpoint with the same, the resumed session's
    first update included (the model file does not hold the coefficient: the agent is rebuilt
    at the config's 0.02 and the schedule sets it before the update)."""
    overrides = [*tiny_run(tmp_path / "whole", "ppo"), "ppo.ent_decay_steps=128"]
    train(load_config(DEFAULT_CONFIG, overrides), extra_callbacks=record)
    whole = RECORDED[-1]
    assert whole.used == pytest.approx([0.02, 0.015, 0.01, 0.005])

    overrides = [
        *tiny_run(tmp_path / "parts", "ppo", total=2 * ROLLOUT),
        "ppo.ent_decay_steps=128",
        "train.checkpoint_freq=32",
    ]
    run_dir = train(load_config(DEFAULT_CONFIG, overrides), extra_callbacks=record)
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    resume(run_dir, total_timesteps=4 * ROLLOUT, extra_callbacks=record)
    first, resumed = RECORDED[-2:]
    assert first.used + resumed.used == whole.used
    assert first.logged() + resumed.logged() == whole.logged()

    # Like every ppo.* key it may change on resume: from the checkpoint's step on, the
    # coefficient follows the new schedule (0.02 over 64 steps is 0 from step 64).
    resume(copy, ["ppo.ent_decay_steps=64"], total_timesteps=4 * ROLLOUT, extra_callbacks=record)
    assert RECORDED[-1].used == [0.0, 0.0]
