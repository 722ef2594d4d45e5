"""The episodic bonuses: their closed forms, their resets, and that only training sees them."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecEnvWrapper

import envs
from agents.experiment.config import DEFAULT_CONFIG, ConfigError, load_config
from agents.experiment.training import (
    RunCallbacks,
    _fixes_the_run,
    resume,
    train,
)
from agents.exploration import (
    EpisodicCountBonus,
    EpisodicFirstVisitBonus,
    ExplorationLogger,
    decayed_coef,
    wrap_exploration,
)
from tests.helpers import tiny_run_overrides

COEF = 0.5


class ScriptedViews(gym.Env):
    """Shows a scripted list of views: ``views[0]`` at reset, ``views[t]`` after step ``t``;
    the episode terminates after the last one with ``reward``, every other step pays 0.

    A view is ``(v, d)``: an image filled with ``v`` and direction ``d``.
    """

    def __init__(self, views: list[tuple[int, int]], reward: float = 1.0) -> None:
        self.views = views
        self.reward = reward
        self.t = 0
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (7, 7, 3), np.uint8),
                "direction": spaces.Discrete(4),
            }
        )
        self.action_space = spaces.Discrete(3)

    def _obs(self) -> dict[str, Any]:
        value, direction = self.views[self.t]
        return {"image": np.full((7, 7, 3), value, np.uint8), "direction": direction}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple:
        self.t += 1
        done = self.t == len(self.views) - 1
        return self._obs(), self.reward if done else 0.0, done, False, {}


def scripted_venv(views: list[tuple[int, int]], n_envs: int = 1) -> VecEnv:
    return DummyVecEnv([lambda: Monitor(ScriptedViews(views))] * n_envs)


def step(venv: VecEnv) -> tuple[float, float, bool, dict]:
    _, reward, done, infos = venv.step(np.zeros(venv.num_envs, dtype=np.int64))
    return float(reward[0]), infos[0]["exploration_bonus"], bool(done[0]), infos[0]


def expected_bonuses(views: list[tuple[int, int]], coef: float) -> list[float]:
    """Closed form: after step t, coef / sqrt(visits of views[t] in views[0..t])."""
    return [coef / math.sqrt(views[: t + 1].count(views[t])) for t in range(1, len(views))]


def test_bonus_is_coef_over_sqrt_of_visits_in_the_episode() -> None:
    views = [(1, 0), (2, 0), (1, 0), (1, 0), (1, 1), (3, 2), (2, 0)]
    venv = EpisodicCountBonus(scripted_venv(views), coef=COEF)
    venv.reset()
    got = [step(venv) for _ in range(len(views) - 1)]
    expected = expected_bonuses(views, COEF)
    assert expected[:4] == [COEF, COEF / math.sqrt(2), COEF / math.sqrt(3), COEF]
    np.testing.assert_allclose([bonus for _, bonus, _, _ in got], expected, rtol=1e-6)
    extrinsic = [0.0] * (len(views) - 2) + [1.0]
    np.testing.assert_allclose([r for r, *_ in got], np.add(expected, extrinsic), rtol=1e-6)


def test_counts_restart_at_every_episode_start_including_auto_reset() -> None:
    views = [(1, 0), (1, 0), (2, 0), (1, 0)]
    venv = EpisodicCountBonus(scripted_venv(views), coef=COEF)
    venv.reset()
    episodes = [[step(venv) for _ in range(len(views) - 1)] for _ in range(3)]
    expected = expected_bonuses(views, COEF)  # [coef/sqrt2, coef, coef/sqrt3]
    for episode in episodes:  # the 2nd and 3rd start at SB3's auto-reset
        np.testing.assert_allclose([bonus for _, bonus, _, _ in episode], expected, rtol=1e-6)
        # The last step is counted from terminal_observation in the episode it ends.
        assert [done for *_, done, _ in episode] == [False, False, True]
    venv.reset()  # an explicit reset mid-episode clears the count too
    np.testing.assert_allclose(step(venv)[1], COEF / math.sqrt(2), rtol=1e-6)


def test_envs_count_apart() -> None:
    views = [(1, 0), (2, 0), (2, 0), (3, 0)]
    venv = EpisodicCountBonus(scripted_venv(views, n_envs=2), coef=COEF)
    venv.reset()
    for expected in expected_bonuses(views, COEF):
        _, reward, _, infos = venv.step(np.zeros(2, dtype=np.int64))
        assert [info["exploration_bonus"] for info in infos] == pytest.approx([expected] * 2)


def test_monitor_and_episode_infos_stay_extrinsic() -> None:
    views = [(1, 0), (2, 0), (3, 0), (4, 0)]
    venv = EpisodicCountBonus(scripted_venv(views), coef=COEF)
    venv.reset()
    *_, (reward, bonus, done, info) = [step(venv) for _ in range(len(views) - 1)]
    assert done and reward == pytest.approx(1.0 + COEF)
    assert info["episode"]["r"] == pytest.approx(1.0)  # the Monitor's: extrinsic
    assert info["exploration_episode"] == {"r": pytest.approx(3 * COEF), "l": 3}


def test_reward_feedback_observations_stay_extrinsic() -> None:
    """The thalamus reads prev_reward / episode_return: the bonus must not leak into them."""
    venv = EpisodicCountBonus(envs.make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=1), coef=1.0)
    venv.reset()
    for action in (0, 0, 1):  # left, left, right: new views, no extrinsic reward
        obs, reward, _, _ = venv.step(np.array([action]))
        assert reward[0] > 0
        assert obs["prev_reward"][0, 0] == 0.0 and obs["episode_return"][0, 0] == 0.0


def first_visit_bonuses(views: list[tuple[int, int]], coef: float) -> list[float]:
    """Closed form: after step t, coef if views[t] is not in views[0..t-1], else 0."""
    return [coef if views[t] not in views[:t] else 0.0 for t in range(1, len(views))]


def test_first_visit_bonus_pays_each_new_view_once_and_revisits_nothing() -> None:
    # A long episode that keeps coming back: the count bonus would pay on every step.
    views = [(1, 0), (2, 0), (1, 0), (2, 0), (1, 1), (1, 0), (2, 0), (3, 2), (2, 0), (1, 1)]
    views += [(1, 0), (2, 0)] * 20 + [(4, 0)]
    venv = EpisodicFirstVisitBonus(scripted_venv(views), coef=COEF)
    venv.reset()
    got = [step(venv) for _ in range(len(views) - 1)]
    expected = first_visit_bonuses(views, COEF)
    assert expected[:5] == [COEF, 0.0, 0.0, COEF, 0.0]
    np.testing.assert_allclose([bonus for _, bonus, _, _ in got], expected, rtol=1e-6)
    extrinsic = [0.0] * (len(views) - 2) + [1.0]
    np.testing.assert_allclose([r for r, *_ in got], np.add(expected, extrinsic), rtol=1e-6)
    # The intrinsic return is coef x the distinct views after the first, whatever the length:
    # 4 of them ((2,0), (1,1), (3,2), (4,0)) in 52 steps.
    info = got[-1][3]
    assert info["exploration_episode"] == {
        "r": pytest.approx(COEF * (len(set(views)) - 1)),
        "l": len(views) - 1,
    }
    assert info["exploration_episode"]["r"] == pytest.approx(4 * COEF)
    assert info["episode"]["r"] == pytest.approx(1.0)  # the Monitor's: extrinsic


def test_first_visit_counts_restart_at_every_episode_start_including_auto_reset() -> None:
    views = [(1, 0), (2, 0), (1, 0), (3, 0), (2, 0)]
    venv = EpisodicFirstVisitBonus(scripted_venv(views, n_envs=2), coef=COEF)
    venv.reset()
    expected = first_visit_bonuses(views, COEF)  # [coef, 0, coef, 0]
    for _ in range(3):  # the 2nd and 3rd episodes start at SB3's auto-reset
        episode = [venv.step(np.zeros(2, dtype=np.int64)) for _ in range(len(views) - 1)]
        for env in range(2):
            bonuses = [infos[env]["exploration_bonus"] for *_, infos in episode]
            np.testing.assert_allclose(bonuses, expected, rtol=1e-6)
            assert episode[-1][3][env]["exploration_episode"]["r"] == pytest.approx(2 * COEF)
    step(venv)  # (2, 0) again: new in the fresh episode, then a reset mid-episode
    venv.reset()
    assert step(venv)[1] == pytest.approx(COEF)


class VecMonitorLike(VecEnvWrapper):
    """A wrapper above the bonus, as SB3's VecMonitor / VecTransposeImage sit in a run."""

    def reset(self) -> Any:
        return self.venv.reset()

    def step_wait(self) -> Any:
        return self.venv.step_wait()


def test_wrap_exploration_builds_each_kind_and_the_logger_sets_its_coef() -> None:
    views = [(1, 0), (2, 0)]
    count = wrap_exploration(scripted_venv(views), "episodic_count", 0.1)
    first = wrap_exploration(scripted_venv(views), "episodic_first_visit", 0.1)
    assert type(count) is EpisodicCountBonus and type(first) is EpisodicFirstVisitBonus
    logger = ExplorationLogger(coef=0.2, decay_steps=100)
    logger.model = SimpleNamespace(get_env=lambda: VecMonitorLike(first))  # type: ignore[assignment]
    logger.num_timesteps = 50
    logger._on_rollout_start()  # the decay reaches the first-visit bonus too
    assert first.coef == pytest.approx(0.1)


def test_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="coef = -1"):
        EpisodicCountBonus(scripted_venv([(1, 0), (2, 0)]), coef=-1)
    with pytest.raises(ValueError, match="coef = -1.*set exploration.coef"):
        EpisodicFirstVisitBonus(scripted_venv([(1, 0), (2, 0)]), coef=-1)
    with pytest.raises(ValueError, match="choose one of none, episodic_count, episodic_first"):
        wrap_exploration(scripted_venv([(1, 0), (2, 0)]), "rnd", 0.1)
    box = DummyVecEnv([lambda: gym.make("CartPole-v1")])
    with pytest.raises(ValueError, match="'image' and 'direction'"):
        EpisodicCountBonus(box, coef=0.1)
    with pytest.raises(ValueError, match="EpisodicFirstVisitBonus counts views"):
        EpisodicFirstVisitBonus(box, coef=0.1)
    assert wrap_exploration(box, "none", 0.1) is box


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("exploration.kind=rnd", "exploration.kind = 'rnd' is not a valid choice"),
        ("exploration.coef=-0.1", "exploration.coef = -0.1 is out of range: must be >= 0.0"),
        ("exploration.coeff=0.1", "Did you mean 'exploration.coef'"),
    ],
)
def test_config_errors_name_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, [override])


def test_defaults_keep_recorded_results_and_resume_cannot_change_it() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.exploration.kind == "none"
    for kind in ("thalamus", "ppo", "lstm"):
        assert _fixes_the_run("exploration.coef", kind)
        assert _fixes_the_run("exploration.kind", kind)


def _wrappers(venv: Any) -> list[type]:
    chain = []
    while venv is not None:
        chain.append(type(venv))
        venv = getattr(venv, "venv", None) if isinstance(venv, VecEnvWrapper) else None
    return chain


class Inspect(BaseCallback):
    """Records what a run's training env, eval env and logger hold."""

    def __init__(self, callbacks: RunCallbacks) -> None:
        super().__init__()
        self.run_callbacks = callbacks
        self.logged: list[dict[str, float]] = []
        self.episode_returns: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.logged.append(
            {k: v for k, v in self.model.logger.name_to_value.items() if "exploration" in k}
        )

    def _on_training_end(self) -> None:
        self.train_chain = _wrappers(self.model.get_env())
        self.eval_chain = _wrappers(self.run_callbacks.evaluation.eval_env)
        self.episode_returns = [info["r"] for info in self.model.ep_info_buffer]
        self.eval_reward = self.run_callbacks.evaluation.last_mean_reward


INSPECTED: list[Inspect] = []


def extra(callbacks: RunCallbacks) -> list[BaseCallback]:
    """An ``extra_callbacks`` factory that keeps each session's :class:`Inspect`."""
    INSPECTED.append(Inspect(callbacks))
    return [INSPECTED[-1]]


def tiny_run(tmp_path: Path, agent: str, kind: str = "episodic_count") -> list[str]:
    """Overrides of a 64-step run with the bonus ``kind``, evaluating at step 32."""
    return [
        *tiny_run_overrides(tmp_path, agent, total=64, eval_freq=32),
        f"exploration.kind={kind}",
        "exploration.coef=1.0",  # 8 steps of it: an intrinsic return above 1
    ]


BONUS_OF_KIND = {
    "episodic_count": EpisodicCountBonus,
    "episodic_first_visit": EpisodicFirstVisitBonus,
}


@pytest.mark.parametrize("kind", list(BONUS_OF_KIND))
@pytest.mark.parametrize("agent", ["ppo", "lstm", "thalamus"])
def test_every_agent_trains_with_the_bonus_and_reports_extrinsic_returns(
    tmp_path: Path, agent: str, kind: str, recwarn: pytest.WarningsRecorder
) -> None:
    overrides = tiny_run(tmp_path, agent, kind)
    train(load_config(DEFAULT_CONFIG, overrides), extra_callbacks=extra)
    seen = INSPECTED[-1]
    assert BONUS_OF_KIND[kind] in seen.train_chain
    assert not set(BONUS_OF_KIND.values()) & set(seen.eval_chain)
    assert seen.episode_returns and max(seen.episode_returns) <= 1.0  # extrinsic
    assert seen.eval_reward <= 1.0
    first = seen.logged[0]
    assert 0.0 < first["exploration/intrinsic_mean"] <= 1.0
    assert first["exploration/intrinsic_ep_return_mean"] > 1.0
    # The eval env lacks the wrapper on purpose: no "not of the same type" warning from SB3.
    assert not [w for w in recwarn if "not of the same type" in str(w.message)]


def test_decayed_coef_reaches_zero_and_stays() -> None:
    assert [decayed_coef(0.2, 100, t) for t in (0, 50, 100, 150)] == [0.2, 0.1, 0.0, 0.0]


def test_logger_ignores_envs_without_the_bonus() -> None:
    logger = ExplorationLogger()
    logger.locals = {"infos": [{}, {"episode": {"r": 1.0}}]}
    logger._on_rollout_start()
    logger._on_step()
    assert logger.rollout_steps == 0 and not logger.episode_returns


def test_resume_keeps_the_bonus_continues_its_decay_and_refuses_to_change_it(
    tmp_path: Path,
) -> None:
    """Rollouts of 32 steps, coef 1 decaying to 0 over 128 steps: 1, 0.75 in the first
    session (steps 0, 32), 0.5, 0.25 after resuming from the checkpoint at step 64."""
    overrides = [*tiny_run(tmp_path, "ppo"), "train.checkpoint_freq=32"]
    run_dir = train(
        load_config(DEFAULT_CONFIG, [*overrides, "exploration.decay_steps=128"]),
        extra_callbacks=extra,
    )
    with pytest.raises(ConfigError, match="exploration.coef=0.1.*cannot change a resumed run"):
        resume(run_dir, ["exploration.coef=0.1"], total_timesteps=128)
    resume(run_dir, total_timesteps=128, extra_callbacks=extra)
    first, resumed = INSPECTED[-2:]
    assert [logged["exploration/coef"] for logged in first.logged] == [1.0, 0.75]
    assert [logged["exploration/coef"] for logged in resumed.logged] == [0.5, 0.25]
    for logged in first.logged + resumed.logged:  # every bonus is at most the coef
        assert 0 < logged["exploration/intrinsic_mean"] <= logged["exploration/coef"]
    assert EpisodicCountBonus in resumed.train_chain
    assert EpisodicCountBonus not in resumed.eval_chain
