"""The observation contract, reward feedback, trials, determinism and rendering of envs/."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import envs
from envs import MissionObservationWrapper, RewardFeedbackWrapper, make_env

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date:DeprecationWarning")

FLOAT_KEYS = ("prev_reward", "episode_return", "last_episode_return")
CONTRACT_KEYS = {
    "image",
    "direction",
    "mission",
    "prev_action",
    "prev_reward",
    "episode_return",
    "last_episode_return",
    "trial_episode",
}


def assert_obs_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def layout(env: gym.Env) -> tuple[bytes, tuple[int, int], int, str]:
    """What identifies a task instance: the full grid, the agent's pose, the mission."""
    base = env.unwrapped
    pos = (int(base.agent_pos[0]), int(base.agent_pos[1]))
    return base.grid.encode().tobytes(), pos, int(base.agent_dir), base.mission


@pytest.mark.parametrize("trial_episodes", [1, 3])
@pytest.mark.parametrize(
    "env_id", ["MiniGrid-DoorKey-5x5-v0", "MiniGrid-Playground-v0", "BabyAI-BossLevel-v0"]
)
def test_observation_space_is_the_contract(env_id: str, trial_episodes: int) -> None:
    env = make_env(env_id, trial_episodes=trial_episodes)
    space = env.observation_space
    assert isinstance(space, spaces.Dict) and set(space.spaces) == CONTRACT_KEYS
    assert space["image"] == spaces.Box(0, 255, (7, 7, 3), np.uint8)
    assert space["direction"] == spaces.Discrete(4)
    assert space["mission"] == spaces.Box(
        0, envs.MISSION_VOCAB_SIZE - 1, (envs.MAX_MISSION_LEN,), np.int64
    )
    assert space["prev_action"] == spaces.Discrete(env.action_space.n + 1)
    for key in FLOAT_KEYS:
        assert space[key] == spaces.Box(-np.inf, np.inf, (1,), np.float32)
    assert space["trial_episode"] == spaces.Discrete(trial_episodes)
    obs, _ = env.reset(seed=0)
    assert obs in space
    for _ in range(20):
        obs, *_ = env.step(env.action_space.sample())
        assert obs in space


def test_image_and_direction_are_minigrids_unchanged() -> None:
    raw = gym.make("MiniGrid-MemoryS7-v0")
    env = make_env("MiniGrid-MemoryS7-v0")
    raw_obs, _ = raw.reset(seed=5)
    obs, _ = env.reset(seed=5)
    for action in [2, 0, 2, 1, 2, 2, 3, 5]:
        np.testing.assert_array_equal(obs["image"], raw_obs["image"])
        assert obs["direction"] == raw_obs["direction"]
        assert envs.default_vocabulary().decode(obs["mission"]) == raw_obs["mission"]
        raw_obs, *_ = raw.step(action)
        obs, *_ = env.step(action)


def test_reward_feedback_matches_a_hand_computed_episode() -> None:
    # Empty-5x5, seed 0: the agent starts at (1, 1) facing east, the goal is at (3, 3).
    # turn right, done (no-op), pick up (nothing), forward to (1, 2), turn left, forward twice
    # to (3, 2), turn right, forward onto the goal at step 9: reward 1 - 0.9 * 9 / 100.
    env = make_env("MiniGrid-Empty-5x5-v0")
    actions = [1, 6, 3, 2, 0, 2, 2, 1, 2]
    final_reward = 1 - 0.9 * 9 / 100
    expected_prev_action = [7, *actions]  # 7 = "none": MiniGrid has 7 actions
    expected_prev_reward = [0.0] * 9 + [final_reward]
    expected_return = [0.0] * 9 + [final_reward]

    obs, _ = env.reset(seed=0)
    observed = [obs]
    for i, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        observed.append(obs)
        assert terminated == (i == len(actions) - 1) and not truncated
    assert reward == pytest.approx(final_reward)
    assert info["is_success"] is True
    assert [int(o["prev_action"]) for o in observed] == expected_prev_action
    np.testing.assert_allclose([o["prev_reward"][0] for o in observed], expected_prev_reward)
    np.testing.assert_allclose([o["episode_return"][0] for o in observed], expected_return)
    assert all(o["last_episode_return"][0] == 0 and o["trial_episode"] == 0 for o in observed)

    # A new episode starts from "none" and zeros again, and its return starts from 0.
    obs, _ = env.reset()
    assert int(obs["prev_action"]) == 7
    assert obs["prev_reward"][0] == 0 and obs["episode_return"][0] == 0
    obs, *_ = env.step(0)
    assert int(obs["prev_action"]) == 0
    assert obs["prev_reward"][0] == 0 and obs["episode_return"][0] == 0


def test_feedback_wrapper_rejects_non_discrete_actions_and_double_wrapping() -> None:
    env = RewardFeedbackWrapper(MissionObservationWrapper(gym.make("MiniGrid-Empty-5x5-v0")))
    with pytest.raises(ValueError, match="already has them"):
        RewardFeedbackWrapper(env)
    with pytest.raises(TypeError, match="Discrete"):
        RewardFeedbackWrapper(gym.make("Pendulum-v1"))
    with pytest.raises(TypeError, match="Dict observation space"):
        RewardFeedbackWrapper(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="lacks"):
        MissionObservationWrapper(gym.wrappers.FilterObservation(env, ["image", "direction"]))


def run_trial(env: gym.Env, rng: np.random.Generator, seed: int | None) -> dict[str, Any]:
    """Play one trial with random actions, recording what the tests check."""
    obs, _ = env.reset(seed=seed)
    record: dict[str, Any] = {
        "starts": [layout(env)],
        "start_obs": [obs],
        "returns": [],
        "rewards": [],
        "trial_episode": [int(obs["trial_episode"])],
    }
    inner_return = 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(7)))
        record["rewards"].append(float(reward))
        record["trial_episode"].append(int(obs["trial_episode"]))
        inner_return += float(reward)
        if terminated or truncated:
            record["returns"].append(inner_return)
            record["final_info"] = info
            record["terminated"] = terminated
            return record
        if "inner_episode" in info:  # an attempt ended; obs starts the next one
            assert info["inner_episode"]["return"] == pytest.approx(inner_return)
            record["returns"].append(inner_return)
            record["starts"].append(layout(env))
            record["start_obs"].append(obs)
            assert "is_success" not in info
            inner_return = 0.0
        else:
            assert obs["episode_return"][0] == pytest.approx(inner_return, abs=1e-6)


@pytest.mark.parametrize("env_id", ["MiniGrid-DoorKey-5x5-v0", "BabyAI-GoToLocalS6N3-v0"])
def test_trial_replays_the_same_layout_and_sums_rewards(env_id: str) -> None:
    n = 4
    env = make_env(env_id, trial_episodes=n, max_steps=6)  # short attempts: mostly truncated
    rng = np.random.default_rng(0)
    first = run_trial(env, rng, seed=11)
    assert len(first["returns"]) == n
    assert len(set(first["starts"])) == 1, "every attempt must start on the same layout"
    assert first["trial_episode"][0] == 0 and first["trial_episode"][-1] == n - 1
    assert sorted(set(first["trial_episode"])) == list(range(n))
    assert sum(first["rewards"]) == pytest.approx(sum(first["returns"]))
    for i, obs in enumerate(first["start_obs"]):
        assert int(obs["trial_episode"]) == i
        assert int(obs["prev_action"]) == 7, "feedback keys reset at every attempt"
        assert obs["prev_reward"][0] == 0 and obs["episode_return"][0] == 0
        expected_last = 0.0 if i == 0 else first["returns"][i - 1]
        assert obs["last_episode_return"][0] == pytest.approx(expected_last, abs=1e-6)
    assert first["final_info"]["is_success"] == (first["rewards"][-1] > 0)

    # The first trial runs on the given seed, like a plain reset(seed=11) would.
    raw = gym.make(env_id, max_steps=6)
    raw.reset(seed=11)
    assert layout(raw) == first["starts"][0]
    # The next trial (reset without a seed) is a new task, again repeated for every attempt.
    second = run_trial(env, rng, seed=None)
    assert len(set(second["starts"])) == 1
    assert second["starts"][0] != first["starts"][0]


def test_trial_last_episode_return_carries_a_success() -> None:
    env = make_env("MiniGrid-Empty-5x5-v0", trial_episodes=2)
    env.reset(seed=0)
    for action in [2, 2, 1, 2]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not (terminated or truncated)
    obs, reward, terminated, truncated, info = env.step(2)  # onto the goal: attempt 1 ends
    success_reward = 1 - 0.9 * 5 / 100
    assert reward == pytest.approx(success_reward) and not terminated
    assert info["inner_episode"] == {
        "return": pytest.approx(success_reward),
        "length": 5,
        "is_success": True,
        "terminated": True,
    }
    assert obs["last_episode_return"][0] == pytest.approx(success_reward)
    assert int(obs["trial_episode"]) == 1 and obs["episode_return"][0] == 0
    for action in [2, 2, 1, 2]:
        obs, *_ = env.step(action)
        assert obs["last_episode_return"][0] == pytest.approx(success_reward)
        assert obs["episode_return"][0] == 0 and int(obs["trial_episode"]) == 1
    obs, reward, terminated, truncated, info = env.step(2)
    assert terminated and info["is_success"] is True


def test_truncated_trial_is_not_a_success() -> None:
    env = make_env("MiniGrid-Empty-8x8-v0", trial_episodes=2, max_steps=3)
    env.reset(seed=0)
    outcomes = [env.step(0)[2:] for _ in range(6)]  # turn left 6 times: 2 attempts of 3 steps
    assert [(t, tr) for t, tr, _ in outcomes] == [(False, False)] * 5 + [(False, True)]
    assert outcomes[-1][2]["is_success"] is False
    assert outcomes[2][2]["inner_episode"]["terminated"] is False


@pytest.mark.parametrize("trial_episodes", [0, 2.0, -1])
def test_trial_episodes_must_be_a_positive_int(trial_episodes: Any) -> None:
    with pytest.raises(ValueError, match="trial_episodes"):
        make_env("MiniGrid-Empty-5x5-v0", trial_episodes=trial_episodes)


@pytest.mark.parametrize("trial_episodes", [1, 3])
@pytest.mark.parametrize("env_id", ["MiniGrid-DoorKey-5x5-v0", "BabyAI-SynthLoc-v0"])
def test_same_seed_gives_same_observations(env_id: str, trial_episodes: int) -> None:
    def rollout(seed_at_make: bool) -> list[dict[str, Any]]:
        env = make_env(env_id, seed=7 if seed_at_make else None, trial_episodes=trial_episodes)
        obs, _ = env.reset() if seed_at_make else env.reset(seed=7)
        actions = np.random.default_rng(1)
        observed = [obs]
        for _ in range(300):  # several episodes: later resets without a seed are covered too
            obs, _, terminated, truncated, _ = env.step(int(actions.integers(7)))
            observed.append(obs)
            if terminated or truncated:
                obs, _ = env.reset()
                observed.append(obs)
        return observed

    first, again, seeded_at_make = rollout(False), rollout(False), rollout(True)
    assert len(first) == len(again) == len(seeded_at_make)
    for a, b, c in zip(first, again, seeded_at_make, strict=True):
        assert_obs_equal(a, b)
        assert_obs_equal(a, c)


def test_different_seeds_give_different_layouts() -> None:
    env = make_env("MiniGrid-DoorKey-8x8-v0")
    layouts = set()
    for seed in range(5):
        env.reset(seed=seed)
        layouts.add(layout(env))
    assert len(layouts) == 5


def test_observations_are_fresh_objects() -> None:
    env = make_env("MiniGrid-DoorKey-5x5-v0", trial_episodes=2)
    first, _ = env.reset(seed=0)
    second, *_ = env.step(0)
    for key, value in first.items():
        if isinstance(value, np.ndarray):
            assert not np.shares_memory(value, second[key]), key
    first["mission"][0] = 0  # writable, and changing it changes nothing else
    assert second["mission"][0] != 0


@pytest.mark.parametrize("trial_episodes", [1, 2])
def test_rgb_render_is_the_full_grid_with_the_view_highlighted(trial_episodes: int) -> None:
    raw = gym.make("MiniGrid-DoorKey-6x6-v0", render_mode="rgb_array")
    env = make_env(
        "MiniGrid-DoorKey-6x6-v0", render_mode="rgb_array", trial_episodes=trial_episodes
    )
    raw.reset(seed=3)
    env.reset(seed=3)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (6 * 32, 6 * 32, 3)
    np.testing.assert_array_equal(frame, raw.render())
    np.testing.assert_array_equal(frame, env.unwrapped.get_frame(highlight=True))
    assert not np.array_equal(frame, env.unwrapped.get_frame(highlight=False))
    env.step(2)
    raw.step(2)
    np.testing.assert_array_equal(env.render(), raw.render())


class _ChattyResetEnv(gym.Env):
    """Prints like a BabyAI level during ``reset()``, then optionally fails."""

    observation_space = spaces.Discrete(2)
    action_space = spaces.Discrete(2)

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        print("Sampling rejected: unreachable object at (1, 6)")
        print("a message of the user's own")
        print("Timeout during mission generation: maximum recursion depth exceeded")
        if self.fail:
            raise RuntimeError("layout generation failed")
        return 0, {}


def test_quiet_level_sampling_drops_only_the_retry_lines(capsys: pytest.CaptureFixture) -> None:
    env = envs.QuietLevelSamplingWrapper(_ChattyResetEnv())
    env.reset(seed=0)
    env.reset()
    assert capsys.readouterr().out == "a message of the user's own\n" * 2
    assert env.rejected_samples == 4


def test_quiet_level_sampling_keeps_other_output_when_reset_raises(
    capsys: pytest.CaptureFixture,
) -> None:
    env = envs.QuietLevelSamplingWrapper(_ChattyResetEnv(fail=True))
    with pytest.raises(RuntimeError, match="layout generation failed"):
        env.reset(seed=0)
    assert capsys.readouterr().out == "a message of the user's own\n"
    assert env.rejected_samples == 2


def test_babyai_envs_reset_silently_with_unchanged_observations(
    capsys: pytest.CaptureFixture,
) -> None:
    """BabyAI-GoToLocal rejects layouts on most seeds; make_env keeps stdout clean without
    changing what the agent sees."""
    env = make_env("BabyAI-GoToLocal-v0")
    assert env.get_wrapper_attr("rejected_samples") == 0
    observations = [env.reset(seed=seed)[0] for seed in range(30)]
    assert capsys.readouterr().out == ""
    assert env.get_wrapper_attr("rejected_samples") > 0

    unquiet = RewardFeedbackWrapper(MissionObservationWrapper(gym.make("BabyAI-GoToLocal-v0")))
    for seed, obs in enumerate(observations):
        expected, _ = unquiet.reset(seed=seed)
        assert_obs_equal({key: obs[key] for key in expected}, expected)  # no trial keys there
    assert "Sampling rejected" in capsys.readouterr().out  # the seeds do hit rejections


def test_minigrid_envs_are_not_wrapped_for_quiet_sampling() -> None:
    with pytest.raises(AttributeError):
        make_env("MiniGrid-DoorKey-5x5-v0").get_wrapper_attr("rejected_samples")


def test_a_shown_mission_replaces_the_env_mission_for_the_agent_only() -> None:
    env = envs.make_env("BabyAI-GoToLocal-v0", seed=3, mission="go to the red ball")
    vocabulary = env.get_wrapper_attr("vocabulary")
    real = set()
    for _ in range(4):
        obs, _ = env.reset()
        real.add(env.unwrapped.mission)
        assert vocabulary.decode(obs["mission"]) == "go to the red ball"
        obs, *_ = env.step(2)
        assert vocabulary.decode(obs["mission"]) == "go to the red ball"
    assert real != {"go to the red ball"}  # the env keeps (and judges by) its own missions
    plain, _ = envs.make_env("BabyAI-GoToLocal-v0", seed=3).reset()
    assert vocabulary.decode(plain["mission"]) in real
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['fly', 'moon'\]"):
        envs.make_env("BabyAI-GoToLocal-v0", mission="fly to the moon")


def test_an_empty_shown_mission_is_shown_as_no_words() -> None:
    """``--mission ""`` (no instruction at all) must not fall back to the env's mission."""
    env = envs.make_env("BabyAI-GoToLocal-v0", seed=3, mission="")
    obs, _ = env.reset()
    assert env.unwrapped.mission  # the env still has one
    assert env.get_wrapper_attr("vocabulary").decode(obs["mission"]) == ""
    assert (obs["mission"] == envs.vocab.PAD_ID).all()
