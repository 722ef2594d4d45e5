"""Config system: YAML layers, dotted overrides, validation errors, the shipped configs."""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path

import pytest

from agents.constants import AGENT_KINDS
from agents.experiment.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    DEFAULTS_FILE,
    ConfigError,
    ExperimentConfig,
    ExplorationConfig,
    config_reference,
    config_reference_markdown,
    config_to_yaml,
    find_config_for_env,
    load_config,
    parse_overrides,
    save_config,
)
from tests.helpers import TASKS_WITH_A_BONUS

PER_ENV_FILES = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p != DEFAULTS_FILE)
REQUIRED_ENVS = {
    "MiniGrid-DoorKey-5x5-v0",
    "MiniGrid-MemoryS7-v0",
    "MiniGrid-MemoryS11-v0",
    "MiniGrid-RedBlueDoors-6x6-v0",
    "MiniGrid-KeyCorridorS3R1-v0",
}


def test_shipped_configs_cover_the_required_envs_and_a_babyai_task() -> None:
    env_ids = {load_config(p).env.id for p in PER_ENV_FILES}
    assert env_ids >= REQUIRED_ENVS
    assert any(env_id.startswith("BabyAI-") for env_id in env_ids)


@pytest.mark.parametrize("path", PER_ENV_FILES, ids=lambda p: p.stem)
def test_every_per_env_file_validates_and_states_its_budget(path: Path) -> None:
    config = load_config(path)
    assert find_config_for_env(config.env.id) == path
    text = path.read_text()
    budget = re.search(r"^# Budget: ([\d.]+)([kM]) env steps", text, flags=re.MULTILINE)
    assert budget is not None, f"{path.name} must state its budget in a '# Budget:' comment"
    scale = {"k": 1_000, "M": 1_000_000}[budget.group(2)]
    assert config.train.total_timesteps == round(float(budget.group(1)) * scale)


@pytest.mark.parametrize("kind", AGENT_KINDS)
def test_only_the_tasks_with_evidence_default_to_the_first_visit_bonus(kind: str) -> None:
    """Issue 36: the evidence supports a per-task exploration default on KeyCorridorS3R1 and
    RedBlueDoors-6x6 only (docs/exploration.md, "Per-task defaults"); every other per-env file
    trains without one, and ``exploration.kind=none`` turns theirs off."""
    with_bonus = {find_config_for_env(env_id) for env_id in TASKS_WITH_A_BONUS}
    assert None not in with_bonus
    for path in PER_ENV_FILES:
        config = load_config(path, [f"agent.kind={kind}"])
        if path not in with_bonus:
            assert config.exploration == ExplorationConfig(), path.name
            continue
        assert (config.exploration.kind, config.exploration.coef) == ("episodic_first_visit", 0.01)
        assert config.exploration.mixing == "reward" and config.exploration.decay_steps == 0
        assert load_config(path, ["exploration.kind=none"]).exploration.kind == "none"


RECIPE_FILES = sorted((CONFIG_DIR / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_validates_for_its_agent_and_task(path: Path) -> None:
    """A recipe is ``<agent>_<task file>.yaml``: it sets that agent kind, trains that task
    file's env, and its header names how it was chosen (a sweep file that exists, or the
    candidates fixed in advance)."""
    config = load_config(path)
    agent, _, task_file = path.stem.partition("_")
    assert config.agent.kind == agent
    assert config.env.id == load_config(CONFIG_DIR / f"{task_file}.yaml").env.id
    header = path.read_text().split("\n\n", 1)[0]
    sweep = re.search(r"configs/sweeps/(\w+)\.yaml", header)
    if sweep is not None:
        assert (CONFIG_DIR / "sweeps" / f"{sweep.group(1)}.yaml").is_file()
        assert sweep.group(1) == path.stem
    else:
        assert "candidates" in header, f"{path.name}'s header must say how it was chosen"


def test_layers_merge_in_order_schema_defaults_file_overrides() -> None:
    schema = ExperimentConfig()
    config = load_config(DEFAULT_CONFIG, ["ppo.n_steps=64", "train.seed=7"])
    assert config.env.id == "MiniGrid-DoorKey-5x5-v0"  # from the per-env file
    assert config.ppo.n_steps == 64 and config.train.seed == 7  # overrides win
    assert config.lstm == schema.lstm  # untouched sections keep the schema defaults
    assert load_config(None).env.id == schema.env.id  # no per-env file: defaults.yaml only
    assert load_config(None, ["train.seed=1", "train.seed=2"]).train.seed == 2


def test_overrides_parse_yaml_values_and_reach_list_items_and_dicts() -> None:
    config = load_config(
        None,
        [
            "ppo.learning_rate=1e-3",
            "ppo.target_kl=0.02",
            "thalamus.streams.1.d_state=8",
            "env.env_kwargs.max_steps=50",
            "train.video=true",
        ],
    )
    assert config.ppo.learning_rate == pytest.approx(1e-3)
    assert config.ppo.target_kl == pytest.approx(0.02)
    assert [s.d_state for s in config.thalamus.streams] == [16, 8]
    assert config.env.env_kwargs == {"max_steps": 50}
    assert config.train.video is True
    assert parse_overrides(["ppo.target_kl=null"]) == [("ppo.target_kl", None)]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["ppo.n_step=64"], r"unknown key 'ppo\.n_step'.*Did you mean 'ppo\.n_steps'.*gamma"),
        (["ppo.lr=1e-3"], r"unknown key 'ppo\.lr'.*Valid keys in 'ppo': .*learning_rate"),
        (
            ["optim.lr=1"],
            r"unknown key 'optim'.*"
            r"env, agent, ppo, thalamus, tokenizer, policy, thalamus_ppo, lstm",
        ),
        (["thalamus.streams.0.size=3"], r"unknown key 'thalamus\.streams\.0\.size'.*d_state"),
        (["ppo.n_steps=abc"], r"ppo\.n_steps = 'abc'.*wrong type: expected int"),
        (["train.video=maybe"], r"train\.video = 'maybe'.*expected bool"),
        (["ppo.target_kl=high"], r"ppo\.target_kl = 'high'.*expected float or null"),
        (["ppo.gamma=1.5"], r"ppo\.gamma = 1\.5 is out of range: must be >= 0\.0 and <= 1\.0"),
        (["env.n_envs=0"], r"env\.n_envs = 0 is out of range: must be >= 1"),
        (["ppo.learning_rate=0"], r"ppo\.learning_rate = 0\.0 is out of range: must be > 0\.0"),
        (["ppo.learning_rate=nan"], r"ppo\.learning_rate = nan must be a finite number"),
        (["agent.kind=rnn"], r"agent\.kind = 'rnn' is not a valid choice.*thalamus, ppo, lstm"),
        (["env.vec_env=ray"], r"env\.vec_env = 'ray'.*dummy, subproc"),
        (
            ["policy.critic_trunk=own"],
            r"policy\.critic_trunk = 'own' is not a valid choice.*shared, separate, detached",
        ),
        (["thalamus.top_k=0"], r"thalamus\.top_k must be a positive int, got 0"),
        (["thalamus.d_model=30"], r"thalamus\.d_model=30 must be divisible by n_heads=4"),
        (["train.device=tpu"], r"train\.device = 'tpu'"),
        (["thalamus.streams.1.clock=0"], r"thalamus\.streams\.1\.clock must be an int >= 1"),
        (["thalamus.streams.0.kind=lstm"], r"thalamus\.streams\.0\.kind='lstm'.*mamba, episodic"),
        (["ppo.batch_size=4096"], r"ppo\.batch_size = 4096 is larger than one rollout"),
        (["ppo.batch_size=200"], r"ppo\.batch_size.*multiple of n_steps=128"),
        (["ppo.n_steps"], r"override 'ppo\.n_steps' must look like key=value"),
        (["train.video=true", "train.eval_freq=0"], r"train\.video = true.*train\.eval_freq = 0"),
    ],
)
def test_bad_values_are_rejected_naming_key_value_and_choices(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(DEFAULT_CONFIG, overrides)


def test_unknown_env_id_suggests_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"env\.id = 'MiniGrid-DoorKey-5x6-v0'.*DoorKey-5x5"):
        load_config(DEFAULT_CONFIG, ["env.id=MiniGrid-DoorKey-5x6-v0"])


def test_errors_in_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  n_step: 64\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'ppo\.n_step' \(from file {bad}\)"):
        load_config(bad)
    bad.write_text("train:\n  seed: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"train\.seed"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"config file 'nope' not found.*doorkey_5x5"):
        load_config("nope")


THREE_STREAMS_YAML = """\
thalamus:
  streams:
    - {name: visual}
    - {name: semantic, dt_min: 0.005, dt_max: 0.05, A_init_min: 0.5, A_init_max: 1.0, clock: 4}
    - {name: episodic, kind: episodic, capacity: 64}
"""


def test_clocked_and_episodic_streams_are_selected_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "three.yaml"
    path.write_text(THREE_STREAMS_YAML)
    config = load_config(path, ["thalamus.streams.2.capacity=32"])
    streams = config.thalamus.streams
    assert [(s.name, s.kind, s.clock, s.capacity) for s in streams] == [
        ("visual", "mamba", 1, 64),
        ("semantic", "mamba", 4, 64),
        ("episodic", "episodic", 1, 32),
    ]
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", defaults_file=None) == config
    # The defaults keep their meaning: clock 1 and no episodic stream.
    assert all(s.kind == "mamba" and s.clock == 1 for s in load_config(None).thalamus.streams)


def test_saved_config_loads_back_identically(tmp_path: Path) -> None:
    config = load_config(DEFAULT_CONFIG, ["thalamus.top_k=8", "env.env_kwargs.max_steps=40"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", defaults_file=None) == config
    assert (tmp_path / "config.yaml").read_text() == config_to_yaml(config)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_reference_lists_every_key_once_and_the_readme_documents_them() -> None:
    rows = config_reference()
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys))
    for key in ("env.id", "ppo.clip_range", "thalamus.top_k", "lstm.n_lstm_layers", "train.seed"):
        assert key in keys
    readme = (CONFIG_DIR.parent / "README.md").read_text()
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert not missing, f"README's config reference lacks {missing}"
    table = config_reference_markdown()
    assert table in readme, "README's config reference is stale: paste config_reference_markdown()"


def test_reference_defaults_are_those_of_the_defaults_file() -> None:
    rows = {key: default for key, _, default, _ in config_reference()}
    defaults = load_config(None)
    assert rows["ppo.learning_rate"] == str(defaults.ppo.learning_rate)
    assert rows["ppo.n_epochs"] == str(defaults.ppo.n_epochs)
    schema = {key: default for key, _, default, _ in config_reference(ExperimentConfig())}
    assert schema["ppo.n_epochs"] == str(ExperimentConfig().ppo.n_epochs)


@pytest.mark.parametrize("kind", ["thalamus", "ppo", "lstm"])
def test_build_agent_reads_exactly_the_sections_the_mapping_gives(kind, monkeypatch) -> None:
    """AGENT_ONLY_SECTIONS (what the stale-record check ignores) agrees with build_agent: a
    change in a section of another agent leaves the agent's arguments alone, a change in one
    of its own sections reaches them."""
    import agents
    from agents.experiment.config import AGENT_ONLY_SECTIONS, ExperimentConfig, sections_ignored_by
    from agents.experiment.training import build_agent

    calls = []

    def make_agent(*args: object, **kwargs: object) -> object:
        calls.append((args, kwargs))
        return types.SimpleNamespace()  # build_agent attaches the config to what it gets

    monkeypatch.setattr(agents, "make_agent", make_agent)

    def agent_args(section: str | None = None) -> tuple:
        config = ExperimentConfig()
        config.agent.kind = kind
        if section is not None:  # change the section's first setting
            part = getattr(config, section)
            name = dataclasses.fields(part)[0].name
            value = getattr(part, name)
            setattr(
                part, name, 5 if value is None else value + ("x" if isinstance(value, str) else 1)
            )
        build_agent(config, env=None)
        return calls[-1]

    base = agent_args()
    for section in sections_ignored_by(kind):
        assert agent_args(section) == base, f"{kind} reads {section}"
    for section in AGENT_ONLY_SECTIONS[kind]:
        assert agent_args(section) != base, f"{kind} ignores {section}"


def test_agent_only_sections_name_agent_kinds_and_config_sections() -> None:
    from agents.experiment.config import AGENT_ONLY_SECTIONS, ExperimentConfig, sections_ignored_by
    from agents.registry import AGENT_KINDS

    assert set(AGENT_ONLY_SECTIONS) == set(AGENT_KINDS)
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    owned = {s for sections in AGENT_ONLY_SECTIONS.values() for s in sections}
    assert owned <= fields
    assert all(len(sections) == len(set(sections)) for sections in AGENT_ONLY_SECTIONS.values())
    assert sections_ignored_by("ppo") == {"thalamus", "tokenizer", "policy", "thalamus_ppo", "lstm"}
    assert sections_ignored_by("lstm") == {"thalamus", "tokenizer", "policy", "thalamus_ppo"}
    # a section two kinds read (the baselines' baseline.*) is ignored by neither of them
    assert sections_ignored_by("thalamus") == {"lstm", "baseline"}


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["agent.kind=ppo"], True),
        (["agent.kind=thalamus", "thalamus_ppo.advantage_normalization=minibatch"], True),
        (["agent.kind=thalamus"], False),  # one mean and scale per rollout: any batch size
    ],
)
def test_single_sample_minibatches_are_refused_only_where_normalised_per_minibatch(
    overrides: list[str], refused: bool
) -> None:
    tiny = ["ppo.n_steps=1", "ppo.batch_size=1", "env.n_envs=1", *overrides]
    if refused:
        with pytest.raises(ConfigError, match="normalised per minibatch"):
            load_config(None, tiny)
    else:
        assert load_config(None, tiny).ppo.batch_size == 1


def test_the_agent_kinds_the_config_lists_are_the_registered_ones() -> None:
    """``agents.constants.AGENT_KINDS`` (read by the config without torch) is the registry's."""
    from agents.constants import AGENT_KINDS
    from agents.registry import AGENT_SPECS

    assert tuple(AGENT_SPECS) == AGENT_KINDS
    assert ExperimentConfig.__dataclass_fields__  # the schema loaded with them


def test_the_ppo_defaults_have_one_source() -> None:
    """They lived in three places that disagreed (ThalamusPPO: 4 epochs at 3e-4, the schema:
    the same, configs/defaults.yaml: 10 epochs at 1e-3, which every run got). Now
    ``agents.constants.PPO_DEFAULTS`` is the source and the others agree with it."""
    import inspect

    import yaml

    from agents.constants import PPO_DEFAULTS, PPO_SCHEDULE_DEFAULTS, THALAMUS_PPO_DEFAULTS
    from agents.ppo import ThalamusPPO

    schema = ExperimentConfig()
    assert dataclasses.asdict(schema.ppo) == {**PPO_DEFAULTS, **PPO_SCHEDULE_DEFAULTS}
    assert dataclasses.asdict(schema.thalamus_ppo) == THALAMUS_PPO_DEFAULTS
    constructor = inspect.signature(ThalamusPPO).parameters
    for key, value in {**PPO_DEFAULTS, **THALAMUS_PPO_DEFAULTS}.items():
        assert constructor[key].default == value, key
    shared = yaml.safe_load(DEFAULTS_FILE.read_text())
    for section in ("ppo", "thalamus_ppo"):
        for key, value in (shared.get(section) or {}).items():
            assert value == getattr(getattr(schema, section), key), f"{section}.{key}"
    # Every run still gets the values the defaults file gave it.
    assert (load_config(None).ppo.n_epochs, load_config(None).ppo.learning_rate) == (10, 1e-3)
