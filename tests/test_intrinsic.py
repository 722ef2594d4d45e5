"""The intrinsic value head (``exploration.mixing = value_head``): its non-episodic GAE, the
advantage mixing, that it changes nothing it should not, and that every agent kind has it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.vec_env import VecEnv

import envs
from agents.experiment.config import (
    DEFAULT_CONFIG,
    ConfigError,
    ExperimentConfig,
    config_from_yaml_text,
    config_to_yaml,
    inert_settings,
    load_config,
)
from agents.experiment.io import latest_checkpoint
from agents.experiment.model_files import load_model_file, save_model
from agents.experiment.training import (
    _hyperparameters,
    _make_envs,
    build_agent,
    resume,
    train,
)
from agents.exploration import EpisodicFirstVisitBonus
from agents.intrinsic import add_intrinsic_advantages, nonepisodic_gae
from tests.test_exploration import extra, scripted_venv, tiny_run

KINDS = ["thalamus", "ppo", "lstm"]


def tiny(kind: str, *extra: str) -> ExperimentConfig:
    """A 2-env, 16-step-rollout config of ``kind`` on Empty-5x5 with episodes of at most 6
    steps (so a rollout crosses episode ends), the first-visit bonus at coef 0.5."""
    overrides = [
        f"agent.kind={kind}",
        "env.id=MiniGrid-Empty-5x5-v0",
        "env.n_envs=2",
        "env.env_kwargs.max_steps=6",
        "ppo.n_steps=16",
        "ppo.batch_size=32",
        "ppo.n_epochs=2",
        "exploration.kind=episodic_first_visit",
        "exploration.coef=0.5",
        "train.device=cpu",
        "train.eval_freq=0",
        "train.checkpoint_freq=0",
        "train.progress=none",
        "thalamus.d_model=32",
        "thalamus.d_task=32",
        "thalamus.d_workspace=32",
        "thalamus.top_k=8",
        "lstm.lstm_hidden_size=16",
    ]
    return load_config(DEFAULT_CONFIG, [*overrides, *extra])


def built(config: ExperimentConfig) -> tuple[Any, VecEnv]:
    """The agent of ``config`` on its training envs (with the bonus wrapper)."""
    train_env, _ = _make_envs(config)
    return build_agent(config, train_env), train_env


# ----------------------------------------------------------------------------- the GAE


def test_nonepisodic_gae_crosses_the_episode_end_the_extrinsic_gae_stops_at() -> None:
    """One env, 4 steps, the episode ends after step 1 (step 2 starts a new one); gamma 0.5,
    lambda 1, values 0, the value after the rollout 8. By hand: the intrinsic return of step
    1 is 2 + 0.5 * 7 = 5.5 (it continues into the next episode), the extrinsic one 2."""
    rewards = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    values = np.zeros((4, 1), dtype=np.float32)
    advantages, returns = nonepisodic_gae(rewards, values, np.array([8.0]), 0.5, 1.0)
    np.testing.assert_allclose(returns[:, 0], [3.75, 5.5, 7.0, 8.0])
    np.testing.assert_allclose(advantages, returns)

    extrinsic = RolloutBuffer(4, spaces.Box(-1, 1, (1,)), spaces.Discrete(2), "cpu", 1.0, 0.5)
    for t in range(4):
        extrinsic.add(
            np.zeros((1, 1)),
            np.zeros((1, 1)),
            rewards[t],
            np.array([t == 2]),
            th.zeros(1),
            th.zeros(1),
        )
    extrinsic.compute_returns_and_advantage(th.tensor([8.0]), dones=np.array([False]))
    np.testing.assert_allclose(extrinsic.returns[:, 0], [2.0, 2.0, 7.0, 8.0])


def test_nonepisodic_gae_with_lambda_and_values_by_hand() -> None:
    """gamma 0.5, lambda 0.5, values 1, last value 2, rewards 1 0 0 1: deltas 0.5 -0.5 -0.5 1,
    A_3 = 1, A_2 = -0.5 + 0.25 * 1, A_1 = -0.5 + 0.25 * A_2, A_0 = 0.5 + 0.25 * A_1."""
    rewards = np.array([[1.0], [0.0], [0.0], [1.0]])
    advantages, returns = nonepisodic_gae(rewards, np.ones((4, 1)), np.array([2.0]), 0.5, 0.5)
    np.testing.assert_allclose(advantages[:, 0], [0.359375, -0.5625, -0.25, 1.0])
    np.testing.assert_allclose(returns[:, 0], advantages[:, 0] + 1.0)


def test_advantages_are_mixed_into_the_extrinsic_ones_and_returns_stay_extrinsic() -> None:
    class Buffer:
        advantages = np.array([[1.0, 2.0]], dtype=np.float32)
        returns = np.array([[5.0, 6.0]], dtype=np.float32)
        intrinsic_rewards = np.array([[1.0, 3.0]], dtype=np.float32)
        intrinsic_values = np.zeros((1, 2), dtype=np.float32)

    buffer = Buffer()
    add_intrinsic_advantages(buffer, np.zeros(2), gamma=0.9, gae_lambda=0.95, adv_coef=0.5)
    np.testing.assert_allclose(buffer.advantages, [[1.5, 3.5]])
    np.testing.assert_allclose(buffer.extrinsic_advantages, [[1.0, 2.0]])
    np.testing.assert_allclose(buffer.intrinsic_returns, [[1.0, 3.0]])
    np.testing.assert_allclose(buffer.returns, [[5.0, 6.0]])


# ----------------------------------------------------------------------------- the rollout


def _rollout_arrays(model: Any) -> dict[str, np.ndarray]:
    """The last rollout's arrays, ``[T, N]`` (SB3's ``get`` flattened some env-major)."""
    buffer = model.rollout_buffer
    steps, n_envs = buffer.buffer_size, buffer.n_envs

    def unflat(array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.shape == (steps, n_envs):
            return array
        return array.reshape(n_envs, steps).T  # SB3's swap_and_flatten, undone

    names = ["advantages", "returns", "values", "rewards", "episode_starts"]
    names += ["intrinsic_rewards", "intrinsic_values", "intrinsic_returns", "intrinsic_advantages"]
    return {name: unflat(getattr(buffer, name)) for name in names}


@pytest.mark.parametrize("kind", KINDS)
def test_every_agent_learns_the_bonus_apart_across_episode_ends(kind: str) -> None:
    """After one rollout of 16 steps in 6-step episodes: the stored intrinsic rewards are the
    wrapper's bonuses, the intrinsic advantages follow the recursion *through* every episode
    end while the extrinsic ones stop there, the policy trained on their mix, and the head's
    signals are logged."""
    config = tiny(
        kind,
        "exploration.mixing=value_head",
        "exploration.intrinsic_gamma=0.9",
        "exploration.intrinsic_adv_coef=0.5",
    )
    model, env = built(config)
    bonuses: list[np.ndarray] = []
    step_wait = env.step_wait

    def recording_step_wait() -> Any:
        result = step_wait()
        bonuses.append(np.array([info["exploration_bonus"] for info in result[3]]))
        return result

    env.step_wait = recording_step_wait  # type: ignore[method-assign]
    model.learn(32)
    env.close()
    a = _rollout_arrays(model)
    np.testing.assert_allclose(a["intrinsic_rewards"], np.stack(bonuses[-16:]))
    assert a["intrinsic_rewards"].max() == 0.5

    gamma, lam = 0.9, config.ppo.gae_lambda
    ends = np.argwhere(a["episode_starts"][1:] > 0)
    assert len(ends), "the rollout must cross an episode end"
    for t, env_index in ends:  # step t ended an episode; step t + 1 started the next
        ext, intr = (a["advantages"] - 0.5 * a["intrinsic_advantages"]), a["intrinsic_advantages"]
        values, int_values = a["values"][:, env_index], a["intrinsic_values"][:, env_index]
        # Extrinsic: nothing from the next episode, A_t = r_t - V_t (a truncation's bootstrap
        # is in r_t already).
        assert ext[t, env_index] == pytest.approx(a["rewards"][t, env_index] - values[t], abs=1e-5)
        # Intrinsic: the recursion goes on into the next episode.
        expected = (
            a["intrinsic_rewards"][t, env_index]
            + gamma * int_values[t + 1]
            - int_values[t]
            + gamma * lam * intr[t + 1, env_index]
        )
        assert intr[t, env_index] == pytest.approx(expected, abs=1e-5)
    np.testing.assert_allclose(
        a["intrinsic_returns"], a["intrinsic_advantages"] + a["intrinsic_values"], atol=1e-5
    )
    logged = model.logger.name_to_value
    names = ("intrinsic_value_mean", "intrinsic_adv_std", "extrinsic_adv_std")
    for key in (*names, "intrinsic_explained_variance"):
        assert np.isfinite(logged[f"exploration/{key}"]), key
    assert logged["exploration/intrinsic_value_loss"] > 0


@pytest.mark.parametrize("kind", ["ppo", "lstm"])
def test_the_baselines_intrinsic_values_are_those_the_rollout_computed(kind: str) -> None:
    """The baselines compute the rollout's intrinsic values when the update starts, from what
    the buffer stored; the same inputs give back the *extrinsic* values SB3 stored while
    collecting, so they are what the rollout fed its critic (for the LSTM: each step's
    critic state and episode start)."""
    model, env = built(tiny(kind, "exploration.mixing=value_head"))
    checked: list[float] = []
    original_train = model.train

    def train() -> None:
        with th.no_grad():
            values = model.policy.predict_values(*model.rollout_critic_inputs())
        stored = model.rollout_buffer.values.reshape(-1)
        checked.append(float(np.abs(values.cpu().numpy().reshape(-1) - stored).max()))
        original_train()

    model.train = train  # type: ignore[method-assign]
    model.learn(32)
    env.close()
    assert len(checked) == 1 and checked[0] < 1e-5


# ----------------------------------------------------------------------------- equivalences


def _parameters(model: Any, keep: Any = lambda name: True) -> dict[str, th.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.policy.named_parameters()
        if "intrinsic" not in name and keep(name)
    }


def _one_update(config: ExperimentConfig, zero_head: bool = False) -> Any:
    model, env = built(config)
    if zero_head:
        with th.no_grad():
            for p in model.policy.intrinsic_value_net.parameters():
                p.zero_()
    model.learn(32)
    env.close()
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_bonus_and_a_zero_head_give_the_update_without_a_bonus(kind: str) -> None:
    """coef 0 with the head's weights zeroed: the intrinsic returns, values, advantages and
    loss are exactly 0, so the update equals reward mixing's with coef 0 (no bonus) to 1e-6.
    Also checks that the head draws from a forked random stream: the rollouts are the same."""
    reward = _one_update(tiny(kind, "exploration.coef=0"))
    value_head = _one_update(
        tiny(kind, "exploration.coef=0", "exploration.mixing=value_head"), zero_head=True
    )
    expected, got = _parameters(reward), _parameters(value_head)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert th.allclose(value, got[name], atol=1e-6, rtol=0), name


def test_no_intrinsic_weight_gives_ppo_the_policy_update_without_a_bonus() -> None:
    """intrinsic_adv_coef 0 with a real bonus: the advantages are the extrinsic ones, so PPO's
    actor (its own MLP branch and action head) moves exactly as without a bonus; the critic
    does not (it learns the intrinsic head too). The gradient clip, which couples the two,
    is lifted."""
    actor = lambda name: "policy_net" in name or "action_net" in name  # noqa: E731
    free = "ppo.max_grad_norm=1e9"
    reward = _one_update(tiny("ppo", "exploration.coef=0", free))
    value_head = _one_update(
        tiny("ppo", "exploration.mixing=value_head", "exploration.intrinsic_adv_coef=0", free)
    )
    expected, got = _parameters(reward, actor), _parameters(value_head, actor)
    assert expected
    for name, value in expected.items():
        assert th.allclose(value, got[name], atol=1e-6, rtol=0), name
    critic = _parameters(reward, lambda n: "value_net" in n)
    assert any(not th.equal(v, _parameters(value_head)[n]) for n, v in critic.items())


@pytest.mark.parametrize("kind", KINDS)
def test_reward_mixing_builds_the_agents_as_before(kind: str) -> None:
    config = tiny(kind)
    assert config.exploration.mixing == "reward"
    assert not [key for key in _hyperparameters(config) if key.startswith("intrinsic")]
    model, env = built(config)
    env.close()
    assert type(model).__name__ in ("ThalamusPPO", "PPO", "RecurrentPPO")
    assert not [name for name in model.policy.state_dict() if "intrinsic" in name]


# ----------------------------------------------------------------------------- the wrapper


def test_the_wrapper_leaves_the_reward_extrinsic_in_value_head_mode() -> None:
    views = [(1, 0), (2, 0), (3, 0)]
    venv = EpisodicFirstVisitBonus(scripted_venv(views), coef=0.5, add_to_reward=False)
    venv.reset()
    rewards, bonuses = [], []
    for _ in range(2):
        _, reward, _, infos = venv.step(np.zeros(1, dtype=np.int64))
        rewards.append(float(reward[0]))
        bonuses.append(infos[0]["exploration_bonus"])
    assert rewards == [0.0, 1.0]  # ScriptedViews' own rewards
    assert bonuses == [0.5, 0.5]
    train_env, _ = _make_envs(tiny("ppo", "exploration.mixing=value_head"))
    assert train_env.add_to_reward is False
    train_env.close()
    train_env, _ = _make_envs(tiny("ppo"))
    assert train_env.add_to_reward is True
    train_env.close()


# ----------------------------------------------------------------------------- config, files


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["exploration.kind=none", "exploration.mixing=value_head"],
            "exploration.mixing = 'value_head' learns an intrinsic reward, but exploration.kind "
            "= 'none' gives none; set exploration.kind",
        ),
        (["exploration.mixing=sum"], "exploration.mixing = 'sum' is not a valid choice"),
        (["exploration.intrinsic_gamma=1.5"], "exploration.intrinsic_gamma = 1.5 is out of range"),
        (["exploration.intrinsic_adv_coef=-1"], "exploration.intrinsic_adv_coef = -1.0 is out of"),
    ],
)
def test_config_errors_say_what_is_wrong_and_what_to_do(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(DEFAULT_CONFIG, overrides)


def test_intrinsic_settings_without_the_head_are_reported_inert() -> None:
    config = load_config(DEFAULT_CONFIG, ["exploration.intrinsic_gamma=0.9"])
    warnings = inert_settings(config)
    assert any("only apply with exploration.mixing = value_head" in w for w in warnings)
    config = load_config(DEFAULT_CONFIG, ["exploration.kind=episodic_count"])
    assert not [w for w in inert_settings(config) if "mixing" in w]


def test_intrinsic_settings_without_the_head_are_refused_by_the_baselines() -> None:
    from agents import make_agent

    venv = envs.make_vec_env("MiniGrid-Empty-5x5-v0", n_envs=1, seed=0)
    with pytest.raises(ValueError, match="intrinsic_gamma only apply with intrinsic_value_head"):
        make_agent("ppo", venv, device="cpu", intrinsic_gamma=0.9)
    venv.close()


def test_an_agent_with_the_head_refuses_an_env_without_the_bonus() -> None:
    config = tiny("ppo", "exploration.mixing=value_head")
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0, **config.env.env_kwargs)
    model = build_agent(config, venv)
    with pytest.raises(RuntimeError, match="wrap the training env with agents.exploration"):
        model.learn(32)
    venv.close()


def test_a_config_saved_before_the_mixing_keys_loads_with_reward_mixing() -> None:
    text = config_to_yaml(tiny("ppo"))
    old = "\n".join(
        line
        for line in text.splitlines()
        if not line.strip().startswith(("mixing:", "intrinsic_gamma:", "intrinsic_adv_coef:"))
    )
    assert "mixing" not in old
    config = config_from_yaml_text(old, "an old run's config.yaml")
    assert dataclasses.asdict(config) == dataclasses.asdict(tiny("ppo"))


@pytest.mark.parametrize("kind", KINDS)
def test_the_head_round_trips_through_a_model_file(tmp_path: Path, kind: str) -> None:
    model = _one_update(tiny(kind, "exploration.mixing=value_head"))
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model_file(tmp_path / "m.safetensors", device="cpu")
    assert type(loaded) is type(model)
    state, restored = model.policy.state_dict(), loaded.policy.state_dict()
    assert [n for n in state if "intrinsic" in n]
    assert state.keys() == restored.keys()
    for name, value in state.items():
        assert th.equal(value, restored[name]), name
    assert loaded.intrinsic_gamma == model.intrinsic_gamma
    assert loaded.intrinsic_adv_coef == model.intrinsic_adv_coef


@pytest.mark.parametrize("kind", ["thalamus", "ppo"])
def test_a_value_head_run_resumes_from_its_checkpoint_with_the_head(
    tmp_path: Path, kind: str
) -> None:
    """A run stopped at its step-32 checkpoint resumes to 128 steps: the head's weights come
    back from the checkpoint, the head keeps learning (its logs continue), and
    exploration.mixing cannot change on resume (it fixes the network)."""
    overrides = [
        *tiny_run(tmp_path, kind, "episodic_first_visit"),
        "exploration.mixing=value_head",
        "train.checkpoint_freq=32",
        "train.total_timesteps=64",
    ]
    run_dir = train(load_config(DEFAULT_CONFIG, overrides), extra_callbacks=extra)
    with pytest.raises(ConfigError, match="exploration.mixing=reward.*cannot change a resumed run"):
        resume(run_dir, ["exploration.mixing=reward"], total_timesteps=128)
    checkpoint = load_model_file(latest_checkpoint(run_dir / "checkpoints").model_path)
    resumed_head: list[th.Tensor] = []

    def remember_head(callbacks: Any) -> list[Any]:
        inspect = extra(callbacks)[0]
        original = inspect._on_training_start

        def on_training_start() -> None:
            head = inspect.model.policy.intrinsic_value_net.weight.detach().clone()
            resumed_head.append(head)
            original()

        inspect._on_training_start = on_training_start  # type: ignore[method-assign]
        return [inspect]

    model_dir = resume(run_dir, total_timesteps=128, extra_callbacks=remember_head)
    assert model_dir == run_dir
    assert th.equal(resumed_head[0], checkpoint.policy.intrinsic_value_net.weight)
    final = load_model_file(run_dir / "final_model.safetensors")
    assert final.num_timesteps >= 128
    assert not th.equal(final.policy.intrinsic_value_net.weight, resumed_head[0])
