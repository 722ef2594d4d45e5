"""Helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import KVWriter

import envs
from agents.experiment.config import DEFAULT_CONFIG, load_config, save_config
from agents.experiment.model_files import save_model
from agents.experiment.training import build_agent


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
