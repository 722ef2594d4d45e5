"""Gymnasium side of thalamus_rl: MiniGrid/BabyAI observations for the thalamus.

``make_env`` / ``make_vec_env`` build envs whose observation is a ``gymnasium.spaces.Dict`` with
the same keys for every env id (see :func:`envs.factory.make_env`); the mission is encoded with
the versioned vocabulary in ``envs/vocab.json`` (:data:`MISSION_VOCAB_SIZE` ids, padded to
:data:`MAX_MISSION_LEN`).
"""

from __future__ import annotations

from envs.factory import VEC_ENV_KINDS, make_env, make_vec_env
from envs.registry import check_env_id, minigrid_env_ids
from envs.vocab import (
    PAD_ID,
    UNK_ID,
    MissionVocabulary,
    default_vocabulary,
    tokenize,
)
from envs.wrappers import (
    IMAGE_CHANNEL_HIGH,
    MissionObservationWrapper,
    QuietLevelSamplingWrapper,
    RewardFeedbackWrapper,
    TrialWrapper,
    declare_feedback_keys,
    feedback_keys,
)

__all__ = [
    "IMAGE_CHANNEL_HIGH",
    "MAX_MISSION_LEN",
    "MISSION_VOCAB_SIZE",
    "PAD_ID",
    "UNK_ID",
    "VEC_ENV_KINDS",
    "MissionObservationWrapper",
    "MissionVocabulary",
    "QuietLevelSamplingWrapper",
    "RewardFeedbackWrapper",
    "TrialWrapper",
    "check_env_id",
    "declare_feedback_keys",
    "default_vocabulary",
    "feedback_keys",
    "make_env",
    "make_vec_env",
    "minigrid_env_ids",
    "tokenize",
]


def __getattr__(name: str) -> int:
    # MISSION_VOCAB_SIZE and MAX_MISSION_LEN come from vocab.json, read on first use (PEP 562).
    if name in ("MISSION_VOCAB_SIZE", "MAX_MISSION_LEN"):
        from envs import vocab

        return getattr(vocab, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
