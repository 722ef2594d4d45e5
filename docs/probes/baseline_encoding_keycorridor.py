"""Probe: which part of the PPO baseline's observation encoding fails MiniGrid-KeyCorridorS3R1.

Trains SB3's PPO on the project's env stack (``envs.make_vec_env``) with one observation
encoding and one PPO recipe, and prints the mean eval reward (50 stochastic episodes on envs
seeded apart) every 25k steps, then one JSON line. Results: ``docs/benchmarks/baselines.md``.

    .venv/bin/python docs/probes/baseline_encoding_keycorridor.py ENCODING RECIPE SEED STEPS

ENCODING (what the policy sees, and how it is scaled):

- ``dict``: every Dict key (image, direction, mission, reward feedback) through
  ``FlatDictExtractor`` without ``image_high``: the image divided by 255, as SB3 does for a
  uint8 image (what the benchmark's PPO had before the extractor's fix);
- ``dict_scaled``: the same, with ``image_high=envs.IMAGE_CHANNEL_HIGH`` (today's baselines);
- ``dict_vecnorm``: ``dict`` with ``VecNormalize`` on the image key;
- ``keys_vecnorm:K1,K2``: only keys K1, K2, ... of the Dict, ``VecNormalize`` on the image;
- ``image``: the image alone as a Box, SB3's ``MlpPolicy`` (divides by 255);
- ``image_vecnorm``: the image alone with ``VecNormalize`` (what rl-zoo3 runs on MiniGrid).

RECIPE: ``shared`` (the benchmark's: lr 1e-3, batch 256) or ``zoo`` (lr 2.5e-4, batch 1024);
both 8 envs, n_steps 128, 10 epochs, ent_coef 0.01, gamma 0.99, GAE 0.95.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecNormalize

import envs
from agents.baselines import FlatDictExtractor

ENV_ID = "MiniGrid-KeyCorridorS3R1-v0"
RECIPES = {
    "shared": {"learning_rate": 1e-3, "batch_size": 256},
    "zoo": {"learning_rate": 2.5e-4, "batch_size": 1024},
}
COMMON = {"n_steps": 128, "n_epochs": 10, "ent_coef": 0.01, "gamma": 0.99, "gae_lambda": 0.95}


class SelectKeys(VecEnvWrapper):
    """Keep some keys of a Dict observation; ``image_only`` returns the image as a Box."""

    def __init__(self, venv: VecEnv, keys: tuple[str, ...], image_only: bool = False) -> None:
        space = venv.observation_space
        kept = space["image"] if image_only else spaces.Dict({k: space[k] for k in keys})
        super().__init__(venv, observation_space=kept)
        self.keys, self.image_only = keys, image_only

    def _select(self, observation: dict[str, Any]) -> Any:
        if self.image_only:
            return observation["image"]
        return {key: observation[key] for key in self.keys}

    def reset(self) -> Any:
        return self._select(self.venv.reset())

    def step_wait(self) -> Any:
        observation, reward, done, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = self._select(info["terminal_observation"])
        return self._select(observation), reward, done, infos


def build_env(encoding: str, seed: int, training: bool) -> VecEnv:
    venv: VecEnv = envs.make_vec_env(ENV_ID, n_envs=8, seed=seed)
    name, _, keys = encoding.partition(":")
    if name.startswith("image"):
        venv = SelectKeys(venv, ("image",), image_only=True)
    elif name == "keys_vecnorm":
        venv = SelectKeys(venv, tuple(keys.split(",")))
    if name.endswith("vecnorm"):
        norm_keys = None if name.startswith("image") else ["image"]
        venv = VecNormalize(
            venv, norm_obs=True, norm_reward=training, norm_obs_keys=norm_keys, training=training
        )
    return venv


class EvalEvery(BaseCallback):
    """Mean eval reward every ``every`` steps, with the training env's normalisation stats."""

    def __init__(self, eval_env: VecEnv, every: int = 25_000) -> None:
        super().__init__()
        self.eval_env, self.every, self.next, self.curve = eval_env, every, every, []

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next:
            self.next += self.every
            if isinstance(self.eval_env, VecNormalize):
                self.eval_env.obs_rms = self.model.get_env().obs_rms
            mean, _ = evaluate_policy(self.model, self.eval_env, n_eval_episodes=50)
            self.curve.append((self.num_timesteps, round(float(mean), 3)))
            print(self.curve[-1], flush=True)
        return True


def main(encoding: str, recipe: str, seed: int, steps: int) -> None:
    th.set_num_threads(1)
    venv = build_env(encoding, seed, training=True)
    eval_env = build_env(encoding, 10_000 + seed, training=False)
    policy_kwargs = {}
    if not encoding.startswith("image"):
        high = envs.IMAGE_CHANNEL_HIGH if encoding == "dict_scaled" else None
        policy_kwargs = {
            "features_extractor_class": FlatDictExtractor,
            "features_extractor_kwargs": {"image_high": high},
        }
    policy = "MlpPolicy" if encoding.startswith("image") else "MultiInputPolicy"
    model = PPO(
        policy,
        venv,
        seed=seed,
        device="cpu",
        policy_kwargs=policy_kwargs,
        **RECIPES[recipe],
        **COMMON,
    )
    callback = EvalEvery(eval_env)
    model.learn(steps, callback=callback)
    result = {"encoding": encoding, "recipe": recipe, "seed": seed, "curve": callback.curve}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
