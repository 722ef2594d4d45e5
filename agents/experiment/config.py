"""Experiment configuration: OmegaConf structured configs, YAML files and dotted overrides.

One config system for every entry point. A config is built in layers, each merged over the
previous one and type-checked against the dataclass schema below as it is merged:

1. the schema defaults (the dataclasses in this module),
2. ``configs/defaults.yaml`` (the project's shared settings),
3. one per-env file, e.g. ``configs/doorkey_5x5.yaml``,
4. dotted ``key=value`` overrides from the command line (``ppo.n_steps=64``).

:func:`load_config` then checks ranges, choices and cross-field rules and returns a plain
:class:`ExperimentConfig` of dataclasses. Every problem (an unknown key, a wrong type, a
value out of range, an env id that is not registered) raises :class:`ConfigError` naming the
key, the value and what would be valid, before anything is built.

>>> cfg = load_config(overrides=["train.seed=3", "ppo.n_steps=64"])
>>> cfg.train.seed, cfg.ppo.n_steps
(3, 64)
>>> load_config(overrides=["ppo.n_step=64"])  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
agents.experiment.config.ConfigError: unknown key 'ppo.n_step' ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import operator
import os
import re
import types
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from agents.constants import (
    ADVANTAGE_NORMALIZATIONS,
    AGENT_KINDS,
    CRITIC_TRUNKS,
    DEFAULT_CORE_LR_SCALE,
    EXPLORATION_KINDS,
    EXPLORATION_MIXINGS,
    INTRINSIC_DEFAULTS,
    PPO_DEFAULTS,
    PPO_SCHEDULE_DEFAULTS,
    THALAMUS_PPO_DEFAULTS,
    check_batch_size,
    check_lags,
)
from agents.registry import AGENT_SPECS, spec
from thalamus_rl.config import ThalamusConfig

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "DEFAULTS_FILE",
    "AgentConfig",
    "ConfigError",
    "EnvConfig",
    "ExperimentConfig",
    "ExplorationConfig",
    "LSTMConfig",
    "PPOConfig",
    "PolicyConfig",
    "ThalamusPPOConfig",
    "TokenizerConfig",
    "TrainConfig",
    "config_reference",
    "config_from_yaml_text",
    "config_reference_markdown",
    "config_to_yaml",
    "find_config_for_env",
    "inert_settings",
    "load_config",
    "parse_overrides",
    "resolve_config_path",
    "resolve_yaml_file",
    "to_dataclass",
    "save_config",
    "validate_config",
]

CONFIG_DIR: Path = Path(__file__).resolve().parents[2] / "configs"
"""The repository's ``configs/`` folder."""
DEFAULTS_FILE: Path = CONFIG_DIR / "defaults.yaml"
"""Shared settings, merged under every per-env file."""
DEFAULT_CONFIG: Path = CONFIG_DIR / "doorkey_5x5.yaml"
"""The config ``scripts/train_agent.py`` trains when given no arguments."""


class ConfigError(ValueError):
    """A config value, key or file is invalid; the message says which and what is valid."""


def _param(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field carrying its documentation and its valid range or choices.

    OmegaConf reads only the type and the default; :func:`validate_config` reads the bounds
    from the field metadata and :func:`config_reference` the help text.
    """
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, dict | list):
        factory = default.copy
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EnvConfig:
    """Which environment to train on and how to vectorise it."""

    id: str = _param("MiniGrid-DoorKey-5x5-v0", "Gymnasium env id (MiniGrid-* or BabyAI-*).")
    n_envs: int = _param(8, "Parallel training envs.", ge=1)
    vec_env: str = _param(
        "dummy",
        "Vectorisation: 'dummy' steps envs in this process, 'subproc' in worker processes.",
        choices=("dummy", "subproc"),
    )
    trial_episodes: int = _param(
        1,
        "Episodes per trial: the reward-feedback signals (return of the previous episode) "
        "carry across this many episodes of the same layout.",
        ge=1,
    )
    env_kwargs: dict[str, Any] = _param({}, "Extra keyword arguments for gymnasium.make.")


@dataclass
class AgentConfig:
    """Which agent to train."""

    kind: str = _param(
        "thalamus",
        "; ".join(f"{s.kind}: {s.description}" for s in AGENT_SPECS.values()) + ".",
        choices=AGENT_KINDS,
    )


@dataclass
class PPOConfig:
    """PPO hyperparameters, shared by all three agents (stable-baselines3 names), and the
    entropy coefficient's schedule, which the training loop applies to each of them.

    ``ent_decay_steps > 0`` with ``ent_coef = 0`` is allowed: the schedule keeps a coefficient
    of 0 at 0, which is the run without it (a sweep may draw ``ent_coef = 0`` under a decay
    set for every trial); :func:`inert_settings` warns of it.
    """

    n_steps: int = _param(PPO_DEFAULTS["n_steps"], "Rollout length per env between updates.", ge=1)
    batch_size: int = _param(PPO_DEFAULTS["batch_size"], "Minibatch size in env steps.", ge=1)
    n_epochs: int = _param(PPO_DEFAULTS["n_epochs"], "Passes over each rollout.", ge=1)
    learning_rate: float = _param(PPO_DEFAULTS["learning_rate"], "Adam learning rate.", gt=0.0)
    gamma: float = _param(PPO_DEFAULTS["gamma"], "Discount factor.", ge=0.0, le=1.0)
    gae_lambda: float = _param(PPO_DEFAULTS["gae_lambda"], "GAE lambda.", ge=0.0, le=1.0)
    clip_range: float = _param(PPO_DEFAULTS["clip_range"], "PPO ratio clip.", gt=0.0)
    ent_coef: float = _param(PPO_DEFAULTS["ent_coef"], "Entropy bonus coefficient.", ge=0.0)
    ent_decay_steps: int = _param(
        PPO_SCHEDULE_DEFAULTS["ent_decay_steps"],
        "Lower ent_coef linearly to 0 over this many env steps, set at each rollout start from "
        "the run's step count (so a resume continues it; train/ent_coef logs it); 0: constant.",
        ge=0,
    )
    vf_coef: float = _param(PPO_DEFAULTS["vf_coef"], "Value loss coefficient.", ge=0.0)
    max_grad_norm: float = _param(PPO_DEFAULTS["max_grad_norm"], "Gradient norm clip.", gt=0.0)
    normalize_advantage: bool = _param(
        PPO_DEFAULTS["normalize_advantage"],
        "Normalise advantages (PPO and LSTM-PPO: per minibatch; the thalamus agent: as "
        "thalamus_ppo says).",
    )
    target_kl: float | None = _param(
        PPO_DEFAULTS["target_kl"],
        "Stop an update's epochs early when the approximate KL exceeds this.",
        gt=0.0,
    )


@dataclass
class TokenizerConfig:
    """How the thalamus policy turns observations into tokens (``agent.kind = thalamus``)."""

    max_word_tokens: int | None = _param(
        None,
        "Keep only the first this many mission slots as word tokens (null: all). Fewer tokens "
        "make the core faster; the task vector still pools every word.",
        ge=0,
    )


@dataclass
class PolicyConfig:
    """The thalamus policy beyond its core and tokenizer (``agent.kind = thalamus``)."""

    core_lr_scale: float = _param(
        DEFAULT_CORE_LR_SCALE,
        "The tokenizer and core train at this times ppo.learning_rate, the actor and critic "
        "heads at the full rate (the core's parameters move the policy far more per Adam "
        "step than the heads').",
        gt=0.0,
    )
    compile_core: bool = _param(
        False,
        "Run the core through torch.compile (inductor) in rollouts and updates; eager is the "
        "reference. Compiling costs minutes on a small CPU before the first update and saves "
        "~25% of each iteration after it: worth it for long runs only "
        "(docs/benchmarks/profile.md).",
    )
    critic_trunk: str = _param(
        "shared",
        "What the critic's heads read: shared (the actor's core; the value loss trains it "
        "too), separate (a tokenizer and core of their own, same thalamus settings: twice the "
        "core's cost, and the value loss never reaches the actor's core), detached (the "
        "actor's core with the gradient stopped: only the policy loss trains the core).",
        choices=CRITIC_TRUNKS,
    )


@dataclass
class ThalamusPPOConfig:
    """ThalamusPPO's update beyond the shared ``ppo`` settings (``agent.kind = thalamus``)."""

    advantage_normalization: str = _param(
        THALAMUS_PPO_DEFAULTS["advantage_normalization"],
        "Scope of the advantage normalisation: rollout (one mean and scale per update) or "
        "minibatch (SB3's PPO).",
        choices=ADVANTAGE_NORMALIZATIONS,
    )
    advantage_std_floor: float = _param(
        THALAMUS_PPO_DEFAULTS["advantage_std_floor"],
        "Divide advantages by max(std, this), in reward units: before a sparse-reward task "
        "pays, advantages are value noise, and scaled to unit variance they make the core fit "
        "it and stop exploring (DoorKey-5x5). 0: off.",
        ge=0.0,
    )
    adaptive_lr_kl: float | None = _param(
        THALAMUS_PPO_DEFAULTS["adaptive_lr_kl"],
        "Scale the learning rate after each update to keep its approximate KL near this "
        "(/1.5 above twice it, x1.5 below half of it, never above ppo.learning_rate); null: off. "
        "The core moves the policy 0.05-0.3 KL per update at ppo.learning_rate once rewards "
        "arrive; PPO's MLP moves it ~0.01.",
        gt=0.0,
    )
    aux_past_view_coef: float = _param(
        THALAMUS_PPO_DEFAULTS["aux_past_view_coef"],
        "Weight of a self-supervised memory loss added to the PPO loss: from the core's features "
        "at step t a head predicts the image seen at t - k (each cell's category per channel, "
        "cross-entropy) for each lag k in aux_past_view_lags, masked across episode starts and "
        "the sequence's start, so the core learns to keep recent views before the reward says "
        "they matter (agents/past_view.py). 0: off, and the policy has no head.",
        ge=0.0,
    )
    aux_past_view_lags: list[int] = _param(
        THALAMUS_PPO_DEFAULTS["aux_past_view_lags"],
        "The lags k (steps back) the past-view head predicts, each >= 1 and < ppo.n_steps; "
        "read only with aux_past_view_coef > 0.",
    )


@dataclass
class LSTMConfig:
    """Policy settings of the LSTM baseline (sb3-contrib RecurrentPPO)."""

    lstm_hidden_size: int = _param(128, "LSTM hidden units.", ge=1)
    n_lstm_layers: int = _param(1, "Stacked LSTM layers.", ge=1)
    shared_lstm: bool = _param(False, "Actor and critic share one LSTM.")
    enable_critic_lstm: bool = _param(True, "The critic has its own LSTM (if not shared).")


@dataclass
class BaselineConfig:
    """Observation handling of the PPO and LSTM baselines (``agent.kind = ppo`` or ``lstm``;
    the thalamus agent embeds its observations with its own tokenizer and ignores this)."""

    normalize_obs: bool = _param(
        False,
        "Standardise each observation feature with running mean and variance, as SB3's "
        "VecNormalize does (what the baselines' users normally run them with). The statistics "
        "are part of the policy: saved in its model files, applied on every evaluation, and "
        "updated after each rollout's update from that rollout's observations.",
    )
    obs_clip: float = _param(
        10.0,
        "With normalize_obs, clip standardised features to [-obs_clip, obs_clip] "
        "(VecNormalize's clip_obs).",
        gt=0.0,
    )


@dataclass
class ExplorationConfig:
    """An intrinsic reward for training, for every agent kind (:mod:`agents.exploration`;
    evaluation and the logged episode returns stay extrinsic), added to the reward or learnt
    by a value head of its own (:mod:`agents.intrinsic`)."""

    kind: str = _param(
        "none",
        "none: extrinsic reward only; episodic_count: add coef / sqrt(n) per step, n the visits "
        "of the new view (egocentric image and direction) in this episode, counts cleared at "
        "each episode start; episodic_first_visit: add coef only when the new view is seen for "
        "the first time in this episode (0 on revisits), so an episode's intrinsic return is at "
        "most coef times its distinct views.",
        choices=EXPLORATION_KINDS,
    )
    coef: float = _param(
        0.005, "Intrinsic reward of a view new in the episode, in reward units.", ge=0.0
    )
    decay_steps: int = _param(
        0,
        "Lower coef linearly to 0 over this many env steps, set at each rollout start from the "
        "run's step count (so a resume continues it); 0: constant.",
        ge=0,
    )
    mixing: str = _param(
        "reward",
        "How the intrinsic reward trains the policy. reward: added to the extrinsic reward, so "
        "its return stops at the episode's end and a coef large enough to matter also pays for "
        "not ending (docs/exploration.md); value_head: kept apart and learnt by a second value "
        "head whose returns run on across episode ends (RND's practice), the policy trained on "
        "extrinsic advantage + intrinsic_adv_coef * intrinsic advantage.",
        choices=EXPLORATION_MIXINGS,
    )
    intrinsic_gamma: float = _param(
        INTRINSIC_DEFAULTS["intrinsic_gamma"],
        "With mixing = value_head: the discount of the intrinsic return.",
        ge=0.0,
        le=1.0,
    )
    intrinsic_adv_coef: float = _param(
        INTRINSIC_DEFAULTS["intrinsic_adv_coef"],
        "With mixing = value_head: the weight of the intrinsic advantage, added to the extrinsic "
        "one before advantage normalisation (1: the scale reward mixing gives the same coef).",
        ge=0.0,
    )


@dataclass
class TrainConfig:
    """Budget, seeding, device, and what the run writes while it trains."""

    total_timesteps: int = _param(200_000, "Env steps to train for, over all envs.", ge=1)
    seed: int = _param(0, "Seed of the policy, the training envs and (offset) the eval envs.", ge=0)
    device: str = _param("auto", "Torch device: auto, cpu, cuda, cuda:N or mps.")
    torch_threads: int | None = _param(
        None,
        "torch.set_num_threads for the run (null: torch's default). On a busy 2-core machine "
        "1 is fastest for these small models.",
        ge=1,
    )
    checkpoint_freq: int = _param(
        50_000, "Checkpoint every this many env steps (0: only at the end).", ge=0
    )
    keep_checkpoints: int = _param(3, "Periodic checkpoints kept; older ones are deleted.", ge=1)
    eval_freq: int = _param(25_000, "Evaluate every this many env steps (0: never).", ge=0)
    eval_episodes: int = _param(20, "Episodes per evaluation.", ge=1)
    eval_n_envs: int = _param(4, "Parallel eval envs (seeded apart from the training envs).", ge=1)
    eval_deterministic: bool = _param(
        False,
        "Evaluate with the most likely action instead of sampling. Off by default: under argmax "
        "a MiniGrid policy often loops forever (an unchanged view repeats the same action).",
    )
    video: bool = _param(
        False,
        "At each evaluation, record one episode with the thalamus overlay to videos/ and "
        "log it to tensorboard.",
    )
    video_fps: int = _param(4, "Frames per second of recorded videos.", ge=1)
    progress: str = _param(
        "auto",
        "auto: a progress bar on a terminal, log lines otherwise; bar; log; none.",
        choices=("auto", "bar", "log", "none"),
    )
    log_every_s: float = _param(30.0, "Seconds between plain progress log lines.", gt=0.0)
    runs_dir: str = _param("runs", "Where run directories are created.")


#: The config sections that only some agent kinds read (``config_sections`` of their
#: :class:`agents.registry.AgentSpec`); every other section is shared by all. A ``ppo`` run
#: ignores the thalamus' and the LSTM's, an ``lstm`` run the thalamus', a ``thalamus`` run the
#: LSTM's and the baselines' (``baseline``), so two configs that differ only there train the
#: same agent.
AGENT_ONLY_SECTIONS: dict[str, tuple[str, ...]] = {
    kind: agent_spec.config_sections for kind, agent_spec in AGENT_SPECS.items()
}


def sections_ignored_by(kind: str) -> set[str]:
    """The config sections an agent of ``kind`` does not read."""
    return {
        section
        for other, sections in AGENT_ONLY_SECTIONS.items()
        if other != kind
        for section in sections
    } - set(AGENT_ONLY_SECTIONS[kind])


@dataclass
class ExperimentConfig:
    """One training run: env, agent, PPO, thalamus/tokenizer/policy and LSTM settings, the loop."""

    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    thalamus: ThalamusConfig = field(default_factory=ThalamusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    thalamus_ppo: ThalamusPPOConfig = field(default_factory=ThalamusPPOConfig)
    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    exploration: ExplorationConfig = field(default_factory=ExplorationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def yaml_file_names(folder: Path) -> str:
    """The names of the YAML files directly in ``folder``, sorted, comma-separated (what a
    name-or-path argument accepts there), e.g. ``"ablations, baselines, full"``."""
    return ", ".join(sorted(path.stem for path in folder.glob("*.yaml")))


def resolve_yaml_file(
    name_or_path: str | os.PathLike[str],
    folder: Path,
    what: str,
    error: type[Exception] = ConfigError,
) -> Path:
    """Find a YAML file given a path, or a name (with or without ``.yaml``) in ``folder`` or a
    folder under it (``recipes/ppo_keycorridor_s3r1``).

    :param what: what the file is, for the error message (``"config file"``, ``"suite"``).
    :param error: the exception class raised when nothing is found.
    :raises error: no such file; the message lists the names in ``folder``.
    """
    path = Path(name_or_path)
    candidates = [path]
    if not path.is_absolute():  # also a name under folder, e.g. recipes/ppo_keycorridor_s3r1
        candidates += [folder / path, folder / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise error(
        f"{what} '{name_or_path}' not found. Give a path, or one of the names in "
        f"{folder}: {yaml_file_names(folder)}"
    )


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Find a config file given a path or a bare name in ``configs/``.

    >>> resolve_config_path("doorkey_5x5").name
    'doorkey_5x5.yaml'

    :raises ConfigError: no such file; the message lists the configs that exist.
    """
    return resolve_yaml_file(name_or_path, CONFIG_DIR, "config file")


def find_config_for_env(env_id: str) -> Path | None:
    """The per-env file in ``configs/`` whose ``env.id`` is ``env_id``, if there is one.

    >>> find_config_for_env("MiniGrid-MemoryS7-v0").name
    'memory_s7.yaml'
    >>> find_config_for_env("MiniGrid-Empty-5x5-v0") is None
    True
    """
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path == DEFAULTS_FILE:
            continue
        data = OmegaConf.load(path)
        if OmegaConf.select(data, "env.id", default=None) == env_id:
            return path
    return None


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """Split dotted ``key=value`` overrides and parse each value as YAML.

    >>> parse_overrides(["ppo.n_steps=64", "ppo.learning_rate=1e-3", "env.env_kwargs.size=6"])
    [('ppo.n_steps', 64), ('ppo.learning_rate', 0.001), ('env.env_kwargs.size', 6)]

    ``null`` is None and ``[1, 2]`` a list; list items are addressed by index.

    :raises ConfigError: an override without ``=`` or with an empty key.
    """
    parsed: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override '{item}' must look like key=value, e.g. ppo.n_steps=64 or "
                "train.seed=3 (scripts/train_agent.py --help-config lists the keys)"
            )
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]
        parsed.append((key, value))
    return parsed


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    *,
    defaults_file: str | os.PathLike[str] | None = DEFAULTS_FILE,
    check_env_id: bool = True,
) -> ExperimentConfig:
    """Build, type-check and validate an experiment config.

    :param config_file: a per-env YAML (path or name in ``configs/``); ``None`` uses only the
        schema and the defaults file.
    :param overrides: dotted ``key=value`` strings, applied last, in order.
    :param defaults_file: shared settings merged under ``config_file``; ``None`` skips them.
    :param check_env_id: check that ``env.id`` is a registered MiniGrid/BabyAI id.
    :return: the validated config as dataclasses.
    :raises ConfigError: unknown key, wrong type, out-of-range value or unknown env id.
    """
    merged: DictConfig = OmegaConf.structured(ExperimentConfig)
    files = [] if defaults_file is None else [Path(defaults_file)]
    if config_file is not None:
        files.append(resolve_config_path(config_file))
    for path in files:
        layer = _load_yaml(path)
        with _omegaconf_errors(f"file {path}", layer):
            merged = OmegaConf.merge(merged, layer)  # type: ignore[assignment]
    for key, value in parse_overrides(overrides):
        with _omegaconf_errors("the command line", {key: value}):
            OmegaConf.update(merged, key, value, merge=True)
    return to_dataclass(merged, check_env_id=check_env_id)


def config_from_yaml_text(
    text: str, source: str, overrides: Iterable[str] = (), *, check_env_id: bool = True
) -> ExperimentConfig:
    """Build and validate a config from the YAML text :func:`config_to_yaml` wrote, e.g. the
    copy a model file carries; ``source`` names where the text came from in errors.

    >>> config_from_yaml_text(config_to_yaml(ExperimentConfig()), "a test") == ExperimentConfig()
    True

    :raises ConfigError: the text is not a mapping of sections, or a key or value is invalid.
    """
    try:
        layer = OmegaConf.create(text)
    except Exception as exc:  # yaml.YAMLError and friends: say where the text came from
        raise ConfigError(f"the config in {source} is not valid YAML: {exc}") from None
    if not isinstance(layer, DictConfig) or not layer:
        raise ConfigError(f"the config in {source} is empty or not a mapping of sections")
    merged: DictConfig = OmegaConf.structured(ExperimentConfig)
    with _omegaconf_errors(source, layer):
        merged = OmegaConf.merge(merged, layer)  # type: ignore[assignment]
    for key, value in parse_overrides(overrides):
        with _omegaconf_errors("the command line", {key: value}):
            OmegaConf.update(merged, key, value, merge=True)
    return to_dataclass(merged, check_env_id=check_env_id)


def to_dataclass(config: DictConfig, *, check_env_id: bool = True) -> ExperimentConfig:
    """Convert a merged structured config to :class:`ExperimentConfig` and validate it."""
    try:
        result = OmegaConf.to_object(config)
    except OmegaConfBaseException as exc:  # e.g. a mandatory value left missing
        raise ConfigError(f"{exc.full_key}: {exc.msg.splitlines()[0]}") from None
    except (ValueError, TypeError) as exc:  # the __post_init__ checks of ThalamusConfig
        raise ConfigError(str(exc).replace("ThalamusConfig.", "thalamus.")) from None
    assert isinstance(result, ExperimentConfig)
    validate_config(result, check_env_id=check_env_id)
    return result


def _load_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found") from None
    except Exception as exc:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, not a list")
    return data


@contextlib.contextmanager
def _omegaconf_errors(source: str, layer: Any) -> Iterator[None]:
    """Turn OmegaConf's merge errors into a ConfigError naming the key, value and source."""
    try:
        yield
    except (ConfigKeyError, ConfigAttributeError) as exc:
        raise ConfigError(_unknown_key_message(exc.full_key or str(exc.key), source)) from None
    except ValidationError as exc:
        full_key = _normalise_key(exc.full_key or str(exc.key))
        first_line = exc.msg.splitlines()[0]
        if not first_line.startswith("Value '"):  # e.g. a list index out of range
            raise ConfigError(f"{full_key} (from {source}): {first_line}") from None
        value = _select(layer, full_key)
        raise ConfigError(
            f"{full_key} = {value!r} (from {source}) has the wrong type: expected "
            f"{_type_name(_field_at(full_key))}"
        ) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key} (from {source}): {exc.msg.splitlines()[0]}") from None
    except TypeError as exc:  # e.g. a mapping given where the schema has a list
        raise ConfigError(f"{source}: {exc}") from None


def _normalise_key(full_key: str) -> str:
    """``thalamus.streams[0].foo`` -> ``thalamus.streams.0.foo`` (the override syntax)."""
    return re.sub(r"\[(\d+)\]", r".\1", full_key)


def _select(layer: Any, full_key: str) -> Any:
    """The value a layer gives ``full_key`` (a flat override or a nested mapping)."""
    if isinstance(layer, dict) and full_key in layer:
        return layer[full_key]
    return OmegaConf.select(OmegaConf.create(layer), full_key, default=None)


def _unknown_key_message(full_key: str, source: str) -> str:
    full_key = _normalise_key(full_key)
    parent_key, _, leaf = full_key.rpartition(".")
    valid = _keys_at(parent_key)
    where = f"in '{parent_key}'" if parent_key else "at the top level (sections)"
    message = f"unknown key '{full_key}' (from {source})."
    close = difflib.get_close_matches(leaf, valid, n=1)
    if close:
        suggestion = f"{parent_key}.{close[0]}" if parent_key else close[0]
        message += f" Did you mean '{suggestion}'?"
    return f"{message} Valid keys {where}: {', '.join(valid)}"


def _schema_at(dotted: str) -> Any:
    """The schema type at a dotted path ('' is ExperimentConfig; digits index into lists)."""
    cls: Any = ExperimentConfig
    for part in filter(None, dotted.split(".")):
        if part.isdigit() and typing.get_origin(cls) is list:
            cls = typing.get_args(cls)[0]
        elif dataclasses.is_dataclass(cls):
            cls = typing.get_type_hints(cls).get(part)
        else:
            return None
    return cls


def _keys_at(dotted: str) -> list[str]:
    cls = _schema_at(dotted)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls)]


def _field_at(full_key: str) -> Any:
    return _schema_at(full_key)


def _type_name(annotation: Any) -> str:
    if annotation is None:
        return "a value of the documented type"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def validate_config(config: ExperimentConfig, *, check_env_id: bool = True) -> None:
    """Check ranges, choices and cross-field rules of a config built from the schema.

    Types are already enforced by OmegaConf while merging; this checks the bounds and
    choices declared with each field, the device, the env id, and that the settings fit
    together (e.g. a minibatch no larger than a rollout).

    :raises ConfigError: naming the key, the value and the valid range or choices.
    """
    _validate_fields(config, prefix="")
    _validate_device(config.train.device)
    rollout = config.ppo.n_steps * config.env.n_envs
    if config.ppo.batch_size > rollout:
        raise ConfigError(
            f"ppo.batch_size = {config.ppo.batch_size} is larger than one rollout "
            f"(ppo.n_steps * env.n_envs = {config.ppo.n_steps} * {config.env.n_envs} = "
            f"{rollout}); lower ppo.batch_size or raise ppo.n_steps / env.n_envs"
        )
    if config.train.video and config.train.eval_freq == 0:
        raise ConfigError(
            "train.video = true records one episode at each evaluation, but train.eval_freq = 0 "
            "turns evaluation off; set train.eval_freq > 0 or train.video = false"
        )
    agent_spec = spec(config.agent.kind)
    per_rollout = (
        "thalamus_ppo" in agent_spec.algorithm_sections
        and config.thalamus_ppo.advantage_normalization == "rollout"
    )
    if config.ppo.normalize_advantage and config.ppo.batch_size < 2 and not per_rollout:
        raise ConfigError(
            f"ppo.batch_size = {config.ppo.batch_size} must be >= 2 with "
            "ppo.normalize_advantage = true (advantages are normalised per minibatch)"
        )
    if agent_spec.env_column_minibatches:
        try:
            check_batch_size(config.ppo.batch_size, config.ppo.n_steps, config.env.n_envs)
        except ValueError as exc:
            raise ConfigError(f"ppo.batch_size / ppo.n_steps / env.n_envs: {exc}") from None
    if "thalamus_ppo" in agent_spec.algorithm_sections and config.thalamus_ppo.aux_past_view_coef:
        try:
            check_lags(config.thalamus_ppo.aux_past_view_lags, config.ppo.n_steps)
        except ValueError as exc:
            raise ConfigError(f"thalamus_ppo.{exc}") from None
    if config.exploration.mixing == "value_head" and config.exploration.kind == "none":
        raise ConfigError(
            "exploration.mixing = 'value_head' learns an intrinsic reward, but exploration.kind "
            "= 'none' gives none; set exploration.kind (e.g. episodic_first_visit) or "
            "exploration.mixing = reward"
        )
    if check_env_id:
        _validate_env_id(config.env.id)


def inert_settings(config: ExperimentConfig, start_timesteps: int = 0) -> list[str]:
    """Settings of ``config`` that will have no effect in a run from ``start_timesteps`` to
    ``train.total_timesteps``, each as a sentence saying what to change.

    An evaluation runs when the step count crosses a multiple of ``train.eval_freq``.

    >>> inert_settings(load_config(None, ["train.total_timesteps=50000"]))
    []
    >>> [w[:60] for w in inert_settings(load_config(None, ["train.total_timesteps=2048"]))]
    ['no evaluation falls inside this run: train.eval_freq = 25,00']
    """
    train = config.train
    found = []
    if train.eval_freq > 0 and train.total_timesteps // train.eval_freq == (
        start_timesteps // train.eval_freq
    ):
        nothing = "no eval/* curves and no best_model.zip"
        if train.video:
            nothing += ", and train.video = true records no video"
        found.append(
            f"no evaluation falls inside this run: train.eval_freq = {train.eval_freq:,} but "
            f"it trains from step {start_timesteps:,} to {train.total_timesteps:,}, so there "
            f"will be {nothing}; set train.eval_freq <= {train.total_timesteps - start_timesteps:,}"
            " to evaluate"
        )
    ppo = config.ppo
    if ppo.ent_decay_steps > 0 and ppo.ent_coef == 0:
        found.append(
            f"ppo.ent_decay_steps = {ppo.ent_decay_steps:,} decays ppo.ent_coef, and it is 0: "
            "the run trains without an entropy bonus throughout; set ppo.ent_coef > 0 (e.g. "
            "0.01) to decay it, or ppo.ent_decay_steps=0"
        )
    exploration = config.exploration
    if exploration.mixing == "reward":
        changed = [
            f"exploration.{key} = {getattr(exploration, key)}"
            for key, default in INTRINSIC_DEFAULTS.items()
            if getattr(exploration, key) != default
        ]
        if changed:
            found.append(
                f"{' and '.join(changed)} only apply with exploration.mixing = value_head, and "
                "it is reward; set exploration.mixing=value_head to use them"
            )
    return found


def _validate_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_fields(value, prefix=f"{key}.")
            continue
        meta = f.metadata
        if not meta or value is None:
            continue
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{key} = {value!r} is not a valid choice; choose one of: "
                + ", ".join(str(c) for c in choices)
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r} must be a finite number")
        if not all(op(value, meta[name]) for name, _, op in _BOUNDS if meta.get(name) is not None):
            raise ConfigError(f"{key} = {value!r} is out of range: must be {_limits(meta)}")


_BOUNDS = (
    ("ge", ">=", operator.ge),
    ("gt", ">", operator.gt),
    ("le", "<=", operator.le),
    ("lt", "<", operator.lt),
)


def _limits(meta: Any) -> str:
    """``'>= 0.0 and <= 1.0'`` from a field's bounds metadata."""
    return " and ".join(
        f"{sym} {meta[name]}" for name, sym, _ in _BOUNDS if meta.get(name) is not None
    )


def _validate_device(device: str) -> None:
    if device in ("auto", "cpu"):  # always valid: no torch import (--print-config stays fast)
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"train.device = {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device = {device!r} but no CUDA device is available; use cpu or auto"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device = {device!r} but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device = {device!r} but MPS is not available; use cpu or auto")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"train.device = {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps"
        )


def _validate_env_id(env_id: str) -> None:
    from envs.registry import check_env_id

    try:
        check_env_id(env_id)
    except ValueError as exc:
        raise ConfigError(f"env.id = {env_id!r}: {exc}") from None


# --------------------------------------------------------------------------------------
# Saving and documenting
# --------------------------------------------------------------------------------------


def config_to_yaml(config: ExperimentConfig) -> str:
    """The resolved config as YAML, loadable again with :func:`load_config`.

    >>> "kind: thalamus" in config_to_yaml(ExperimentConfig())
    True
    """
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: ExperimentConfig, path: str | os.PathLike[str]) -> None:
    """Write :func:`config_to_yaml` to ``path`` atomically (temp file + rename)."""
    from agents.experiment.io import atomic_write_text

    atomic_write_text(path, config_to_yaml(config))


def config_reference(base: ExperimentConfig | None = None) -> list[tuple[str, str, str, str]]:
    """One row per config key: ``(key, type, default, help with valid range)``.

    This is the table ``--help-config`` prints and the README's config reference
    (:func:`config_reference_markdown`). List items (``thalamus.streams``) get one row per
    field, with each item's default joined by ``/``.

    :param base: where the defaults come from; ``None``: the schema with
        ``configs/defaults.yaml`` over it, what every run starts from before its per-env file.

    >>> rows = {key: rest for key, *rest in config_reference()}
    >>> rows["ppo.n_steps"]
    ['int', '128', 'Rollout length per env between updates. (>= 1)']
    >>> rows["thalamus.streams.<i>.name"][:2]
    ['str', 'visual / semantic']
    """
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: Any, defaults: list[Any], prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        param_docs = _param_docs(cls)
        for f in dataclasses.fields(cls):
            key, annotation = f"{prefix}{f.name}", hints[f.name]
            values = [getattr(d, f.name) for d in defaults]
            if dataclasses.is_dataclass(annotation):
                walk(annotation, values, f"{key}.")
                continue
            help_text = f.metadata.get("help") or param_docs.get(f.name, "")
            limits = [_limits(f.metadata)] if _limits(f.metadata) else []
            if f.metadata.get("choices"):
                limits.append("one of " + ", ".join(str(c) for c in f.metadata["choices"]))
            if limits:
                help_text = f"{help_text} ({'; '.join(limits)})".strip()
            list_of = (
                typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
            )
            if list_of is not None and dataclasses.is_dataclass(list_of):
                names = [str(getattr(v, "name", i)) for i, v in enumerate(values[0])]
                rows.append((key, f"list[{list_of.__name__}]", ", ".join(names), help_text))
                walk(list_of, list(values[0]), f"{key}.<i>.")
                continue
            shown = " / ".join(dict.fromkeys(_format_default(v) for v in values))
            rows.append((key, _type_name(annotation), shown, help_text))

    if base is None:
        base = load_config(None, check_env_id=False)
    walk(ExperimentConfig, [base], "")
    return rows


def config_reference_markdown() -> str:
    """:func:`config_reference` as the README's Markdown table (docstring markup made plain)."""

    def plain(text: str) -> str:
        text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", text)  # :func:`~a.b.f` -> `f`
        return text.replace("``", "`").replace("|", "\\|")

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, help_text in config_reference():
        lines.append(f"| `{key}` | {plain(type_name)} | {plain(default)} | {plain(help_text)} |")
    return "\n".join(lines)


def _param_docs(cls: Any) -> dict[str, str]:
    """``{name: text}`` from the ``:param name: text`` lines of a class docstring."""
    docs: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"\s*:param (\w+):\s*(.*)", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None and line.strip() and not line.strip().startswith(":"):
            docs[current] += " " + line.strip()
        else:
            current = None
    return docs


def _format_default(value: Any) -> str:
    if value is None:
        return "null"
    return str(value)
