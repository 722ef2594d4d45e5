"""thalamus_rl: the thalamus' neural modules (pure PyTorch, env-agnostic).

The package never imports gymnasium or stable-baselines3, and never imports mamba-ssm at
import time: its CUDA kernels are loaded lazily by ``Mamba2Block`` when asked for.
"""

from thalamus_rl.core import StreamReadout, ThalamusConfig, ThalamusCore, ThalamusOutput
from thalamus_rl.distributed import DistributedMamba, MambaStream, StreamConfig, default_streams
from thalamus_rl.feedback import FeedbackLayer, FeedbackModulation
from thalamus_rl.gate import GateOutput, PhaseGate
from thalamus_rl.mamba2 import Mamba2Block, Mamba2State, kernels_available
from thalamus_rl.state import ThalamusState
from thalamus_rl.workspace import PhaseWorkspace

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
