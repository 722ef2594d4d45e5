"""The agent kinds: one :class:`AgentSpec` per kind, and nothing else switches on a kind's name.

A spec says what the experiment layer needs to know about a kind: its algorithm class, the
config sections only it reads, how its policy arguments come from a config, whether it is
recurrent, how to play it one step at a time, and what the video and the diagnoses can show
of it. The classes and functions a spec names are imported on first use (``"module:name"``),
so that this module, and the config schema that reads :data:`AGENT_KINDS` from it, load
without torch or stable-baselines3.

Adding a kind is one module (its builder, its policy arguments, and a stepper if
:class:`agents.stepping.PredictStepper` does not fit) and one :func:`register` call below;
``docs/contributing.md`` walks through it.

>>> spec("lstm").recurrent, spec("lstm").config_sections
(True, ('lstm', 'baseline'))
>>> AGENT_KINDS
('thalamus', 'ppo', 'lstm')
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["AGENT_KINDS", "AGENT_SPECS", "AgentSpec", "register", "spec", "spec_of_model"]


def _resolve(target: str) -> Any:
    """The object ``"package.module:name"`` names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class AgentSpec:
    """What the rest of the project knows about one agent kind.

    :ivar kind: the name in configs and on the command line (``agent.kind``).
    :ivar description: one line for ``--help-config``.
    :ivar algorithm: ``"module:Class"`` of the SB3 algorithm (what ``load`` is called on).
    :ivar build: ``"module:function"``; ``function(env, *, seed, device, policy_kwargs,
        **hyperparams) -> BaseAlgorithm`` builds an untrained agent
        (:func:`agents.factory.make_agent` calls it).
    :ivar policy_kwargs: ``"module:function"``; ``function(config) -> dict`` turns an
        :class:`~agents.experiment.config.ExperimentConfig` into the agent's ``policy_kwargs``.
    :ivar stepper: ``"module:Class"``; ``Class(model)`` plays the agent one step at a time
        (:class:`agents.stepping.Stepper`: its recurrent state starts at zero, each step gets
        its episode-start flag).
    :ivar config_sections: config sections that this kind reads and some others do not
        (every other section is shared by all kinds); sections only other kinds list are
        ignored by it.
    :ivar algorithm_sections: of those, the sections passed to the algorithm's constructor
        beside the shared ``ppo`` section.
    :ivar recurrent: the policy keeps a state across steps.
    :ivar env_column_minibatches: a minibatch is a set of whole env columns, so
        ``ppo.batch_size`` must be a multiple of ``ppo.n_steps``.
    :ivar shows_gate: its steps carry a thalamus output: the video's overlay marks the
        selected cells, and the slot report and the selection test apply.
    """

    kind: str
    description: str
    algorithm: str
    build: str
    policy_kwargs: str
    stepper: str
    config_sections: tuple[str, ...] = ()
    algorithm_sections: tuple[str, ...] = ()
    recurrent: bool = False
    env_column_minibatches: bool = False
    shows_gate: bool = False

    def algorithm_class(self) -> type:
        """The SB3 algorithm class (imports it)."""
        return _resolve(self.algorithm)

    def build_function(self) -> Callable[..., Any]:
        """The builder :attr:`build` names (imports it)."""
        return _resolve(self.build)

    def policy_kwargs_from_config(self, config: Any) -> dict[str, Any]:
        """``policy_kwargs`` of this kind for ``config`` (an ``ExperimentConfig``)."""
        return _resolve(self.policy_kwargs)(config)

    def make_stepper(self, model: Any) -> Any:
        """A fresh :class:`agents.stepping.Stepper` playing ``model``."""
        return _resolve(self.stepper)(model)


#: Every registered kind, in registration order (the order of ``--help-config``'s choices).
AGENT_SPECS: dict[str, AgentSpec] = {}


def register(agent_spec: AgentSpec) -> AgentSpec:
    """Add ``agent_spec`` to :data:`AGENT_SPECS`.

    :raises ValueError: a kind of that name is already registered.
    """
    if agent_spec.kind in AGENT_SPECS:
        raise ValueError(f"agent kind {agent_spec.kind!r} is already registered")
    AGENT_SPECS[agent_spec.kind] = agent_spec
    return agent_spec


def spec(kind: str) -> AgentSpec:
    """The spec of ``kind``.

    :raises ValueError: no such kind (the message lists the registered ones).
    """
    try:
        return AGENT_SPECS[kind]
    except KeyError:
        raise ValueError(
            f"Unknown agent kind {kind!r}; choose one of {list(AGENT_SPECS)}."
        ) from None


def spec_of_model(model: Any) -> AgentSpec:
    """The spec whose algorithm class ``model`` is an instance of (the most derived match:
    ``ThalamusPPO`` before SB3's ``PPO``, which it extends).

    :raises ValueError: ``model`` is of no registered kind.
    """
    matches = [s for s in AGENT_SPECS.values() if isinstance(model, s.algorithm_class())]
    if not matches:
        raise ValueError(
            f"{type(model).__name__} is not the algorithm of any agent kind "
            f"({', '.join(AGENT_SPECS)}); register its kind in agents/registry.py"
        )
    return max(matches, key=lambda s: len(s.algorithm_class().__mro__))


register(
    AgentSpec(
        kind="thalamus",
        description="ThalamusPPO (the thalamus policy)",
        algorithm="agents.ppo:ThalamusPPO",
        build="agents.thalamus_agent:build",
        policy_kwargs="agents.thalamus_agent:policy_kwargs",
        stepper="agents.stepping:ThalamusStepper",
        config_sections=("thalamus", "tokenizer", "policy", "thalamus_ppo"),
        algorithm_sections=("thalamus_ppo",),
        recurrent=True,
        env_column_minibatches=True,
        shows_gate=True,
    )
)
register(
    AgentSpec(
        kind="ppo",
        description="feed-forward PPO baseline",
        algorithm="stable_baselines3:PPO",
        build="agents.baselines:build_ppo",
        policy_kwargs="agents.baselines:policy_kwargs",
        stepper="agents.stepping:FeedForwardStepper",
        config_sections=("baseline",),
    )
)
register(
    AgentSpec(
        kind="lstm",
        description="sb3-contrib RecurrentPPO baseline",
        algorithm="sb3_contrib:RecurrentPPO",
        build="agents.baselines:build_lstm",
        policy_kwargs="agents.baselines:policy_kwargs",
        stepper="agents.stepping:RecurrentStepper",
        config_sections=("lstm", "baseline"),
        recurrent=True,
    )
)

#: The registered kinds' names.
AGENT_KINDS: tuple[str, ...] = tuple(AGENT_SPECS)
