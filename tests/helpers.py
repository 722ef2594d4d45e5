"""Helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import KVWriter

import envs
from agents.experiment.config import DEFAULT_CONFIG, load_config, save_config
from agents.experiment.model_files import save_model
from agents.experiment.training import build_agent

#: The tasks whose per-env file turns the first-visit bonus on (issue 36): those where the
#: `exploration` suite showed the baselines learn with it and not without it. Read by the
#: config test (only these files default to a bonus) and the benchmark test (their recorded
#: runs still resolve to what they ran).
TASKS_WITH_A_BONUS = ("MiniGrid-KeyCorridorS3R1-v0", "MiniGrid-RedBlueDoors-6x6-v0")


def save_untrained_run(root: Path, overrides: list[str]) -> Path:
    """Save an untrained agent and its config under ``root`` as a run directory.

    :param root: the folder to write ``final_model.safetensors`` and ``config.yaml`` into.
    :param overrides: dotted ``KEY=VALUE`` overrides of the default config.
    :return: ``root``, loadable by ``agents.experiment.training.load_model``.
    """
    config = load_config(DEFAULT_CONFIG, overrides)
    venv = envs.make_vec_env(config.env.id, n_envs=1, seed=0, **config.env.env_kwargs)
    save_model(build_agent(config, venv), root / "final_model.safetensors")
    venv.close()
    save_config(config, root / "config.yaml")
    return root


class CaptureWriter(KVWriter):
    """Keeps every dumped key/value (SB3 logger output format)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, key_values: dict[str, Any], key_excluded: Any, step: int = 0) -> None:
        self.records.append(dict(key_values))

    def close(self) -> None:
        pass


#: Rollouts of 32 env steps (2 envs x 16) trained in one minibatch and one epoch.
TINY_ROLLOUT = ["env.n_envs=2", "ppo.n_steps=16", "ppo.batch_size=32", "ppo.n_epochs=1"]

#: A thalamus core of width 32 that keeps 8 tokens.
TINY_THALAMUS = [
    "thalamus.d_model=32",
    "thalamus.d_task=32",
    "thalamus.d_workspace=32",
    "thalamus.top_k=8",
]


def tiny_run_overrides(tmp_path: Path, agent: str, total: int, eval_freq: int) -> list[str]:
    """Overrides of a run small enough for a unit test: 2 envs of MiniGrid-Empty-5x5 whose
    episodes end after 8 steps, rollouts of 32 env steps (16 per env) in one minibatch and
    epoch, no checkpoints, 2-episode evaluations every ``eval_freq`` steps, run directories
    under ``tmp_path``, and for the thalamus agent a core of width 32 keeping 8 tokens.

    :param agent: the agent kind (``agent.kind``).
    :param total: ``train.total_timesteps``.
    :param eval_freq: ``train.eval_freq`` (env steps).
    """
    overrides = [
        f"agent.kind={agent}",
        "env.id=MiniGrid-Empty-5x5-v0",
        "env.env_kwargs.max_steps=8",
        *TINY_ROLLOUT,
        f"train.total_timesteps={total}",
        "train.checkpoint_freq=0",
        f"train.eval_freq={eval_freq}",
        "train.eval_episodes=2",
        "train.eval_n_envs=2",
        "train.device=cpu",
        "train.torch_threads=1",
        "train.progress=none",
        f"train.runs_dir={tmp_path}",
    ]
    if agent == "thalamus":
        overrides += TINY_THALAMUS
    return overrides
