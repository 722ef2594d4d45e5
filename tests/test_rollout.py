"""agents.experiment.rollout.play_episode, the one episode loop, against the loops it replaced.

Evaluation, videos, the mission sensitivity test and the memory diagnosis each had their own
loop with ``isinstance(policy, ThalamusPolicy)`` branches; :func:`_reference_episode` is that
loop (``diagnose_memory.play`` and ``video.run_episode`` before issue 33), kept here as the
reference the unified loop must reproduce: the same actions, rewards and features for a fixed
seed, sampled actions included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th

import envs
from agents.experiment.rollout import play_episode
from agents.experiment.training import load_model
from agents.registry import spec_of_model
from tests.helpers import save_untrained_run

ENV_ID = "MiniGrid-MemoryS7-v0"
KINDS = ("thalamus", "ppo", "lstm")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    loaded = {}
    for kind in KINDS:
        root = save_untrained_run(
            tmp_path_factory.mktemp(kind),
            [
                f"agent.kind={kind}",
                f"env.id={ENV_ID}",
                "env.n_envs=1",
                "ppo.n_steps=16",
                "ppo.batch_size=16",
                "env.env_kwargs.max_steps=20",
                "thalamus.d_model=32",
                "thalamus.d_task=32",
                "thalamus.d_workspace=32",
                "lstm.lstm_hidden_size=16",
                "train.device=cpu",
            ],
        )
        loaded[kind] = load_model(root, device="cpu").model
    return loaded


def _reference_episode(
    model: Any, env: Any, seed: int, deterministic: bool
) -> tuple[list[int], list[float], list[np.ndarray]]:
    """The pre-issue-33 loop: actions, rewards and per-step features, branching on the policy."""
    from agents.policy import ThalamusPolicy

    policy = model.policy
    policy.set_training_mode(False)
    thalamus = isinstance(policy, ThalamusPolicy)
    recurrent = hasattr(policy, "lstm_actor")
    obs, _ = env.reset(seed=seed)
    state: Any = None
    step = 0
    actions, rewards, features_seen = [], [], []
    while True:
        starts = np.array([step == 0])
        if thalamus:
            obs_tensor, _ = policy.obs_to_tensor(obs)
            with th.no_grad():
                out = policy.act(obs_tensor, state, th.as_tensor(starts), deterministic, False)
            state = out.state
            action = out.actions[0].cpu().numpy()
            features = out.thalamus.features[0].cpu().numpy()
        else:
            action, state = model.predict(
                obs, state=state, episode_start=starts, deterministic=deterministic
            )
            if recurrent:
                features = np.asarray(state[0])[:, 0].reshape(-1)
            else:
                obs_tensor, _ = policy.obs_to_tensor(obs)
                with th.no_grad():
                    latent = policy.extract_features(obs_tensor, policy.pi_features_extractor)
                    features = policy.mlp_extractor.forward_actor(latent)[0].cpu().numpy()
        obs, reward, terminated, truncated, _ = env.step(np.asarray(action).reshape(()))
        actions.append(int(np.asarray(action)))
        rewards.append(float(reward))
        features_seen.append(np.asarray(features, dtype=np.float64).copy())
        step += 1
        if terminated or truncated:
            return actions, rewards, features_seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_play_episode_reproduces_the_old_loop(
    models: dict[str, Any], kind: str, deterministic: bool
) -> None:
    model = models[kind]
    env = envs.make_env(ENV_ID, max_steps=20)
    try:
        for seed in (3, 4):
            th.manual_seed(seed)
            old_actions, old_rewards, old_features = _reference_episode(
                model, env, seed, deterministic
            )
            seen: list[tuple[int, np.ndarray]] = []
            th.manual_seed(seed)
            episode = play_episode(
                model,
                env,
                deterministic=deterministic,
                seed=seed,
                with_features=True,
                on_step=lambda _e, _o, step, seen=seen: seen.append(
                    (int(step.action), np.asarray(step.features, dtype=np.float64))
                ),
            )
            assert [a for a, _ in seen] == old_actions
            assert episode.length == len(old_rewards)
            assert episode.episode_return == pytest.approx(sum(old_rewards))
            for (_, new), old in zip(seen, old_features, strict=True):
                np.testing.assert_array_equal(new, old)
    finally:
        env.close()


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_a_stepper_and_only_the_thalamus_shows_a_gate(
    models: dict[str, Any], kind: str
) -> None:
    agent_spec = spec_of_model(models[kind])
    assert agent_spec.kind == kind
    env = envs.make_env(ENV_ID, max_steps=20)
    try:
        episode = play_episode(models[kind], env, seed=0, max_steps=2)
    finally:
        env.close()
    assert episode.length == 2
    assert (episode.last_step.thalamus is not None) == agent_spec.shows_gate


def test_an_unregistered_algorithm_is_refused_with_the_kinds_named(models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="thalamus, ppo, lstm"):
        spec_of_model(object())


def _importing(folder: Path, module: str) -> list[str]:
    """The files directly in ``folder`` that import ``module``."""
    pattern = rf"^\s*(from|import) {re.escape(module)}\b"
    return [p.name for p in sorted(folder.glob("*.py")) if re.search(pattern, p.read_text(), re.M)]


def test_the_layers_import_one_way() -> None:
    """Dependencies point one way: agents.bench -> agents.experiment -> agents, never back."""
    agents_dir = Path(__file__).resolve().parents[1] / "agents"
    assert _importing(agents_dir, "agents.experiment") == []
    assert _importing(agents_dir, "agents.bench") == []
    assert _importing(agents_dir / "experiment", "agents.bench") == []
