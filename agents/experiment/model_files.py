"""Model and checkpoint files that load without running code from them.

stable-baselines3's ``save`` writes a zip whose ``data`` entry holds cloudpickled Python
objects; ``load`` unpickles them, so opening a zip someone else made can run any code they put
in it. Our files hold no pickles. One ``.safetensors`` file per model:

* the tensors: the policy's ``state_dict`` (``policy.<name>``) and the optimizer's per-parameter
  state (``optimizer.<index>.<key>``);
* the safetensors header's string metadata: ``format`` / ``version``, the agent kind, the run's
  config as YAML (the config the weights were trained with), the algorithm's counters and
  statistics (timesteps, updates, learning-rate progress and KL-adaptation factor, the
  episode-info window), the optimizer's parameter groups, and the observation space it was
  built for (JSON).

Loading reads the header and the tensors as data, rebuilds the agent from the config through
:func:`agents.experiment.training.build_agent`, then puts the tensors and counters back. A
stable-baselines3 zip is read only through :func:`load_pickled_model`, which callers reach
through an explicit ``--trust-pickle`` opt-in (``scripts/convert_run.py`` converts an old run once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from agents.constants import MODEL_SUFFIX
from agents.experiment.config import (
    ConfigError,
    ExperimentConfig,
    config_from_yaml_text,
    config_to_yaml,
)
from agents.experiment.hints import script_command
from agents.experiment.io import atomic_write_bytes

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_SUFFIX",
    "TRUST_PICKLE_HELP",
    "ModelFile",
    "ModelFileError",
    "PickledModelError",
    "apply_model_file",
    "attach_config",
    "attached_config",
    "load_model_file",
    "load_pickled_model",
    "model_from_file",
    "model_file_bytes",
    "read_model_file",
    "save_model",
]

FORMAT_NAME = "thalamus_rl.model"
FORMAT_VERSION = 1
TRUST_PICKLE_HELP = (
    "also read stable-baselines3 .zip models. They hold pickled Python objects: loading one "
    "runs whatever code its author put in it (arbitrary code execution). Only for files you "
    "made yourself or trust"
)
_CONFIG_ATTRIBUTE = "_thalamus_rl_config"
_HEADER_LIMIT = 100_000_000  # bytes of JSON header a model file may declare


class ModelFileError(ConfigError):
    """A model or checkpoint file that cannot be used; the message names it (one line)."""


class PickledModelError(ModelFileError):
    """A stable-baselines3 zip (pickled objects) met without the ``--trust-pickle`` opt-in."""


def pickled_model_message(path: Path, convert_target: Path | None = None) -> str:
    """What to tell a user whose ``path`` is a stable-baselines3 zip."""
    target = convert_target if convert_target is not None else path
    return (
        f"{path} is a stable-baselines3 zip: it holds pickled Python objects, and loading it "
        "runs any code its author put in it. This project reads only .safetensors models. If "
        "you made it (a run of an older version) or trust its author, convert it once with: "
        + script_command("convert_run.py", target, "--trust-pickle")
    )


# --------------------------------------------------------------------------------------
# The config a model was trained with
# --------------------------------------------------------------------------------------


def attach_config(model: BaseAlgorithm, config: ExperimentConfig) -> None:
    """Remember on ``model`` the config it trains with; :func:`save_model` writes it."""
    setattr(model, _CONFIG_ATTRIBUTE, config)


def attached_config(model: BaseAlgorithm) -> ExperimentConfig | None:
    """The config :func:`attach_config` put on ``model``, or None."""
    return getattr(model, _CONFIG_ATTRIBUTE, None)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    """numpy scalars and tuples as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | deque):
        return [_json_value(v) for v in value]
    return value


def _algorithm_state(model: BaseAlgorithm) -> dict[str, Any]:
    """What a resume needs of the algorithm besides its config and tensors."""
    state: dict[str, Any] = {
        "kind_class": type(model).__name__,
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(getattr(model, "_n_updates", 0)),
        "episode_num": int(model._episode_num),
        "current_progress_remaining": float(model._current_progress_remaining),
        "ep_info_buffer": _json_value(list(model.ep_info_buffer or [])),
        "ep_success_buffer": _json_value(list(model.ep_success_buffer or [])),
    }
    if hasattr(model, "lr_factor"):
        state["lr_factor"] = float(model.lr_factor)
    return state


def model_file_bytes(model: BaseAlgorithm, config: ExperimentConfig | None = None) -> bytes:
    """``model`` as the bytes of a ``.safetensors`` model file (see the module doc).

    :param config: the config it trains with; default the one :func:`attach_config` set.
    :raises ValueError: no config given or attached.
    """
    from safetensors.torch import save

    config = config if config is not None else attached_config(model)
    if config is None:
        raise ValueError(
            "save_model needs the model's config: build it with "
            "agents.experiment.training.build_agent, or pass config="
        )
    tensors: dict[str, th.Tensor] = {}
    # A module shared by several attributes (SB3's features_extractor, pi_ and
    # vf_features_extractor) appears under several names: store it once, the others as aliases.
    aliases: dict[str, str] = {}
    stored: dict[tuple[Any, ...], str] = {}
    for name, tensor in model.policy.state_dict().items():
        view = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and view in stored:
            aliases[f"policy.{name}"] = stored[view]
            continue
        stored[view] = f"policy.{name}"
        tensors[f"policy.{name}"] = tensor.detach().to("cpu").clone().contiguous()
    optimizer = model.policy.optimizer.state_dict()
    scalar_state: dict[str, dict[str, Any]] = {}
    for index, per_param in optimizer["state"].items():
        for key, value in per_param.items():
            if isinstance(value, th.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu").clone().contiguous()
            else:
                scalar_state.setdefault(str(index), {})[key] = _json_value(value)
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "agent_kind": config.agent.kind,
        "config": config_to_yaml(config),
        "algorithm": json.dumps(_algorithm_state(model)),
        "optimizer": json.dumps(
            {"param_groups": _json_value(optimizer["param_groups"]), "scalar_state": scalar_state}
        ),
        "observation_space": repr(model.observation_space),
        "aliases": json.dumps(aliases),
    }
    return save(tensors, metadata=metadata)


def save_model(
    model: BaseAlgorithm, path: str | os.PathLike[str], config: ExperimentConfig | None = None
) -> None:
    """Write ``model`` to ``path`` (a ``.safetensors`` file) atomically.

    :raises agents.experiment.io.DiskFullError: the disk is full (nothing is left half-written).
    """
    atomic_write_bytes(path, model_file_bytes(model, config))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A model file's contents, read as data.

    :ivar path: where it was read from.
    :ivar config: the config its weights were trained with.
    :ivar algorithm: the counters and statistics (:func:`_algorithm_state`).
    :ivar optimizer: ``param_groups`` and the non-tensor per-parameter state.
    :ivar observation_space: ``repr`` of the observation space it was built for.
    :ivar tensors: policy and optimizer tensors by name (aliases resolved).
    """

    path: Path
    config: ExperimentConfig
    algorithm: dict[str, Any]
    optimizer: dict[str, Any]
    observation_space: str
    tensors: dict[str, th.Tensor]

    @property
    def timesteps(self) -> int:
        return int(self.algorithm["num_timesteps"])


def _header(data: bytes, path: Path) -> dict[str, Any]:
    if len(data) < 8:
        raise ModelFileError(f"{path} is not a model file: {len(data)} bytes, truncated or empty")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_HEADER_LIMIT, len(data) - 8):
        raise ModelFileError(f"{path} is not a complete model file (truncated or not safetensors)")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, ValueError):
        raise ModelFileError(f"{path} is not a model file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a model file: its header is not a mapping")
    return header


def read_model_file(path: str | os.PathLike[str], *, check_env_id: bool = True) -> ModelFile:
    """Read a ``.safetensors`` model file as data (nothing in it is executed).

    :raises PickledModelError: ``path`` is a stable-baselines3 zip.
    :raises ModelFileError: missing, truncated, corrupt, of another format or version, or
        carrying an invalid config; the message names the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        with open(path, "rb") as f:  # one open: a later prune cannot change what we read
            data = f.read()
    except FileNotFoundError:
        raise  # the caller decides: a missing file may have been pruned since it was listed
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
        raise PickledModelError(pickled_model_message(path))
    metadata = _header(data, path).get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is a safetensors file but not a thalamus_rl model")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path} is model format version {metadata.get('version')}; this code reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is corrupt: {str(exc).splitlines()[0]}") from None
    try:
        algorithm = json.loads(metadata["algorithm"])
        optimizer = json.loads(metadata["optimizer"])
        config_text = metadata["config"]
        for alias, name in json.loads(metadata.get("aliases", "{}")).items():
            tensors[alias] = tensors[name]
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path} is corrupt: its metadata lacks {exc}") from None
    config = config_from_yaml_text(config_text, f"model file {path}", check_env_id=check_env_id)
    return ModelFile(
        path,
        config,
        algorithm,
        optimizer,
        metadata.get("observation_space", ""),
        tensors,
    )


class _SpacesOnlyVecEnv(VecEnv):
    """A VecEnv that only carries spaces: what the factory needs to rebuild an agent whose
    weights are then loaded (for prediction, not for training)."""

    def __init__(self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space):
        super().__init__(num_envs, observation_space, action_space)

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("a model loaded without an env cannot step; pass env= to train it")

    reset = step_async = step_wait = env_method = set_attr = _refuse  # type: ignore[assignment]

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [None] * self.num_envs

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs


def _spaces_of(config: ExperimentConfig) -> tuple[spaces.Space, spaces.Space]:
    import envs

    env = envs.make_env(
        config.env.id, trial_episodes=config.env.trial_episodes, **config.env.env_kwargs
    )
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def apply_model_file(model: BaseAlgorithm, model_file: ModelFile) -> None:
    """Put ``model_file``'s weights, optimizer state and counters into ``model`` (built from
    the same config).

    :raises ModelFileError: the tensors do not fit the model (names or shapes).
    """
    path = model_file.path
    policy_state = {
        name.removeprefix("policy."): tensor
        for name, tensor in model_file.tensors.items()
        if name.startswith("policy.")
    }
    try:
        model.policy.load_state_dict(policy_state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{path} does not fit the agent its config builds: {str(exc).splitlines()[0]} "
            f"(saved for observation space {model_file.observation_space})"
        ) from None
    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, tensor in model_file.tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = tensor
    for index, values in model_file.optimizer.get("scalar_state", {}).items():
        optimizer_state.setdefault(int(index), {}).update(values)
    groups = [dict(group) for group in model_file.optimizer["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    try:
        model.policy.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: the optimizer state does not fit: {exc}") from None
    algorithm = model_file.algorithm
    model.num_timesteps = int(algorithm["num_timesteps"])
    model._n_updates = int(algorithm["n_updates"])
    model._episode_num = int(algorithm["episode_num"])
    model._current_progress_remaining = float(algorithm["current_progress_remaining"])
    window = model._stats_window_size
    model.ep_info_buffer = deque(algorithm["ep_info_buffer"], maxlen=window)
    model.ep_success_buffer = deque(algorithm["ep_success_buffer"], maxlen=window)
    if "lr_factor" in algorithm and hasattr(model, "lr_factor"):
        model.lr_factor = float(algorithm["lr_factor"])


def load_model_file(
    path: str | os.PathLike[str],
    *,
    env: VecEnv | None = None,
    device: str = "auto",
    config: ExperimentConfig | None = None,
) -> BaseAlgorithm:
    """Rebuild the agent a model file describes and load its weights, optimizer and counters.

    :param path: a ``.safetensors`` model file (:func:`save_model`).
    :param env: the envs to train on (a resume); None builds the agent for prediction only.
    :param device: the torch device to load onto.
    :param config: the config to build with (a resume's, with its overrides); default the
        file's own.
    :raises ModelFileError: see :func:`read_model_file` and :func:`apply_model_file`.
    """
    return model_from_file(read_model_file(path), env=env, device=device, config=config)


def model_from_file(
    model_file: ModelFile,
    *,
    env: VecEnv | None = None,
    device: str = "auto",
    config: ExperimentConfig | None = None,
) -> BaseAlgorithm:
    """:func:`load_model_file` for a file already read."""
    from agents.experiment.training import build_agent

    config = config if config is not None else model_file.config
    build_config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, device=device)
    )
    if env is None:
        observation_space, action_space = _spaces_of(config)
        spaces_env = _SpacesOnlyVecEnv(config.env.n_envs, observation_space, action_space)
        model = build_agent(build_config, spaces_env)
        model.env = None
    else:
        model = build_agent(build_config, env)
    attach_config(model, config)
    apply_model_file(model, model_file)
    return model


def load_pickled_model(
    path: str | os.PathLike[str], kind: str, *, device: str = "auto", env: VecEnv | None = None
) -> BaseAlgorithm:
    """Load a stable-baselines3 zip. **Runs code from the file**: call it only behind an
    explicit opt-in (``--trust-pickle``).

    :raises ModelFileError: the zip cannot be read.
    """
    from agents.experiment.training import agent_class

    try:
        return agent_class(kind).load(path, env=env, device=device)
    except (AssertionError, KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path} is not a readable stable-baselines3 zip: {exc}") from None
