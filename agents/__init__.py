"""RL side: the observation tokenizer, the recurrent ThalamusPolicy, ThalamusPPO, baselines.

Names are imported on first use (PEP 562): ``import agents.experiment.config`` (the config schema,
``scripts/train_agent.py --help-config``) then costs no torch or stable-baselines3 import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agents.buffer import ThalamusRolloutBuffer, ThalamusRolloutBufferSamples
    from agents.constants import AGENT_KINDS
    from agents.factory import FlatDictExtractor, make_agent
    from agents.policy import PolicyStep, SequenceEvaluation, ThalamusPolicy
    from agents.ppo import ThalamusPPO
    from agents.tokenizer import TokenizedObs, Tokenizer, TokenLayout

# Each public name and the submodule that defines it.
_SOURCES = {
    "AGENT_KINDS": "constants",
    "FlatDictExtractor": "factory",
    "PolicyStep": "policy",
    "SequenceEvaluation": "policy",
    "ThalamusPPO": "ppo",
    "ThalamusPolicy": "policy",
    "ThalamusRolloutBuffer": "buffer",
    "ThalamusRolloutBufferSamples": "buffer",
    "TokenLayout": "tokenizer",
    "TokenizedObs": "tokenizer",
    "Tokenizer": "tokenizer",
    "make_agent": "factory",
}

__all__ = [
    "AGENT_KINDS",
    "FlatDictExtractor",
    "PolicyStep",
    "SequenceEvaluation",
    "ThalamusPPO",
    "ThalamusPolicy",
    "ThalamusRolloutBuffer",
    "ThalamusRolloutBufferSamples",
    "TokenLayout",
    "TokenizedObs",
    "Tokenizer",
    "make_agent",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
