"""RL side: the observation tokenizer, the recurrent ThalamusPolicy, ThalamusPPO, baselines."""

from agents.buffer import ThalamusRolloutBuffer, ThalamusRolloutBufferSamples
from agents.factory import AGENT_KINDS, FlatDictExtractor, make_agent
from agents.policy import PolicyStep, SequenceEvaluation, ThalamusPolicy
from agents.ppo import ThalamusPPO
from agents.tokenizer import TokenizedObs, Tokenizer, TokenLayout

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
