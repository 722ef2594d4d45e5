"""thalamus_rl: the thalamus' neural modules (pure PyTorch, env-agnostic).

The package never imports gymnasium or stable-baselines3, and never imports mamba-ssm at
import time: its CUDA kernels are loaded lazily by ``Mamba2Block`` when asked for. Its names
are imported on first use (PEP 562), so ``from thalamus_rl.config import ThalamusConfig``
does not import torch: ``scripts/train_agent.py --help-config`` reads the config schema
without the seconds torch takes to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thalamus_rl.config import StreamConfig, ThalamusConfig, default_streams
    from thalamus_rl.core import StreamReadout, ThalamusCore, ThalamusOutput
    from thalamus_rl.distributed import DistributedMamba, MambaStream
    from thalamus_rl.feedback import FeedbackLayer, FeedbackModulation
    from thalamus_rl.gate import GateOutput, PhaseGate
    from thalamus_rl.mamba2 import Mamba2Block, Mamba2State, kernels_available
    from thalamus_rl.state import ThalamusState
    from thalamus_rl.workspace import PhaseWorkspace

# Each public name and the submodule that defines it.
_SOURCES = {
    "DistributedMamba": "distributed",
    "FeedbackLayer": "feedback",
    "FeedbackModulation": "feedback",
    "GateOutput": "gate",
    "Mamba2Block": "mamba2",
    "Mamba2State": "mamba2",
    "MambaStream": "distributed",
    "PhaseGate": "gate",
    "PhaseWorkspace": "workspace",
    "StreamConfig": "config",
    "StreamReadout": "core",
    "ThalamusConfig": "config",
    "ThalamusCore": "core",
    "ThalamusOutput": "core",
    "ThalamusState": "state",
    "default_streams": "config",
    "kernels_available": "mamba2",
}

__all__ = [
    "DistributedMamba",
    "FeedbackLayer",
    "FeedbackModulation",
    "GateOutput",
    "Mamba2Block",
    "Mamba2State",
    "MambaStream",
    "PhaseGate",
    "PhaseWorkspace",
    "StreamConfig",
    "StreamReadout",
    "ThalamusConfig",
    "ThalamusCore",
    "ThalamusOutput",
    "ThalamusState",
    "default_streams",
    "kernels_available",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
