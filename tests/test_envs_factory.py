"""The env factory: Gymnasium and SB3 env checkers over the registry, VecEnvs, Monitor, errors."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs import make_env, make_vec_env, minigrid_env_ids

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is out of date:DeprecationWarning",
    "ignore:.*Box observation space (minimum|maximum) value:UserWarning",  # the contract's ±inf
    "ignore:.*minimal resolution for an image:UserWarning",  # SB3's CnnPolicy hint
    "ignore:.*is different from the unwrapped version:UserWarning",
)

ENV_IDS = minigrid_env_ids()
# One env of each family (and every kind of mission: none, fixed, placeholders, BabyAI grammar).
REPRESENTATIVE_IDS = [
    "MiniGrid-DoorKey-5x5-v0",
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-Empty-Random-5x5-v0",
    "MiniGrid-Dynamic-Obstacles-5x5-v0",
    "MiniGrid-LavaGapS5-v0",
    "MiniGrid-LockedRoom-v0",
    "MiniGrid-Fetch-5x5-N2-v0",
    "MiniGrid-PutNear-6x6-N2-v0",
    "MiniGrid-KeyCorridorS3R1-v0",
    "MiniGrid-ObstructedMaze-1Dl-v0",
    "MiniGrid-Playground-v0",
    "BabyAI-GoToLocal-v0",
    "BabyAI-PutNextLocal-v0",
    "BabyAI-MoveTwoAcrossS5N2-v0",
    "BabyAI-SynthSeq-v0",
    "BabyAI-BossLevel-v0",
]
LONG_TAIL_IDS = [env_id for env_id in ENV_IDS if env_id not in REPRESENTATIVE_IDS]


def build_or_skip(env_id: str, **kwargs) -> envs.TrialWrapper:
    try:
        env = make_env(env_id, **kwargs)
        env.reset(seed=0)  # the WFC envs read their pattern image here
        return env
    except FileNotFoundError as error:  # the WFC envs' pattern images are missing from the wheel
        pytest.skip(f"{env_id} cannot be constructed in this install: {error}")


def run_checkers(env_id: str, trial_episodes: int) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # BabyAI's rejection-sampling chatter
        gym_check_env(build_or_skip(env_id, trial_episodes=trial_episodes), skip_render_check=True)
        sb3_check_env(build_or_skip(env_id, trial_episodes=trial_episodes))


def test_representative_set_is_registered() -> None:
    assert set(REPRESENTATIVE_IDS) <= set(ENV_IDS)
    assert len(ENV_IDS) > 150


@pytest.mark.parametrize("trial_episodes", [1, 3])
@pytest.mark.parametrize("env_id", REPRESENTATIVE_IDS)
def test_env_checkers_pass(env_id: str, trial_episodes: int) -> None:
    run_checkers(env_id, trial_episodes)


@pytest.mark.slow
@pytest.mark.parametrize("trial_episodes", [1, 3])
@pytest.mark.parametrize("env_id", LONG_TAIL_IDS)
def test_env_checkers_pass_on_the_whole_registry(env_id: str, trial_episodes: int) -> None:
    run_checkers(env_id, trial_episodes)


def test_render_modes_pass_the_gymnasium_render_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker also builds the env in "human" mode: keep pygame off the screen.
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    env = make_env("MiniGrid-DoorKey-5x5-v0", render_mode="rgb_array", trial_episodes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pygame's missing-font notice in "human" mode
        gym_check_env(env, skip_render_check=False)


@pytest.mark.parametrize(
    ("env_id", "match"),
    [
        ("MiniGrid-DoorKey-5x5-v9", "Did you mean 'MiniGrid-DoorKey-5x5-v0'"),
        ("minigrid-doorkey-5x5-v0", "Did you mean 'MiniGrid-DoorKey-5x5-v0'"),
        ("BabyAI-BossLevl-v0", "'BabyAI-BossLevel-v0'"),
        ("Atari-Pong-v99", "envs.minigrid_env_ids"),
        ("CartPole-v1", "not by minigrid"),
    ],
)
def test_unknown_env_id_lists_close_matches(env_id: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_env(env_id)
    with pytest.raises(ValueError, match=match):
        make_vec_env(env_id)


def test_env_kwargs_reach_gym_make() -> None:
    env = make_env("MiniGrid-DoorKey-5x5-v0", max_steps=7)
    assert env.unwrapped.max_steps == 7
    with pytest.raises(TypeError, match="max_stepz"):
        make_env("MiniGrid-DoorKey-5x5-v0", max_stepz=7)


def test_make_vec_env_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="vec_env must be one of"):
        make_vec_env("MiniGrid-Empty-5x5-v0", vec_env="ray")
    with pytest.raises(ValueError, match="n_envs"):
        make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=0)


def first_observations(n_envs: int, seed: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(n_envs):
        obs, _ = make_env("MiniGrid-DoorKey-8x8-v0", seed=seed + i).reset()
        out.append(obs)
    return out


@pytest.mark.parametrize("vec_env", ["dummy", "subproc"])
def test_vec_env_seeds_env_i_with_seed_plus_i(vec_env: str) -> None:
    venv = make_vec_env("MiniGrid-DoorKey-8x8-v0", n_envs=3, seed=20, vec_env=vec_env)
    try:
        obs = venv.reset()
        assert set(obs) == set(venv.observation_space.spaces)
        for i, expected in enumerate(first_observations(3, seed=20)):
            for key, value in expected.items():
                np.testing.assert_array_equal(obs[key][i], value, err_msg=f"env {i} {key}")
        assert not np.array_equal(obs["image"][0], obs["image"][1])
    finally:
        venv.close()


def test_monitor_logs_return_length_and_success_of_whole_trials(tmp_path) -> None:
    venv = make_vec_env(
        "MiniGrid-Empty-5x5-v0",
        n_envs=2,
        seed=0,
        trial_episodes=2,
        max_steps=10,
        monitor_dir=str(tmp_path),
    )
    venv.reset()
    rng = np.random.default_rng(0)
    done_infos = []
    for _ in range(200):
        _, rewards, dones, infos = venv.step(rng.integers(3, size=2))  # left/right/forward
        done_infos += [info for info, done in zip(infos, dones, strict=True) if done]
    venv.close()
    assert len(done_infos) >= 10
    for info in done_infos:
        episode = info["episode"]
        assert episode["l"] <= 2 * 10  # a trial is 2 attempts of at most 10 steps
        assert info["is_success"] == episode["is_success"]
        assert isinstance(info["is_success"], bool)
    assert any(info["is_success"] for info in done_infos)
    assert not all(info["is_success"] for info in done_infos)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.monitor.csv", "1.monitor.csv"]
    assert "is_success" in (tmp_path / "0.monitor.csv").read_text().splitlines()[1]


def test_sb3_ppo_trains_on_the_vec_env_and_logs_success() -> None:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.preprocessing import get_flattened_obs_dim
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class ConcatExtractor(BaseFeaturesExtractor):
        """Every (preprocessed) observation entry, flattened and concatenated: the 7x7 image is
        too small for SB3's default CNN, and the real tokenizer lives in agents/."""

        def __init__(self, observation_space) -> None:
            dims = [get_flattened_obs_dim(s) for s in observation_space.spaces.values()]
            super().__init__(observation_space, features_dim=sum(dims))

        def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([x.flatten(1).float() for x in observations.values()], dim=1)

    venv = make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=2, seed=0, max_steps=8)
    model = PPO(
        "MultiInputPolicy",
        venv,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        seed=0,
        policy_kwargs={"features_extractor_class": ConcatExtractor},
    )
    model.learn(total_timesteps=64)
    assert len(model.ep_info_buffer) > 0
    assert len(model.ep_success_buffer) == len(model.ep_info_buffer)
    venv.close()


def test_vec_env_renders_rgb_frames() -> None:
    venv = make_vec_env("MiniGrid-DoorKey-5x5-v0", n_envs=2, seed=0, render_mode="rgb_array")
    venv.reset()
    frames = venv.get_images()
    assert len(frames) == 2 and frames[0].shape == (5 * 32, 5 * 32, 3)
    venv.close()
